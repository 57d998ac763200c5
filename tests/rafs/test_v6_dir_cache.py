"""Directory blocks are parsed once for a listing served in many READDIR(PLUS) requests, each of
which starts over at the beginning of the directory."""

from pathlib import Path

from nydus_py.builder.options import BuildOptions
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.v6 import DIR_BLOCK_CACHE, _cached_dir_block

from ..fs.mountrig import build


def test_a_listing_in_pieces_parses_each_block_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    names = [b"file-%04d" % i for i in range(300)]  # several 4 KiB directory blocks
    for n in names:
        (src / "d" / n.decode()).write_bytes(n)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(), views=False)
    before = _cached_dir_block.cache_info().misses
    image = open_bootstrap(img.boot)
    d = image.lookup(image.root_ino, b"d")  # parses the root's block, and d's to check its '..'
    assert d is not None
    blocks = -(-image.getattr(d).size // 4096)
    assert 1 < blocks <= DIR_BLOCK_CACHE
    got: list[bytes] = []
    while True:  # 25 entries per request, as a 4 KiB READDIRPLUS reply holds
        piece = [e.name for _, e in zip(range(25), image.readdir(d, len(got)), strict=False)]
        if not piece:
            break
        got += piece
    assert got == names
    assert _cached_dir_block.cache_info().misses - before == 1 + blocks  # the root's one block, then d's
