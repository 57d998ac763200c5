"""`fs_driver: erofs` skipping the round trip: a blob complete in the blob cache at mount is read
by the kernel straight from the cache's data file (no READ reaches a blob view), an incomplete
one through the views' READs as before, and the cache never evicts a blob the kernel reads
directly. Also FUSE passthrough on the views themselves, and why EROFS cannot sit on it."""

import errno
import json
import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nydus_py.builder.cache_view import write_cache_view
from nydus_py.fs.blob_view import BlobViewFilesystem
from nydus_py.fs.erofs_serve import ErofsServe
from nydus_py.fuse.protocol import FuseSession
from nydus_py.metrics.backend import instrument
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.cache.blobcache import DATA_SUFFIX
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.erofs_mount import mount_erofs
from nydus_py.transport.fusedev import FuseDevSession
from nydus_py.transport.mount import is_mountpoint
from tests.builder.erofs_rig import compare_trees, erofs_available
from tests.daemon.rig import Api, DaemonProc, wait_state
from tests.fs.mountrig import CHUNK, Image, build, make_tree
from tests.fs.test_erofs_driver import Served, _cleanup, _daemon_views
from tests.waiting import wait_until


@contextmanager
def served(img: Image, work: str, *, size_limit: int = 0) -> Iterator[Served]:
    """`img` mounted with the EROFS driver at `work`/mnt through the blob cache in `work`/cache."""
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    image = open_bootstrap(img.boot)
    cache = BlobCacheManager(os.path.join(work, "cache"), LocalBlobDir(img.blob_dir), size_limit=size_limit)
    source, stats = instrument(cache, "localfs")
    device = BlobDevice(image, source, amplify_io=1 << 20)
    serve = ErofsServe(image, device, img.boot, mnt)
    try:
        serve.start()
        yield Served(serve, cache, stats, image)
    finally:
        serve.close()
        cache.close()
        image.close()
    assert not is_mountpoint(mnt)


def fill_cache(img: Image, work: str, *, only_first_chunk: bool = False) -> None:
    """Fetch every chunk of every blob into `work`/cache (or just the first chunk of each)."""
    image = open_bootstrap(img.boot)
    cache = BlobCacheManager(os.path.join(work, "cache"), LocalBlobDir(img.blob_dir))
    try:
        device = BlobDevice(image, cache)
        for i, blob in enumerate(image.blobs):
            size = CHUNK if only_first_chunk else blob.uncompressed_size
            device.read_blob(i, 0, size, blob.uncompressed_size)
    finally:
        cache.close()
        image.close()


def image_of(tmp_path: Path) -> tuple[str, Image]:
    src = str(tmp_path / "src")
    make_tree(src, many=300)
    rng = random.Random(5)
    with open(os.path.join(src, "bulk"), "wb") as f:  # several MiB, read in large pieces
        f.write(rng.randbytes(3 << 20))
    return src, build(src, str(tmp_path / "img"), views=False)


@pytest.mark.slow
def test_complete_cache_is_read_by_the_kernel_directly(tmp_path) -> None:
    """Every blob complete in the cache at mount: EROFS gets the cache's data files as its
    devices, no blob view is even mounted, the whole tree reads back equal to its source, and
    not one READ reaches the views (nor the backend)."""
    erofs_available()
    src, img = image_of(tmp_path)
    work = str(tmp_path / "w")
    fill_cache(img, work)
    with served(img, work) as s:
        snap = s.serve.snapshot()
        assert snap["cache_devices"] == snap["cache_devices_pinned"] == len(s.image.blobs) >= 1
        assert snap["cache_device_fallbacks"] == 0
        assert s.serve.view_dir == "" and s.serve.session is None
        assert compare_trees(src, s.serve.target) > 300
        snap = s.serve.snapshot()
        assert snap["kernel_reads"] == 0 and snap["view_opens"] == 0
        assert s.backend.read_amount_total == 0
    assert s.serve.snapshot()["cache_devices_pinned"] == 0  # released with the mount


@pytest.mark.slow
def test_incomplete_cache_reads_through_the_views(tmp_path) -> None:
    """A blob only partly cached at mount: it is read through the blob view's FUSE READs (the
    fallback is counted), and the tree still reads back equal to its source."""
    erofs_available()
    src, img = image_of(tmp_path)
    work = str(tmp_path / "w")
    fill_cache(img, work, only_first_chunk=True)
    with served(img, work) as s:
        snap = s.serve.snapshot()
        assert snap["cache_devices"] == 0
        assert snap["cache_device_fallbacks"] == len(s.image.blobs)
        assert snap["cache_device_errors"] == 0
        assert s.serve.view_dir
        assert compare_trees(src, s.serve.target) > 300
        snap = s.serve.snapshot()
        assert snap["kernel_reads"] > 0 and snap["kernel_read_errors"] == 0
        assert s.backend.read_amount_total > 0


@pytest.mark.slow
def test_eviction_spares_a_blob_read_by_the_kernel(tmp_path) -> None:
    """With a size limit the cache is over at once, yet it never evicts a blob the kernel reads
    from the cache directly; once the image is unmounted, it may."""
    erofs_available()
    src, img = image_of(tmp_path)
    work = str(tmp_path / "w")
    fill_cache(img, work)
    data = [os.path.join(work, "cache", bid + DATA_SUFFIX) for bid in img.result.blob_ids]
    with served(img, work, size_limit=1) as s:
        assert s.serve.snapshot()["cache_devices"] == len(data)
        assert s.cache.usage() > 1
        assert s.cache.evict() == 0
        assert all(os.path.exists(p) for p in data), "a blob the kernel reads directly was evicted"
        assert compare_trees(src, s.serve.target) > 300
        assert s.cache.stats.evictions == 0
    again = BlobCacheManager(os.path.join(work, "cache"), LocalBlobDir(img.blob_dir), size_limit=1)
    try:
        assert again.evict() > 0  # nothing holds them any more
    finally:
        again.close()
    assert not any(os.path.exists(p) for p in data)


@pytest.mark.slow
def test_daemon_second_mount_reads_the_complete_cache_directly(tmp_path) -> None:
    """`nydusd-py fuse --fs-driver erofs` over a blob cache: the first run reads everything
    through the views (and completes the cache), the second one hands EROFS the cache file, mounts
    no view, and its metrics say so; digest validation on keeps the views."""
    erofs_available()
    src, img = image_of(tmp_path)
    cache = str(tmp_path / "cache")
    mnt, sock = tmp_path / "mnt", str(tmp_path / "api.sock")
    mnt.mkdir()

    def run(validate: bool) -> dict:
        cfg = tmp_path / f"c{validate:d}.json"
        cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": img.blob_dir}},
                                              "cache": {"type": "blobcache", "config": {"work_dir": cache}}},
                                   "mode": "direct", "digest_validate": validate, "enable_xattr": True}))
        d = DaemonProc(["fuse", "--fs-driver", "erofs", "--config", str(cfg), "--bootstrap", img.boot,
                        "--mountpoint", str(mnt), "--apisock", sock], str(tmp_path / "d.log"))
        try:
            d.wait_socket(sock, 30)
            api = Api(sock)
            wait_state(api, "RUNNING")
            assert compare_trees(src, str(mnt)) > 300
            m = api.get("/api/v1/metrics/blobcache").json()["erofs"]
            m["views_mounted"] = bool(_daemon_views(d))
            api.close()
            assert d.stop(signal.SIGTERM) == 0, d.log_text()
            return m
        finally:
            d.kill()
            _cleanup([str(mnt)], d)

    first = run(False)
    assert first["cache_devices"] == 0 and first["cache_device_fallbacks"] == 1 and first["kernel_reads"] > 0
    assert first["views_mounted"]
    second = run(False)
    assert second["cache_devices"] == 1 and second["cache_device_fallbacks"] == 0, second
    assert second["kernel_reads"] == 0 and second["backend_bytes"] == 0 and not second["views_mounted"]
    validated = run(True)  # every cached read must be digest-checked: through the views
    assert validated["cache_devices"] == 0 and validated["cache_device_fallbacks"] == 1
    assert validated["kernel_reads"] > 0 and validated["backend_bytes"] == 0


# -- FUSE passthrough on the views themselves --------------------------------------------------------


@contextmanager
def views(img: Image, work: str) -> Iterator[tuple[BlobViewFilesystem, FuseDevSession, str]]:
    """The blob views alone on a FUSE mount that offers passthrough (the transport's backing
    registry attached), over the blob cache in `work`/cache."""
    image = open_bootstrap(img.boot)
    cache = BlobCacheManager(os.path.join(work, "cache"), LocalBlobDir(img.blob_dir))
    fs = BlobViewFilesystem(image, BlobDevice(image, cache))
    mnt = os.path.join(work, "views")
    os.makedirs(mnt, exist_ok=True)
    session = FuseDevSession(FuseSession(fs).handle_vectored, mnt, threads=2, fsname="nydus-blobview-test")
    fs.backing = session
    try:
        session.mount()
        os.listdir(mnt)  # the first request waits for INIT: negotiation is over once it answers
        yield fs, session, mnt
    finally:
        session.close()
        fs.release_all()
        cache.close()
        image.close()
    assert not is_mountpoint(mnt)


@pytest.mark.slow
def test_view_of_a_complete_blob_is_read_through_fuse_passthrough(tmp_path) -> None:
    """Opening the view of a blob complete in the cache answers FOPEN_PASSTHROUGH with the data
    file as backing: its bytes are the blob's view, and no READ reaches the filesystem; the
    backing id is closed at release."""
    erofs_available()
    _, img = image_of(tmp_path)
    work = str(tmp_path / "w")
    fill_cache(img, work)
    with views(img, work) as (fs, session, mnt):
        assert fs.stats.snapshot()["passthrough_negotiated"] is True
        path = fs.paths(mnt)[0]
        want = os.path.join(work, "want")
        write_cache_view(img.boot, img.blob_dir, fs.blobs[0].blob_id, want)
        with open(path, "rb") as f:
            assert session.backings_open == 1
            assert f.read() == Path(want).read_bytes()[:fs.sizes[0]]
        snap = fs.stats.snapshot()
        assert snap["passthrough_opens"] == 1 and snap["passthrough_fallbacks"] == 0
        assert snap["kernel_reads"] == 0, "a passthrough open's data reached the filesystem"
        wait_until(lambda: session.backings_open == 0, what="RELEASE closing the backing id")
        assert fs.stats.snapshot()["passthrough_files"] == 0


@pytest.mark.slow
def test_erofs_refuses_views_on_a_passthrough_mount(tmp_path) -> None:
    """Why ErofsServe gives EROFS the cache files rather than passthrough views: a FUSE mount that
    negotiated passthrough is stacked, and the kernel refuses file-backed EROFS devices there."""
    erofs_available()
    _, img = image_of(tmp_path)
    work = str(tmp_path / "w")
    fill_cache(img, work)
    target = tmp_path / "mnt"
    target.mkdir()
    with views(img, work) as (fs, _session, mnt):
        assert fs.stats.snapshot()["passthrough_negotiated"] is True
        with pytest.raises(OSError) as e:
            mount_erofs(img.boot, fs.paths(mnt), str(target))
        assert e.value.errno == errno.EINVAL
    assert not is_mountpoint(str(target))
