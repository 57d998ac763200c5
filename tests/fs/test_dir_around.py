"""Directory-aware read-around (storage/cache/around.py, issue 12): a cold READ of a file looked
up in a directory takes the following files of that directory along in the same backend read,
never another directory's files, and stops guessing for a reader whose guesses go unread. Over
a real image, a real blob cache and a local backend that counts its reads."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import BlobInfo, RafsImage
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.cache.around import DIR_CREDIT
from nydus_py.storage.cache.blobcache import AROUND_WASTE
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

from ..storage.images import write_files
from .mountrig import build

FILE = 6000  # random bytes: a file's chunk is about this big compressed


class CountingDir(LocalBlobDir):
    """A local backend that counts its reads (the GETs a registry would answer)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads = 0
        self.bytes = 0

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        self.reads += 1
        self.bytes += size
        return super().read(blob, offset, size)


def _tree(src: Path, dirs: int, files: int, seed: int = 5) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    for d in range(dirs):
        for f in range(files):
            rel = f"d{d:02d}/f{f:03d}"
            out[rel] = rng.randbytes(FILE + rng.randrange(500))
        out[f"d{d:02d}/sub/inner"] = rng.randbytes(FILE)  # a subdirectory: stored elsewhere
    return write_files(src, out)


@contextmanager
def _mount(tmp_path: Path, dirs: int, files: int,
           **cache: int) -> Iterator[tuple[RafsFilesystem, BlobCacheManager, CountingDir, dict[str, bytes]]]:
    """The filesystem over a blob cache of a `_tree` image, closed (with its cache) at the end."""
    tree = _tree(tmp_path / "src", dirs, files)
    img = build(str(tmp_path / "src"), str(tmp_path / "img"), BuildOptions(chunk_size=1 << 20), views=False)
    image: RafsImage = open_bootstrap(img.boot)
    source = CountingDir(img.blob_dir)
    cache_mgr = BlobCacheManager(str(tmp_path / "cache"), source, stream_size=0, **cache)
    fs = RafsFilesystem(image, BlobDevice(image, cache_mgr, validate=True, amplify_io=1 << 20), readahead_chunks=0)
    try:
        yield fs, cache_mgr, source, tree
    finally:
        fs.close()
        cache_mgr.close()


def _cat(fs: RafsFilesystem, rel: str) -> bytes:
    """LOOKUP each component, then one READ of the whole file (as the kernel does for a small file)."""
    ino = 1
    for part in rel.split("/"):
        ino = fs.lookup(ino, part.encode()).ino
    return bytes(fs.read(ino, 0, 0, 128 << 10))


def test_a_run_of_a_directory_costs_one_backend_read(tmp_path: Path) -> None:
    with _mount(tmp_path, 3, 12) as (fs, m, source, tree):
        run = [f"d01/f{f:03d}" for f in range(3, 9)]  # a run of six neighbours, not from the first
        for rel in run:
            assert _cat(fs, rel) == tree[rel]
        assert source.reads == 1
        s = m.stats
        assert s.dir_guesses == 1 and s.dir_chunks >= len(run) - 1
        assert s.dir_used_bytes > 0 and s.around_chunks == 0


def test_the_guess_stops_where_the_directory_does(tmp_path: Path) -> None:
    with _mount(tmp_path, 3, 6) as (fs, m, source, tree):
        for rel in ("d00/f002", "d00/f003", "d00/f004", "d00/f005"):
            assert _cat(fs, rel) == tree[rel]
        assert source.reads == 1
        # f003..f005 came along; d01's files, right after them in the blob, did not
        assert m.stats.dir_chunks == 3 and m.stats.dir_used_bytes == m.stats.dir_bytes
        assert _cat(fs, "d01/f000") == tree["d01/f000"]
        assert source.reads == 2


def test_without_a_lookup_the_blind_window_still_applies(tmp_path: Path) -> None:
    with _mount(tmp_path, 2, 8) as (fs, m, _source, tree):
        ino = fs.lookup(fs.lookup(1, b"d00").ino, b"f001").ino
        fs._parents.clear()  # (as after READDIRPLUS, which creates the dentry without a LOOKUP)
        assert bytes(fs.read(ino, 0, 0, 128 << 10)) == tree["d00/f001"]
        assert m.stats.dir_guesses == 0 and m.stats.dir_refused == 0


@pytest.mark.parametrize("dir_around", [0, 256 << 10])
def test_guesses_that_go_unread_stop(tmp_path: Path, dir_around: int) -> None:
    with _mount(tmp_path, 40, 12, dir_around=dir_around, read_around=0) as (fs, m, source, tree):
        rng = random.Random(9)
        picks = rng.sample(sorted(r for r in tree if "/sub/" not in r and not r.endswith("f011")), 150)
        for rel in picks:
            assert _cat(fs, rel) == tree[rel]
        s = m.stats
        if not dir_around:
            assert s.dir_guesses == 0 and s.dir_bytes == 0 and s.dir_refused == 0
            return
        assert s.dir_refused > 0 and s.dir_guesses < len(picks) // 2
        unused = s.dir_bytes - s.dir_used_bytes
        # the guesses' waste: within their credit, the blind budget and one window
        assert unused <= DIR_CREDIT + AROUND_WASTE * (s.demand_bytes + s.ahead_used_bytes) + dir_around
        assert source.bytes - s.demand_bytes <= unused + s.dir_used_bytes
