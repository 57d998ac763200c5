"""FUSE over io_uring on real mounts: a built image served through the ring equals its source
byte for byte, concurrent readers on every CPU are answered from their CPU's queue, mounts come
and go without leaking threads or fds, the daemon serves it from config and ends on SIGTERM,
and every fallback (module parameter N, queue setup failing after INIT) is logged, counted and
still serves the mount through /dev/fuse."""

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nydus_py.api.client import ApiClient
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.abi import InitFlags
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache.blobcache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport import fuse_uring
from nydus_py.transport.fuse_uring import ENABLE_URING_PARAM, FuseUringSession, read_possible_cpus
from nydus_py.transport.fusedev import KEEP_READ_MAX
from nydus_py.transport.io_uring import probe
from nydus_py.transport.mount import abort_connection, connection_of, is_mountpoint
from tests.builder.erofs_rig import compare_trees
from tests.conftest import require_device
from tests.fs.mountrig import Image, build, make_tree, nydusd
from tests.waiting import wait_event, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _set_param(value: str) -> None:
    Path(ENABLE_URING_PARAM).write_text(value)


@contextlib.contextmanager
def uring_param(value: str) -> Iterator[None]:
    """fuse.enable_uring set for the test, restored after (the daemon never writes it)."""
    require_device("/dev/fuse")
    if not os.path.exists(ENABLE_URING_PARAM):
        pytest.skip("this kernel has no FUSE over io_uring")
    if why := probe():
        pytest.skip(why)
    old = Path(ENABLE_URING_PARAM).read_text().strip()
    _set_param(value)
    try:
        yield
    finally:
        _set_param(old)


@pytest.fixture
def uring_on() -> Iterator[None]:
    with uring_param("Y"):
        yield


@pytest.fixture
def uring_off() -> Iterator[None]:
    with uring_param("N"):
        yield


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Image]:
    work = tmp_path_factory.mktemp("uring")
    src = str(work / "src")
    make_tree(src, many=600)
    return src, build(src, str(work / "img"), views=False)


@contextlib.contextmanager
def served(image: Image, mnt: Path, *, block_reads: tuple[threading.Event, threading.Event] | None = None,
           read_waits: bool = False, cache: Path | None = None, **kw: int) -> Iterator[FuseUringSession]:
    """An in-process FuseUringSession over the image; a watchdog aborts a hung connection so
    that a protocol bug fails the test instead of wedging it. (It finds the connection in
    mountinfo: a stat of the mountpoint would hang as well while the kernel holds requests
    back for a ring that never becomes ready.) `read_waits`: the transport asks the session
    which READs may wait (as the daemon does); `cache`: through a blob cache there."""
    mnt.mkdir(exist_ok=True)
    img = open_bootstrap(image.boot)
    source: LocalBlobDir | BlobCacheManager = LocalBlobDir(image.blob_dir)
    if cache is not None:
        source = BlobCacheManager(str(cache), source, amplify_io=0, read_around=0)
    fs = RafsFilesystem(img, BlobDevice(img, source, validate=cache is None), readahead_chunks=0)
    if block_reads is not None:  # a READ that waits, as one on a slow registry fetch does
        read = fs.read
        entered, release = block_reads

        def slow_read(*a: Any) -> Any:
            entered.set()
            assert release.wait(60)
            return read(*a)

        fs.read = slow_read  # type: ignore[method-assign]
    session = FuseSession(fs)
    t = FuseUringSession(session, str(mnt), threads=2, read_waits=session.read_waits if read_waits else None, **kw)
    watchdog: threading.Timer | None = None
    try:
        t.mount()
        watchdog = threading.Timer(120, abort_connection, args=(connection_of(t.mountpoint),))
        watchdog.start()
        os.stat(mnt)  # INIT answered, and (over the ring) every queue registered
        # (`active` is set by the INIT worker once every queue registered: the kernel may serve
        # requests over the ring a moment before)
        wait_until(lambda: t.stats.active or t.stats.fallbacks or not t.session.flags & InitFlags.OVER_IO_URING, 30,
                   "the ring to be active or given up")
        yield t
    finally:
        try:
            t.close()
        finally:
            if watchdog is not None:
                watchdog.cancel()
                watchdog.join()
            fs.close()
            img.close()
            source.close()
    assert t.wait(0), "transport threads still running after close()"
    assert not is_mountpoint(str(mnt))


def test_image_over_io_uring_equals_its_source(uring_on: None, tree: tuple[str, Image], tmp_path: Path) -> None:
    src, image = tree
    with served(image, tmp_path / "mnt") as t:
        n = compare_trees(src, str(tmp_path / "mnt"))
        stats = t.stats.as_dict()
    assert n > 600
    assert stats["active"] and stats["fallbacks"] == 0
    assert stats["queues"] == read_possible_cpus() and stats["register_failures"] == 0
    # Everything after INIT came through the ring: thousands of LOOKUP/GETATTR/READ/READLINK/
    # GETXATTR..., none read from /dev/fuse.
    assert stats["ring_requests"] > 2 * n
    assert stats["dev_requests"] == 0
    assert stats["entry_errors"] == stats["commit_failures"] == 0


def test_concurrent_readers_on_every_cpu(uring_on: None, tree: tuple[str, Image], tmp_path: Path) -> None:
    src, image = tree
    cpus = sorted(os.sched_getaffinity(0))
    files = []
    for dirpath, _, names in os.walk(src):
        files += [os.path.relpath(os.path.join(dirpath, n), src) for n in names
                  if os.path.isfile(os.path.join(dirpath, n)) and not os.path.islink(os.path.join(dirpath, n))]
    files.sort()
    want = {f: hashlib.sha256(Path(src, f).read_bytes()).digest() for f in files}
    errors: list[str] = []
    mnt = tmp_path / "mnt"
    with served(image, mnt) as t:
        start = threading.Barrier(8)

        def reader(i: int) -> None:
            os.sched_setaffinity(0, {cpus[i % len(cpus)]})  # the kernel queues by the caller's CPU
            start.wait(30)
            for f in files[i::8]:
                got = hashlib.sha256((mnt / f).read_bytes()).digest()
                if got != want[f]:
                    errors.append(f)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads)
        stats = t.stats.as_dict()
    assert errors == []
    per_queue = stats["queue_requests"]
    assert isinstance(per_queue, list)
    for cpu in cpus:  # each reader's CPU had its requests served by its own queue
        assert per_queue[cpu] > 0, per_queue
    assert stats["dev_requests"] == 0


@pytest.mark.parametrize("config", [{}, {"workers": 2}, {"depth": 2, "max_workers": 1}],
                         ids=["default", "workers", "smallest"])
def test_a_blocked_read_does_not_hold_up_its_queue(uring_on: None, tree: tuple[str, Image], tmp_path: Path,
                                                   config: dict[str, int]) -> None:
    """A READ that waits (registry fetch) is handed to the pool with its entry: metadata
    requests from the same CPU, so on the same queue, are answered by the ring thread from its
    other entries meanwhile (two entries and one pool thread are enough)."""
    src, image = tree
    mnt = tmp_path / "mnt"
    entered, release = threading.Event(), threading.Event()
    got: dict[str, object] = {}
    cpu = min(os.sched_getaffinity(0))

    def on_cpu(key: str, fn: Any) -> threading.Thread:
        def run() -> None:
            os.sched_setaffinity(0, {cpu})
            got[key] = fn()

        th = threading.Thread(target=run)
        th.start()
        return th

    with served(image, mnt, block_reads=(entered, release), **config) as t:
        try:
            reader = on_cpu("data", lambda: (mnt / "text").read_bytes())
            wait_event(entered, 30, "the READ to reach the filesystem")
            lister = on_cpu("names", lambda: sorted(os.listdir(mnt / "many2")))
            lister.join(30)
            assert not lister.is_alive(), "metadata waited behind the blocked READ"
            assert reader.is_alive()
        finally:
            release.set()
        reader.join(60)
        stats = t.stats.as_dict()
    assert got["names"] == sorted(os.listdir(os.path.join(src, "many2")))
    assert got["data"] == Path(src, "text").read_bytes()
    assert stats["dev_requests"] == 0 and stats["entry_errors"] == 0
    assert stats["handed_off"] >= 1 and 1 <= stats["pool_threads"] <= config.get("max_workers", 16)


def _files(src: str, n: int) -> list[str]:
    """`n` non-empty small files of the tree (relative paths)."""
    names = sorted(f for f in os.listdir(os.path.join(src, "many1")) if os.path.getsize(os.path.join(src, "many1", f)))
    return [f"many1/{f}" for f in names[:n]]


def _direct_reads(src: str, mnt: Path, names: list[str]) -> None:
    """One O_DIRECT READ of each whole (small) file: no page cache, each reaches the daemon."""
    for name in names:
        want = Path(src, name).read_bytes()
        fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 4096, 0) == want
        finally:
            os.close(fd)


@pytest.mark.parametrize("read_waits", [True, False], ids=["read_waits", "no_hint"])
def test_local_reads_are_kept_on_the_ring(uring_on: None, tree: tuple[str, Image], tmp_path: Path,
                                          read_waits: bool) -> None:
    """A READ of a local blob (no blob cache) waits on nothing slower than a local disk: the
    ring thread answers it itself and counts it in `reads_kept`; without the hint every READ
    is handed to the pool, as one that may wait."""
    src, image = tree
    names = _files(src, 12)
    with served(image, tmp_path / "mnt", read_waits=read_waits) as t:
        _direct_reads(src, tmp_path / "mnt", names)
        stats = t.stats.as_dict()
        # a READ larger than KEEP_READ_MAX (a readahead window) goes to the pool all the same,
        # so that concurrent windows decode in parallel
        fd = os.open(tmp_path / "mnt" / "big-random", os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 2 * KEEP_READ_MAX, 0) == Path(src, "big-random").read_bytes()[:2 * KEEP_READ_MAX]
        finally:
            os.close(fd)
        big = t.stats.as_dict()
    assert stats["active"] and stats["dev_requests"] == 0
    assert big["reads_kept"] == stats["reads_kept"] and big["handed_off"] > stats["handed_off"], (stats, big)
    if read_waits:
        assert stats["reads_kept"] >= len(names), stats
        assert stats["handed_off"] == 0 and stats["pool_threads"] == 0, stats
    else:
        assert stats["reads_kept"] == 0, stats
        assert stats["handed_off"] >= len(names), stats


def test_blob_cache_reads_are_kept_on_the_ring_once_ready(uring_on: None, tree: tuple[str, Image],
                                                         tmp_path: Path) -> None:
    """Through a blob cache, a READ whose chunk is not fetched yet is handed to the pool (it
    may wait); once its chunk is ready in the cache the same READ is kept."""
    src, image = tree
    names = _files(src, 8)
    with served(image, tmp_path / "mnt", read_waits=True, cache=tmp_path / "cache") as t:
        _direct_reads(src, tmp_path / "mnt", names)
        cold = t.stats.as_dict()
        _direct_reads(src, tmp_path / "mnt", names)
        warm = t.stats.as_dict()
    assert cold["reads_kept"] == 0 and cold["handed_off"] >= len(names), cold
    assert warm["reads_kept"] >= len(names) and warm["handed_off"] == cold["handed_off"], warm


def test_mount_umount_rounds_leave_no_threads_or_fds(uring_on: None, tree: tuple[str, Image],
                                                      tmp_path: Path) -> None:
    _, image = tree
    threads_before = set(threading.enumerate())
    fds_before = set(os.listdir("/proc/self/fd"))
    for i in range(6):
        with served(image, tmp_path / "mnt", depth=1 + i % 3, workers=1 + i % 2) as t:
            assert sorted(os.listdir(tmp_path / "mnt" / "sub")) == ["deeper", "leaf-link", "rel"]
            assert (tmp_path / "mnt" / "sub" / "deeper" / "leaf").read_bytes() == b"leaf\n"
            assert t.stats.active and not t.stats.fallbacks, t.stats.as_dict()
    assert set(threading.enumerate()) - threads_before == set()
    assert set(os.listdir("/proc/self/fd")) - fds_before == set()


def test_enable_uring_N_falls_back_logged_and_counted(uring_off: None, tree: tuple[str, Image], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    src, image = tree
    caplog.set_level(logging.WARNING, logger="nydus_py.transport.fuse_uring")
    with served(image, tmp_path / "mnt") as t:
        compare_trees(os.path.join(src, "sub"), str(tmp_path / "mnt" / "sub"))
        stats = t.stats.as_dict()
    assert stats["fallbacks"] == 1 and not stats["active"]
    assert "enable_uring is N" in str(stats["fallback_reason"])
    assert stats["ring_requests"] == 0 and stats["dev_requests"] > 0 and stats["queues"] == 0
    assert any("FUSE io_uring not used" in r.getMessage() for r in caplog.records)


def test_queue_setup_failing_after_init_falls_back(uring_on: None, tree: tuple[str, Image], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """INIT already negotiated the ring (the kernel holds requests until every queue has
    registered): a queue that cannot be set up must make the kernel fall back, not hang."""
    src, image = tree

    class NoQueue:
        def __init__(self, *a: object, **kw: object) -> None:
            raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(fuse_uring, "_Queue", NoQueue)
    caplog.set_level(logging.WARNING, logger="nydus_py.transport.fuse_uring")
    with served(image, tmp_path / "mnt") as t:
        assert (tmp_path / "mnt" / "text").read_bytes() == Path(src, "text").read_bytes()
        stats = t.stats.as_dict()
    assert stats["fallbacks"] == 1 and not stats["active"]
    assert "Cannot allocate memory" in str(stats["fallback_reason"])
    assert stats["ring_requests"] == 0 and stats["dev_requests"] > 0


def test_daemon_serves_io_uring_from_config_and_ends_on_sigterm(uring_on: None, tree: tuple[str, Image],
                                                                 tmp_path: Path) -> None:
    src, image = tree
    mnt = str(tmp_path / "mnt")
    with nydusd(image.boot, image.blob_dir, mnt, str(tmp_path), fuse_io_uring=True) as d:
        compare_trees(os.path.join(src, "many1"), os.path.join(mnt, "many1"))
        log_text = d.log_text()
    # nydusd() asserted exit 0 on SIGTERM and no mount left behind
    assert f"FUSE io_uring: {read_possible_cpus()} queues" in log_text
    assert "not used" not in log_text


@pytest.mark.parametrize("param", ["Y", "N"])
def test_daemon_io_uring_flag_and_transport_metrics(param: str, tree: tuple[str, Image], tmp_path: Path) -> None:
    """`--io-uring`: /api/v1/metrics/transport says which transport serves the mount, with the
    ring's counters, or the fallback and its reason."""
    src, image = tree
    mnt, sock = str(tmp_path / "mnt"), str(tmp_path / "api.sock")
    with uring_param(param), nydusd(image.boot, image.blob_dir, mnt, str(tmp_path),
                                     args=("--io-uring", "--apisock", sock, "--fuse-poll-us", "40")) as d:
        assert Path(mnt, "sub", "deeper", "leaf").read_bytes() == b"leaf\n"
        wait_until(lambda: os.path.exists(sock), 30, "the API socket")
        client = ApiClient(sock)
        try:
            m = client.call("GET", "/api/v1/metrics/transport")
        finally:
            client.close()
        log_text = d.log_text()
    u = m["io_uring"]
    assert m["fusedev"]["poll_us"] == 40  # --fuse-poll-us reaches the /dev/fuse workers beside the ring
    # no warming with --io-uring: a ring thread answers on the requester's own CPU
    assert m["warm"]["warm_kb"] == 0 and m["warm"]["warmed"] == 0
    if param == "Y":
        assert m["transport"] == "fuse_io_uring"
        assert u["active"] and u["fallbacks"] == 0 and u["ring_requests"] > 0 and u["dev_requests"] == 0
        assert u["reads_kept"] >= 1  # the READ of a local blob, answered by its ring thread
    else:
        assert m["transport"] == "fusedev"
        assert u["fallbacks"] == 1 and "enable_uring is N" in u["fallback_reason"] and u["ring_requests"] == 0
        assert "FUSE io_uring not used" in log_text
        assert m["fusedev"]["reads_kept"] >= 1  # the /dev/fuse fallback keeps local READs too
