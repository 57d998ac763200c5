"""A read that takes a chunk whole (a small file read at once, an aligned 1 MiB window) hands the
decoded chunk to its reader without keeping it in the in-memory chunk cache: the kernel's page
cache holds those bytes now, and a kept copy only cost fresh pages (a page fault per 4 KiB
decoded). Reads of a part of a chunk still keep it for their neighbours, and concurrent readers
of a chunk not kept still share one load."""

import random
import threading
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import BlobInfo, RafsImage
from nydus_py.storage.cache.chunk_cache import ChunkCache
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

from ..fs.mountrig import build
from ..waiting import wait_until

CS = 1 << 20


class GatedDir(LocalBlobDir):
    """The blob dir, counting reads; while `gate` is set, reads wait for `go`."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads = 0
        self.gate = False
        self.entered = threading.Event()
        self.go = threading.Event()

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        self.reads += 1
        if self.gate:
            self.entered.set()
            assert self.go.wait(10)
        return super().read(blob, offset, size)


def _setup(tmp_path: Path, validate: bool = False) -> tuple[BlobDevice, RafsImage, dict[str, bytes], GatedDir]:
    rng = random.Random(7)
    files = {"small": rng.randbytes(3000) * 7, "big": rng.randbytes(CS // 4) * 12}  # 21 KB; 3 chunks
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CS), views=False)
    image = open_bootstrap(img.boot)
    source = GatedDir(img.blob_dir)
    return BlobDevice(image, source, validate=validate, cache=ChunkCache(64 << 20)), image, files, source


def _ino(image: RafsImage, name: str) -> int:
    ino = image.lookup(image.root_ino, name.encode())
    assert ino is not None
    return ino


def _whole_reads_are_not_kept(tmp_path: Path, validate: bool) -> None:
    dev, image, files, source = _setup(tmp_path, validate)
    small, big = _ino(image, "small"), _ino(image, "big")
    assert bytes(dev.read(small, 0, 128 << 10)) == files["small"]  # the whole file, one chunk
    for off in range(0, len(files["big"]), CS):  # aligned 1 MiB windows: each a whole chunk
        assert bytes(dev.read(big, off, CS)) == files["big"][off : off + CS]
    assert dev.cache.held == 0 and dev.cache.passed == 4 and dev.chunk_loads == 4
    # read again (the page cache dropped): decoded again, still right
    assert bytes(dev.read(small, 0, 128 << 10)) == files["small"] and source.reads == 5
    assert dev.cache.held == 0


def test_a_read_taking_a_chunk_whole_does_not_keep_it(tmp_path: Path) -> None:
    _whole_reads_are_not_kept(tmp_path, validate=False)


def test_validated_whole_reads_are_not_kept_either(tmp_path: Path) -> None:
    _whole_reads_are_not_kept(tmp_path, validate=True)


def test_reads_of_a_part_of_a_chunk_keep_it_for_their_neighbours(tmp_path: Path) -> None:
    dev, image, files, source = _setup(tmp_path)
    small, big = _ino(image, "small"), _ino(image, "big")
    step = 128 << 10
    for off in range(0, CS, step):  # the big file's first chunk in 128 KiB READs
        assert bytes(dev.read(big, off, step)) == files["big"][off : off + step]
    assert bytes(dev.read(small, 0, 4096)) == files["small"][:4096]  # the head of the small file
    assert bytes(dev.read(small, 4096, 128 << 10)) == files["small"][4096:]  # the rest: a hit
    assert dev.chunk_loads == 2 and source.reads == 2 and dev.cache.passed == 0
    assert dev.cache.held == CS + len(files["small"])


@pytest.mark.parametrize("whole", [False, True], ids=["read", "read_whole"])
def test_concurrent_whole_readers_share_one_load_not_kept(tmp_path: Path, whole: bool) -> None:
    """Two readers of a whole small file (`read` of its whole range, or `read_whole`): one load,
    shared, and the chunk not kept."""
    dev, image, files, source = _setup(tmp_path)
    small = _ino(image, "small")
    source.gate = True
    got: list[bytes] = []

    def reader() -> None:
        data = dev.read_whole(small, len(files["small"])) if whole else dev.read(small, 0, 128 << 10)
        got.append(bytes(data))

    first = threading.Thread(target=reader, daemon=True)
    first.start()
    assert source.entered.wait(10)
    second = threading.Thread(target=reader, daemon=True)
    second.start()
    store = dev.cache.store
    wait_until(lambda: any(p.event is not None for p in list(store._loading.values())),
               what="the second reader waiting on the first one's load")
    source.go.set()
    first.join(10)
    second.join(10)
    assert got == [files["small"]] * 2
    assert source.reads == 1 and dev.chunk_loads == 1 and dev.cache.held == 0
    if not whole:
        assert dev.cache.passed == 1


def test_read_whole_of_a_one_chunk_file_decodes_it_once_not_kept(tmp_path: Path) -> None:
    """`read_whole` (a small file's one READ): the chunk decoded, handed over, counted, not kept."""
    dev, image, files, source = _setup(tmp_path)
    small = _ino(image, "small")
    assert bytes(dev.read_whole(small, len(files["small"]))) == files["small"]
    assert source.reads == 1 and dev.chunk_loads == 1 and dev.cache.passed == 1 and dev.cache.held == 0
    assert dev.bytes_read == len(files["small"])


def test_read_whole_hits_a_chunk_already_held(tmp_path: Path) -> None:
    dev, image, files, source = _setup(tmp_path)
    small = _ino(image, "small")
    assert bytes(dev.read(small, 0, 4096)) == files["small"][:4096]  # a part: the chunk is kept
    assert bytes(dev.read_whole(small, len(files["small"]))) == files["small"]
    assert source.reads == 1 and dev.chunk_loads == 1


def test_read_whole_of_a_file_of_several_chunks_reads_them_all(tmp_path: Path) -> None:
    dev, image, files, source = _setup(tmp_path)
    big = _ino(image, "big")
    assert bytes(dev.read_whole(big, len(files["big"]))) == files["big"]
    assert source.reads == 3 and dev.chunk_loads == 3
