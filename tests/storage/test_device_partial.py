"""Random 4 KiB reads decode only the head of a chunk they need (digest validation off), so a
cold random reader does not pay a whole 1 MiB decode per miss; sequential readers, second
misses and validating readers still decode whole chunks, and the bytes are always right."""

import json
import random
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.rafs import codec, open_bootstrap
from nydus_py.rafs.constants import Compressor
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.model import BlobInfo, RafsImage
from nydus_py.storage.cache.chunk_cache import ChunkCache
from nydus_py.storage.device import PARTIAL_STEP, BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

from ..fs.mountrig import build

CS = 1 << 20
N_CHUNKS = 4


class CountingDir(LocalBlobDir):
    """The blob dir, recording every read's size; `corrupt` returns wrong bytes for all reads."""

    def __init__(self, path: str, corrupt: bool = False) -> None:
        super().__init__(path)
        self.sizes: list[int] = []
        self.corrupt = corrupt

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        self.sizes.append(size)
        data = super().read(blob, offset, size)
        return bytes(reversed(data)) if self.corrupt else data


def _text(n: int, seed: int = 5) -> bytes:
    """Compressible, but different everywhere (so a wrong offset shows)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(2, 9)).hex().encode() for _ in range(4000)]
    out = bytearray()
    k = 0
    while len(out) < n:
        out += b"%d %s\n" % (k, b" ".join(rng.choices(words, k=8)))
        k += 1
    return bytes(out[:n])


def _full_cache() -> ChunkCache:
    """A chunk cache with no room for another whole chunk (room for four 128 KiB heads), as
    after a while of random reads over a file bigger than the cache."""
    cache = ChunkCache(capacity_bytes=4 * CS)
    cache.get("filler", lambda: bytes(4 * CS - N_CHUNKS * PARTIAL_STEP))
    return cache


def _setup(tmp_path: Path, compressor: Compressor = Compressor.ZSTD, *, validate: bool = False,
           corrupt: bool = False, cache: ChunkCache | None = None) -> tuple[BlobDevice, RafsImage, int, bytes,
                                                                           CountingDir]:
    src = tmp_path / "src"
    src.mkdir(parents=True)
    data = _text(N_CHUNKS * CS - 777)
    (src / "f").write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CS, compressor=compressor), views=False)
    image = open_bootstrap(img.boot)
    ino = image.lookup(image.root_ino, b"f")
    assert ino is not None
    chunks = image.chunks(ino, 0, len(data))
    assert len(chunks) == N_CHUNKS
    assert all(c.compressed for c in chunks) == (compressor != Compressor.NONE)
    source = CountingDir(img.blob_dir, corrupt)
    return BlobDevice(image, source, validate=validate, cache=cache or _full_cache()), image, ino, data, source


def test_random_reads_decode_only_the_head_they_need(tmp_path: Path) -> None:
    dev, _image, ino, data, _source = _setup(tmp_path)
    for k in range(N_CHUNKS):
        off = k * CS + 8192
        assert bytes(dev.read(ino, off, 4096, len(data))) == data[off : off + 4096]
    # one 128 KiB head per chunk, not four whole 1 MiB chunks
    assert dev.chunk_loads == N_CHUNKS
    assert dev.partial_loads == N_CHUNKS
    assert dev.decoded_bytes == N_CHUNKS * PARTIAL_STEP
    # a neighbour inside the decoded head hits the chunk cache
    assert bytes(dev.read(ino, 65536, 4096, len(data))) == data[65536 : 65536 + 4096]
    assert dev.chunk_loads == N_CHUNKS


def test_a_cache_with_room_keeps_chunks_whole(tmp_path: Path) -> None:
    dev, _image, ino, data, _source = _setup(tmp_path, cache=ChunkCache())
    for off in (8192, CS + 8192, 900_000):
        assert bytes(dev.read(ino, off, 4096, len(data))) == data[off : off + 4096]
    assert (dev.chunk_loads, dev.partial_loads, dev.decoded_bytes) == (2, 0, 2 * CS)


def test_uncompressed_chunks_are_read_by_range(tmp_path: Path) -> None:
    dev, _image, ino, data, source = _setup(tmp_path, Compressor.NONE)
    off = 2 * CS + 300_000
    assert bytes(dev.read(ino, off, 4096, len(data))) == data[off : off + 4096]
    assert source.sizes == [3 * PARTIAL_STEP]  # the head up to the read, not the whole 1 MiB


def test_a_second_miss_in_a_chunk_decodes_it_whole_once(tmp_path: Path) -> None:
    dev, _image, ino, data, _source = _setup(tmp_path)
    for off in (8192, 900_000, 500_000, CS - 4096, 12_345):
        assert bytes(dev.read(ino, off, 4096, len(data))) == data[off : off + 4096]
    assert (dev.chunk_loads, dev.partial_loads) == (2, 1)
    assert dev.decoded_bytes == PARTIAL_STEP + CS


def test_a_sequential_reader_decodes_each_chunk_once(tmp_path: Path) -> None:
    dev, _image, ino, data, _source = _setup(tmp_path)
    step = 128 << 10
    got = b"".join(bytes(dev.read(ino, off, step, len(data))) for off in range(0, len(data), step))
    assert got == data
    assert (dev.chunk_loads, dev.partial_loads, dev.decoded_bytes) == (N_CHUNKS, 0, len(data))


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE])
def test_random_reads_return_the_right_bytes(tmp_path: Path, compressor: Compressor) -> None:
    dev, _image, ino, data, _source = _setup(tmp_path, compressor)
    rng = random.Random(7)
    for _ in range(300):
        off = rng.randrange(len(data))
        size = rng.choice([1, 4096, 10_000, 200_000, CS + 5])
        assert bytes(dev.read(ino, off, size, len(data))) == data[off : off + size], (off, size)
    assert dev.read_errors == 0


def test_read_cached_serves_a_held_head_and_nothing_past_it(tmp_path: Path) -> None:
    dev, _image, ino, data, _source = _setup(tmp_path)
    dev.read(ino, 8192, 4096, len(data))
    assert dev.partial_loads == 1
    head = dev.read_cached(ino, 100_000, 4096, len(data))
    assert head is not None and bytes(head) == data[100_000:104_096]
    assert dev.read_cached(ino, PARTIAL_STEP, 4096, len(data)) is None
    assert not dev.holds(_image.chunks(ino, 0, 1)[0])  # (readahead still loads it whole)


def test_validation_decodes_whole_chunks_and_a_mismatch_is_an_error(tmp_path: Path) -> None:
    dev, _image, ino, data, _source = _setup(tmp_path, validate=True)
    assert bytes(dev.read(ino, 8192, 4096, len(data))) == data[8192:12288]
    assert (dev.partial_loads, dev.decoded_bytes) == (0, CS)

    bad, _image, ino, data, _source = _setup(tmp_path / "bad", Compressor.NONE, validate=True, corrupt=True)
    with pytest.raises((FormatError, OSError)):
        bad.read(ino, 8192, 4096, len(data))
    assert bad.read_errors == 1

    # without validation, a head that cannot be decoded is an error too, never bytes
    broken, _image, ino, data, _source = _setup(tmp_path / "broken", corrupt=True)
    with pytest.raises(FormatError):
        broken.read(ino, 8192, 4096, len(data))
    assert (broken.read_errors, broken.chunk_loads) == (1, 0)


def test_decompress_prefix_is_the_head_and_refuses_a_short_stream() -> None:
    data = _text(CS)
    for algo in (Compressor.ZSTD, Compressor.GZIP, Compressor.NONE):
        packed = codec.compress(algo, data)
        assert codec.decompress_prefix(algo, packed, CS, 5000) == data[:5000]
        assert codec.decompress_prefix(algo, packed, CS, 2 * CS) == data
        if algo != Compressor.NONE:
            with pytest.raises(FormatError):
                codec.decompress_prefix(algo, packed[: len(packed) // 10], CS, CS // 2)


def test_the_chunk_cache_replaces_a_short_head_and_counts_its_size() -> None:
    cache = ChunkCache(capacity_bytes=1000)
    loads: list[int] = []

    def load(n: int) -> bytes:
        loads.append(n)
        return bytes(n)

    assert len(cache.get("k", lambda: load(100), 50)) == 100
    assert len(cache.get("k", lambda: load(400), 80)) == 100  # held head covers it: a hit
    assert len(cache.get("k", lambda: load(400), 300)) == 400  # too short: loaded again
    assert loads == [100, 400]
    assert cache.size == 400
    assert cache.peek("k", 401) is None and cache.peek("k", 400) is not None


def test_chunk_cache_size_is_a_config_key_in_both_forms() -> None:
    from nydus_py.config import ConfigError
    from nydus_py.config.forms import parse_any

    backend = {"type": "localfs", "config": {"dir": "/nonexistent"}}
    v1 = {"device": {"backend": backend}, "chunk_cache_size": 128 << 20}
    v2 = {"version": 2, "backend": {"type": "localfs", "localfs": {"dir": "/nonexistent"}},
          "rafs": {"chunk_cache_size": 128 << 20}}
    assert parse_any(json.dumps(v1)).rafs.chunk_cache_size == 128 << 20
    assert parse_any(json.dumps(v2)).rafs.chunk_cache_size == 128 << 20
    assert parse_any(json.dumps({"device": {"backend": backend}})).rafs.chunk_cache_size == 128 << 20
    with pytest.raises(ConfigError):
        parse_any(json.dumps({**v1, "chunk_cache_size": -1}))


def test_a_mounted_image_gets_the_configured_chunk_cache(tmp_path: Path) -> None:
    from nydus_py.daemon.instance import MountCmd, create_instance

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    img = build(str(src), str(tmp_path / "img"), views=False)
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": img.blob_dir}}}, "mode": "direct",
           "chunk_cache_size": 3 << 20}
    inst = create_instance("/m", MountCmd("rafs", img.boot, json.dumps(cfg)))
    try:
        assert inst.device is not None and inst.device.cache.capacity == 3 << 20
    finally:
        inst.close()
