"""Warming over a real /dev/fuse mount: a LOOKUP of a small file decodes the file after the
reply is written (while the process that asked wakes up), and the READ that follows takes it;
files that are only stat'ed stop the warming after a few. Contents stay exact either way."""

import contextlib
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.fusedev import FuseDevSession
from nydus_py.vfs.vfs import Vfs
from tests.conftest import require_device
from tests.fs.mountrig import abort_connection, build

N = 120


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    rng = random.Random(11)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(N):
        (src / "d" / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(1, 48 << 10)))
    (src / "big").write_bytes(rng.randbytes(300 << 10))  # above the warm size: never warmed
    img = build(str(src), str(tmp_path / "img"), views=False)
    yield src, img.boot, img.blob_dir


class _Mount:
    def __init__(self, fs: RafsFilesystem, mnt: Path, warm_kb: int) -> None:
        vfs = Vfs()
        vfs.mount("/", fs)
        self.session = FuseSession(vfs)
        self.session.warm_max = warm_kb << 10
        self.dev = FuseDevSession(self.session.handle_vectored, str(mnt), threads=2,
                                  max_write=self.session.max_write)
        self.dev.mount()
        self.watchdog = threading.Timer(120, abort_connection, args=(str(mnt),))
        self.watchdog.start()

    def close(self) -> None:
        self.dev.close()
        self.watchdog.cancel()


@contextlib.contextmanager
def _mounted(boot: str, blob_dir: str, mnt: Path, warm_kb: int = 128,
             fs_cls: type[RafsFilesystem] = RafsFilesystem, timeout: float = 86400.0,
             ) -> Iterator[tuple[_Mount, RafsFilesystem]]:
    require_device("/dev/fuse")
    mnt.mkdir(exist_ok=True)
    image = open_bootstrap(boot)
    source = LocalBlobDir(blob_dir)
    fs = fs_cls(image, BlobDevice(image, source, validate=True), readahead_chunks=0, entry_timeout=timeout,
                attr_timeout=timeout)
    m = _Mount(fs, mnt, warm_kb)
    try:
        yield m, fs
    finally:
        m.close()
        fs.close()
        source.close()


@pytest.mark.slow
@pytest.mark.root
def test_reads_after_lookups_take_the_warmed_files_and_stats_stop_the_warming(tree, tmp_path: Path) -> None:  # noqa: ANN001
    src, boot, blob_dir = tree
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    with _mounted(boot, blob_dir, mnt) as (m, fs):
        names = [f"d/f{i:03d}" for i in range(N)]
        for name in names[: N // 2]:  # open by path and read: LOOKUP, READ
            assert (mnt / name).read_bytes() == (src / name).read_bytes()
        assert (mnt / "big").read_bytes() == (src / "big").read_bytes()
        warmed, gate = fs.device.warmed, m.session.warm_gate
        # (a READ that came before its warm-up ended decodes for itself: counted, not asserted)
        assert warmed.warmed == N // 2 and warmed.hits >= N // 4, vars(warmed)
        assert gate.followed == N // 2 and gate.skipped == 0
        for name in names[N // 2 :]:  # stat only: LOOKUP, no READ
            assert os.stat(mnt / name).st_size == (src / name).stat().st_size
        # the watch list fills, then each LOOKUP pushed out unread lowers the score (at most
        # `limit` after the reads above) until it is negative: warming stops for the rest
        stats_warmed = warmed.warmed - N // 2
        most = gate.watch + gate.limit + 1
        assert stats_warmed <= most and gate.skipped >= N // 2 - most and gate.score < 0, vars(gate)
        for name in names[N // 2 :]:  # now read them (their dentries are cached: READs only)
            assert (mnt / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.slow
@pytest.mark.root
def test_reads_after_a_stat_storm_bring_the_warming_back_when_lookups_alternate_dirs_and_files(
        tmp_path: Path) -> None:
    """With no dentry caching every read looks up a directory, then a file: the gate, off after
    the stats, samples small files' LOOKUPs (not every LOOKUP), so it sees the files read again.
    (Each file is read once: a file read again from the page cache is a LOOKUP with no READ.)"""
    src = tmp_path / "src"
    names = [f"d{i:02d}/f{j}" for i in range(50) for j in range(3)]
    for n, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(bytes([n % 256]) * (100 + n))
    img = build(str(src), str(tmp_path / "img"), views=False)
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    with _mounted(img.boot, img.blob_dir, mnt, timeout=0.0) as (m, fs):
        gate = m.session.warm_gate
        for name in names:
            os.stat(mnt / name)
        assert gate.score < 0
        hits = fs.device.warmed.hits
        for name in names:
            assert (mnt / name).read_bytes() == (src / name).read_bytes()
        assert gate.score >= 0 and fs.device.warmed.hits > hits, vars(gate)


class _WaitingWarm(RafsFilesystem):
    """Its warm-up waits until the test has seen its stat() return."""

    stat_returned = threading.Event()
    warm_saw_it: list[bool] = []

    def warm(self, ino: int, size: int) -> None:
        self.warm_saw_it.append(self.stat_returned.wait(10))
        super().warm(ino, size)


@pytest.mark.slow
@pytest.mark.root
def test_the_warm_up_runs_after_the_lookup_reply_is_written(tree, tmp_path: Path) -> None:  # noqa: ANN001
    src, boot, blob_dir = tree
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    with _mounted(boot, blob_dir, mnt, fs_cls=_WaitingWarm):
        os.stat(mnt / "d")
        assert os.stat(mnt / "d" / "f007").st_size == (src / "d" / "f007").stat().st_size
        _WaitingWarm.stat_returned.set()
        assert (mnt / "d" / "f007").read_bytes() == (src / "d" / "f007").read_bytes()
        # a warm-up run before the reply was written would have held the stat for 10 s and seen False
        assert _WaitingWarm.warm_saw_it == [True]


@pytest.mark.slow
@pytest.mark.root
def test_warm_size_0_warms_nothing(tree, tmp_path: Path) -> None:  # noqa: ANN001
    src, boot, blob_dir = tree
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    with _mounted(boot, blob_dir, mnt, warm_kb=0) as (m, fs):
        for i in range(10):
            assert (mnt / f"d/f{i:03d}").read_bytes() == (src / f"d/f{i:03d}").read_bytes()
        assert fs.device.warmed.warmed == 0 and m.session.warm_gate.warmed == 0


@pytest.mark.slow
@pytest.mark.root
def test_a_depth_first_walk_gets_each_next_listing_decoded_ahead(tmp_path: Path) -> None:
    rng = random.Random(4)
    src = tmp_path / "src"
    dirs = [src]
    for i in range(40):  # a random tree of 41 directories, a few files in each
        d = rng.choice(dirs) / f"d{i:02d}"
        d.mkdir(parents=True)
        dirs.append(d)
        for j in range(rng.randrange(0, 4)):
            (d / f"f{j}").write_bytes(rng.randbytes(rng.randrange(0, 3000)))
    img = build(str(src), str(tmp_path / "img"), views=False)
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    with _mounted(img.boot, img.blob_dir, mnt) as (m, fs):
        walk = subprocess.run(["ls", "-lRn", "--time-style=+%s"], cwd=mnt, capture_output=True, check=True,
                              env={**os.environ, "LC_ALL": "C"}).stdout
        native = subprocess.run(["ls", "-lRn", "--time-style=+%s"], cwd=src, capture_output=True, check=True,
                                env={**os.environ, "LC_ALL": "C"}).stdout
        # the same listing (the link counts and sizes of directories differ between ext4 and RAFS)
        assert _names(walk) == _names(native)
        # every listing's end but the last predicted the next directory of the walk
        assert fs.walk.predicted == len(dirs) - 1, fs.walk.predicted


def _names(ls: bytes) -> list[bytes]:
    """`ls -lRn` output reduced to directory headers and entry names (no block totals)."""
    out = []
    for line in ls.splitlines():
        if line.startswith(b"total"):
            continue
        if line.endswith(b":") or not line:
            out.append(line)
        else:
            out.append(line.split()[-1])
    return out
