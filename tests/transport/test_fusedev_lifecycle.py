"""The /dev/fuse transport's life cycle on real mounts: 50 mount/umount rounds leave nothing
behind; the daemon ends cleanly on SIGTERM/SIGINT, on an external umount and on a connection
abort; debug mode logs every op with its args, result and latency."""

import contextlib
import errno
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.fusedev import FuseDevSession
from nydus_py.transport.mount import is_mountpoint, mount_device
from tests.conftest import require_device
from tests.fs.mountrig import (  # noqa: F401  (fuse_transport: a fixture)
    CHUNK,
    Daemon,
    abort_connection,
    build,
    cleanup_mount,
    fuse_transport,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.root]

DATA = bytes(range(256)) * (3 * CHUNK // 256) + b"tail"


@pytest.fixture
def image(tmp_path: Path):
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "hello").write_bytes(DATA)
    (src / "dir" / "small").write_bytes(b"small\n")
    return build(str(src), str(tmp_path / "img"), views=False)


def _mounts_at(real: str) -> int:
    """Mounts at `real` (a realpath: resolving it would stat the mount, i.e. ask our own workers)."""
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == real)


def test_mount_umount_50_times_leaves_nothing(image, tmp_path: Path) -> None:
    require_device("/dev/fuse")
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    mnt.mkdir()
    threads_before = set(threading.enumerate())
    fds_before = sorted(os.listdir("/proc/self/fd"))
    # the server runs in this process: a protocol bug would hang the test, so a watchdog aborts
    # the connection (the hang becomes a failure)
    watchdog = threading.Timer(120, abort_connection, args=(str(mnt),))
    watchdog.start()
    try:
        _mount_umount_rounds(image, mnt)
    finally:
        watchdog.cancel()
        watchdog.join()
    # No thread of ours is left; threads of earlier tests may have ended meanwhile.
    assert set(threading.enumerate()) - threads_before == set()
    assert set(os.listdir("/proc/self/fd")) - set(fds_before) == set()


def _mount_umount_rounds(image, mnt: Path) -> None:  # noqa: ANN001
    for i in range(50):
        img = open_bootstrap(image.boot)
        source = LocalBlobDir(image.blob_dir)
        fs = RafsFilesystem(img, BlobDevice(img, source, validate=True))
        session = FuseSession(fs)
        dev = FuseDevSession(session.handle, str(mnt), threads=1 + i % 4, max_write=session.max_write)
        dev.mount()
        try:
            assert _mounts_at(str(mnt)) == 1
            if i == 0:  # the transport raised the bdi readahead once INIT was answered
                sys_ra = f"/sys/class/bdi/{mount_device(str(mnt))}/read_ahead_kb"
                os.stat(mnt)  # INIT has been answered once any request has been
                assert Path(sys_ra).read_text().strip() == str(dev.readahead_kb) == "1024"
            assert sorted(os.listdir(mnt)) == ["dir", "hello"]
            with open(mnt / "hello", "rb") as f:
                f.seek(i * 997)
                assert f.read(CHUNK) == DATA[i * 997 : i * 997 + CHUNK]
            assert (mnt / "dir" / "small").stat().st_size == 6
        finally:
            dev.close()
            fs.close()
            img.close()
            source.close()
        assert dev.wait(0), f"round {i}: workers still running"
        assert _mounts_at(str(mnt)) == 0, f"round {i}: stale mount"


def _daemon(image, tmp_path: Path, log_level: str = "info") -> Daemon:
    cfg = write_config(str(tmp_path / "cfg.json"), image.blob_dir)
    d = Daemon(image.boot, str(tmp_path / "mnt"), cfg, str(tmp_path / "nydusd.log"), log_level=log_level)
    d.wait_mounted()
    return d


def _wait_exit(d: Daemon, timeout: float = 30.0) -> int:
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        d.kill()
        raise AssertionError(f"daemon did not exit:\n{d.log_text()}") from None


@pytest.mark.usefixtures("fuse_transport")  # over /dev/fuse reads and over io_uring
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_0(image, tmp_path: Path, sig: int) -> None:
    require_device("/dev/fuse")
    d = _daemon(image, tmp_path)
    try:
        assert Path(d.mountpoint, "hello").read_bytes() == DATA
        d.proc.send_signal(sig)
        assert _wait_exit(d) == 0, d.log_text()
        assert not is_mountpoint(d.mountpoint)
    finally:
        d.kill()


@pytest.mark.usefixtures("fuse_transport")
def test_sigterm_while_busy_detaches_and_serves_open_files(image, tmp_path: Path) -> None:
    """A file held open makes a plain umount EBUSY: the daemon detaches lazily, keeps serving
    the open file, and exits 0 once it is closed. (Also: a SIGTERM right after the mount must
    not kill the daemon before its handlers are in place.)"""
    require_device("/dev/fuse")
    d = _daemon(image, tmp_path)
    try:
        fd = os.open(os.path.join(d.mountpoint, "hello"), os.O_RDONLY | os.O_DIRECT)
        try:
            d.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not is_mountpoint(d.mountpoint), 20, "the lazy detach")
            assert d.proc.poll() is None
            assert os.pread(fd, 4096, CHUNK) == DATA[CHUNK : CHUNK + 4096]
        finally:
            os.close(fd)
        assert _wait_exit(d) == 0, d.log_text()
    finally:
        d.kill()


@pytest.mark.usefixtures("fuse_transport")
def test_sigterm_with_a_file_never_closed_ends_after_the_grace(image, tmp_path: Path) -> None:
    """A file that stays open keeps a lazily detached mount alive: the daemon serves it for the
    stop grace (fusedev.STOP_GRACE), then aborts the connection and exits 0 (it used to wait for
    each worker in turn, 10 s apiece). The open file then fails instead of hanging."""
    require_device("/dev/fuse")
    d = _daemon(image, tmp_path)
    fd = os.open(os.path.join(d.mountpoint, "hello"), os.O_RDONLY | os.O_DIRECT)
    try:
        d.proc.send_signal(signal.SIGTERM)
        assert _wait_exit(d, timeout=15) == 0, d.log_text()
        assert "aborting the FUSE connection" in d.log_text()
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
        assert e.value.errno in (errno.ENOTCONN, errno.EIO)
    finally:
        with contextlib.suppress(OSError):  # (close flushes: ENOTCONN on an aborted connection)
            os.close(fd)
        d.kill()


@pytest.mark.usefixtures("fuse_transport")
def test_external_umount_ends_session(image, tmp_path: Path) -> None:
    require_device("/dev/fuse")
    d = _daemon(image, tmp_path)
    try:
        assert Path(d.mountpoint, "dir", "small").read_bytes() == b"small\n"
        subprocess.run(["umount", d.mountpoint], check=True, timeout=20)
        assert _wait_exit(d) == 0, d.log_text()
        assert not is_mountpoint(d.mountpoint)
    finally:
        d.kill()


@pytest.mark.usefixtures("fuse_transport")
def test_connection_abort_ends_session(image, tmp_path: Path) -> None:
    require_device("/dev/fuse")
    d = _daemon(image, tmp_path)
    try:
        assert Path(d.mountpoint, "hello").stat().st_size == len(DATA)
        assert abort_connection(d.mountpoint)
        assert _wait_exit(d) == 0, d.log_text()
        # the daemon may leave the dead mount for whoever aborted it (nydusd does); it must be
        # dead, not served by anything
        if is_mountpoint(d.mountpoint):
            with pytest.raises(OSError) as ei:
                os.stat(os.path.join(d.mountpoint, "never-looked-up"))
            assert ei.value.errno == errno.ENOTCONN
    finally:
        d.kill()
        cleanup_mount(str(tmp_path / "mnt"))


@pytest.mark.usefixtures("fuse_transport")
def test_debug_mode_logs_ops_with_args_result_latency(image, tmp_path: Path) -> None:
    require_device("/dev/fuse")
    d = _daemon(image, tmp_path, log_level="debug")
    try:
        with open(os.path.join(d.mountpoint, "hello"), "rb") as f:
            assert f.read(100) == DATA[:100]
        with open(os.path.join(d.mountpoint, "hello"), "rb") as f:
            assert f.read() == DATA
        assert Path(d.mountpoint, "dir", "small").read_bytes() == b"small\n"
        assert sorted(os.listdir(d.mountpoint)) == ["dir", "hello"]
        assert os.listdir(os.path.join(d.mountpoint, "dir")) == ["small"]
        assert not os.path.exists(os.path.join(d.mountpoint, "missing"))
        assert d.stop() == 0
    finally:
        d.kill()
    log = d.log_text()
    lat = r"\[\d+(\.\d+)? us\]"
    assert re.search(r"FUSE INIT unique=\d+ .*-> ok len=\d+ " + lat, log), log[:2000]
    assert re.search(r"FUSE LOOKUP unique=\d+ nodeid=1 .*name=b'hello' -> ok len=\d+ " + lat, log)
    assert re.search(r"FUSE LOOKUP unique=\d+ nodeid=1 .*name=b'missing' -> error ENOENT " + lat, log)
    # zero-message open/opendir: the first is refused with ENOSYS, then the kernel stops asking
    opens = re.findall(r"FUSE OPEN unique=\d+ nodeid=\d+ .*", log)
    assert len(opens) == 1 and re.search(r"flags=0x[0-9a-f]+.* -> error ENOSYS " + lat, opens[0]), opens
    assert len(re.findall(r"FUSE OPENDIR .*-> error ENOSYS", log)) == len(re.findall("FUSE OPENDIR", log)) == 1
    assert "FUSE RELEASE" not in log
    assert re.search(r"FUSE READ unique=\d+ nodeid=\d+ .*offset=0 size=\d+ .*-> ok len=\d+ " + lat, log)
