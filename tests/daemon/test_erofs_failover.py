"""Failover and hot upgrade of `fs_driver: erofs` mounts: the kernel's EROFS mount stays, the
blob-view FUSE connection is held by the supervisor (in the one fd it keeps), and the next
daemon re-creates the views from the saved state and serves that connection again.

Readers read files through the EROFS mount with their page cache (and the views') dropped
before every read, so that reads really become FUSE READs of the views; every byte read is
compared with the source. During the gap a read may wait or fail with EIO, never return other
bytes; after the takeover every file reads right. Mount/umount rounds must leave nothing behind.
"""

import contextlib
import errno
import json
import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nydus_py.api.server import API_WORKERS
from nydus_py.fs.erofs_serve import ErofsServe
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.mount import is_mountpoint
from tests.builder.erofs_rig import erofs_at, erofs_available
from tests.conftest import require_device
from tests.daemon.rig import Api, DaemonProc, wait_state
from tests.daemon.test_failover import Supervisor
from tests.fs.mountrig import build
from tests.fs.test_erofs_driver import served
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
V1 = "/api/v1"
CHUNK = 0x10000
KILL_ROUNDS = 20
MOUNT_ROUNDS = 50
READERS = 32


# -- the image and its readers ---------------------------------------------------------------------------


def make_source(src: Path, files: int = 24, seed: int = 5) -> dict[str, bytes]:
    """Files of one to nine 64 KiB chunks (plus tails), in a few directories."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(files):
        rel = f"d{i % 3}/f{i:02d}"
        out[rel] = rng.randbytes(rng.randint(1, 9) * CHUNK + rng.randrange(0, 5000))
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(out[rel])
    return out


def config(blob_dir: str, cache_dir: str, *, validate: bool = True) -> str:
    return json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": blob_dir}},
                                  "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}},
                       "mode": "direct", "digest_validate": validate, "fs_driver": "erofs"})


def drop(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@dataclass
class Tally:
    reads: int = 0
    bytes_ok: int = 0
    wrong_bytes: int = 0
    eio: int = 0
    waited: int = 0  # reads begun before the new daemon served and answered by it (they waited)
    other: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.progress = threading.Condition(self.lock)


class Readers:
    """`n` threads reading random ranges of the files under `root` (cold: each drops the file's
    pages and every view's before its read) until stopped; each compares what it read."""

    def __init__(self, root: str, files: dict[str, bytes], views: list[str], n: int = READERS,
                 allowed: tuple[int, ...] = (errno.EIO,)) -> None:
        self.root = root
        self.files = files
        self.view_fds = [os.open(v, os.O_RDONLY) for v in views]  # (opened while a daemon serves)
        for v in self.view_fds:
            # The first close(2) of a view file sends FLUSH, which the views answer ENOSYS so that
            # the kernel stops sending it. Have that happen now: a FLUSH waits uninterruptibly
            # until it is answered, and the new daemon's fork closes inherited fds in the gap.
            os.close(os.dup(v))
        self.allowed = allowed
        self.tally = Tally()
        self.phase = 0  # 1: the daemon is gone, 2: its successor serves (set by the test)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        rng = random.Random(k)
        names = sorted(self.files)
        while not self.stop.is_set():
            rel = rng.choice(names)
            want = self.files[rel]
            off = rng.randrange(0, len(want)) & ~0xFFF
            size = rng.choice([4096, 20_000, CHUNK, 3 * CHUNK])
            try:
                fd = os.open(os.path.join(self.root, rel), os.O_RDONLY)
            except OSError as e:
                self._error(e)
                continue
            try:
                drop(fd)
                for v in self.view_fds:
                    drop(v)
                phase = self.phase
                got = os.pread(fd, size, off)
            except OSError as e:
                self._error(e)
                continue
            finally:
                os.close(fd)
            exp = want[off:off + size]
            wrong = sum(a != b for a, b in zip(got, exp, strict=False)) + max(0, len(got) - len(exp))
            if len(got) < len(exp) and not wrong:
                # a read that failed partway (a page past the first got EIO) returns what it had:
                # an EIO for the tally, not wrong bytes (which would be a mismatch in what came)
                self._error(OSError(errno.EIO, "short read"))
                continue
            with self.tally.lock:
                self.tally.reads += 1
                self.tally.bytes_ok += len(got) - wrong
                self.tally.wrong_bytes += wrong
                self.tally.waited += phase < 2 and self.phase == 2
                self.tally.progress.notify_all()

    def _error(self, e: OSError) -> None:
        with self.tally.lock:
            if e.errno in self.allowed:
                self.tally.eio += e.errno == errno.EIO
                key = errno.errorcode.get(e.errno or 0, str(e.errno))
                if e.errno != errno.EIO:
                    self.tally.other[key] = self.tally.other.get(key, 0) + 1
            else:
                key = f"unexpected {errno.errorcode.get(e.errno or 0, e.errno)}"
                self.tally.other[key] = self.tally.other.get(key, 0) + 1
            self.tally.progress.notify_all()

    def wait_reads(self, more: int, timeout: float = 60.0) -> None:
        """Until `more` reads beyond the current count have completed."""
        with self.tally.lock:
            goal = self.tally.reads + more
        with self.tally.progress:
            ok = self.tally.progress.wait_for(lambda: self.tally.reads >= goal, timeout)
        assert ok, f"readers made no progress: {self.tally}"

    def finish(self) -> Tally:
        self.stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a reader is stuck in a read"
        for v in self.view_fds:
            os.close(v)
        return self.tally


def full_compare(root: str, files: dict[str, bytes], views: list[str]) -> int:
    """Every file, cold, in full: the number of files that differ (or fail)."""
    bad = 0
    vfds = [os.open(v, os.O_RDONLY) for v in views]
    try:
        for v in vfds:
            drop(v)
        for rel, want in sorted(files.items()):
            try:
                with open(os.path.join(root, rel), "rb") as f:
                    drop(f.fileno())
                    bad += f.read() != want
            except OSError:
                bad += 1
    finally:
        for v in vfds:
            os.close(v)
    return bad


# -- the daemon --------------------------------------------------------------------------------------------


def mountinfo() -> list[list[str]]:
    with open("/proc/self/mountinfo") as f:
        return [line.split() for line in f]


def mounted_under(root: str) -> list[str]:
    return [m[4] for m in mountinfo() if m[4] == root or m[4].startswith(root + "/")]


@dataclass
class Rig:
    root: Path
    files: dict[str, bytes]
    boot: str
    blobs: str
    sup: Supervisor
    daemons: list[DaemonProc] = field(default_factory=list)

    @property
    def mnt(self) -> str:
        return str(self.root / "mnt")

    @property
    def host(self) -> str:
        return str(self.root / "host")

    def start(self, sock: str, *extra: str, dedicated: list[str] | None = None) -> tuple[DaemonProc, Api]:
        """A shared daemon (FUSE root at mnt), or with `dedicated` (its image arguments) one
        that serves a single image with the EROFS driver at host."""
        where = dedicated + ["--mountpoint", self.host] if dedicated else ["--mountpoint", self.mnt]
        argv = ["fuse", "--thread-num", "2", "--id", "d1", *where, "--apisock", sock,
                "--log-level", "info", "--supervisor", self.sup.path, "--failover-policy", "resend", *extra]
        d = DaemonProc(argv, str(self.root / f"d{len(self.daemons)}.log"))
        self.daemons.append(d)
        d.wait_socket(sock, 30)
        return d, Api(sock)

    def mount(self, api: Api, host: str | None = None, *, validate: bool = True) -> None:
        body = {"fs_type": "rafs", "source": self.boot,
                "config": config(self.blobs, str(self.root / "cache"), validate=validate)}
        r = api.request("POST", f"{V1}/mount", {"mountpoint": host or self.host}, body)
        assert r.status == 204, (r.status, r.body, self.daemons[-1].log_text())

    def views(self, api: Api, host: str | None = None) -> tuple[str, list[str]]:
        """(the view dir, its files) of the EROFS mount at `host` (of a dedicated daemon's one
        mount: ""), from the blob-cache metrics."""
        m = api.get(f"{V1}/metrics/blobcache", **({"id": host or self.host} if host != "" else {})).json()["erofs"]
        vd = m["view_dir"]
        return vd, sorted(os.path.join(vd, n) for n in os.listdir(vd))

    def erofs_metrics(self, api: Api, host: str | None = None) -> dict[str, int]:
        query = {"id": host or self.host} if host != "" else {}
        return api.get(f"{V1}/metrics/blobcache", **query).json()["erofs"]  # type: ignore[no-any-return]

    def takeover(self, sock: str, *extra: str, dedicated: list[str] | None = None) -> tuple[DaemonProc, Api]:
        """A new daemon (same argv; `--upgrade` for a hot upgrade) takes the state over -> READY."""
        sender = self.sup.serve_restore()
        d, api = self.start(sock, *extra, dedicated=dedicated)
        wait_state(api, "INIT")
        r = api.request("PUT", f"{V1}/daemon/fuse/takeover")
        assert r.status == 204, (r.status, r.body, d.log_text())
        sender.join(10)
        wait_state(api, "READY")
        return d, api

    def run(self, api: Api) -> None:
        r = api.request("PUT", f"{V1}/daemon/start")
        assert r.status == 204, (r.status, r.body, self.daemons[-1].log_text())
        wait_state(api, "RUNNING")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], str, str]:
    work = tmp_path_factory.mktemp("erofs-failover")
    src = work / "src"
    files = make_source(src)
    img = build(str(src), str(work / "img"), views=False)
    return files, img.boot, img.blob_dir


@pytest.fixture
def rig(tmp_path: Path, image: tuple[dict[str, bytes], str, str]) -> Iterator[Rig]:
    require_device("/dev/fuse")
    erofs_available()
    for d in ("mnt", "host", "socket", "supervisor"):
        (tmp_path / d).mkdir()
    (tmp_path / "socket").chmod(0o700)
    files, boot, blobs = image
    r = Rig(tmp_path, files, boot, blobs, Supervisor(str(tmp_path / "supervisor/d1.sock")))
    try:
        yield r
    finally:
        for d in r.daemons:
            d.kill()
        r.sup.close()
        for p in sorted(mounted_under(str(tmp_path)), key=len, reverse=True):
            os.system(f"umount -l {p} 2>/dev/null")  # noqa: S605 (a failed test's leftovers)
        for d in r.daemons:  # views of a failed test
            for line in d.log_text().splitlines():
                if "blob views at " in line:
                    v = line.rsplit("blob views at ", 1)[1].rstrip(")")
                    if is_mountpoint(v):
                        os.system(f"umount -l {v} 2>/dev/null")  # noqa: S605
                    if os.path.isdir(v):
                        with contextlib.suppress(OSError):
                            os.rmdir(v)


@contextmanager
def reading(rig: Rig, api: Api, **kw: object) -> Iterator[Readers]:
    _vd, views = rig.views(api)
    readers = Readers(rig.host, rig.files, views, **kw)  # type: ignore[arg-type]
    try:
        yield readers
    finally:
        readers.stop.set()


# -- the tests ---------------------------------------------------------------------------------------------


def test_kill_9_under_32_cold_readers_then_takeover_20_rounds(rig: Rig) -> None:
    """Round after round: kill -9 the daemon while 32 readers read cold, a new one takes over
    through the supervisor. 0 wrong bytes; every file right after each takeover."""
    sock = str(rig.root / "socket/api.sock")
    d, api = rig.start(sock)
    rig.mount(api)
    assert erofs_at(rig.host)
    view_dir, views = rig.views(api)
    assert full_compare(rig.host, rig.files, views) == 0
    rig.sup.save(api)
    totals = Tally()
    served_after = []
    for k in range(KILL_ROUNDS):
        readers = Readers(rig.host, rig.files, views)
        try:
            readers.wait_reads(READERS)  # every reader is busy, reading cold
            readers.phase = 1
            d.stop(signal.SIGKILL)
            api.close()
            assert erofs_at(rig.host) and is_mountpoint(view_dir), "the kernel mounts stay"
            # same argv, no --upgrade: the new daemon sees the crash and waits for the takeover
            d, api = rig.takeover(sock)
            rig.run(api)
            readers.phase = 2
            readers.wait_reads(2 * READERS)  # served by the new daemon
        finally:
            tally = readers.finish()
        assert tally.wrong_bytes == 0, (k, tally)
        assert not tally.other, (k, tally)
        with totals.lock:
            totals.reads += tally.reads
            totals.eio += tally.eio
            totals.bytes_ok += tally.bytes_ok
            totals.waited += tally.waited
        assert rig.views(api) == (view_dir, views), "the same view mount, re-created"
        assert full_compare(rig.host, rig.files, views) == 0, (k, d.log_text())
        served_after.append(rig.erofs_metrics(api)["kernel_reads"])
        rig.sup.save(api)  # the snapshotter's sendfd round after a takeover
    print(f"\n{KILL_ROUNDS} rounds: {totals.reads} reads, {totals.bytes_ok} bytes right, 0 wrong, "
          f"{totals.eio} EIO, {totals.waited} waited for the successor")
    assert totals.waited + totals.eio > 0, "no read ever met the gap"
    assert all(n > 0 for n in served_after), served_after  # reads really went through the views
    api.close()
    assert d.stop(signal.SIGTERM) == 0, d.log_text()
    assert not erofs_at(rig.host) and not is_mountpoint(view_dir) and not os.path.exists(view_dir)
    assert not is_mountpoint(rig.mnt)


def test_hot_upgrade_keeps_erofs_mount_serving(rig: Rig) -> None:
    sock0, sock1 = (str(rig.root / "socket" / f"api{k}.sock") for k in range(2))
    old, api0 = rig.start(sock0)
    rig.mount(api0)
    view_dir, views = rig.views(api0)
    rig.sup.save(api0)
    with reading(rig, api0) as readers:
        readers.wait_reads(READERS)
        new, api1 = rig.takeover(sock1, "--upgrade")
        assert api0.request("PUT", f"{V1}/daemon/exit").status == 204
        assert old.wait_exit() == 0, old.log_text()
        assert erofs_at(rig.host) and is_mountpoint(view_dir), old.log_text()
        rig.run(api1)
        readers.wait_reads(2 * READERS)
        tally = readers.finish()
    print(f"\nhot upgrade: {tally.reads} reads, {tally.wrong_bytes} wrong bytes, {tally.eio} EIO")
    assert tally.wrong_bytes == 0 and not tally.other, tally
    assert full_compare(rig.host, rig.files, views) == 0
    assert rig.erofs_metrics(api1)["kernel_reads"] > 0
    api0.close()
    api1.close()
    assert new.stop(signal.SIGTERM) == 0, new.log_text()
    assert not erofs_at(rig.host) and not is_mountpoint(view_dir) and not os.path.exists(view_dir)


def test_dedicated_erofs_daemon_failover(rig: Rig) -> None:
    """`nydusd-py fuse --fs-driver erofs --bootstrap B --mountpoint M --supervisor S`: killed, it
    is restarted with the same argv, sees the crash (M still mounted, its API socket dead) and
    waits in INIT; the takeover carries the one EROFS mount over (the bundle holds no /dev/fuse)."""
    cfg = rig.root / "config.json"
    cfg.write_text(config(rig.blobs, str(rig.root / "cache")))
    image_args = ["--fs-driver", "erofs", "--config", str(cfg), "--bootstrap", rig.boot]
    sock = str(rig.root / "socket/api.sock")
    d, api = rig.start(sock, dedicated=image_args)
    wait_state(api, "RUNNING")
    assert erofs_at(rig.host) and not is_mountpoint(rig.mnt)
    view_dir, views = rig.views(api, "")
    rig.sup.save(api)
    readers = Readers(rig.host, rig.files, views)
    try:
        readers.wait_reads(READERS)
        readers.phase = 1
        d.stop(signal.SIGKILL)
        api.close()
        assert erofs_at(rig.host) and is_mountpoint(view_dir)
        d, api = rig.takeover(sock, dedicated=image_args)
        rig.run(api)
        readers.phase = 2
        readers.wait_reads(2 * READERS)
    finally:
        tally = readers.finish()
    assert tally.wrong_bytes == 0 and not tally.other, tally
    assert full_compare(rig.host, rig.files, views) == 0
    assert rig.erofs_metrics(api, "")["kernel_reads"] > 0
    rig.sup.save(api)  # and it can hand over again
    api.close()
    assert d.stop(signal.SIGTERM) == 0, d.log_text()
    assert not erofs_at(rig.host) and not is_mountpoint(view_dir) and not os.path.exists(view_dir)


def test_takeover_of_a_mount_reading_complete_cache_files(rig: Rig) -> None:
    """A mount made when the blob cache was already complete has no blob views at all: EROFS
    reads the cache data files (`cache_devices`). kill -9, then a takeover: the EROFS mount is
    adopted as it is (not torn down for missing views), the files stay pinned, every file reads
    right, and SIGTERM then unmounts it."""
    sock = str(rig.root / "socket/api.sock")
    d, api = rig.start(sock)
    rig.mount(api)
    _vd, views = rig.views(api)
    assert full_compare(rig.host, rig.files, views) == 0  # every chunk is in the cache now
    r = api.request("DELETE", f"{V1}/mount", {"mountpoint": rig.host})
    assert r.status == 204, r.body
    rig.mount(api, validate=False)  # (with digest validation the views stay: they check every read)
    m = rig.erofs_metrics(api)
    assert m["view_dir"] == "" and m["cache_devices"] >= 1 and m["cache_device_fallbacks"] == 0, m
    rig.sup.save(api)
    d.stop(signal.SIGKILL)
    api.close()
    assert erofs_at(rig.host)
    d, api = rig.takeover(sock)
    rig.run(api)
    assert erofs_at(rig.host), d.log_text()
    m = rig.erofs_metrics(api)
    assert m["cache_devices_pinned"] == m["cache_devices"] >= 1, m
    assert full_compare(rig.host, rig.files, []) == 0
    rig.sup.save(api)  # and it can hand over again
    api.close()
    assert d.stop(signal.SIGTERM) == 0, d.log_text()
    assert not erofs_at(rig.host)


def test_fuse_root_unmounted_after_sendfd_still_unmounts_erofs(rig: Rig) -> None:
    """Only a hand-over (PUT /daemon/exit) leaves the EROFS mounts sent to the supervisor: when
    the daemon ends because its FUSE root went away, no successor will see a crash (the root
    is not mounted), so they are unmounted as before, nothing left behind."""
    d, api = rig.start(str(rig.root / "socket/api.sock"))
    rig.mount(api)
    view_dir, _views = rig.views(api)
    rig.sup.save(api)
    api.close()
    os.system(f"umount -l {rig.mnt}")  # noqa: S605
    assert d.wait_exit() == 0, d.log_text()
    assert not erofs_at(rig.host) and not is_mountpoint(view_dir) and not os.path.exists(view_dir), d.log_text()


def test_adopt_refuses_another_blob_table_eio_never_wrong_bytes(tmp_path: Path,
                                                                image: tuple[dict[str, bytes], str, str]) -> None:
    """A successor whose bootstrap no longer has the blob table the kernel mounted with must not
    serve the views (other blobs' bytes at those offsets): it aborts them (EIO) and unmounts."""
    require_device("/dev/fuse")
    erofs_available()
    files, boot, blobs = image
    other_src = tmp_path / "other"
    make_source(other_src, files=3, seed=99)
    other = build(str(other_src), str(tmp_path / "other-img"), views=False)
    base = str(tmp_path / "views")
    os.makedirs(base)
    with served(boot, blobs, str(tmp_path / "w"), base_dir=base) as s:
        rel = sorted(files)[0]
        fd = os.open(os.path.join(s.serve.target, rel), os.O_RDONLY)  # busy: detached, not unmounted
        try:
            img2 = open_bootstrap(other.boot)
            dev2 = BlobDevice(img2, LocalBlobDir(other.blob_dir))
            succ = ErofsServe(img2, dev2, other.boot, s.serve.target)
            with pytest.raises(ValueError, match="blob table differs"):
                succ.adopt(s.serve.handover_state(), os.dup(s.serve.view_fd))
            img2.close()
            assert succ.aborts == 1
            assert not is_mountpoint(s.serve.target) and not is_mountpoint(s.serve.view_dir)
            drop(fd)
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, 0)
            assert ei.value.errno in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)
        finally:
            os.close(fd)
    assert os.listdir(base) == []


def _census(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def _loop_backing() -> dict[str, str]:
    out = {}
    for dev in sorted(Path("/sys/block").glob("loop*")):
        f = dev / "loop" / "backing_file"
        out[dev.name] = f.read_text().strip() if f.exists() else ""
    return out


def test_50_mount_umount_rounds_under_readers_leak_nothing(rig: Rig) -> None:
    """Mount, read with concurrent readers, sendfd (as the snapshotter does), umount while they
    still read: never a wrong byte, and afterwards no mount, fd, thread, loop device or view
    directory more than before."""
    d, api = rig.start(str(rig.root / "socket/api.sock"))
    pid = d.proc.pid
    hosts = [rig.host, str(rig.root / "host2")]
    os.mkdir(hosts[1])
    rig.mount(api)  # a first round: imports and module state are there before the census
    rig.sup.save(api)
    assert api.request("DELETE", f"{V1}/mount", {"mountpoint": rig.host}).status == 204
    rig.sup.save(api)
    base_mounts = sorted(mounted_under(str(rig.root)))
    base_fds, base_tasks = _census(pid)
    loops = _loop_backing()
    seen_views: set[str] = set()
    totals = Tally()
    allowed = (errno.EIO, errno.ENOENT, errno.EBUSY, errno.ENOTCONN, errno.ECONNABORTED)
    for k in range(MOUNT_ROUNDS):
        host = hosts[k % 2]
        rig.mount(api, host)
        vd, _views = rig.views(api, host)
        seen_views.add(vd)
        # (no view fds held: an open view file would keep the view mount busy at umount)
        readers = Readers(host, rig.files, [], n=8, allowed=allowed)
        try:
            readers.wait_reads(8)
            rig.sup.save(api)
            r = api.request("DELETE", f"{V1}/mount", {"mountpoint": host})
            assert r.status == 204, (r.status, r.body, d.log_text())
        finally:
            tally = readers.finish()
        assert tally.wrong_bytes == 0, (k, tally)
        assert not [key for key in tally.other if key.startswith("unexpected")], (k, tally)
        totals.reads += tally.reads
        totals.eio += tally.eio
        rig.sup.save(api)
        assert not is_mountpoint(host) and not is_mountpoint(vd) and not os.path.exists(vd), (k, d.log_text())
    assert len(seen_views) == MOUNT_ROUNDS
    assert sorted(mounted_under(str(rig.root))) == base_mounts
    assert not any(is_mountpoint(v) or os.path.exists(v) for v in seen_views)
    assert _loop_backing() == loops
    # The API's thread pool grows lazily up to API_WORKERS and never shrinks (a request that
    # comes while the last one's worker is not yet idle again starts another): that much slack;
    # a leak of even one thread a round would be 50 more.
    slack = API_WORKERS - 1
    wait_until(lambda: _census(pid)[0] <= base_fds and _census(pid)[1] <= base_tasks + slack, 20,
               lambda: f"fds/threads back to {(base_fds, base_tasks)} (+{slack} threads), now {_census(pid)}")
    print(f"\n{MOUNT_ROUNDS} rounds: {totals.reads} reads, 0 wrong bytes, {totals.eio} EIO; "
          f"fds {base_fds} -> {_census(pid)[0]}, threads {base_tasks} -> {_census(pid)[1]}")
    api.close()
    assert d.stop(signal.SIGTERM) == 0, d.log_text()
