"""Rig for real-mount tests of `nydusd-py fuse`: build trees and images, run the daemon as a
subprocess, and compare a mount against an oracle (the source directory or a kernel EROFS mount
of the same bootstrap) on every stat field, xattrs, link targets and data.

The daemon runs in its own process, so a hung request can never wedge the test's interpreter;
every wait has a deadline, and a stuck connection is aborted through /sys/fs/fuse/connections.
"""

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.cache_view import write_cache_view
from nydus_py.builder.options import BuildOptions, BuildResult
from nydus_py.builder.sources import tree_from_directory
from nydus_py.transport.fuse_uring import ENABLE_URING_PARAM
from nydus_py.transport.io_uring import probe
from nydus_py.transport.mount import is_mountpoint
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CHUNK = 0x10000  # small chunks make "a file of several chunks" cheap


# -- trees ------------------------------------------------------------------------------------------


def make_tree(src: str, *, many: int = 10_500, seed: int = 1) -> None:
    """Every file type, xattrs, hard links, varied owners/modes/nsec mtimes, multi-chunk files,
    and `many` small files spread over three directories."""
    rng = random.Random(seed)
    os.makedirs(src)
    p = lambda *parts: os.path.join(src, *parts)  # noqa: E731
    big = rng.randbytes(7 * CHUNK + 4321)
    with open(p("big-random"), "wb") as f:
        f.write(big)
    with open(p("aligned"), "wb") as f:  # exactly 4 chunks: no tail
        f.write(rng.randbytes(4 * CHUNK))
    with open(p("text"), "wb") as f:  # compressible, crosses chunk boundaries
        f.write(b"".join(b"line %06d of a compressible file\n" % i for i in range(12_000)))
    with open(p("zeros"), "wb") as f:
        f.write(b"\0" * (3 * CHUNK + 1))
    with open(p("empty"), "wb"):
        pass
    os.link(p("big-random"), p("hard-1"))
    os.link(p("big-random"), p("hard-2"))
    os.makedirs(p("sub", "deeper"))
    with open(p("sub", "deeper", "leaf"), "wb") as f:
        f.write(b"leaf\n")
    os.link(p("sub", "deeper", "leaf"), p("sub", "leaf-link"))
    os.symlink("big-random", p("sym"))
    os.symlink("/" + "x" * 250 + "/target", p("sym-long"))
    os.symlink("sub/deeper/leaf", p("sub", "rel"))
    os.mknod(p("chr"), stat.S_IFCHR | 0o620, os.makedev(4, 64))
    os.mknod(p("blk"), stat.S_IFBLK | 0o660, os.makedev(259, 1 << 19))
    os.mkfifo(p("fifo"), 0o640)
    os.mknod(p("sock"), stat.S_IFSOCK | 0o755)
    os.setxattr(p("big-random"), "user.checksum", hashlib.sha256(big).digest())
    os.setxattr(p("big-random"), "user.empty", b"")
    os.setxattr(p("text"), "trusted.overlay.opaque", b"y")
    os.setxattr(p("sub"), "user.dir", b"d" * 300)
    os.setxattr(p("empty"), "user.big", bytes(range(256)) * 8)
    for d in range(3):
        os.makedirs(p(f"many{d}"))
    for i in range(many):
        with open(p(f"many{i % 3}", f"file-{i:05d}" + "n" * (i % 50)), "wb") as f:
            f.write(rng.randbytes(i % 700) if i % 5 else b"")
    os.chmod(p("text"), 0o4755)
    os.chmod(p("sub", "deeper"), 0o1777)
    os.chown(p("text"), 1000, 1000)
    os.chown(p("sub", "deeper", "leaf"), 70000, 65534)
    os.lchown(p("sym"), 12, 34)
    # mtimes last, children before parents, with nanoseconds
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(src), reverse=True)):
        for j, name in enumerate(dirnames + filenames):
            ns = 1_700_000_000_000_000_000 + (i * 1000 + j) * 1_000_123_457
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(src, ns=(1_600_000_000_987_654_321,) * 2)


@dataclass
class Image:
    boot: str
    blob_dir: str
    views: list[str]
    result: BuildResult


def build(src: str, work: str, opts: BuildOptions | None = None, *, views: bool = True) -> Image:
    """Build `src` into `work`/boot + `work`/blobs, with cache views for the kernel oracle."""
    opts = opts or BuildOptions(chunk_size=CHUNK)
    boot, blobs = os.path.join(work, "boot"), os.path.join(work, "blobs")
    os.makedirs(blobs, exist_ok=True)
    result = build_image(tree_from_directory(src), boot, blobs, opts)
    out = []
    if views:
        for bid in result.blob_ids:
            view = os.path.join(work, f"view-{bid[:16]}")
            write_cache_view(boot, blobs, bid, view)
            out.append(view)
    return Image(boot, blobs, out, result)


# -- the daemon ------------------------------------------------------------------------------------


def write_config(path: str, blob_dir: str, **extra: object) -> str:
    cfg = {
        "device": {"backend": {"type": "localfs", "config": {"dir": blob_dir}}},
        "mode": "direct",
        "digest_validate": True,
        "enable_xattr": True,
        **extra,
    }
    Path(path).write_text(json.dumps(cfg))
    return path


def mount_devnum(mountpoint: str) -> str | None:
    real = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real:
                return fields[2]
    return None


FUSECTL = "/sys/fs/fuse/connections"


def ensure_fusectl() -> None:
    """Mount the fusectl filesystem where systemd would; it stays mounted (as on any systemd host)."""
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4] == FUSECTL for line in f):
            return
    subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], check=True, capture_output=True)


def abort_connection(mountpoint: str) -> bool:
    """Abort the FUSE connection behind `mountpoint` (like `echo 1 > .../abort`)."""
    dev = mount_devnum(mountpoint)
    if not dev:
        return False
    ensure_fusectl()
    major, minor = (int(x) for x in dev.split(":"))
    path = Path(f"{FUSECTL}/{major << 20 | minor}/abort")
    if not path.exists():
        return False
    path.write_text("1")
    return True


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    wait_until(cond, timeout, what)


# Appended to every daemon's command line, and the daemons started meanwhile: the
# `fuse_transport` fixture runs a test over /dev/fuse reads and again over io_uring.
DAEMON_ARGS: list[str] = []
STARTED: list["Daemon"] = []


@pytest.fixture(params=["fusedev", "io_uring"])
def fuse_transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per FUSE transport (tests opt in with `usefixtures`). Over io_uring
    every daemon the test started must really have served the ring (no silent fallback)."""
    if request.param == "fusedev":
        yield "fusedev"
        return
    if not os.path.exists(ENABLE_URING_PARAM):
        pytest.skip("this kernel has no FUSE over io_uring")
    if why := probe():
        pytest.skip(f"no usable io_uring in this kernel: {why}")
    old = Path(ENABLE_URING_PARAM).read_text().strip()
    Path(ENABLE_URING_PARAM).write_text("Y")
    DAEMON_ARGS.append("--io-uring")
    STARTED.clear()
    try:
        yield "io_uring"
    finally:
        DAEMON_ARGS.remove("--io-uring")
        Path(ENABLE_URING_PARAM).write_text(old)
    for d in STARTED:
        text = d.log_text()
        assert "FUSE io_uring: " in text and "io_uring not used" not in text, f"{d.log} did not use io_uring"
    STARTED.clear()


class Daemon:
    """`python -m nydus_py.cli.daemon fuse ...` in a subprocess, log in a file."""

    def __init__(self, boot: str, mountpoint: str, config: str, log: str, *, threads: int = 4,
                 log_level: str = "info", args: tuple[str, ...] = ()) -> None:
        os.makedirs(mountpoint, exist_ok=True)
        self.mountpoint = os.path.realpath(mountpoint)
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--config", config, "--bootstrap", boot,
                 "--mountpoint", self.mountpoint, "--thread-num", str(threads), "--log-level", log_level, *args,
                 *DAEMON_ARGS],
                stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
            )
        STARTED.append(self)

    def log_text(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def wait_mounted(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            return is_mountpoint(self.mountpoint)

        wait_for(ready, timeout, f"{self.mountpoint} to be mounted")
        os.stat(self.mountpoint)  # answered by the daemon once INIT is through

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; a daemon that does not go is aborted and killed (and the test fails)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon ignored SIGTERM:\n{self.log_text()}") from None

    def kill(self) -> None:
        abort_connection(self.mountpoint)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        cleanup_mount(self.mountpoint)


def cleanup_mount(mountpoint: str) -> None:
    if is_mountpoint(mountpoint):
        abort_connection(mountpoint)
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)


@contextlib.contextmanager
def nydusd(boot: str, blob_dir: str, mountpoint: str, work: str, *, threads: int = 4, log_level: str = "info",
           args: tuple[str, ...] = (), **cfg: object) -> Iterator[Daemon]:
    """A mounted daemon for the `with` body; on exit it must stop cleanly (exit 0, no mount).
    `args`: more command-line options."""
    config = write_config(os.path.join(work, f"config-{os.path.basename(mountpoint)}.json"), blob_dir, **cfg)
    d = Daemon(boot, mountpoint, config, os.path.join(work, f"nydusd-{os.path.basename(mountpoint)}.log"),
               threads=threads, log_level=log_level, args=args)
    try:
        d.wait_mounted()
        yield d
    except BaseException:
        d.kill()
        raise
    rc = d.stop()
    assert rc == 0, f"daemon exit {rc}:\n{d.log_text()}"
    assert not is_mountpoint(d.mountpoint), "daemon left its mount behind"


# -- comparing trees -------------------------------------------------------------------------------


def xattrs(p: bytes) -> dict[bytes, bytes]:
    """All xattrs of `p`; an image without any xattr answers ENOSYS by design (the kernel then
    stops asking, which `ls -l` profits from), seen here as EOPNOTSUPP: no xattrs."""
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        return {}
    return {os.fsencode(n): os.getxattr(p, n, follow_symlinks=False) for n in names}


def sha256_file(p: bytes) -> bytes:
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.digest()


def ranges(size: int, rng: random.Random, n: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """Offsets/sizes that straddle chunk boundaries, start/end of file, and random spots."""
    out = [(0, 1), (max(0, size - 1), 1), (max(0, size - 100), 4096), (size, 10)]
    for b in range(chunk, size, chunk):
        out.append((b - 1, 2))
        out.append((max(0, b - rng.randrange(1, 5000)), rng.randrange(2, 3 * chunk)))
    for _ in range(n):
        out.append((rng.randrange(size + 1), rng.randrange(1, 4 * chunk)))
    return out


def pread_all(fd: int, off: int, n: int) -> bytes:
    """pread until `n` bytes or EOF (a FUSE read may legally return short)."""
    parts = []
    while n > 0:
        b = os.pread(fd, n, off)
        if not b:
            break
        parts.append(b)
        off += len(b)
        n -= len(b)
    return b"".join(parts)


def compare_ranges(a: bytes, b: bytes, size: int, rng: random.Random, n: int = 8) -> int:
    fa = os.open(a, os.O_RDONLY)
    fb = os.open(b, os.O_RDONLY)
    try:
        checked = 0
        for off, ln in ranges(size, rng, n):
            got, want = pread_all(fb, off, ln), pread_all(fa, off, ln)
            assert got == want, (b, off, ln, len(got), len(want))
            checked += 1
        return checked
    finally:
        os.close(fa)
        os.close(fb)


@dataclass
class Compared:
    entries: int = 0
    files: int = 0
    ranges: int = 0
    xattrs: int = 0


def compare(oracle: str, mnt: str, *, exact: bool, rng: random.Random | None = None,
            ino_map: bool = False, dir_nlink: bool = True) -> Compared:
    """Assert `mnt` mirrors `oracle` entry by entry.

    exact=False (oracle is the source directory): directory sizes are filesystem-specific and
    not compared. exact=True (oracle is another mount of the same bootstrap): directory sizes and
    ctime must agree too (st_blocks does not: nydusd reports ceil(size/512), EROFS whole blocks). ino_map=True: st_ino must be equal too
    (FUSE exports v6 nids, as EROFS does), except the roots (FUSE's root is 1).
    """
    rng = rng or random.Random(0)
    ob, mb = os.fsencode(oracle), os.fsencode(mnt)
    link_o: dict[tuple[int, int], set[bytes]] = {}
    link_m: dict[int, set[bytes]] = {}
    out = Compared()
    stack = [b""]
    while stack:
        rel = stack.pop()
        a, b = ob + rel, mb + rel
        sa, sb = os.lstat(a), os.lstat(b)
        where = rel or b"/"
        out.entries += 1
        assert sa.st_mode == sb.st_mode, (where, oct(sa.st_mode), oct(sb.st_mode))
        assert (sa.st_uid, sa.st_gid) == (sb.st_uid, sb.st_gid), (where, sa.st_uid, sa.st_gid, sb.st_uid, sb.st_gid)
        assert sa.st_mtime_ns == sb.st_mtime_ns, (where, sa.st_mtime_ns, sb.st_mtime_ns)
        if dir_nlink or not stat.S_ISDIR(sa.st_mode):
            assert sa.st_nlink == sb.st_nlink, (where, sa.st_nlink, sb.st_nlink)
        assert sa.st_rdev == sb.st_rdev, (where, sa.st_rdev, sb.st_rdev)
        if exact:
            assert sa.st_size == sb.st_size, (where, sa.st_size, sb.st_size)
            assert sa.st_ctime_ns == sb.st_ctime_ns, (where, sa.st_ctime_ns, sb.st_ctime_ns)
        if ino_map and rel:
            assert sa.st_ino == sb.st_ino, (where, sa.st_ino, sb.st_ino)
        xa, xb = xattrs(a), xattrs(b)
        assert xa == xb, (where, xa, xb)
        out.xattrs += len(xa)
        if stat.S_ISDIR(sa.st_mode):
            na, nb = sorted(os.listdir(a)), sorted(os.listdir(b))
            assert na == nb, where
            stack.extend(rel + b"/" + n for n in na)
            continue
        assert sa.st_size == sb.st_size, (where, sa.st_size, sb.st_size)
        link_o.setdefault((sa.st_dev, sa.st_ino), set()).add(rel)
        link_m.setdefault(sb.st_ino, set()).add(rel)
        if stat.S_ISLNK(sa.st_mode):
            assert os.readlink(a) == os.readlink(b), where
        elif stat.S_ISREG(sa.st_mode):
            out.files += 1
            assert sha256_file(a) == sha256_file(b), where
            if sa.st_size > CHUNK // 2:
                out.ranges += compare_ranges(a, b, sa.st_size, rng)
    # hard links: the same groups of paths share an inode on both sides
    assert sorted(map(sorted, link_o.values())) == sorted(map(sorted, link_m.values()))
    return out
