"""`chunks_after`: a blob's chunks in blob order, for read amplification across files."""

import random

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.layout_common import pack_chunks


def _image(tmp_path, version, prefetch=()):  # noqa: ANN001, ANN202
    rng = random.Random(5)
    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for k in range(6):
            (src / f"d{d}" / f"f{k}").write_bytes(rng.randbytes(rng.randrange(1, 9000)))
    (src / "big").write_bytes(rng.randbytes(40000))
    boot = tmp_path / "boot"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    build_image(tree_from_directory(src), str(boot), str(blobs),
                BuildOptions(fs_version=version, chunk_size=0x4000, prefetch_paths=list(prefetch)))
    return open_bootstrap(str(boot))


def _all_chunks(img):  # noqa: ANN001, ANN202
    out = {}
    for _path, ino in img.walk():
        if img.getattr(ino).mode & 0o170000 == 0o100000:
            for c in img.chunks(ino):
                out[(c.blob_index, c.index)] = c
    return sorted(out.values(), key=lambda c: (c.blob_index, c.compressed_offset))


def test_v6_chunks_after_walks_the_blob_in_order(tmp_path):
    with _image(tmp_path, 6) as img:
        chunks = _all_chunks(img)
        assert len(chunks) > 20
        for k in (0, 7, len(chunks) - 1):
            got = list(img.chunks_after(chunks[k]))
            assert [(c.index, c.compressed_offset, c.digest) for c in got] == \
                   [(c.index, c.compressed_offset, c.digest) for c in chunks[k + 1:]]
        for a, b in zip(chunks, chunks[1:], strict=False):  # packed back to back: amplification can merge
            assert b.compressed_offset == a.compressed_offset + a.compressed_size


def test_prefetch_files_are_packed_first_in_the_blob(tmp_path):
    want = [b"/d2/f3", b"/d0/f1", b"/big"]
    with _image(tmp_path, 6, want) as img:
        from nydus_py.storage.prefetch import resolve_path

        first = []
        for p in want:
            first += img.chunks(resolve_path(img, p))
        offsets = [c.compressed_offset for c in first]
        assert offsets == sorted(offsets) and offsets[0] == 0  # in list order, at the front
        nxt = list(img.chunks_after(first[0]))
        assert [c.compressed_offset for c in nxt[:len(first) - 1]] == offsets[1:]


@pytest.mark.parametrize("version", [5])
def test_images_without_a_blob_chunk_table_yield_nothing(tmp_path, version):
    with _image(tmp_path, version) as img:
        c = _all_chunks(img)[0]
        assert list(img.chunks_after(c)) == []


def test_v6_packed_chunks_are_the_chunks_packed(tmp_path):
    """`packed_chunks` (what a build tree of the image keeps) is `pack_chunks(chunks(ino))` for
    every file: the records as stored, each at its file offset, empty for an empty file."""
    (tmp_path / "src" / "empty").parent.mkdir(parents=True)
    (tmp_path / "src" / "empty").write_bytes(b"")
    with _image(tmp_path, 6) as img:
        files = 0
        for _path, ino in img.walk():
            if img.getattr(ino).mode & 0o170000 == 0o100000:
                files += 1
                assert img.packed_chunks(ino) == pack_chunks(img.chunks(ino))
        assert files == 20
