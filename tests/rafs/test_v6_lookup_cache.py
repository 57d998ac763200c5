"""LOOKUP and '..' over the process-wide caches of RAFS v6: directory blocks are parsed (and
validated) once for all the LOOKUPs of a directory, each directory's '..' is checked once for its
parent's listing, its own listing and every '..' asked, and both caches are bounded and answer
nothing for a closed image (a remount is a new image)."""

import gc
import os
import random
import shutil
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.rafs import FormatError, open_bootstrap
from nydus_py.rafs.v6 import DIR_BLOCK_CACHE, PARENT_CACHE, _cached_dir_block, _cached_parent, _open_images

from ..fs.mountrig import build


def _image(tmp_path: Path, name: str, make: "dict[str, bytes | None]") -> str:
    """Build a v6 image of `make` (path -> bytes, None for a directory) in tmp_path/name."""
    src = tmp_path / f"src-{name}"
    shutil.rmtree(src, ignore_errors=True)
    for path, data in make.items():
        p = src / path
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    work = tmp_path / name
    shutil.rmtree(work, ignore_errors=True)
    return build(str(src), str(work), BuildOptions(), views=False).boot


def test_lookups_in_a_directory_of_several_blocks_parse_each_block_once(tmp_path: Path) -> None:
    files = {f"d/entry-with-a-long-name-{i:04d}": b"%d" % i for i in range(300)}
    boot = _image(tmp_path, "img", {**files, "d/sub": None})
    src = tmp_path / "src-img"
    for k in range(3):  # hard links: one inode under several names, some in other blocks
        os.link(src / "d" / "entry-with-a-long-name-0007", src / "d" / f"zz-link-{k}")
    boot = build(str(src), str(tmp_path / "img2"), BuildOptions(), views=False).boot
    image = open_bootstrap(boot)
    d = image.lookup(image.root_ino, b"d")
    assert d is not None
    blocks = -(-image.getattr(d).size // 4096)
    assert 1 < blocks <= DIR_BLOCK_CACHE
    listed = {e.name: e.ino for e in image.readdir(d)}
    before = _cached_dir_block.cache_info().misses
    names = list(listed)
    random.Random(1).shuffle(names)
    assert {n: image.lookup(d, n) for n in names} == listed
    assert _cached_dir_block.cache_info().misses == before  # the listing parsed them all already
    links = {listed[b"entry-with-a-long-name-0007"]} | {listed[b"zz-link-%d" % k] for k in range(3)}
    assert len(links) == 1 and image.getattr(links.pop()).nlink == 4
    for absent in (b"a", b"entry-with-a-long-name-0150x", b"zzz", b"entry", b".", b".."):
        assert image.lookup(d, absent) is None
    image.close()

    # a fresh image: LOOKUPs alone parse each block once (the root's, then d's: first for its
    # '..', then for its names; and sub's, for its '..'), however many names they ask
    before = _cached_dir_block.cache_info().misses
    image = open_bootstrap(boot)
    d = image.lookup(image.root_ino, b"d")
    assert d is not None
    assert {n: image.lookup(d, n) for n in names} == listed
    assert _cached_dir_block.cache_info().misses - before == 1 + blocks + 1
    image.close()


def test_a_directory_parent_is_checked_once_for_listings_lookups_and_dotdot(tmp_path: Path) -> None:
    boot = _image(tmp_path, "img", {"a/b/c/f": b"x", "a/g": b"y", "h/i/j": None, "k": b"z"})
    image = open_bootstrap(boot)
    before = _cached_parent.cache_info().misses
    dirs = []
    for _path, ino in image.walk():  # lists every directory: each checks its subdirectories' '..'
        if image.mode(ino) & 0o170000 == 0o040000:
            dirs.append(ino)
            image.parent(ino)
    for ino in dirs:
        list(image.readdir(ino))
        image.parent(ino)
    assert _cached_parent.cache_info().misses - before == len(dirs) == 7


def test_caches_are_bounded_and_a_closed_image_answers_nothing(tmp_path: Path) -> None:
    assert _cached_parent.cache_info().maxsize == PARENT_CACHE
    assert _cached_dir_block.cache_info().maxsize == DIR_BLOCK_CACHE
    boot = _image(tmp_path, "img", {"a/x/y": b"1"})
    image = open_bootstrap(boot)
    a = image.lookup(image.root_ino, b"a")
    assert a is not None
    x = image.lookup(a, b"x")
    assert x is not None and image.parent(x) == a
    image.close()
    with pytest.raises(FormatError):
        image.parent(x)
    with pytest.raises(FormatError):
        image.lookup(a, b"x")
    # the same path rebuilt with x moved under the root, opened again (a remount)
    boot2 = _image(tmp_path, "img", {"a/z": b"1", "x/y": b"2"})
    assert boot2 == boot
    image = open_bootstrap(boot)
    x2 = image.lookup(image.root_ino, b"x")
    assert x2 is not None and image.parent(x2) == image.root_ino
    a2 = image.lookup(image.root_ino, b"a")
    assert a2 is not None and image.lookup(a2, b"x") is None and image.lookup(a2, b"z") is not None
    image.close()


def test_an_image_dropped_without_close_leaves_the_open_table(tmp_path: Path) -> None:
    boot = _image(tmp_path, "img", {"a/b": b"1"})
    image = open_bootstrap(boot)
    serial = image._serial  # type: ignore[attr-defined]
    assert serial in _open_images
    del image
    gc.collect()
    assert serial not in _open_images
