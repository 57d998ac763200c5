"""`fs_driver: erofs` for images in a real registry (Debian's `docker-registry` on loopback),
mounted by reference (`--image REF`, `docker://` sources over the API): the bootstrap is fetched
at mount, the data blob is read lazily through the blob cache. A counting proxy in front of the
registry shows what each step fetched; the storage fault matrix runs through it too."""

import concurrent.futures
import errno
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.fs.erofs_serve import ErofsServe
from nydus_py.fs.failed_reads import HOLD
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.constants import Compressor
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from nydus_py.transport.mount import is_mountpoint
from tests.builder.erofs_rig import blob_view_mounts, compare_trees, erofs_at, erofs_available
from tests.daemon.rig import Api, DaemonProc, wait_state
from tests.storage import images
from tests.storage.conftest import plain_registry, registry_bin, registry_root  # noqa: F401
from tests.storage.fault_proxy import FaultProxy, Request

pytestmark = [pytest.mark.slow, pytest.mark.root]

REPO = "test/erofs-ref"
BULK = 6  # MiB of incompressible data beside the small files
MANY = 24


@dataclass
class Pushed:
    image: images.BuiltImage
    boot_layer: str  # digest of the bootstrap layer
    registry_url: str

    @property
    def data_blob(self) -> str:
        return self.image.blob_id


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, plain_registry) -> Pushed:  # noqa: F811
    work = tmp_path_factory.mktemp("erofs-ref")
    src = work / "src"
    files = images.make_tree(src, seed=21)
    rng = random.Random(21)
    (src / "bulk").mkdir()
    for i in range(BULK):
        data = rng.randbytes(1 << 20)
        (src / "bulk" / f"b{i}").write_bytes(data)
        files[f"bulk/b{i}"] = data
    many = random.Random(22)  # files of two chunks side by side, most never read (the startup-set test)
    (src / "many").mkdir()
    for i in range(MANY):
        data = many.randbytes(80 << 10)
        (src / "many" / f"m{i:02d}").write_bytes(data)
        files[f"many/m{i:02d}"] = data
    blob_dir = work / "blobs"
    result = build_image(tree_from_directory(src), str(work / "image.boot"), str(blob_dir),
                         BuildOptions(chunk_size=images.CHUNK, compressor=Compressor.ZSTD))
    img = images.BuiltImage(src, work / "image.boot", blob_dir, result, files)
    cfg = parse_registry_config(images.registry_config(plain_registry.host, REPO), env={}, docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, img, "v1")
        manifest = json.loads(b.get_manifest("v1")[0])
    return Pushed(img, manifest["layers"][-1]["digest"], plain_registry.url)


@pytest.fixture
def proxy(pushed: Pushed) -> Iterator[FaultProxy]:
    p = FaultProxy(pushed.registry_url, stall_seconds=10)
    yield p
    p.stop()


def config(proxy: FaultProxy, cache: str, **extra: object) -> dict[str, object]:
    backend = images.registry_config(proxy.host, REPO, timeout=1, read_deadline=3, retry_limit=3)
    return images.nydusd_config(backend, cache, amplify_io=128 << 10, **extra)


def _ranged_bytes(reqs: list[Request]) -> int:
    """Bytes asked for by ranged GETs (`Range: bytes=a-b`)."""
    total = 0
    for r in reqs:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", r.range or "")
        assert m, f"an unranged GET of the data blob: {r.target}"
        total += int(m.group(2)) - int(m.group(1)) + 1
    return total


def data_gets(proxy: FaultProxy, pushed: Pushed) -> list[Request]:
    return [r for r in proxy.blob_requests() if pushed.data_blob in r.path]


def _cleanup(paths: list[str], d: DaemonProc) -> None:
    """After a failed daemon test: detach what it left (its EROFS mounts, then the blob views
    its log names; never another test's)."""
    for p in paths:
        if is_mountpoint(p):
            subprocess.run(["umount", "-l", p], check=False, capture_output=True)
    for v in re.findall(r"blob views at (\S+)\)", d.log_text()):
        if v in blob_view_mounts():
            subprocess.run(["umount", "-l", v], check=False, capture_output=True)


def test_dedicated_by_reference_lazy_and_equal(tmp_path: Path, pushed: Pushed, proxy: FaultProxy) -> None:
    """`nydusd-py fuse --fs-driver erofs --image REF`: at mount only the manifest and the
    bootstrap layer are fetched; one small file costs a few chunks of a multi-MiB blob; the
    tree then compares equal to its source on every field."""
    erofs_available()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config(proxy, str(tmp_path / "cache"))))
    mnt, sock = tmp_path / "mnt", str(tmp_path / "api.sock")
    mnt.mkdir()
    d = DaemonProc(["fuse", "--fs-driver", "erofs", "--image", f"{proxy.host}/{REPO}:v1", "--config", str(cfg),
                    "--mountpoint", str(mnt), "--apisock", sock], str(tmp_path / "d.log"))
    try:
        d.wait_socket(sock, 60)
        api = Api(sock)
        wait_state(api, "RUNNING")
        assert erofs_at(str(mnt)), d.log_text()
        blob_gets = proxy.blob_requests()
        assert [r.path.rsplit("/", 1)[1] for r in blob_gets] == [pushed.boot_layer], \
            [r.target for r in proxy.requests]
        assert any("/manifests/v1" in r.path for r in proxy.requests)
        # metadata never leaves the kernel: a walk of every inode fetches nothing
        n = sum(len(dirs) + len(names) for _, dirs, names in os.walk(mnt))
        assert n > 40 and data_gets(proxy, pushed) == []
        assert (mnt / "etc" / "motd").read_bytes() == pushed.image.files["etc/motd"]
        fetched = _ranged_bytes(data_gets(proxy, pushed))
        blob = len(pushed.image.blob_bytes())
        assert 0 < fetched <= 256 << 10, f"one small file fetched {fetched} bytes of a {blob}-byte blob"
        assert blob > 12 * fetched
        assert compare_trees(str(pushed.image.src), str(mnt)) > 40
        m = api.get("/api/v1/metrics/blobcache").json()
        assert m["erofs"]["kernel_reads"] > 0 and m["erofs"]["backend_bytes"] > 0, m
        view_dir = m["erofs"]["view_dir"]
        assert view_dir in blob_view_mounts()
        api.close()
        assert d.stop(signal.SIGTERM) == 0, d.log_text()
        assert not is_mountpoint(str(mnt)) and view_dir not in blob_view_mounts(), d.log_text()
    finally:
        d.kill()
        _cleanup([str(mnt)], d)


def test_shared_api_mount_of_docker_source(tmp_path: Path, pushed: Pushed, proxy: FaultProxy) -> None:
    """`POST /api/v1/mount` of a `docker://` source whose config says `"fs_driver": "erofs"`:
    EROFS at the host path, equal to the source; umount leaves nothing mounted."""
    erofs_available()
    fuse_mnt, host, sock = tmp_path / "fuse", tmp_path / "host", str(tmp_path / "api.sock")
    fuse_mnt.mkdir()
    host.mkdir()
    d = DaemonProc(["fuse", "--mountpoint", str(fuse_mnt), "--apisock", sock], str(tmp_path / "d.log"))
    try:
        d.wait_socket(sock, 60)
        api = Api(sock)
        wait_state(api, "RUNNING")
        body = {"fs_type": "rafs", "source": f"docker://{proxy.host}/{REPO}:v1",
                "config": json.dumps(config(proxy, str(tmp_path / "cache"), fs_driver="erofs"))}
        r = api.request("POST", "/api/v1/mount", {"mountpoint": str(host)}, body)
        assert r.status == 204, (r.status, r.body, d.log_text())
        assert erofs_at(str(host)) and data_gets(proxy, pushed) == []
        assert compare_trees(str(pushed.image.src), str(host)) > 40
        assert data_gets(proxy, pushed)
        view_dir = api.get("/api/v1/metrics/blobcache", id=str(host)).json()["erofs"]["view_dir"]
        assert view_dir in blob_view_mounts()
        r = api.request("DELETE", "/api/v1/mount", {"mountpoint": str(host)})
        assert r.status == 204, r.body
        assert not is_mountpoint(str(host)) and view_dir not in blob_view_mounts()
        api.close()
        assert d.stop(signal.SIGTERM) == 0, d.log_text()
    finally:
        d.kill()
        _cleanup([str(host), str(fuse_mnt)], d)


# -- the storage fault matrix, through the kernel's EROFS driver ----------------------------------------

TIMEOUT, DEADLINE = 0.5, 2.0  # the backend's per-attempt timeout and per-read deadline
LIMIT = DEADLINE + 1.5  # a read(2) ends (bytes or EIO) within this; two deadlines would not
BLOCK = 16 << 10
FAULTS = ("5xx", "reset", "stall", "truncate", "short", "oversize", "bad_range", "corrupt", "200_for_206")
FILES = ["big/a.bin", "etc/passwd", "small/f03", "text/log.txt"]


@dataclass
class FaultRig:
    proxy: FaultProxy
    backend: RegistryBackend
    cache: BlobCacheManager
    serve: ErofsServe
    files: dict[str, bytes]
    pool: concurrent.futures.ThreadPoolExecutor

    def pread(self, rel: str, offset: int, size: int = BLOCK) -> bytes | None:
        """One read(2) of the EROFS mount: its bytes, or None for EIO; it must end within LIMIT
        and any bytes it returns must be the source's."""
        def go() -> bytes | None:
            fd = os.open(os.path.join(self.serve.target, rel), os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            except OSError as e:
                assert e.errno == errno.EIO, f"{rel} @{offset}: {e}"
                return None
            finally:
                os.close(fd)

        fut = self.pool.submit(go)
        try:
            got = fut.result(timeout=LIMIT)
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"read of {rel} @{offset} still blocked after {LIMIT} s") from None
        want = self.files[rel][offset:offset + size]
        if got is not None and got != want:
            zeros = got == bytes(len(got))
            raise AssertionError(f"{rel} @{offset}: wrong bytes{' (zeros)' if zeros else ''}")
        return got

    def read_all(self, rel: str) -> int:
        """Read `rel` block by block; returns how many blocks were EIO (the rest were right)."""
        size = len(self.files[rel])
        return sum(self.pread(rel, off) is None for off in range(0, size, BLOCK))

    def recovered(self, rel: str) -> None:
        """Every block of `rel` reads right once the short memory of failed ranges
        (`failed_reads.HOLD`) has passed: failures were not cached, by us or by the kernel."""
        for off in range(0, len(self.files[rel]), BLOCK):
            deadline = time.monotonic() + HOLD + LIMIT
            while self.pread(rel, off) is None:
                assert time.monotonic() < deadline, f"{rel} @{off} still EIO with a healthy registry"
                time.sleep(0.05)  # poll interval of the condition above


@contextmanager
def served_through_proxy(tmp_path: Path, pushed: Pushed, amplify_io: int = 128 << 10) -> Iterator[FaultRig]:
    """The pushed image served with the EROFS driver in this process, its blob read through a
    fault proxy in front of the registry, with a fresh blob cache and page cache."""
    erofs_available()
    proxy = FaultProxy(pushed.registry_url, stall_seconds=10)
    conf = images.registry_config(proxy.host, REPO, timeout=TIMEOUT, read_deadline=DEADLINE, retry_limit=3)
    backend = RegistryBackend(parse_registry_config(conf, env={}, docker_config_paths=[]))
    cache = BlobCacheManager(str(tmp_path / "cache"), backend, amplify_io=amplify_io)
    image = open_bootstrap(str(pushed.image.boot))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    serve = ErofsServe(image, BlobDevice(image, cache, amplify_io=amplify_io), str(pushed.image.boot), str(mnt),
                       base_dir=str(tmp_path))
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        serve.start()
        yield FaultRig(proxy, backend, cache, serve, pushed.image.files, pool)
    finally:
        proxy.clear()
        serve.close()
        pool.shutdown(wait=True)
        cache.close()
        image.close()
        proxy.stop()
    assert not is_mountpoint(str(mnt))


# whole files scattered over the blob, each with unread neighbours: two-chunk ones (80 KiB) and
# small ones
STARTUP = [*(f"many/m{i:02d}" for i in range(0, MANY, 4)), "etc/passwd", "etc/motd",
           *(f"small/f{i:02d}" for i in range(0, 30, 3))]


def test_erofs_startup_set_fetches_little_more_than_it_reads(tmp_path: Path, pushed: Pushed) -> None:
    """Laziness through the kernel's EROFS driver: nothing but the bootstrap is needed to mount
    and walk the tree, and reading a startup set (whole files: multi-chunk ones and small ones,
    scattered over the blob) fetches at most 1.3x the bytes it reads (the data is incompressible,
    so compression does not flatter the ratio), with the default amplify_io (1 MiB). Readahead
    on the views, or amplification that takes whatever follows in the blob, would blow this up."""
    with served_through_proxy(tmp_path, pushed, amplify_io=1 << 20) as r:
        n = sum(len(dirs) + len(names) for _, dirs, names in os.walk(r.serve.target))
        assert n > 40 and data_gets(r.proxy, pushed) == [], "mount and walk fetched data"
        nread = 0
        for rel in STARTUP:
            got = (Path(r.serve.target) / rel).read_bytes()
            assert got == r.files[rel], rel
            nread += len(got)
        fetched = _ranged_bytes(data_gets(r.proxy, pushed))
        blob = len(pushed.image.blob_bytes())
        print(f"startup set: read {nread}, fetched {fetched} ({fetched / nread:.2f}x) of a {blob}-byte blob")
        assert fetched <= 1.3 * nread, f"fetched {fetched} bytes to read {nread} ({fetched / nread:.2f}x)"
        assert fetched < blob / 2


@pytest.mark.parametrize("fault", FAULTS)
def test_erofs_one_fault_is_absorbed(tmp_path: Path, pushed: Pushed, fault: str) -> None:
    """One fault on the first blob GET: retried (or the chunk fetched again), the reader never
    sees it; every file then reads right."""
    with served_through_proxy(tmp_path, pushed) as r:
        r.proxy.inject(fault)
        assert r.read_all("big/a.bin") == 0
        assert r.proxy.injected[fault] == 1
        for rel in FILES:
            assert r.read_all(rel) == 0
        assert r.serve.fs.stats.read_errors == 0


@pytest.mark.parametrize("fault", FAULTS)
def test_erofs_persistent_fault_is_eio_then_recovers(tmp_path: Path, pushed: Pushed, fault: str) -> None:
    """Every blob GET faulty: each read(2) ends within the deadline with EIO or the right bytes
    (a 200 for a 206 is whole and right), never zeros; once the registry is healthy again the
    same ranges read right (the failures were not cached, by us or by the kernel)."""
    with served_through_proxy(tmp_path, pushed) as r:
        r.proxy.inject(fault, 1000)
        offsets = (0, 3 * images.CHUNK)
        eio = sum(r.pread("big/c.bin", off) is None for off in offsets)
        eio += r.pread("etc/motd", 0) is None
        if fault == "corrupt":  # one flipped byte per response: some chunk of the file is bad
            eio += r.read_all("big/c.bin")
        if fault == "200_for_206":
            assert eio == 0
        else:
            assert eio >= 1 and r.serve.fs.stats.read_errors >= 1
        r.proxy.clear()
        for rel in ("big/c.bin", "etc/motd"):
            r.recovered(rel)


def test_erofs_mixed_faults_never_a_wrong_byte(tmp_path: Path, pushed: Pushed) -> None:
    """A random mix of faults while every file is read: only right bytes or EIO; then, healthy
    again, everything reads right."""
    rng = random.Random(4)
    with served_through_proxy(tmp_path, pushed) as r:
        for _ in range(40):
            r.proxy.inject(rng.choice([f for f in FAULTS if f != "stall"]))
        for rel in sorted(r.files):
            r.read_all(rel)
        assert sum(r.proxy.injected.values()) > 0
        r.proxy.clear()
        for rel in sorted(r.files):
            r.recovered(rel)
