"""Thread CPU per 1 MiB READ through the daemon's own stack, in one process: a DaemonService with
the image mounted at / as `nydusd-py virtiofs --bootstrap` does (WritableVfs, the metrics
observer, the metered localfs backend), READ chains of virtio_read_micro's shape popped from a
ring, answered by fuse_into_handler(svc.session) and completed; no kernel, no QEMU, no thread
wake-ups (those are in virtio_dd_micro.py). Any argument: also print a cProfile.

python3 benchmarks/virtio_daemon_stack_micro.py [profile]
"""

import cProfile
import json
import pstats
import random
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from virtio_read_micro import (  # noqa: E402
    IN_HEADER,
    MIB,
    BuildOptions,
    GuestRing,
    Opcode,
    build_image,
    run,
    tree_from_directory,
)

from nydus_py.config import parse_any  # noqa: E402
from nydus_py.daemon.instance import MountCmd  # noqa: E402
from nydus_py.daemon.service import DaemonOptions, DaemonService  # noqa: E402

READS = 1000
INIT_IN = struct.Struct("<IIIII44x")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="virtio-stack-micro-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "big.bin").write_bytes(random.Random(1).randbytes(16 * MIB))
        build_image(tree_from_directory(str(src)), f"{tmp}/boot", f"{tmp}/blobs", BuildOptions())
        svc = DaemonService(DaemonOptions(mode="virtiofs", mountpoint="", threads=1))
        svc.default_config = parse_any(json.dumps({"device": {"backend": {"type": "localfs",
                                                                          "config": {"dir": f"{tmp}/blobs"}}},
                                                   "mode": "direct"}))
        svc.mount("/", MountCmd("rafs", f"{tmp}/boot", ""))
        s = svc.session
        s.handle(IN_HEADER.pack(IN_HEADER.size + INIT_IN.size, Opcode.INIT, 2, 0, 0, 0, 1, 0, 0)
                 + INIT_IN.pack(7, 38, MIB, 0x73FFFFFB, 0))
        r = bytes(s.handle(IN_HEADER.pack(48, Opcode.LOOKUP, 3, 1, 0, 0, 1, 0, 0) + b"big.bin\0") or b"")
        nodeid = struct.unpack_from("<Q", r, 16)[0]
        g = GuestRing(False)
        per = sorted(run(g, s, nodeid, 0, 16, READS) for _ in range(5))
        print(f"daemon stack CPU per 1 MiB READ, ring to ring: best {per[0]:6.1f} us  median {per[2]:6.1f} us")
        if len(sys.argv) > 1:
            prof = cProfile.Profile()
            prof.runcall(run, g, s, nodeid, 0, 16, READS)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        svc.umount("/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
