"""`BlobDevice.warm`: a small file decoded right after its LOOKUP is kept for the one READ of
all of it that follows (then gone), only when that needs no waiting (a local blob, no blob
cache), and never in place of checking: a chunk that fails its digest is never handed out."""

import random
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import BlobInfo, RafsImage
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.cache.chunk_cache import ChunkCache
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.warm import WarmStore

from ..fs.mountrig import build

CS = 1 << 20


class CountingDir(LocalBlobDir):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads = 0
        self.flip: int | None = None  # a blob offset whose byte every read returns flipped

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        self.reads += 1
        data = bytearray(super().read(blob, offset, size))
        if self.flip is not None and offset <= self.flip < offset + size:
            data[self.flip - offset] ^= 0xFF
        return bytes(data)


class RemoteDir(CountingDir):
    local = False


def _image(tmp_path: Path) -> tuple[RafsImage, str, dict[str, bytes]]:
    rng = random.Random(3)
    files = {f"s{i}": rng.randbytes(500 + 997 * i) for i in range(24)}
    files["big"] = rng.randbytes(2 * CS + 5)
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CS), views=False)
    return open_bootstrap(img.boot), img.blob_dir, files


def _ino(image: RafsImage, name: str) -> int:
    ino = image.lookup(image.root_ino, name.encode())
    assert ino is not None
    return ino


def test_a_warmed_file_is_read_without_touching_the_blob_again_and_only_once(tmp_path: Path) -> None:
    image, blob_dir, files = _image(tmp_path)
    source = CountingDir(blob_dir)
    dev = BlobDevice(image, source, validate=True, cache=ChunkCache(64 << 20))
    ino = _ino(image, "s5")
    size = len(files["s5"])
    assert dev.warm(ino, size)
    assert source.reads == 1 and dev.cache.held == 0  # decoded, not kept in the chunk cache
    assert bytes(dev.read_whole(ino, size)) == files["s5"]
    assert source.reads == 1 and dev.warmed.hits == 1
    # taken: a second READ (the page cache dropped) reads the blob again
    assert bytes(dev.read_whole(ino, size)) == files["s5"]
    assert source.reads == 2 and dev.warmed.hits == 1


def test_only_what_needs_no_waiting_is_warmed(tmp_path: Path) -> None:
    image, blob_dir, files = _image(tmp_path)
    remote = RemoteDir(blob_dir)  # a registry, as far as the device can tell
    dev = BlobDevice(image, remote, cache=ChunkCache(64 << 20))
    assert not dev.warm(_ino(image, "s1"), len(files["s1"]))
    assert remote.reads == 0
    local = CountingDir(blob_dir)
    dev = BlobDevice(image, local, cache=ChunkCache(64 << 20))
    assert not dev.warm(_ino(image, "big"), len(files["big"]))  # three chunks: not a small file
    assert not dev.warm(_ino(image, "s1"), len(files["s1"]) + 1)  # a size that is not the file's
    assert local.reads == 0 and dev.warmed.warmed == 0


def test_files_looked_up_but_never_read_are_pushed_out(tmp_path: Path) -> None:
    image, blob_dir, files = _image(tmp_path)
    dev = BlobDevice(image, CountingDir(blob_dir), cache=ChunkCache(64 << 20))
    dev.warmed = WarmStore(keep=4)
    names = [f"s{i}" for i in range(10)]
    for name in names:
        assert dev.warm(_ino(image, name), len(files[name]))
    assert dev.warmed.wasted == 6
    for name in names:  # all still read right; only the last 4 from what was warmed
        assert bytes(dev.read_whole(_ino(image, name), len(files[name]))) == files[name]
    assert dev.warmed.hits == 4


def test_a_chunk_that_fails_its_digest_is_not_warmed_and_its_read_fails(tmp_path: Path) -> None:
    image, blob_dir, files = _image(tmp_path)
    source = CountingDir(blob_dir)
    dev = BlobDevice(image, source, validate=True, cache=ChunkCache(64 << 20))
    ino = _ino(image, "s9")
    chunk = image.chunks(ino, 0, len(files["s9"]))[0]
    source.flip = chunk.compressed_offset + chunk.compressed_size // 2
    with pytest.raises(Exception):  # noqa: B017 (DigestMismatch or a decode error: never bytes)
        dev.warm(ino, len(files["s9"]))
    assert dev.warmed.warmed == 0
    with pytest.raises(Exception):  # noqa: B017
        dev.read_whole(ino, len(files["s9"]))
    source.flip = None  # the blob is right again: so is the READ
    assert bytes(dev.read_whole(ino, len(files["s9"]))) == files["s9"]


def test_the_store_holds_at_most_its_bytes_and_an_idle_trim_empties_it() -> None:
    store = WarmStore(keep=16, max_bytes=10_000)
    for ino in range(5):
        store.put(ino, bytes(3000))
    assert store.size <= 10_000 and store.wasted == 2  # 5 x 3000 > 10000: the two oldest went
    assert store.take(0) is None and store.take(4) == bytes(3000)
    assert store.size == 6000
    assert store.clear() and store.size == 0 and store.take(3) is None
    assert not store.clear()


def test_with_a_blob_cache_only_files_whose_chunks_are_ready_are_warmed(tmp_path: Path) -> None:
    image, blob_dir, files = _image(tmp_path)
    remote = RemoteDir(blob_dir)
    cache = BlobCacheManager(str(tmp_path / "cache"), remote, amplify_io=0, read_around=0)
    dev = BlobDevice(image, cache, cache=ChunkCache(64 << 20))
    try:
        s2, s3 = _ino(image, "s2"), _ino(image, "s3")
        assert not dev.warm(s2, len(files["s2"]))  # not fetched yet: warming never fetches
        assert remote.reads == 0 and dev.warmed.warmed == 0
        assert bytes(dev.read_whole(s3, len(files["s3"]))) == files["s3"]  # fetched by a READ
        fetched = remote.reads
        assert dev.warm(s3, len(files["s3"]))  # ready now: read from the cache's files
        assert remote.reads == fetched
        assert bytes(dev.read_whole(s3, len(files["s3"]))) == files["s3"] and dev.warmed.hits == 1
    finally:
        cache.close()


def test_a_read_too_small_for_the_warmed_file_leaves_it_kept() -> None:
    store = WarmStore()
    store.put(7, b"x" * 5000)
    assert store.take(7, 4096) is None  # (an O_DIRECT or mmap read of the first page)
    assert store.take(7, 8192) == b"x" * 5000 and store.take(7, 8192) is None
    assert store.hits == 1
