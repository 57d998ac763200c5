"""Python time per FUSE request in `FuseSession.handle`, by opcode, over a real image (no kernel).

Times are the CPU time of the thread (time.thread_time), so that other processes competing for
the cores do not inflate them.

The session is put together as `nydusd-py fuse --bootstrap` does it (RafsFilesystem over a
BlobDevice on the config's backend, mounted at / of a Vfs, the daemon's metrics observer), and
fed the requests a cold walk makes: READDIRPLUS of every directory until the empty reply
(as `find`/`ls -lR` after a mount), LOOKUP of every path component and READ of every small file
(as `cat` of each file), plus GETATTR and GETXATTR. Every pass starts on a fresh image and
device (nothing decoded or cached yet). Replies are taken as the buffers the fusedev transport
writes (`handle_vectored`): a READ's data is not joined behind its header. `--profile OP` prints a cProfile of that pass.

python3 benchmarks/fuse_handle_micro.py --boot B --config C [--profile readdirplus]
"""

import argparse
import cProfile
import json
import pstats
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.config import parse_any  # noqa: E402
from nydus_py.fs.rafs_fs import RafsFilesystem  # noqa: E402
from nydus_py.fuse.abi import Opcode  # noqa: E402
from nydus_py.fuse.protocol import FuseSession  # noqa: E402
from nydus_py.metrics.fsstats import FsStats, FuseMetrics  # noqa: E402
from nydus_py.rafs import open_bootstrap  # noqa: E402
from nydus_py.storage.device import BlobDevice  # noqa: E402
from nydus_py.storage.factory import make_source  # noqa: E402
from nydus_py.vfs.vfs import Vfs  # noqa: E402

IN_HEADER = struct.Struct("<IIQQIIIHH")
INIT_IN = struct.Struct("<IIIII44x")  # major, minor, max_readahead, flags, flags2 (7.36+)
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
GETXATTR_IN = struct.Struct("<II")
DIRENTPLUS_HEAD = 128  # fuse_entry_out; then fuse_dirent (ino, off, namelen, type)


class Rig:
    def __init__(self, boot: str, config: str) -> None:
        cfg = parse_any(Path(config).read_text()).rafs
        self.image = open_bootstrap(boot)
        self.device = BlobDevice(self.image, make_source(cfg), validate=cfg.digest_validate)
        self.fs = RafsFilesystem(self.image, self.device, enable_xattr=cfg.enable_xattr, readahead_chunks=0)
        vfs = Vfs()
        vfs.mount("/", self.fs)
        self.session = FuseSession(vfs)
        stats = FsStats("/")
        self.session.set_observer(FuseMetrics(lambda n: (stats, n)))
        self.unique = 0
        self.handle(Opcode.INIT, 0, INIT_IN.pack(7, 45, 1 << 20, 0x73FFFFFB | (1 << 30), 0x5FD))

    def handle(self, opcode: int, nodeid: int, args: bytes) -> bytes:
        """The reply's first buffer (READ data stays apart, as /dev/fuse's writev sends it)."""
        return self.handle_vectored(opcode, nodeid, args)[0]

    def handle_vectored(self, opcode: int, nodeid: int, args: bytes) -> list:
        """The reply as the buffers the fusedev transport writes with one writev."""
        self.unique += 2
        req = IN_HEADER.pack(IN_HEADER.size + len(args), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + args
        r = self.session.handle_vectored(req)
        assert r is not None
        return r

    def close(self) -> None:
        self.fs.close()
        self.image.close()


def entry_ino(reply: bytes) -> int:
    return struct.unpack_from("<Q", reply, 16)[0]


def direntplus(reply: bytes) -> list[tuple[int, int, int, bytes]]:
    """(ino, off, type, name) of a READDIRPLUS reply."""
    out, pos = [], 16
    while pos < len(reply):
        ino = struct.unpack_from("<Q", reply, pos)[0]
        _dino, off, nl, typ = struct.unpack_from("<QQII", reply, pos + DIRENTPLUS_HEAD)
        name = reply[pos + DIRENTPLUS_HEAD + 24 : pos + DIRENTPLUS_HEAD + 24 + nl]
        out.append((ino, off, typ, name))
        pos += (DIRENTPLUS_HEAD + 24 + nl + 7) & ~7
    return out


def walk_readdirplus(rig: Rig) -> int:
    """READDIRPLUS every directory until an empty reply, 32 KiB at a time: what Linux 6.18 asks
    for a getdents of find/ls (older kernels asked one page)."""
    n = 0
    dirs = [1]
    while dirs:
        d = dirs.pop()
        off = 0
        while True:
            r = b"".join(rig.handle_vectored(Opcode.READDIRPLUS, d, READ_IN.pack(0, off, 32768, 0, 0, 0, 0)))
            n += 1
            ents = direntplus(r)
            if not ents:
                break
            for ino, eoff, typ, name in ents:
                off = eoff
                if typ == stat.S_IFDIR >> 12 and name not in (b".", b".."):
                    dirs.append(ino)
    return n


def small_paths(rig: Rig, limit: int = 1 << 20) -> list[bytes]:
    return [p for p, i in rig.image.walk()
            if stat.S_ISREG(rig.image.getattr(i).mode) and rig.image.getattr(i).size < limit]


def lookups(rig: Rig, paths: list[bytes]) -> int:
    """LOOKUP each component of each path once (what a cold path walk sends)."""
    seen: dict[bytes, int] = {b"": 1}
    n = 0
    for p in paths:
        parts = p.strip(b"/").split(b"/")
        for k in range(len(parts)):
            key = b"/".join(parts[: k + 1])
            if key in seen:
                continue
            parent = seen[b"/".join(parts[:k])]
            seen[key] = entry_ino(rig.handle(Opcode.LOOKUP, parent, parts[k] + b"\0"))
            n += 1
    return n


def reads(rig: Rig, inos: list[int]) -> int:
    for ino in inos:
        rig.handle(Opcode.READ, ino, READ_IN.pack(0, 0, 128 << 10, 0, 0, 0, 0))
    return len(inos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boot", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", choices=["readdirplus", "lookup", "read", "getattr", "getxattr"])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--ops", default="readdirplus,lookup,read,getattr,getxattr", help="passes to run")
    args = ap.parse_args()

    rig = Rig(args.boot, args.config)
    paths = small_paths(rig)
    inos: list[int] = []
    for p in paths:
        ino = 1
        for part in p.strip(b"/").split(b"/"):
            ino = entry_ino(rig.handle(Opcode.LOOKUP, ino, part + b"\0"))
        inos.append(ino)
    rig.close()

    def p_readdirplus(rig: Rig) -> int:
        return walk_readdirplus(rig)

    def p_lookup(rig: Rig) -> int:
        return lookups(rig, paths)

    def p_read(rig: Rig) -> int:
        return reads(rig, inos)

    def p_getattr(rig: Rig) -> int:
        for _ in range(5000):
            rig.handle(Opcode.GETATTR, 1, b"\0" * 16)
        return 5000

    def p_getxattr(rig: Rig) -> int:
        ino = entry_ino(rig.handle(Opcode.LOOKUP, 1, b"opt\0"))
        arg = GETXATTR_IN.pack(255, 0) + b"security.selinux\0"
        for _ in range(5000):
            rig.handle(Opcode.GETXATTR, ino, arg)
        return 5000

    passes: dict[str, Callable[[Rig], int]] = {"readdirplus": p_readdirplus, "lookup": p_lookup, "read": p_read,
                                               "getattr": p_getattr, "getxattr": p_getxattr}
    out: dict[str, dict[str, float]] = {}
    for name, fn in passes.items():
        if name not in args.ops.split(","):
            continue
        per = []
        count = 0
        for _ in range(args.reps):
            rig = Rig(args.boot, args.config)
            prof = cProfile.Profile(time.thread_time_ns, 1e-9) if args.profile == name else None
            t = time.thread_time()
            if prof is not None:
                prof.enable()
            count = fn(rig)
            if prof is not None:
                prof.disable()
            dt = time.thread_time() - t
            rig.close()
            per.append(dt / count * 1e6)
            if prof is not None:
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        out[name] = {"requests": count, "cpu_us_per_request_best": min(per), "cpu_us_per_request_median": sorted(per)[len(per) // 2]}
        print(f"{name:12s} {count:6d} requests  CPU best {min(per):7.1f} us  median {sorted(per)[len(per) // 2]:7.1f} us",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
