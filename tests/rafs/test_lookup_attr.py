"""`RafsImage.lookup_attr` (LOOKUP's work in one image call) answers what `lookup` + `getattr`
answer, on v5 and v6, and None where the filesystem's slower path must say why (no such child,
a parent that is not a directory, '.', '..', a name that cannot be one)."""

import os
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.rafs import open_bootstrap

from ..fs.mountrig import build


@pytest.mark.parametrize("version", [5, 6])
def test_lookup_attr_is_lookup_then_getattr(tmp_path: Path, version: int) -> None:
    src = tmp_path / "src"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x" * 5000)
    (src / "d" / "sub" / "g").write_bytes(b"y")
    os.symlink("f", src / "d" / "link")
    os.link(src / "d" / "f", src / "hard")
    img = build(str(src), str(tmp_path / "img"), BuildOptions(fs_version=version, chunk_size=1 << 20), views=False)
    image = open_bootstrap(img.boot)
    try:
        checked = 0
        for path, ino in image.walk():
            parent_path, _, name = path.rpartition(b"/")
            if not name:
                continue
            parent = image.root_ino
            for part in parent_path.strip(b"/").split(b"/"):
                if part:
                    found = image.lookup(parent, part)
                    assert found is not None
                    parent = found
            assert image.lookup_attr(parent, name) == image.getattr(ino)
            checked += 1
        assert checked == 6
        d = image.lookup(image.root_ino, b"d")
        f = image.lookup(d, b"f")
        assert d is not None and f is not None
        for parent, name in [(d, b"missing"), (f, b"x"), (d, b"."), (d, b".."), (d, b""), (d, b"a/b"),
                             (d, b"a\0"), (d, b"n" * 300)]:
            assert image.lookup_attr(parent, name) is None
    finally:
        image.close()
