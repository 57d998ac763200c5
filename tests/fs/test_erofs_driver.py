"""`fs_driver: erofs`: images served by the kernel's EROFS driver, file data lazily through our
blob views (one FUSE file per blob), compared with their sources on every stat field, xattr,
link and byte; laziness, bad chunks, leaks, refusals, and the daemon's two modes."""

import dataclasses
import errno
import io
import json
import os
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.build import build_image
from nydus_py.builder.cache_view import write_cache_view
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.tree import FileData
from nydus_py.config import ConfigError, parse_any
from nydus_py.fs.blob_view import BlobViewFilesystem
from nydus_py.fs.erofs_serve import ErofsServe
from nydus_py.fuse.api import FuseError
from nydus_py.metrics.backend import BackendStats, instrument
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.constants import Compressor
from nydus_py.rafs.layout_common import pack_chunks
from nydus_py.rafs.model import RafsImage
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.erofs_mount import ErofsImageError, check_image
from nydus_py.transport.mount import is_mountpoint
from tests.builder.erofs_rig import (
    blob_view_mounts,
    compare_trees,
    erofs_at,
    erofs_available,
    mounts,
    tree_from_directory,
)
from tests.builder.test_v6_kernel import apply_meta, build_opts, everything_tree, materialise, trees
from tests.daemon.rig import Api, DaemonProc, assert_error, wait_state
from tests.fs.mountrig import build, make_tree

CHUNK = 0x10000


# -- an image served in-process ----------------------------------------------------------------------


@dataclass
class Served:
    serve: ErofsServe
    cache: BlobCacheManager
    backend: BackendStats
    image: RafsImage


@contextmanager
def served(boot: str, blob_dir: str, work: str, *, amplify_io: int = 1 << 20, base_dir: str | None = None
           ) -> Iterator[Served]:
    """`boot` mounted with the EROFS driver at `work`/mnt over a localfs backend, through a blob
    cache whose backend reads are counted."""
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    image = open_bootstrap(boot)
    cache = BlobCacheManager(os.path.join(work, "cache"), LocalBlobDir(blob_dir), amplify_io=amplify_io)
    source, stats = instrument(cache, "localfs")
    device = BlobDevice(image, source, validate=True, amplify_io=amplify_io)
    serve = ErofsServe(image, device, boot, mnt, base_dir=base_dir)
    try:
        serve.start()
        yield Served(serve, cache, stats, image)
    finally:
        serve.close()
        cache.close()
        image.close()
    assert not is_mountpoint(mnt)


def check_views(s: Served, boot: str, blob_dir: str, work: str) -> None:
    """Every blob view reads byte for byte like the builder's own cache view of that blob."""
    for i, path in enumerate(s.serve.fs.paths(s.serve.view_dir)):
        want = os.path.join(work, f"want-{i}")
        write_cache_view(boot, blob_dir, s.image.blobs[i].blob_id, want)
        with open(path, "rb") as a, open(want, "rb") as b:
            assert a.read() == b.read(), f"blob view {i} differs from its cache view"


# -- comparisons ---------------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=trees, opts=build_opts)
def test_random_trees_compare_equal(spec: tuple, opts: BuildOptions) -> None:
    erofs_available()
    with tempfile.TemporaryDirectory(prefix="nydus-erofs-drv-") as work:
        src = os.path.join(work, "src")
        post: list = []
        materialise(src, spec, [], post)
        apply_meta(post)
        boot, blobs = os.path.join(work, "boot"), os.path.join(work, "blobs")
        build_image(tree_from_directory(src), boot, blobs, opts)
        with served(boot, blobs, work) as s:
            assert compare_trees(src, s.serve.target) >= 1
            check_views(s, boot, blobs, work)


@pytest.mark.slow
def test_everything_tree_and_views(tmp_path) -> None:
    erofs_available()
    src = str(tmp_path / "src")
    everything_tree(src)
    for opts in (BuildOptions(chunk_size=0x4000), BuildOptions(chunk_size=0x1000, compressor=Compressor.LZ4_BLOCK)):
        work = str(tmp_path / f"w{opts.chunk_size}")
        boot, blobs = os.path.join(work, "boot"), os.path.join(work, "blobs")
        build_image(tree_from_directory(src), boot, blobs, opts)
        with served(boot, blobs, work) as s:
            assert compare_trees(src, s.serve.target) > 300
            check_views(s, boot, blobs, work)
            assert s.serve.fs.stats.read_errors == 0


@pytest.mark.slow
def test_multi_blob_image_with_dedup_across_layers(tmp_path) -> None:
    """Two blobs (a lower layer's and the new one), chunks shared across them: two devices."""
    erofs_available()
    src = tmp_path / "src"
    src.mkdir()
    lower = random.Random(7).randbytes(9 * 0x1000 + 9)
    (src / "lower").write_bytes(lower)
    (src / "upper").write_bytes(lower[:0x3000] + b"new data" * 3000)
    os.setxattr(src / "upper", "user.x", b"1")
    os.link(src / "upper", src / "upper-link")
    for p in src.iterdir():
        os.utime(p, ns=(0, 1_000_000_000))
    opts = BuildOptions(chunk_size=0x1000)
    work = str(tmp_path / "w")
    blobs = os.path.join(work, "blobs")
    w = BlobWriter(blobs, opts, blob_index=0)
    chunks = w.add_file(FileData(len(lower), lambda: io.BytesIO(lower)))
    info = w.finish()
    assert info is not None
    root = tree_from_directory(str(src))
    root.set_chunks(root.find(b"/lower"), pack_chunks(chunks), len(lower), root.blob_set([info]))
    boot = os.path.join(work, "boot")
    r = build_image(root, boot, blobs, opts)
    assert r.blob_ids == [info.blob_id, r.blob_id] and r.deduplicated >= 3
    with served(boot, blobs, work) as s:
        assert len(s.serve.fs.paths(s.serve.view_dir)) == 2
        assert compare_trees(str(src), s.serve.target) == 4
        check_views(s, boot, blobs, work)


# -- laziness ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lazy_nothing_fetched_for_metadata_little_for_one_file(tmp_path) -> None:
    """Mounting and walking every inode (stat, xattrs, links) fetches nothing; reading one small
    file fetches a small fraction of the blob."""
    erofs_available()
    src = str(tmp_path / "src")
    make_tree(src, many=600)
    rng = random.Random(3)
    os.makedirs(os.path.join(src, "bulk"))
    for i in range(24):  # 24 MiB of incompressible data around the small files
        with open(os.path.join(src, "bulk", f"b{i:02d}"), "wb") as f:
            f.write(rng.randbytes(1 << 20))
    img = build(src, str(tmp_path / "img"), views=False)
    blob_size = os.path.getsize(os.path.join(img.blob_dir, img.result.blob_ids[0]))
    with served(img.boot, img.blob_dir, str(tmp_path / "w"), amplify_io=128 << 10) as s:
        mnt = s.serve.target
        assert s.backend.read_amount_total == 0, "mounting fetched blob data"
        n = 0
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                os.lstat(p)
                os.listxattr(p, follow_symlinks=False)
                n += 1
        assert n > 600
        assert s.backend.read_amount_total == 0, "metadata reached the backend"
        assert s.serve.fs.stats.reads == 0, "metadata reached the blob views"
        with open(os.path.join(mnt, "many1", "file-00004" + "n" * 4), "rb") as f:
            want = Path(src, "many1", "file-00004" + "n" * 4).read_bytes()
            assert f.read() == want
        fetched = s.backend.read_amount_total
        assert 0 < fetched <= 512 << 10, f"one small file fetched {fetched} bytes of a {blob_size}-byte blob"
        snap = s.serve.snapshot()
        assert snap["kernel_reads"] >= 1 and snap["kernel_read_bytes"] > 0


# -- faults --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_chunk_is_eio_and_neighbours_read_right(tmp_path) -> None:
    erofs_available()
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    files = {name: rng.randbytes(3 * 0x4000 + 100) for name in ("a", "b", "c")}
    for name, data in files.items():
        (src / name).write_bytes(data)
    work = str(tmp_path / "w")
    boot, blobs = os.path.join(work, "boot"), os.path.join(work, "blobs")
    r = build_image(tree_from_directory(str(src)), boot, blobs,
                    BuildOptions(chunk_size=0x4000, compressor=Compressor.NONE))
    with open_bootstrap(boot) as image:
        ino = image.lookup(image.root_ino, b"b")
        assert ino is not None
        bad = image.chunks(ino)[1]
    with open(os.path.join(blobs, r.blob_ids[0]), "r+b") as f:  # one flipped byte in b's 2nd chunk
        f.seek(bad.compressed_offset + 17)
        byte = f.read(1)
        f.seek(bad.compressed_offset + 17)
        f.write(bytes([byte[0] ^ 0x40]))
    with served(boot, blobs, work) as s:
        mnt = s.serve.target
        for name in ("a", "c"):
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == files[name]
        with open(os.path.join(mnt, "b"), "rb") as f:
            assert f.read(0x4000) == files["b"][:0x4000]  # the good first chunk
            f.seek(0x4000)
            with pytest.raises(OSError) as ei:
                f.read(0x4000)
            assert ei.value.errno == errno.EIO
        assert s.cache.stats.digest_errors >= 1
        assert s.serve.fs.stats.read_errors >= 1


class FlippingBlobDir(LocalBlobDir):
    """Local blobs with one byte flipped in [lo, hi) of every read that covers it; counts reads."""

    def __init__(self, blob_dir: str, lo: int, hi: int) -> None:
        super().__init__(blob_dir)
        self.lo, self.hi = lo, hi
        self.reads = 0

    def read(self, blob, offset: int, size: int) -> bytes:  # noqa: ANN001
        self.reads += 1
        data = bytearray(super().read(blob, offset, size))
        if offset <= self.lo + 17 < offset + len(data):
            data[self.lo + 17 - offset] ^= 0x40
        return bytes(data)


def test_view_follow_up_read_served_from_cache_or_fast_eio(tmp_path) -> None:
    """A READ spanning files fails on one bad chunk. Right after, a READ inside that range (the
    kernel's retry for the page the reader wanted) is served from the cache when its chunks
    arrived, and is EIO at once, without the backend, when they did not."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    files = {name: rng.randbytes(3 * 0x4000 + 100) for name in ("a", "b")}
    for name, data in files.items():
        (src / name).write_bytes(data)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    build_image(tree_from_directory(str(src)), boot, blobs, BuildOptions(chunk_size=0x4000, compressor=Compressor.NONE))
    with open_bootstrap(boot) as image:
        a_ino, b_ino = image.lookup(image.root_ino, b"a"), image.lookup(image.root_ino, b"b")
        assert a_ino is not None and b_ino is not None
        a0, bad = image.chunks(a_ino)[0], image.chunks(b_ino)[1]
        backend = FlippingBlobDir(blobs, bad.compressed_offset, bad.compressed_offset + bad.compressed_size)
        cache = BlobCacheManager(str(tmp_path / "cache"), backend, amplify_io=0)
        try:
            fs = BlobViewFilesystem(image, BlobDevice(image, cache, amplify_io=0))
            lo = min(a0.uncompressed_offset, bad.uncompressed_offset)
            hi = max(a0.uncompressed_offset, bad.uncompressed_offset) + 0x4000
            with pytest.raises(FuseError) as ei:
                fs.read(2, 0, lo, hi - lo)
            assert ei.value.errno == errno.EIO
            reads = backend.reads
            got = fs.read(2, 0, a0.uncompressed_offset, 0x4000)  # arrived: served from the cache
            assert bytes(got) == files["a"][:0x4000]
            with pytest.raises(FuseError) as ei:
                fs.read(2, 0, bad.uncompressed_offset, 0x1000)  # not arrived: EIO at once
            assert ei.value.errno == errno.EIO
            assert backend.reads == reads and fs.stats.fast_failures == 1
        finally:
            cache.close()


# -- leaks ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mount_umount_rounds_leak_nothing(tmp_path) -> None:
    erofs_available()
    src = str(tmp_path / "src")
    make_tree(src, many=30)
    img = build(src, str(tmp_path / "img"), views=False)
    base = str(tmp_path / "views")
    os.makedirs(base)
    want = Path(src, "big-random").read_bytes()

    def mine() -> int:  # mounts of this test (others' lazy umounts may end meanwhile)
        return sum(1 for line in mounts() if str(tmp_path) in line.split()[4])

    def census() -> tuple[int, int, int]:
        return mine(), len(os.listdir("/proc/self/fd")), threading.active_count()

    with served(img.boot, img.blob_dir, str(tmp_path / "warm"), base_dir=base):
        pass  # first use: imports, lazily created module state
    before = census()
    for i in range(20):
        with served(img.boot, img.blob_dir, str(tmp_path / f"r{i % 2}"), base_dir=base) as s:
            with open(os.path.join(s.serve.target, "big-random"), "rb") as f:
                assert f.read() == want
            assert mine() == before[0] + 2  # the views and EROFS
    after = census()
    # no mount, fd or thread more than before (earlier tests' leftovers may still be ending)
    assert after[0] == before[0] and after[1] <= before[1] and after[2] <= before[2], (before, after)
    assert os.listdir(base) == []


# -- refusals ------------------------------------------------------------------------------------------


def test_v5_image_refused_with_one_clear_error(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    boot = str(tmp_path / "v5.boot")
    build_image(tree_from_directory(str(src)), boot, str(tmp_path / "blobs"), BuildOptions(fs_version=5))
    with open_bootstrap(boot) as image:
        with pytest.raises(ErofsImageError, match="RAFS v5 images cannot be served by the kernel EROFS driver"):
            check_image(image)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        with pytest.raises(ErofsImageError):
            ErofsServe(image, BlobDevice(image, LocalBlobDir(str(tmp_path / "blobs"))), boot, str(mnt))
        assert not is_mountpoint(str(mnt))


def test_unaligned_chunks_refused(tmp_path) -> None:
    """A v6 blob whose chunks are not on 4 KiB blocks of the uncompressed space is refused."""
    img = build_small(tmp_path)
    with open_bootstrap(img) as image:
        check_image(image)  # the builder's own images pass
        image.blobs[0] = dataclasses.replace(image.blobs[0], chunk_size=0x1800)  # type: ignore[index]
        with pytest.raises(ErofsImageError, match="not 4 KiB-aligned"):
            check_image(image)


def build_small(tmp_path) -> str:  # noqa: ANN001
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(random.Random(1).randbytes(9000))
    boot = str(tmp_path / "boot")
    build_image(tree_from_directory(str(src)), boot, str(tmp_path / "blobs"), BuildOptions(chunk_size=0x1000))
    return boot


def test_config_fs_driver_forms() -> None:
    base = {"device": {"backend": {"type": "localfs", "config": {"dir": "/x"}}}}
    assert parse_any(json.dumps(base)).fs_driver == "fusedev"
    assert parse_any(json.dumps({**base, "fs_driver": "erofs"})).fs_driver == "erofs"
    v2 = {"version": 2, "fs_driver": "erofs", "backend": {"type": "localfs", "localfs": {"dir": "/x"}}}
    parsed = parse_any(json.dumps(v2))
    assert parsed.fs_driver == "erofs" and parsed.v1["fs_driver"] == "erofs"
    assert parsed.redacted_v2()["fs_driver"] == "erofs"
    toml = 'version = 2\nfs_driver = "erofs"\n[backend]\ntype = "localfs"\n[backend.localfs]\ndir = "/x"\n'
    assert parse_any(toml).fs_driver == "erofs"
    with pytest.raises(ConfigError, match="fs_driver"):
        parse_any(json.dumps({**base, "fs_driver": "fscache"}))


# -- the daemon ----------------------------------------------------------------------------------------


def _config(blob_dir: str, cache_dir: str, **extra: object) -> str:
    return json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": blob_dir}},
                                  "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}},
                       "mode": "direct", "digest_validate": True, "enable_xattr": True, **extra})


def _daemon_views(d: DaemonProc) -> set[str]:
    """The blob-view mounts the daemon's log names that are still mounted (never another
    test's: other tests, and other people's, may mount views meanwhile)."""
    return set(re.findall(r"blob views at (\S+)\)", d.log_text())) & blob_view_mounts()


def _cleanup(paths: list[str], d: DaemonProc) -> None:
    """After a failed daemon test: detach what it left (its EROFS mounts, then its views)."""
    for p in paths:
        if is_mountpoint(p):
            subprocess.run(["umount", "-l", p], check=False, capture_output=True)
    for v in _daemon_views(d):
        subprocess.run(["umount", "-l", v], check=False, capture_output=True)


@pytest.mark.slow
def test_dedicated_daemon_fs_driver_erofs(tmp_path) -> None:
    erofs_available()
    src = str(tmp_path / "src")
    make_tree(src, many=200)
    img = build(src, str(tmp_path / "img"), views=False)
    cfg = tmp_path / "c.json"
    cfg.write_text(_config(img.blob_dir, str(tmp_path / "cache")))
    mnt, sock = tmp_path / "mnt", str(tmp_path / "api.sock")
    mnt.mkdir()
    d = DaemonProc(["fuse", "--fs-driver", "erofs", "--config", str(cfg), "--bootstrap", img.boot,
                    "--mountpoint", str(mnt), "--apisock", sock], str(tmp_path / "d.log"))
    try:
        d.wait_socket(sock, 30)
        api = Api(sock)
        wait_state(api, "RUNNING")
        assert erofs_at(str(mnt)), d.log_text()
        assert compare_trees(src, str(mnt)) > 200
        m = api.get("/api/v1/metrics/blobcache").json()
        assert m["erofs"]["kernel_reads"] > 0 and m["erofs"]["backend_bytes"] > 0, m
        api.close()
        assert d.stop(signal.SIGTERM) == 0, d.log_text()
        assert not is_mountpoint(str(mnt)) and not _daemon_views(d), d.log_text()
    finally:
        d.kill()
        _cleanup([str(mnt)], d)


@pytest.mark.slow
def test_shared_daemon_mounts_erofs_at_host_path_beside_fusedev(tmp_path) -> None:
    erofs_available()
    src = str(tmp_path / "src")
    make_tree(src, many=50)
    img = build(src, str(tmp_path / "img"), views=False)
    fuse_mnt, host, sock = tmp_path / "fuse", tmp_path / "host", str(tmp_path / "api.sock")
    fuse_mnt.mkdir()
    host.mkdir()
    d = DaemonProc(["fuse", "--mountpoint", str(fuse_mnt), "--apisock", sock], str(tmp_path / "d.log"))
    try:
        d.wait_socket(sock, 30)
        api = Api(sock)
        wait_state(api, "RUNNING")
        erofs_cfg = _config(img.blob_dir, str(tmp_path / "cache"), fs_driver="erofs")
        r = api.request("POST", "/api/v1/mount", {"mountpoint": str(host)},
                        {"fs_type": "rafs", "source": img.boot, "config": erofs_cfg})
        assert r.status == 204, (r.status, r.body, d.log_text())
        r = api.request("POST", "/api/v1/mount", {"mountpoint": "/img"},
                        {"fs_type": "rafs", "source": img.boot,
                         "config": _config(img.blob_dir, str(tmp_path / "cache2"))})
        assert r.status == 204, r.body
        assert erofs_at(str(host))
        assert compare_trees(src, str(host)) > 50
        assert compare_trees(src, str(fuse_mnt / "img")) > 50  # the FUSE one beside it
        m = api.get("/api/v1/metrics/blobcache", id=str(host)).json()
        assert m["erofs"]["mountpoint"] == str(host.resolve()) and m["erofs"]["kernel_reads"] > 0
        r = api.request("DELETE", "/api/v1/mount", {"mountpoint": str(host)})
        assert r.status == 204, r.body
        assert not is_mountpoint(str(host)) and not _daemon_views(d)
        # a v5 image is refused with one clear error, and nothing is left mounted
        v5 = str(tmp_path / "v5.boot")
        build_image(tree_from_directory(src), v5, str(tmp_path / "b5"), BuildOptions(fs_version=5))
        r = api.request("POST", "/api/v1/mount", {"mountpoint": str(host)},
                        {"fs_type": "rafs", "source": v5,
                         "config": _config(str(tmp_path / "b5"), str(tmp_path / "c5"), fs_driver="erofs")})
        body = assert_error(r, 400)
        assert "RAFS v5 images cannot be served by the kernel EROFS driver" in body["message"]
        assert not is_mountpoint(str(host)) and not _daemon_views(d)
        api.close()
        assert d.stop(signal.SIGTERM) == 0, d.log_text()
        assert not is_mountpoint(str(fuse_mnt))
    finally:
        d.kill()
        _cleanup([str(host), str(fuse_mnt)], d)


@pytest.mark.slow
def test_dedicated_daemon_without_api_never_imports_aiohttp(tmp_path) -> None:
    """No API socket: nothing of aiohttp is loaded (its import cost ~0.1 s of CPU right after
    the mount showed, beside the user's first commands on a 2-core machine), nor asyncio, ssl or
    OpenSSL's libcrypto (about 6 MiB of RSS together)."""
    erofs_available()
    src = str(tmp_path / "src")
    make_tree(src, many=5)
    img = build(src, str(tmp_path / "img"), views=False)
    cfg = tmp_path / "c.json"
    cfg.write_text(_config(img.blob_dir, str(tmp_path / "cache")))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = DaemonProc(["fuse", "--fs-driver", "erofs", "--config", str(cfg), "--bootstrap", img.boot,
                    "--mountpoint", str(mnt), "--log-level", "info"], str(tmp_path / "d.log"))
    try:
        deadline = time.monotonic() + 30
        while "state RUNNING" not in d.log_text():
            assert d.proc.poll() is None and time.monotonic() < deadline, d.log_text()
            time.sleep(0.02)  # poll interval of the condition above
        assert erofs_at(str(mnt))
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
        assert "aiohttp" not in maps
        # no API, no event loop: neither asyncio nor ssl, and no libcrypto for a blake3 image
        for lib in ("_asyncio", "_ssl", "_hashlib", "libcrypto"):
            assert lib not in maps, lib
        assert erofs_at(str(mnt))  # (and it still serves: SIGTERM below must unmount it)
        assert d.stop(signal.SIGTERM) == 0, d.log_text()
    finally:
        d.kill()
        _cleanup([str(mnt)], d)


def test_dedicated_v5_refused_exit_1(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"y" * 100)
    boot = str(tmp_path / "v5.boot")
    build_image(tree_from_directory(str(src)), boot, str(tmp_path / "blobs"), BuildOptions(fs_version=5))
    cfg = tmp_path / "c.json"
    cfg.write_text(_config(str(tmp_path / "blobs"), str(tmp_path / "cache")))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = DaemonProc(["fuse", "--fs-driver", "erofs", "--config", str(cfg), "--bootstrap", boot,
                    "--mountpoint", str(mnt)], str(tmp_path / "d.log"))
    assert d.wait_exit(60) == 1
    assert "Error: fs_driver erofs: RAFS v5 images cannot be served by the kernel EROFS driver" in d.log_text()
    assert not is_mountpoint(str(mnt))


@pytest.mark.slow
def test_busy_umount_detaches_then_aborts_views_eio_not_zeros(tmp_path) -> None:
    """A file still open in the EROFS mount at umount: the mount is detached, the views are
    aborted after the grace, nothing of ours stays mounted, and reading data that was never
    fetched is EIO, not zeros; what the reader already had stays right."""
    erofs_available()
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(9).randbytes(4 << 20)
    (src / "big").write_bytes(data)
    work = str(tmp_path / "w")
    boot, blobs = os.path.join(work, "boot"), os.path.join(work, "blobs")
    build_image(tree_from_directory(str(src)), boot, blobs, BuildOptions(chunk_size=0x10000))
    base = str(tmp_path / "views")
    os.makedirs(base)
    image = open_bootstrap(boot)
    cache = BlobCacheManager(os.path.join(work, "cache"), LocalBlobDir(blobs), amplify_io=0)
    device = BlobDevice(image, cache, validate=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    serve = ErofsServe(image, device, boot, str(mnt), base_dir=base, busy_grace=0.2)
    serve.start()
    fd = os.open(mnt / "big", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]
        serve.close()
        assert serve.lazy_detaches == 1 and serve.aborts == 1
        assert not is_mountpoint(str(mnt)) and os.listdir(base) == []
        assert not any(v.startswith(base + "/") for v in blob_view_mounts())
        assert os.pread(fd, 4096, 0) == data[:4096]  # in the page cache: still right
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, 3 << 20)  # never fetched: EIO, not zeros
        assert ei.value.errno in (errno.EIO, errno.ENOTCONN)
    finally:
        os.close(fd)
        serve.close()
        cache.close()
        image.close()
