"""Adaptive fetching against a real registry (through the fault proxy): a blob read densely
switches to large streams, on-demand reads are not queued behind them, and digest errors or a
broken stream never give wrong bytes."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.chunkdata import verify_chunk
from nydus_py.rafs.constants import ChunkFlags, Compressor
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.model import BlobInfo, ChunkInfo
from nydus_py.storage.cache import BlobCacheManager, ChunkMap
from nydus_py.storage.cache.streams import GAP, DenseDetector, dense_units, plan_streams
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import resolve_path
from nydus_py.storage.registry import RegistryBackend, parse_registry_config

from ..waiting import wait_until
from . import images
from .fault_proxy import FaultProxy, Request

AMPLIFY = 64 << 10
STREAM = 256 << 10  # streams are larger than any on-demand read (AMPLIFY): the proxy tells them apart


def range_len(r: Request) -> int:
    rng = r.range or ""
    if not rng.startswith("bytes="):
        return 0
    a, b = rng[len("bytes="):].split("-")
    return int(b) - int(a) + 1


def is_stream(r: Request) -> bool:
    return range_len(r) > AMPLIFY + GAP


def build_many_files(work: Path, n: int = 240) -> images.BuiltImage:
    """`n` small random files (one chunk each, in name order in the blob) and two of several
    chunks: a tree whose reader touches many distinct chunks, like a walk of a root filesystem."""
    rng = random.Random(31)
    files = {f"d{i // 60:02d}/f{i:04d}": rng.randbytes(rng.randrange(3000, 12000)) for i in range(n)}
    files["big/a.bin"] = rng.randbytes(5 * images.CHUNK + 77)
    files["big/b.bin"] = rng.randbytes(4 * images.CHUNK)
    src = work / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    blob_dir = work / "blobs"
    blob_dir.mkdir()
    opts = BuildOptions(chunk_size=images.CHUNK, compressor=Compressor.ZSTD)
    result = build_image(tree_from_directory(src), str(work / "image.boot"), str(blob_dir), opts)
    return images.BuiltImage(src, work / "image.boot", blob_dir, result, files)


@pytest.fixture(scope="module")
def image(tmp_path_factory, plain_registry):
    img = build_many_files(tmp_path_factory.mktemp("streams"))
    cfg = parse_registry_config(images.registry_config(plain_registry.host, "test/streams"), env={},
                                docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, img, "v1")
    return img


@dataclass
class Rig:
    proxy: FaultProxy
    backend: RegistryBackend
    cache: BlobCacheManager
    device: BlobDevice
    image: images.BuiltImage

    def ino(self, rel: str) -> int:
        ino = resolve_path(self.device.image, b"/" + rel.encode())
        assert ino is not None
        return ino

    def read(self, rel: str) -> bytes:
        return bytes(self.device.read(self.ino(rel), 0, 1 << 30))

    def chunks(self, rel: str) -> list[ChunkInfo]:
        return list(self.device.image.chunks(self.ino(rel)))

    def in_blob_order(self) -> list[str]:
        """Files with data, by where their first chunk sits in the blob."""
        have = [rel for rel in self.image.files if self.chunks(rel)]
        return sorted(have, key=lambda rel: min(c.compressed_offset for c in self.chunks(rel)))

    def blob_size(self) -> int:
        return self.device.image.blobs[0].compressed_size

    def streams_idle(self) -> None:
        s = self.cache.streamer
        assert s is not None
        wait_until(lambda: not s.busy(), 20, "the streams to finish")

    def check_cache(self) -> int:
        """Every chunk the map says is ready holds exactly its bytes; returns how many."""
        blob = self.device.image.blobs[0]
        self.cache.flush()
        work = Path(self.cache.work_dir)
        cmap = ChunkMap(str(work / f"{blob.blob_id}.blob.data.chunk_map"), blob.chunk_count)
        n = 0
        try:
            with open(work / f"{blob.blob_id}.blob.data", "rb") as f:
                for rel in self.image.files:
                    for c in self.chunks(rel):
                        if cmap.is_ready(c.index):
                            f.seek(c.uncompressed_offset)
                            verify_chunk(f.read(c.uncompressed_size), c, blob)
                            n += 1
        finally:
            cmap.close()
        return n


@pytest.fixture
def make_rig(tmp_path, image, plain_registry) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**kw: object) -> Rig:
        proxy = FaultProxy(plain_registry.url, stall_seconds=10)
        conf = images.registry_config(proxy.host, "test/streams", timeout=3.0, read_deadline=6.0, retry_limit=2)
        backend = RegistryBackend(parse_registry_config(conf, env={}, docker_config_paths=[]))
        opts: dict[str, object] = {"amplify_io": AMPLIFY, "stream_size": STREAM, "streams": 2,
                                   "stream_lookahead": 32 << 10, "dense_fraction": 0.1, "dense_min_chunks": 8}
        opts.update(kw)
        cache = BlobCacheManager(str(tmp_path / f"cache{len(made)}"), backend, **opts)  # type: ignore[arg-type]
        r = Rig(proxy, backend, cache, BlobDevice(open_bootstrap(str(image.boot)), cache, amplify_io=AMPLIFY), image)
        made.append(r)
        return r

    yield make
    for r in made:
        r.cache.close()
        r.device.image.close()
        r.proxy.stop()


# -- sans-IO parts -------------------------------------------------------------------------------
def test_dense_detector_counts_within_the_window():
    d = DenseDetector(chunks=100, fraction=0.2, window=10.0, min_chunks=4)
    assert not d.note(0.0, 15)
    assert not d.note(11.0, 15)  # the first 15 fell out of the window
    assert d.note(12.0, 6)  # 21 >= 20% of 100 within 10 s
    assert not d.note(12.5, 50)  # fires once


def test_dense_detector_needs_less_while_a_walk_streams_another_blob():
    need = 1000 * 0.2
    walking = DenseDetector(chunks=1000, fraction=0.2, window=10.0, min_chunks=4)
    assert not walking.note(0.0, 49, walking=True)
    assert walking.note(0.1, 2, walking=True)  # a quarter of the need
    alone = DenseDetector(chunks=1000, fraction=0.2, window=10.0, min_chunks=4)
    assert not alone.note(0.0, 51) and not alone.note(0.1, int(need) - 52)
    tiny = DenseDetector(chunks=100, fraction=0.2, window=10.0, min_chunks=4)
    assert not tiny.note(0.0, 15, walking=True) and tiny.note(0.1, 1, walking=True)  # never under WALK_MIN


def test_dense_detector_needs_min_chunks_and_a_chunk_count():
    assert not DenseDetector(chunks=10, fraction=0.2, window=10.0, min_chunks=8).note(0.0, 5)
    assert not DenseDetector(chunks=0, fraction=0.2, window=10.0).note(0.0, 1000)  # unknown count: never


def test_dense_units_weigh_large_chunks():
    assert dense_units([_chunk(0, 3000), _chunk(3000, 100)]) == 2  # small files: one each
    assert dense_units([_chunk(0, 1 << 20)]) == 16  # a 1 MiB chunk: one per 64 KiB
    assert dense_units([]) == 0


def _chunk(off: int, size: int) -> ChunkInfo:
    return ChunkInfo(b"\0" * 32, 0, ChunkFlags(0), off, size, off, size, 0, off // size, 0)


def test_plan_streams_starts_where_the_reader_is():
    k = 100_000  # chunk size (a hole of one chunk is more than GAP)
    chunks = [_chunk(i * k, k) for i in range(10)]
    missing = chunks[:3] + chunks[5:]  # chunks 3 and 4 fetched already
    pieces = plan_streams(missing, at=6 * k, size=2 * k)
    assert [[c.index for c in p] for p in pieces] == [[5, 6], [7, 8], [9], [0, 1], [2]]
    # a range never spans a hole in what is missing, and reaches `size` before a cut
    assert plan_streams(missing, at=0, size=100 * k) == [chunks[:3], chunks[5:]]


# -- against the registry ------------------------------------------------------------------------
def test_dense_reader_switches_to_streams_and_fetches_the_blob_about_once(make_rig):
    r = make_rig()
    for rel in r.in_blob_order():
        assert r.read(rel) == r.image.files[rel]
    r.streams_idle()
    s = r.cache.stats
    assert s.stream_switches == 1 and s.stream_reads >= 1 and s.streamed_chunks > 0
    assert s.stream_bytes > 0 and s.ondemand_bytes > 0
    assert s.backend_bytes == s.ondemand_bytes + s.stream_bytes  # every byte counted in one mode
    assert s.backend_bytes <= 1.05 * r.blob_size(), (s.backend_bytes, r.blob_size(), s.stream_skipped_bytes)
    assert s.digest_errors == 0
    assert any(is_stream(q) for q in r.proxy.blob_requests())
    assert r.check_cache() > 0
    snap = r.cache.snapshot()["cache"]
    assert snap["stream_bytes"] == s.stream_bytes and snap["ondemand_bytes"] == s.ondemand_bytes


def test_stream_over_small_cached_chunks_keeps_its_place(make_rig):
    """Chunks already cached that are smaller than GAP stay inside a stream's range (one GET):
    the bytes after such a hole are still matched to the right chunks."""
    r = make_rig()
    order = r.in_blob_order()
    holes = [rel for rel in order[len(order) // 2:] if sum(c.compressed_size for c in r.chunks(rel)) <= GAP][::3]
    assert len(holes) >= 3
    for rel in holes:  # sparse: a few small files in the second half
        assert r.read(rel) == r.image.files[rel]
    assert r.cache.stats.stream_switches == 0
    for rel in order:
        assert r.read(rel) == r.image.files[rel]
    r.streams_idle()
    s = r.cache.stats
    assert s.stream_switches == 1 and s.digest_errors == 0, s.snapshot()
    spans = [tuple(int(x) for x in q.range[len("bytes="):].split("-")) for q in r.proxy.blob_requests() if is_stream(q)]
    inside = [rel for rel in holes for c in r.chunks(rel)
              if any(lo < c.compressed_offset and c.compressed_offset + c.compressed_size <= hi for lo, hi in spans)]
    assert inside, "no stream spanned a cached chunk"


class PieceSource:
    """The image's blobs, streamed in odd small pieces (a network whose pieces end anywhere:
    inside a chunk, inside the gap of a cached chunk)."""

    def __init__(self, blob_dir: Path, piece: int = 997) -> None:
        self.inner = LocalBlobDir(str(blob_dir))
        self.piece = piece

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.inner.read(blob, offset, size)

    def read_stream(self, blob: BlobInfo, offset: int, size: int) -> Iterator[bytes]:
        data = self.inner.read(blob, offset, size)
        for pos in range(0, len(data), self.piece):
            yield data[pos:pos + self.piece]


def test_stream_pieces_ending_anywhere_keep_their_place(image, tmp_path):
    cache = BlobCacheManager(str(tmp_path / "cache"), PieceSource(image.blob_dir), amplify_io=AMPLIFY,
                             stream_size=STREAM, streams=2, stream_lookahead=32 << 10, dense_fraction=0.1,
                             dense_min_chunks=8)
    device = BlobDevice(open_bootstrap(str(image.boot)), cache, amplify_io=AMPLIFY)
    try:
        r = Rig(None, None, cache, device, image)  # type: ignore[arg-type]
        order = r.in_blob_order()
        holes = [rel for rel in order[len(order) // 2:] if sum(c.compressed_size for c in r.chunks(rel)) <= GAP][::2]
        for rel in holes:
            assert r.read(rel) == image.files[rel]
        for rel in order:
            assert r.read(rel) == image.files[rel]
        r.streams_idle()
        assert cache.stats.stream_switches == 1 and cache.stats.streamed_chunks > 0
        assert cache.stats.digest_errors == 0, cache.stats.snapshot()
    finally:
        cache.close()
        device.image.close()


def test_sparse_reader_never_switches(make_rig):
    r = make_rig()
    order = r.in_blob_order()
    picked = order[::20]  # a few files spread over the blob (~5% of its chunks), read one by one
    read = 0
    for rel in picked:
        assert r.read(rel) == r.image.files[rel]
        read += sum(c.compressed_size for c in r.chunks(rel))
    s = r.cache.stats
    assert s.stream_switches == 0 and s.stream_bytes == 0 and s.stream_reads == 0
    assert not any(is_stream(q) for q in r.proxy.blob_requests())
    assert s.backend_bytes < 0.5 * r.blob_size()


def _read_until_streaming(r: Rig) -> list[str]:
    """Read files in blob order until the blob switches to streams; the files not read yet."""
    order = r.in_blob_order()
    for k, rel in enumerate(order):
        assert r.read(rel) == r.image.files[rel]
        if r.cache.stats.stream_switches:
            return order[k + 1:]
    raise AssertionError("reading every file in blob order never switched the blob to streams")


def test_demand_read_completes_while_a_stream_is_held(make_rig):
    r = make_rig(streams=1)
    r.proxy.hold_if = is_stream
    left = _read_until_streaming(r)
    wait_until(lambda: r.proxy.held >= 1, 10, "the first stream to reach the registry")
    bid = r.device.image.blobs[0].blob_id
    with r.cache._lock:  # what the held stream has claimed so far
        claimed = {off for b, off in r.cache._inflight if b == bid}
    far = [rel for rel in left if not {c.compressed_offset for c in r.chunks(rel)} & claimed
           and not r.cache.cached_chunks(r.device.image.blobs[0], r.chunks(rel))]
    assert far, "no file left outside what the stream claimed"
    rel = far[-1]
    assert r.read(rel) == r.image.files[rel]  # served while the stream is still held
    assert r.proxy.held == 1 and r.cache.stats.streamed_chunks == 0
    r.proxy.release_held()
    r.streams_idle()
    assert r.cache.stats.streamed_chunks > 0 and r.cache.stats.stream_failures == 0
    for rel in left:
        assert r.read(rel) == r.image.files[rel]


def test_digest_mismatch_in_a_stream_is_eio_never_wrong_bytes(make_rig, caplog):
    r = make_rig()
    order = r.in_blob_order()
    victim = order[-2]  # near the end: a stream brings it before the reader asks
    bad = r.chunks(victim)[0]
    r.proxy.corrupt_offset = bad.compressed_offset + bad.compressed_size // 2
    left = _read_until_streaming(r)
    assert victim in left
    r.streams_idle()
    assert any(is_stream(q) and q.status == 206 for q in r.proxy.blob_requests())
    assert r.cache.stats.digest_errors >= 2  # the stream's copy, then the chunk alone once more
    assert r.cache.stats.stream_failures == 0
    for rel in left:
        if rel == victim:
            with pytest.raises((OSError, FormatError)) as ei:
                r.read(rel)
            if isinstance(ei.value, OSError) and not isinstance(ei.value, FormatError):
                assert ei.value.errno == errno.EIO
        else:
            assert r.read(rel) == r.image.files[rel]
    assert r.cache.cached_chunks(r.device.image.blobs[0], [bad]) is None
    r.check_cache()  # nothing wrong was cached


def test_broken_stream_falls_back_to_per_chunk_fetches(make_rig, caplog):
    r = make_rig(streams=1)
    r.proxy.fault_if = is_stream
    r.proxy.inject("truncate", times=100)
    with caplog.at_level(logging.WARNING, logger="nydus_py.storage.cache.streams"):
        left = _read_until_streaming(r)
        r.streams_idle()
    s = r.cache.stats
    assert s.stream_failures == 1 and r.proxy.injected["truncate"] == 1
    assert any("broke" in m and "one by one" in m for m in caplog.messages)
    assert r.cache.streamer is not None and not r.cache.streamer.streaming(r.device.image.blobs[0].blob_id)
    for rel in left:
        assert r.read(rel) == r.image.files[rel]
    assert r.cache.stats.stream_reads == 1  # no more streams for this blob
    r.check_cache()


# -- the daemon, with its defaults ---------------------------------------------------------------
@pytest.fixture(scope="module")
def big_pushed(tmp_path_factory, plain_registry):
    """An image of 700 chunks (the defaults stream a blob after 15% of its chunks, at least 64)."""
    work = tmp_path_factory.mktemp("streams-e2e")
    img = build_many_files(work / "img", n=690)
    cfg = parse_registry_config(images.registry_config(plain_registry.host, "test/streams-e2e"), env={},
                                docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, img, "v1")
    return img


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_daemon_whole_tree_read_streams_with_defaults(tmp_path, big_pushed, plain_registry, driver):
    """`nydusd-py fuse` with a registry, a blob cache and no tuning: `tar`-like reading of every
    file switches the blob to streams, every byte is right, the blob is fetched about once and
    the metrics say how the bytes came."""
    from tests.conftest import require_device

    from .test_registry_mount import Nydusd

    require_device("/dev/fuse")
    img = big_pushed
    proxy = FaultProxy(plain_registry.url)
    d = None
    try:
        config = images.nydusd_config(images.registry_config(proxy.host, "test/streams-e2e", read_deadline=10.0),
                                      str(tmp_path / "cache"))
        d = Nydusd(tmp_path, "whole", img.boot, config, extra_argv=("--fs-driver", driver))
        for dirpath, _dirs, names in os.walk(d.mnt):  # readdir order, as tar reads
            for name in names:
                p = Path(dirpath) / name
                assert p.read_bytes() == img.files[str(p.relative_to(d.mnt))]
        bc = d.get("/api/v1/metrics/blobcache")
        be = d.get("/api/v1/metrics/backend")
        with open_bootstrap(str(img.boot)) as bimg:
            blob_size = bimg.blobs[0].compressed_size
        assert bc["streams"]["stream_switches"] == 1 and bc["streams"]["stream_failures"] == 0, bc
        assert bc["fetched_bytes"]["stream"] > 0 and bc["fetched_bytes"]["ondemand"] > 0, bc
        assert be["read_amount_total"] == bc["fetched_bytes"]["stream"] + bc["fetched_bytes"]["ondemand"]
        assert be["read_amount_total"] <= 1.05 * blob_size, (be, blob_size)
        assert any(range_len(q) >= 256 << 10 for q in proxy.blob_requests())  # a large ranged GET
        d.stop()
    finally:
        if d is not None:
            d.kill()
        proxy.stop()


def test_config_keys_reach_the_cache(tmp_path):
    from nydus_py.config import ConfigError, parse_config
    from nydus_py.storage.factory import make_source

    def conf(**cache: object) -> str:
        return json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path)}},
                                      "cache": {"type": "blobcache",
                                                "config": {"work_dir": str(tmp_path / "c"), **cache}}}})

    src = make_source(parse_config(conf(stream_size=16 << 20, streams=2, dense_ratio=0.5)))
    try:
        assert isinstance(src, BlobCacheManager) and src.streamer is not None
        assert (src.streamer.size, src.streamer.streams, src.dense_fraction) == (16 << 20, 2, 0.5)
    finally:
        src.close()
    off = make_source(parse_config(conf(stream_size=0)))
    try:
        assert isinstance(off, BlobCacheManager) and off.streamer is None
    finally:
        off.close()
    default = parse_config(conf()).cache
    assert (default.stream_size, default.streams, default.dense_ratio) == (8 << 20, 4, 0.15)
    assert default.read_around == 64 << 10 and default.dir_around == 256 << 10
    no_around = make_source(parse_config(conf(read_around=0, dir_around=0)))
    try:
        assert isinstance(no_around, BlobCacheManager) and no_around.read_around == 0 == no_around.dir_around
    finally:
        no_around.close()
    dir_around = make_source(parse_config(conf(dir_around=128 << 10)))
    try:
        assert isinstance(dir_around, BlobCacheManager) and dir_around.dir_around == 128 << 10
    finally:
        dir_around.close()
    for bad in ({"stream_size": -1}, {"streams": 0}, {"dense_ratio": 0}, {"dense_ratio": 1.5}, {"streams": "4"},
                {"read_around": -1}, {"read_around": 2 << 20}, {"dir_around": -1}, {"dir_around": 5 << 20}):
        with pytest.raises(ConfigError):
            parse_config(conf(**bad))


def test_stream_answered_with_the_whole_blob_is_sliced(make_rig):
    """A registry (or pull-through cache) that ignores Range and sends the whole blob with 200:
    the stream takes its range out of it, as a plain read does."""
    r = make_rig()
    r.proxy.fault_if = is_stream
    r.proxy.inject("200_for_206", times=100)
    left = _read_until_streaming(r)
    r.streams_idle()
    assert r.proxy.injected["200_for_206"] >= 1 and r.backend.counters.ok_200_for_206 >= 1
    s = r.cache.stats
    assert s.stream_failures == 0 and s.streamed_chunks > 0 and s.digest_errors == 0
    for rel in left:
        assert r.read(rel) == r.image.files[rel]
    r.check_cache()
