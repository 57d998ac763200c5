"""Python CPU per 1 MiB virtio-fs READ of RAFS in `FuseSession.handle_into` (no kernel, no QEMU).

The reply lands in a chain's writable buffers as the Linux guest driver lays them out for
`dd bs=1M iflag=direct`: a 16-byte out header, then 256 page-aligned, page-sized buffers (here
views of a memfd mapping, like a guest's RAM; unaligned buffers make the kernel's copy twice
as slow). Times are the thread's CPU time (time.thread_time), so other processes on the
cores do not inflate them. Modes, all with every chunk already at hand (the steady state of a
sequential read after the first pass):
* `memory`: no blob cache: decoded chunks in the in-memory chunk cache, copied into the buffers
  (the path of compressed chunks);
* `localfs preadv`: no blob cache (bench_virtiofs.py's config), chunks stored uncompressed:
  preadv from the localfs blob straight into the buffers (`LocalBlobDir.preadv_into`);
* `blobcache copy`: blob cache, chunks read from `<blob>.blob.data` and copied (the path before
  `BlobDevice.read_ready_into`);
* `blobcache preadv`: blob cache, preadv from the data file straight into the buffers.

python3 benchmarks/read_into_micro.py [--mib 32] [--reps 5] [--json out.json]
"""

import argparse
import contextlib
import json
import mmap
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.builder.build import build_image  # noqa: E402
from nydus_py.builder.options import BuildOptions  # noqa: E402
from nydus_py.builder.sources import tree_from_directory  # noqa: E402
from nydus_py.fs.rafs_fs import RafsFilesystem  # noqa: E402
from nydus_py.fuse.abi import Opcode  # noqa: E402
from nydus_py.fuse.api import Filesystem  # noqa: E402
from nydus_py.fuse.protocol import FuseSession  # noqa: E402
from nydus_py.rafs import open_bootstrap  # noqa: E402
from nydus_py.storage.cache.blobcache import BlobCacheManager  # noqa: E402
from nydus_py.storage.device import BlobDevice  # noqa: E402
from nydus_py.storage.localfs import LocalBlobDir  # noqa: E402
from nydus_py.vfs.vfs import Vfs  # noqa: E402

IN_HEADER = struct.Struct("<IIQQIIIHH")
INIT_IN = struct.Struct("<IIIII44x")
READ_IN = struct.Struct("<QQIIQII")
MIB = 1 << 20


def session(fs: Filesystem) -> FuseSession:
    vfs = Vfs()
    vfs.mount("/", fs)
    s = FuseSession(vfs)
    s.handle(IN_HEADER.pack(IN_HEADER.size + INIT_IN.size, Opcode.INIT, 2, 0, 0, 0, 1, 0, 0)
             + INIT_IN.pack(7, 45, MIB, 0x73FFFFFB | (1 << 30), 0x5FD))
    return s


def run(s: FuseSession, nodeid: int, mib: int, bufs: list[memoryview], passes: int) -> float:
    """CPU microseconds per READ over `passes` sequential passes of the file."""
    guard = contextlib.nullcontext()
    reqs = [IN_HEADER.pack(IN_HEADER.size + READ_IN.size, Opcode.READ, 10 + k, nodeid, 0, 0, 1, 0, 0)
            + READ_IN.pack(0, k * MIB, MIB, 0, 0, 0, 0) for k in range(mib)]
    t = time.thread_time()
    for _ in range(passes):
        for req in reqs:
            n = s.handle_into(req, bufs, guard, True)
            assert n == 16 + MIB, n
    return (time.thread_time() - t) / (passes * mib) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="read-into-micro-"))
    (tmp / "src").mkdir()
    data = random.Random(1).randbytes(args.mib * MIB)
    (tmp / "src" / "big.bin").write_bytes(data)
    build_image(tree_from_directory(str(tmp / "src")), str(tmp / "boot"), str(tmp / "blobs"), BuildOptions())
    memfd = os.memfd_create("guest-ram")
    os.ftruncate(memfd, 4096 + MIB)
    ram = mmap.mmap(memfd, 4096 + MIB)
    view = memoryview(ram)
    bufs = [view[:16]] + [view[4096 + p * 4096 : 4096 + (p + 1) * 4096] for p in range(MIB // 4096)]
    results: dict[str, dict[str, float]] = {}
    for mode in ("memory", "localfs preadv", "blobcache copy", "blobcache preadv"):
        image = open_bootstrap(str(tmp / "boot"))
        backend = LocalBlobDir(str(tmp / "blobs"))
        cache = BlobCacheManager(str(tmp / "cache"), backend) if mode.startswith("blobcache") else None
        device = BlobDevice(image, cache or backend, validate=False)
        if mode == "memory":
            device._raw_into = None  # the decoded-chunk copy, as for compressed chunks
        if mode == "blobcache copy":
            device._ready_into = None  # the path before read_ready_into
        fs = RafsFilesystem(image, device, readahead_chunks=0)
        nodeid = image.lookup(image.root_ino, b"big.bin")
        assert nodeid is not None
        assert device.read(nodeid, 0, args.mib * MIB) == data  # every chunk at hand from now on
        s = session(fs)
        per = sorted(run(s, nodeid, args.mib, bufs, args.passes) for _ in range(args.reps))
        assert bytes(view[4096:]) == data[-MIB:]
        results[mode] = {"cpu_us_per_read_best": per[0], "cpu_us_per_read_median": per[len(per) // 2],
                         "direct_reads": device.direct_reads}
        print(f"{mode:18s} CPU per 1 MiB READ: best {per[0]:7.1f} us  median {per[len(per) // 2]:7.1f} us  "
              f"(preadv answers {device.direct_reads})", flush=True)
        fs.close()
        if cache is not None:
            cache.close()
        image.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"mib": args.mib, "reps": args.reps, "passes": args.passes,
                                               "results": results}, indent=1))
    os.system(f"rm -rf {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
