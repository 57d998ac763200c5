"""Python CPU per 1 MiB virtio-fs READ, ring to ring: pop + descriptor walk + `handle_into` + used
ring (no kernel, no QEMU), for the RAFS share (bench_virtiofs.py's shape: localfs, no blob cache,
chunks stored as they are, so preadv from the blob into guest memory) and the passthrough share.

The chain is what a Linux 6.1 guest's `dd bs=1M iflag=direct` puts on the request queue, as
logged from the bench's TCG guest: one indirect table of 259 descriptors, the 40-byte in header
and read_in, the 16-byte out header, then 256 writable 4 KiB pages at scattered guest-physical
addresses (only 2 of the 256 adjacent to the previous one). `--contiguous` lays the pages out
back to back instead (a guest with huge pages). Times are the thread's CPU time
(time.thread_time), so other processes on the cores do not inflate them. `--profile` prints a
cProfile of the RAFS run.

python3 benchmarks/virtio_read_micro.py [--reads 400] [--contiguous] [--profile]
"""

import argparse
import cProfile
import mmap
import os
import pstats
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from read_into_micro import IN_HEADER, MIB, READ_IN, session  # noqa: E402

from nydus_py.builder.build import build_image  # noqa: E402
from nydus_py.builder.options import BuildOptions  # noqa: E402
from nydus_py.builder.sources import tree_from_directory  # noqa: E402
from nydus_py.fs.passthrough import PassthroughFilesystem  # noqa: E402
from nydus_py.fs.rafs_fs import RafsFilesystem  # noqa: E402
from nydus_py.fuse.abi import Opcode  # noqa: E402
from nydus_py.fuse.iovec import WouldBlock  # noqa: E402
from nydus_py.fuse.protocol import FuseSession  # noqa: E402
from nydus_py.rafs import open_bootstrap  # noqa: E402
from nydus_py.storage.device import BlobDevice  # noqa: E402
from nydus_py.storage.localfs import LocalBlobDir  # noqa: E402
from nydus_py.transport.vhost_user.inflight import InflightQueue  # noqa: E402
from nydus_py.transport.vhost_user.virtiofs import fuse_into_handler  # noqa: E402
from nydus_py.transport.vhost_user.virtqueue import GuestMemory, Region, Virtqueue  # noqa: E402

DESC = struct.Struct("<QIHH")
GPA, UVA, RAM = 0x4000_0000, 0x7F00_0000_0000, 32 << 20
NUM = 1024
RING_DESC, RING_AVAIL, RING_USED = 0x0, 0x4000, 0x8000
REQ, TABLE, PAGES = 0x10000, 0x20000, 0x100000


class GuestRing:
    """A guest's RAM (a memfd mapping) with one request queue and one READ chain in it."""

    def __init__(self, contiguous: bool) -> None:
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, RAM)
        self.ram = mmap.mmap(self.fd, RAM)
        self.mem = GuestMemory([Region(GPA, RAM, UVA, memoryview(self.ram))])
        self.vq = Virtqueue(self.mem, NUM, UVA + RING_DESC, UVA + RING_AVAIL, UVA + RING_USED, indirect=True,
                            event_idx=True)
        self.ring = InflightQueue(self.vq, lambda: None)
        pages = list(range(256))
        if not contiguous:
            random.Random(1).shuffle(pages)
        descs = [(GPA + REQ, 40, 0), (GPA + REQ + 64, 40, 0), (GPA + REQ + 128, 16, 2)]
        descs += [(GPA + PAGES + p * 4096, 4096, 2) for p in pages]
        for i, (addr, length, flags) in enumerate(descs):
            last = i == len(descs) - 1
            DESC.pack_into(self.ram, TABLE + 16 * i, addr, length, flags | (0 if last else 1), 0 if last else i + 1)
        DESC.pack_into(self.ram, RING_DESC, GPA + TABLE, 16 * len(descs), 4, 0)
        self.avail = 0

    def offer(self, nodeid: int, fh: int, unique: int, offset: int) -> None:
        self.ram[REQ : REQ + 40] = IN_HEADER.pack(80, Opcode.READ, unique, nodeid, 0, 0, 1, 0, 0)
        self.ram[REQ + 64 : REQ + 104] = READ_IN.pack(fh, offset, MIB, 0, 0, 0, 0)
        struct.pack_into("<H", self.ram, RING_AVAIL + 4 + 2 * (self.avail % NUM), 0)
        self.avail = (self.avail + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, RING_AVAIL + 2, self.avail)


def lookup_open(s: FuseSession, name: bytes) -> tuple[int, int]:
    """(nodeid, fh) of root/`name` through the session, as the guest gets them."""
    r = bytes(s.handle(IN_HEADER.pack(40 + len(name) + 1, Opcode.LOOKUP, 3, 1, 0, 0, 1, 0, 0) + name + b"\0"))
    nodeid = struct.unpack_from("<Q", r, 16)[0]
    r = bytes(s.handle(IN_HEADER.pack(48, Opcode.OPEN, 4, nodeid, 0, 0, 1, 0, 0) + struct.pack("<II", 0, 0)))
    err = struct.unpack_from("<i", r, 4)[0]
    assert err in (0, -38), r  # (RAFS has no OPEN: reads go with fh 0)
    return nodeid, 0 if err else struct.unpack_from("<Q", r, 16)[0]


def run(g: GuestRing, s: FuseSession, nodeid: int, fh: int, mib: int, reads: int) -> float:
    """CPU microseconds per READ: what the queue's dispatcher does for an inline READ."""
    handler = fuse_into_handler(s)
    ring = g.ring
    t = time.thread_time()
    for k in range(reads):
        g.offer(nodeid, fh, 100 + k, (k % mib) * MIB)
        chain = ring.pop()
        assert chain is not None
        try:
            n = handler(memoryview(chain.read_all()), chain, ring.guard(chain), True)
        except WouldBlock:  # (another process dropped the host's page cache: as the pool would)
            n = handler(memoryview(chain.read_all()), chain, ring.guard(chain), False)
        assert n == 16 + MIB, n
        ring.complete_written(chain, n)
        ring.arm()
    return (time.thread_time() - t) / reads * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--reads", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--contiguous", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="virtio-read-micro-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        data = random.Random(1).randbytes(args.mib * MIB)
        (src / "big.bin").write_bytes(data)
        build_image(tree_from_directory(str(src)), f"{tmp}/boot", f"{tmp}/blobs", BuildOptions())
        image = open_bootstrap(f"{tmp}/boot")
        device = BlobDevice(image, LocalBlobDir(f"{tmp}/blobs"), validate=False)
        rafs = RafsFilesystem(image, device, readahead_chunks=0)
        ino = image.lookup(image.root_ino, b"big.bin")
        assert ino is not None and device.read(ino, 0, args.mib * MIB) == data
        assert device.raw_direct  # (bench_virtiofs's image: chunks stored as they are, preadv from the blob)
        pt = PassthroughFilesystem(str(src), writable=False)
        g = GuestRing(args.contiguous)
        for name, fs in (("rafs localfs", rafs), ("passthrough", pt)):
            s = session(fs)
            nodeid, fh = lookup_open(s, b"big.bin")
            per = sorted(run(g, s, nodeid, fh, args.mib, args.reads) for _ in range(args.reps))
            print(f"{name:12s} CPU per 1 MiB READ, ring to ring: best {per[0]:6.1f} us  median "
                  f"{per[len(per) // 2]:6.1f} us", flush=True)
            if args.profile and name == "rafs localfs":
                prof = cProfile.Profile()
                prof.runcall(run, g, s, nodeid, fh, args.mib, args.reads)
                pstats.Stats(prof).sort_stats("tottime").print_stats(14)
        out = bytes(g.ram[PAGES : PAGES + 256 * 4096])
        assert len(out) == MIB
        rafs.close()
        pt.close()
        image.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
