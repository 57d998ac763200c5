"""RafsFilesystem's directory listings across the requests that continue one (in process): the
kernel reads a directory in 4 KiB replies until an empty one, and each request used to decode
and validate the directory again from its start."""

import os
import stat
from pathlib import Path

import pytest

import nydus_py.fs.rafs_fs as rafs_fs
from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import RafsImage
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

BIG = 300


class CountingImage:
    """The image, counting the decodes of each directory (readdir() and listing() calls)."""

    def __init__(self, image: RafsImage) -> None:
        self._image = image
        self.readdirs: dict[int, int] = {}

    def readdir(self, ino: int, offset: int = 0):  # type: ignore[no-untyped-def]
        self.readdirs[ino] = self.readdirs.get(ino, 0) + 1
        return self._image.readdir(ino, offset)

    def listing(self, ino: int, limit: int):  # type: ignore[no-untyped-def]
        self.readdirs[ino] = self.readdirs.get(ino, 0) + 1
        return self._image.listing(ino, limit)

    def __getattr__(self, name: str) -> object:
        return getattr(self._image, name)


@pytest.fixture(params=[5, 6])
def fs(tmp_path: Path, request: pytest.FixtureRequest) -> RafsFilesystem:
    src = tmp_path / "src"
    for d, n in (("big", BIG), ("small", 3), ("other", 40)):
        (src / d).mkdir(parents=True)
        for i in range(n):
            (src / d / f"file-{i:04d}").write_bytes(b"x" * (i % 7))
    (src / "big" / "sub").mkdir()
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    os.makedirs(blobs)
    build_image(tree_from_directory(src), boot, blobs, BuildOptions(fs_version=request.param))
    image = open_bootstrap(boot)
    f = RafsFilesystem(CountingImage(image), BlobDevice(image, LocalBlobDir(blobs)),  # type: ignore[arg-type]
                       readahead_chunks=0)
    return f


def _plus(fs: RafsFilesystem, ino: int, offset: int, n: int) -> list[tuple[bytes, int, int]]:
    """Up to `n` entries of a READDIRPLUS at `offset`, as (name, ino, cookie); stops early as
    the protocol does when the reply is full."""
    out = []
    for entry, name, _typ, off in fs.readdirplus(ino, 0, offset):
        out.append((name, entry.ino or entry.attr.ino, off))
        if len(out) == n:
            break
    return out


def _walk_in_pieces(fs: RafsFilesystem, ino: int, per: int) -> list[tuple[bytes, int, int]]:
    got: list[tuple[bytes, int, int]] = []
    off = 0
    while True:
        part = _plus(fs, ino, off, per)
        if not part:
            return got
        got += part
        off = part[-1][2]


def test_a_listing_read_in_pieces_decodes_the_directory_once(fs: RafsFilesystem) -> None:
    big = fs.lookup(1, b"big").ino
    img: CountingImage = fs.image  # type: ignore[assignment]
    got = _walk_in_pieces(fs, big, 25)
    want = [(b".", big, 1), (b"..", 1, 2)] + [
        (e.name, e.ino, 3 + k) for k, e in enumerate(img._image.readdir(big))]
    assert got == want
    assert len(got) == BIG + 1 + 2
    assert img.readdirs[big] == 1  # 14 requests, one decode
    # readdir (without plus) continues the same listing
    plain = [(n, i, o) for n, i, _t, o in fs.readdir(big, 0, 100)]
    assert plain == [(n, i, o) for n, i, o in want[100:]]
    assert img.readdirs[big] == 1


def test_listings_beyond_the_budget_are_evicted_or_streamed(fs: RafsFilesystem,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rafs_fs, "LISTING_BUDGET", 60)
    img: CountingImage = fs.image  # type: ignore[assignment]
    big, small, other = (fs.lookup(1, n).ino for n in (b"big", b"small", b"other"))
    # too big for the budget: streamed, one decode per request, still complete and in order
    got = _walk_in_pieces(fs, big, 100)
    assert [n for n, _i, _o in got[2:]] == [e.name for e in img._image.readdir(big)]
    assert img.readdirs[big] == 1 + 5  # found too big once, then 4 pieces and the empty reply
    _walk_in_pieces(fs, small, 2)
    _walk_in_pieces(fs, other, 10)
    assert img.readdirs[small] == 1 and img.readdirs[other] == 1
    assert fs._listed <= 60
    _walk_in_pieces(fs, other, 10)
    assert img.readdirs[other] == 1  # still held
    _walk_in_pieces(fs, small, 2)
    assert img.readdirs[small] == 1  # 3 + 40 fit together


def test_listing_of_a_non_directory_is_enotdir_or_eio(fs: RafsFilesystem) -> None:
    f = fs.lookup(fs.lookup(1, b"small").ino, b"file-0001")
    assert stat.S_ISREG(f.attr.mode)
    with pytest.raises(OSError):
        list(fs.readdirplus(f.ino, 0, 0))


def test_one_budget_for_every_filesystem_and_trim_drops_its_own(fs: RafsFilesystem, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared daemon's images share LISTING_BUDGET (its memory does not grow per image), and an
    idle mount's trim (or close) gives its listings back."""
    monkeypatch.setattr(rafs_fs, "LISTING_BUDGET", 60)
    other_fs = RafsFilesystem(fs.image, fs.device, readahead_chunks=0)
    other = fs.lookup(1, b"other").ino
    _walk_in_pieces(fs, other, 10)
    assert fs._listed == 40
    _walk_in_pieces(other_fs, other, 10)  # 40 + 40 > 60: the first filesystem's listing goes
    assert fs._listed == 0 and other_fs._listed == 40
    assert other_fs.trim() and other_fs._listed == 0 and not other_fs.trim()
    _walk_in_pieces(other_fs, other, 10)
    other_fs.close()
    assert other_fs._listed == 0


def test_an_idle_trim_forgets_the_walk_predictions(fs: RafsFilesystem) -> None:
    """WalkAhead's waiting directories are given back with the listings (an idle mount keeps
    nothing per directory)."""
    fs.warm_next_dir(1)  # the root listed to its end: its subdirectories wait for their turn
    assert fs.walk._after and fs.walk.predicted == 1
    fs.trim()
    assert not fs.walk._after and not fs.trim()
