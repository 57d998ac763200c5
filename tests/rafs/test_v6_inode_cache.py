"""The decoded-inode cache of RAFS v6 images has one budget for the whole process (issue 12,
memory): a shared daemon walking 50 images keeps at most INODE_CACHE inodes, not that many per
image (it was ~1.1 MiB per walked 2.3k-entry image)."""

import tracemalloc
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.rafs import FormatError, open_bootstrap, v6


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for d in range(30):
        (root / f"d{d:02d}").mkdir()
        for f in range(50):
            (root / f"d{d:02d}" / f"f{f:02d}").write_bytes(b"x" * f)
    out = tmp_path_factory.mktemp("img")
    build_image(tree_from_directory(root), str(out / "image.boot"), str(out), BuildOptions())
    return out / "image.boot"


def walk_all(img: object) -> int:
    n = 0
    for _path, ino in img.walk():  # type: ignore[attr-defined]
        img.getattr(ino)  # type: ignore[attr-defined]
        n += 1
    return n


def test_walking_many_images_keeps_one_inode_budget(boot: Path) -> None:
    images = [open_bootstrap(str(boot)) for _ in range(40)]  # 40 x 1531 inodes, all kept open
    try:
        assert all(i.version == 6 for i in images)
        walk_all(images[0])  # (lazy per-image tables, module-level objects: out of the measure)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            walked = sum(walk_all(i) for i in images[1:])
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert walked > 2 * v6.INODE_CACHE
        # per-image caches held ~0.5 KiB x 1531 x 39 = 29 MiB here; one budget holds <= ~4.5 MiB
        assert held < 8 << 20, f"{held / 2**20:.1f} MiB held after walking {walked} inodes"
    finally:
        for i in images:
            i.close()


def test_a_closed_image_answers_from_no_cache(boot: Path) -> None:
    img = open_bootstrap(str(boot))
    root = img.root_ino
    img.getattr(root)
    img.close()
    with pytest.raises(FormatError, match="closed"):
        img.getattr(root)
