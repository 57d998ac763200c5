"""End to end: a RAFS image whose blob lives only in a real registry, mounted by `nydusd-py fuse`
with a registry backend and a blobcache; reads fetch only the chunks of the files read (seen by
a pass-through proxy in front of the registry, the registry's own log and the daemon's metrics);
the cache survives a restart; basic auth, token auth and a pull-through mirror work too."""

import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.fs.failed_reads import HOLD
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.prefetch import resolve_path
from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.waiting import wait_until

from . import images
from . import registry_rig as rig
from .fault_proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.root]
REPO = Path(__file__).resolve().parents[2]


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.path)
        self.sock = s


class Nydusd:
    def __init__(self, work: Path, name: str, boot: Path, config: dict, prefetch_files: Path | None = None,
                 extra_argv: tuple[str, ...] = ()) -> None:
        self.mnt = work / f"mnt-{name}"
        self.mnt.mkdir(exist_ok=True)
        self.sock = str(work / f"{name}.sock")
        self.log = work / f"{name}.log"
        cfg = work / f"{name}.json"
        cfg.write_text(json.dumps(config))
        argv = [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--config", str(cfg), "--bootstrap", str(boot),
                "--mountpoint", str(self.mnt), "--apisock", self.sock, "--log-level", "info", "--thread-num", "4"]
        if prefetch_files is not None:
            argv += ["--prefetch-files", str(prefetch_files)]
        argv += extra_argv
        env = {**images.env_without_auth(), "PYTHONPATH": str(REPO)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        try:
            wait_until(self._mounted, 30, lambda: f"the daemon to mount:\n{self.log.read_text()}")
        except AssertionError:
            self.kill()
            raise

    def _mounted(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return is_mountpoint(str(self.mnt)) and os.path.exists(self.sock)

    def get(self, path: str) -> dict:
        c = UnixHTTP(self.sock)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            assert r.status == 200, (path, r.status, body)
            return json.loads(body)
        finally:
            c.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon ignored SIGTERM:\n{self.log.read_text()}") from None
        assert rc == 0, self.log.read_text()
        assert not is_mountpoint(str(self.mnt))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if is_mountpoint(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)


@pytest.fixture
def daemons():
    started: list[Nydusd] = []
    yield started
    for d in started:
        d.kill()


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, plain_registry):
    work = tmp_path_factory.mktemp("e2e")
    img = images.build(work / "img", seed=31)
    cfg = parse_registry_config(images.registry_config(plain_registry.host, "test/e2e"), env={},
                                docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, img, "v1", chunked=True)
        boot = images.pull_bootstrap(b, "v1", work / "pulled.boot")
    assert boot.read_bytes() == img.boot.read_bytes()
    return img, boot


def chunk_ranges(boot: Path, rels: list[str]) -> list[tuple[int, int]]:
    with open_bootstrap(str(boot)) as image:
        out = []
        for rel in rels:
            for c in image.chunks(resolve_path(image, b"/" + rel.encode())):
                out.append((c.compressed_offset, c.compressed_offset + c.compressed_size))
        return sorted(out)


def parse_range(h: str) -> tuple[int, int]:
    a, b = h.split("=")[1].split("-")
    return int(a), int(b) + 1


def test_lazy_mount_fetches_only_what_is_read(tmp_path, daemons, pushed, plain_registry):
    require_device("/dev/fuse")
    img, boot = pushed
    proxy = FaultProxy(plain_registry.url)
    try:
        backend = images.registry_config(proxy.host, "test/e2e", read_deadline=4.0, timeout=1.5)
        config = images.nydusd_config(backend, str(tmp_path / "cache"), amplify_io=1 << 20)
        # read-around off, blind and by directory: only chunks of the files read may come
        # (tests/storage/test_read_around.py and tests/fs/test_dir_around.py have the neighbours
        # they take along)
        config["device"]["cache"]["config"]["read_around"] = 0  # type: ignore[index]
        config["device"]["cache"]["config"]["dir_around"] = 0  # type: ignore[index]
        d = Nydusd(tmp_path, "lazy", boot, config)
        daemons.append(d)
        read = ["etc/passwd", "big/c.bin", "small/f07"]
        for rel in read:
            assert (d.mnt / rel).read_bytes() == img.files[rel]
        with open(d.mnt / "big" / "a.bin", "rb") as f:  # one chunk in the middle of another file
            f.seek(3 * images.CHUNK + 10)
            assert f.read(100) == img.files["big/a.bin"][3 * images.CHUNK + 10:3 * images.CHUNK + 110]
        assert sorted(os.listdir(d.mnt / "small")) == sorted(p.split("/")[1] for p in img.files if p.startswith("small/"))

        # allowed: chunks of the files that were read (read amplification stays inside a file)
        wanted = chunk_ranges(boot, read + ["big/a.bin"])
        a_chunks = chunk_ranges(boot, ["big/a.bin"])
        gets = proxy.blob_requests()
        assert gets and all(r.status == 206 for r in gets)
        fetched = sorted(parse_range(r.range) for r in gets)
        for lo, hi in fetched:  # every byte fetched belongs to a chunk of a file that was read
            covered = sorted((max(lo, wlo), min(hi, whi)) for wlo, whi in wanted if wlo < hi and lo < whi)
            assert sum(b - a for a, b in covered) == hi - lo, (lo, hi)
        for (_lo1, hi1), (lo2, _hi2) in zip(fetched, fetched[1:], strict=False):
            assert hi1 <= lo2  # nothing fetched twice
        for lo, hi in a_chunks[:3]:  # a.bin before the read offset: not fetched
            assert not any(flo < hi and lo < fhi for flo, fhi in fetched)
        untouched = chunk_ranges(boot, ["big/b.bin", "text/log.txt"])
        assert not any(flo < hi and lo < fhi for lo, hi in untouched for flo, fhi in fetched)
        total = sum(hi - lo for lo, hi in fetched)
        assert total <= len(img.blob_bytes()) - sum(hi - lo for lo, hi in untouched)
        assert plain_registry.blob_gets(img.blob_id) >= len(gets)
        # the daemon's own metrics agree
        backend_m = d.get("/api/v1/metrics/backend")
        assert backend_m["read_count"] == len(gets) and backend_m["read_amount_total"] == total
        cache_m = d.get("/api/v1/metrics/blobcache")
        assert cache_m["underlying_files"] == [f"{img.blob_id}.blob.data"]
        d.stop()

        # restart on the same cache with a registry that only fails: what was read is still there
        proxy.inject("5xx", 10_000)
        d2 = Nydusd(tmp_path, "restart", boot, config)
        daemons.append(d2)
        n = len(proxy.blob_requests())
        for rel in read:
            assert (d2.mnt / rel).read_bytes() == img.files[rel]
        assert len(proxy.blob_requests()) == n
        with pytest.raises(OSError) as e:
            (d2.mnt / "big" / "b.bin").read_bytes()
        assert e.value.errno == errno.EIO
        assert d2.get("/api/v1/metrics/backend")["read_errors"] >= 1  # the registry's failure, not a hang
        proxy.clear()
        # not poisoned: once the failure's short memory (fs.failed_reads.HOLD) has passed, the
        # registry is asked again and the bytes are right
        def read_b() -> bytes | None:
            try:
                return (d2.mnt / "big" / "b.bin").read_bytes()
            except OSError as e:
                assert e.errno == errno.EIO, e
                return None

        data = wait_until(read_b, HOLD + 10, "big/b.bin readable again after the registry recovered")
        assert data == img.files["big/b.bin"]
        d2.stop()
    finally:
        proxy.stop()


def test_prefetch_files_fill_the_cache(tmp_path, daemons, pushed, plain_registry):
    require_device("/dev/fuse")
    img, boot = pushed
    lst = tmp_path / "prefetch.list"
    lst.write_text("/big/b.bin\n/etc/motd\n")
    config = images.nydusd_config(images.registry_config(plain_registry.host, "test/e2e"), str(tmp_path / "cache"),
                                  fs_prefetch={"enable": True, "prefetch_all": False, "threads_count": 2})
    d = Nydusd(tmp_path, "pf", boot, config, prefetch_files=lst)
    daemons.append(d)
    wait_until(lambda: d.get("/api/v1/metrics/blobcache")["prefetch_end_time_secs"], 20, "prefetch to finish")
    m = d.get("/api/v1/metrics/blobcache")
    want = {lo for lo, _ in chunk_ranges(boot, ["big/b.bin", "etc/motd"])}
    assert m["prefetch_data_amount"] == sum(hi - lo for lo, hi in chunk_ranges(boot, ["big/b.bin", "etc/motd"]))
    assert len(want) >= 5
    before = d.get("/api/v1/metrics/backend")["read_count"]
    assert (d.mnt / "big" / "b.bin").read_bytes() == img.files["big/b.bin"]
    assert d.get("/api/v1/metrics/backend")["read_count"] == before  # served from the cache
    d.stop()


@pytest.mark.parametrize("kind", ["basic", "token", "mirror"])
def test_mount_through_auth_and_mirror(kind, tmp_path, daemons, pushed, plain_registry, request):
    require_device("/dev/fuse")
    img, boot = pushed
    if kind == "mirror":
        reg = request.getfixturevalue("mirror_registry")
        backend = images.registry_config(reg.host, "test/e2e")
    else:
        reg = request.getfixturevalue(f"{kind}_registry")
        auth = rig.basic_auth()
        with RegistryBackend(parse_registry_config(images.registry_config(reg.host, "test/e2e", auth=auth), env={},
                                                   docker_config_paths=[])) as b:
            images.push_image(b, img, "v1")
        backend = images.registry_config(reg.host, "test/e2e", auth=auth)
    d = Nydusd(tmp_path, kind, boot, images.nydusd_config(backend, str(tmp_path / "cache")))
    daemons.append(d)
    for rel in ("etc/passwd", "big/a.bin", "text/log.txt"):
        assert (d.mnt / rel).read_bytes() == img.files[rel]
    m = d.get("/api/v1/metrics/backend")
    assert m["read_errors"] == 0 and m["read_count"] > 0
    d.stop()
