"""Layer merging with OCI/overlayfs whiteouts, and bootstrap -> tree reconstruction."""

import hashlib
import io
import json
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from nydus_py.builder.merge import merge_layers, tree_from_image
from nydus_py.builder.sources import tree_from_tar
from nydus_py.builder.tree import ChunkedData, FileData, Inode, walk
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.errors import FormatError

from .treeutil import describe, lookup, make_tar, member, read_all


def layer(*members: tuple[tarfile.TarInfo, bytes]) -> Inode:
    return tree_from_tar(io.BytesIO(make_tar(list(members))))


def names(root: Inode) -> set[str]:
    return {p.decode() for p, _ in walk(root)}


def test_multilayer_like_e2e_rig() -> None:
    """The E2E 'multilayer' image: file whiteout, dir whiteout, opaque dir, hard link."""
    base = layer(
        member("etc/motd", data=b"hello"),
        member("etc/hostname", data=b"box"),
        member("data/gone/deep/file", data=b"x"),
        member("data/opq/a", data=b"a"),
        member("data/opq/sub/c", data=b"c"),
        member("data/keep", data=b"k"),
        member("bin/tool", data=b"#!/bin/sh\n", mode=0o755),
        member("bin/tool-link", tarfile.LNKTYPE, linkname="bin/tool"),
    )
    mid = layer(
        member("etc/.wh.motd", data=b""),
        member("data/.wh.gone", data=b""),
        member("data/opq/.wh..wh..opq", data=b""),
        member("data/opq/b", data=b"b"),
    )
    top = layer(member(".dotfile", data=b"dot"), member("data/new", data=b"n"))
    merged = merge_layers([base, mid, top])
    assert names(merged) == {
        "/",
        "/.dotfile",
        "/bin",
        "/bin/tool",
        "/bin/tool-link",
        "/data",
        "/data/keep",
        "/data/new",
        "/data/opq",
        "/data/opq/b",
        "/etc",
        "/etc/hostname",
    }
    assert lookup(merged, "bin/tool") == lookup(merged, "bin/tool-link")
    assert read_all(lookup(merged, "data/opq/b")) == b"b"


def test_whiteouts_never_survive_even_in_lowest_layer() -> None:
    merged = merge_layers([layer(member(".wh.x", data=b""), member("d/.wh..wh..opq", data=b""), member("y"))])
    assert names(merged) == {"/", "/d", "/y"}


def test_whiteout_then_readd_in_same_layer() -> None:
    lower = layer(member("d/old", data=b"1"), member("f", data=b"old"))
    upper = layer(
        member(".wh.d", data=b""),
        member("d/", tarfile.DIRTYPE, mode=0o700),
        member("d/new", data=b"2"),
        member(".wh.f", data=b""),
        member("f", data=b"new"),
    )
    merged = merge_layers([lower, upper])
    assert set(lookup(merged, "d").children or {}) == {b"new"}
    assert read_all(lookup(merged, "f")) == b"new"


def test_type_replacements() -> None:
    lower = layer(member("a/kid", data=b"1"), member("b", data=b"file"), member("c/kid", data=b"2"))
    upper = layer(
        member("a", tarfile.SYMTYPE, linkname="/x"),  # non-dir over dir: children gone
        member("b/", tarfile.DIRTYPE, mode=0o711),  # dir over file
        member("b/inner", data=b"i"),
        member("c/", tarfile.DIRTYPE, mode=0o700, uid=9),  # dir over dir: merged, upper attrs
        member("c/more", data=b"3"),
    )
    merged = merge_layers([lower, upper])
    assert lookup(merged, "a").symlink == b"/x"
    b = lookup(merged, "b")
    assert b.is_dir and set(b.children or {}) == {b"inner"} and stat.S_IMODE(b.mode) == 0o711
    c = lookup(merged, "c")
    assert set(c.children or {}) == {b"kid", b"more"} and stat.S_IMODE(c.mode) == 0o700 and c.uid == 9


def test_opaque_over_three_layers() -> None:
    l1 = layer(member("d/one", data=b"1"))
    l2 = layer(member("d/two", data=b"2"))
    l3 = layer(member("d/.wh..wh..opq", data=b""), member("d/three", data=b"3"))
    l4 = layer(member("d/four", data=b"4"))
    assert set(lookup(merge_layers([l1, l2, l3, l4]), "d").children or {}) == {b"three", b"four"}
    assert set(lookup(merge_layers([l1, l2]), "d").children or {}) == {b"one", b"two"}


def test_whiteout_of_missing_name_and_aufs_meta_are_harmless() -> None:
    lower = layer(member("f", data=b"1"))
    upper = layer(member(".wh.nothing", data=b""), member(".wh..wh.plnk/", tarfile.DIRTYPE), member("g"))
    assert names(merge_layers([lower, upper])) == {"/", "/f", "/g"}


def test_hard_links_across_merge() -> None:
    lower = layer(member("a", data=b"shared"), member("b", tarfile.LNKTYPE, linkname="a"), member("c", data=b"c"))
    upper = layer(member(".wh.a", data=b""), member("c", data=b"c2"), member("d", tarfile.LNKTYPE, linkname="c"))
    merged = merge_layers([lower, upper])
    b = lookup(merged, "b")
    assert read_all(b) == b"shared" and b != lookup(merged, "c")  # the surviving name keeps the inode
    assert lookup(merged, "c") == lookup(merged, "d") and read_all(lookup(merged, "d")) == b"c2"


def test_inputs_are_not_modified() -> None:
    lower = layer(member("d/x", data=b"1"), member("e/y", data=b"2"))
    upper = layer(member("d/.wh.x", data=b""), member("e/.wh..wh..opq", data=b""), member("e/z", data=b"3"))
    before = (describe(lower), describe(upper))
    merge_layers([lower, upper])
    assert (describe(lower), describe(upper)) == before


def test_overlayfs_spec() -> None:
    lower = layer(member("gone", data=b"1"), member("o/old", data=b"2"), member("keep"))
    upper = layer(
        member("gone", tarfile.CHRTYPE, dev=(0, 0)),
        member("o/", tarfile.DIRTYPE, pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        member("o/new"),
        member("realdev", tarfile.CHRTYPE, dev=(1, 3)),
    )
    merged = merge_layers([lower, upper], "overlayfs")
    assert names(merged) == {"/", "/keep", "/o", "/o/new", "/realdev"}
    assert lookup(merged, "o").xattrs == {}
    # the same layers under the OCI spec keep the device and the lower content
    oci = merge_layers([lower, upper], "oci")
    assert stat.S_ISCHR(lookup(oci, "gone").mode) and set(lookup(oci, "o").children or {}) == {b"old", b"new"}


def test_none_spec_keeps_whiteout_names() -> None:
    merged = merge_layers([layer(member("x")), layer(member(".wh.x"))], "none")
    assert names(merged) == {"/", "/x", "/.wh.x"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        merge_layers([])
    with pytest.raises(ValueError):
        merge_layers([layer(member("x"))], "aufs")
    with pytest.raises(FormatError):
        merge_layers([Inode(mode=stat.S_IFREG | 0o644)])


def test_deep_merge_is_iterative() -> None:
    def chain(depth: int, leaf: bytes) -> Inode:
        root = Inode.directory()
        node = root
        for _ in range(depth):
            child = Inode.directory()
            assert node.children is not None
            node.children[b"d"] = child
            node = child
        assert node.children is not None
        node.children[leaf] = Inode(mode=stat.S_IFREG | 0o644)
        return root

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        merged = merge_layers([chain(2000, b"a"), chain(2000, b"b")])
        leaves = [p for p, n in walk(merged) if not n.is_dir]
    finally:
        sys.setrecursionlimit(old)
    assert len(leaves) == 2


def test_merge_equals_sequential_application() -> None:
    """Merging [a, b, c] at once equals merging (merge(a, b), c)."""
    a = layer(member("x/1", data=b"1"), member("y", data=b"y"))
    b = layer(member("x/.wh.1"), member("x/2", data=b"2"), member(".wh.y"))
    c = layer(member("x/.wh..wh..opq"), member("x/3", data=b"3"), member("y", data=b"y2"))
    once = merge_layers([a, b, c])
    stepwise = merge_layers([merge_layers([a, b]), c])
    assert describe(once) == describe(stepwise)
    assert names(once) == {"/", "/x", "/x/3", "/y"}


# ------------------------------------------------------------------------------------------
# tree_from_image on the real Nydus fixtures
# ------------------------------------------------------------------------------------------


def fixture_md5s(fixtures: Path) -> dict[bytes, str]:
    text = (fixtures / "v5-tree.json").read_text()
    _, end = json.JSONDecoder().raw_decode(text)
    out = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            out[path.encode()] = digest
    return out


@pytest.mark.parametrize("boot", ["v5-sha256-none.boot", "v5-blake3-lz4.boot"])
def test_tree_from_fixture_image(nydus_fixtures: Path, boot: str) -> None:
    blob_dir = str(nydus_fixtures / "blobs")
    with open_bootstrap(str(nydus_fixtures / boot)) as img:
        chunked = tree_from_image(img)
        data_tree = tree_from_image(img, blob_dir, rewrite=True)
        blob_ids = [b.blob_id for b in img.blobs]
        md5s = fixture_md5s(nydus_fixtures)
        files = {p: n for p, n in walk(data_tree) if n.is_reg}
        assert md5s.keys() <= files.keys()
        for path, digest in md5s.items():
            assert hashlib.md5(read_all(files[path])).hexdigest() == digest, path
    assert lookup(chunked, "hardlink-test/foo") == lookup(chunked, "hardlink-test/test.sh")
    assert lookup(chunked, "symlink-test/root-1").symlink == b"/////////////////"
    refs = names = 0
    for _path, node in walk(chunked):
        if node.is_reg:
            names += 1
            assert isinstance(node.data, ChunkedData)
            assert [b.blob_id for b in node.data.blobs] == blob_ids
            assert all(c.file_offset + c.uncompressed_size <= node.size for c in node.data.chunk_infos())
            refs += len(node.data.chunk_infos())
    assert (names, refs) == (23, 29)  # README: 23 regular files, 29 chunks (counted per name)
    assert describe(chunked, data=False) == describe(data_tree, data=False)
    for _path, node in walk(data_tree):
        if node.is_reg:
            assert isinstance(node.data, FileData)


def test_tree_from_image_blob_checks(nydus_fixtures: Path, tmp_path: Path) -> None:
    with open_bootstrap(str(nydus_fixtures / "v5-sha256-none.boot")) as img:
        with pytest.raises(FormatError, match="not found"):
            tree_from_image(img, str(tmp_path))
        with pytest.raises(ValueError):
            tree_from_image(img, rewrite=True)


def test_tree_from_image_detects_corrupt_data(nydus_fixtures: Path, tmp_path: Path) -> None:
    with open_bootstrap(str(nydus_fixtures / "v5-sha256-none.boot")) as img:
        blob = img.blobs[0].blob_id
        data = bytearray((nydus_fixtures / "blobs" / blob).read_bytes())
        data[100] ^= 0xFF
        (tmp_path / blob).write_bytes(bytes(data))
        tree = tree_from_image(img, str(tmp_path), rewrite=True)
        errors = 0
        for _path, node in walk(tree):
            if node.is_reg and node.size:
                try:
                    read_all(node)
                except FormatError:
                    errors += 1
        assert errors >= 1


def test_merge_image_trees_reuses_chunks(nydus_fixtures: Path) -> None:
    with open_bootstrap(str(nydus_fixtures / "v5-sha256-none.boot")) as a, open_bootstrap(
        str(nydus_fixtures / "v5-blake3-lz4.boot")
    ) as b:
        lower, upper = tree_from_image(a), tree_from_image(b)
    upper.remove(0, b"symlink-test")
    upper.add(0, b".wh.symlink-test", stat.S_IFREG | 0o644)
    merged = merge_layers([lower, upper])
    assert b"symlink-test" not in (merged.root.children or {})
    f = lookup(merged, "hardlink-test/foo")
    assert isinstance(f.data, ChunkedData) and f.data.blobs[0].blob_id.startswith("d7b86b1e")


class _Generic:
    """An image seen only through the RafsImage calls (not a V6Image: tree_from_image's generic
    path), with `readdir` listings optionally replaced."""

    def __init__(self, image: object, listings: dict[int, list] | None = None) -> None:
        self._image, self._listings = image, listings or {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._image, name)

    def readdir(self, ino: int, offset: int = 0) -> object:
        return iter(self._listings.get(ino) or list(self._image.readdir(ino, offset)))  # type: ignore[attr-defined]


def _v6_image(tmp_path: Path) -> Path:
    from nydus_py.builder.build import build_image
    from nydus_py.builder.options import BuildOptions

    layer = make_tar([member("d", tarfile.DIRTYPE, mode=0o755), member("d/a", data=b"a" * 70_000),
                      member("d/b", data=b"b" * 5, uid=7, gid=8, pax={"SCHILY.xattr.user.k": "v"}),
                      member("d/hl", tarfile.LNKTYPE, linkname="d/a"), member("d/s", tarfile.SYMTYPE, linkname="a"),
                      member("d/e"), member("dev", tarfile.CHRTYPE, dev=(1, 3)), member("z", data=b"zz")])
    boot = tmp_path / "v6.boot"
    (tmp_path / "blobs").mkdir()
    build_image(tree_from_tar(io.BytesIO(layer)), str(boot), str(tmp_path / "blobs"),
                BuildOptions(fs_version=6, chunk_size=0x4000))
    return boot


def test_tree_from_v6_image_is_the_generic_paths_tree(tmp_path: Path) -> None:
    """A v6 image's tree (its chunk lists packed by the reader, entries added with their
    attributes, no name lookup for names in order) is the one the generic path makes."""
    with open_bootstrap(str(_v6_image(tmp_path))) as img:
        fast, generic = tree_from_image(img), tree_from_image(_Generic(img))  # type: ignore[arg-type]
        assert describe(fast, data=False) == describe(generic, data=False)
        files = [n for n in range(len(fast)) if fast.kind[n] == fast.kind[fast.find(b"/d/a")]]
        assert len(files) == 4  # a, b, e, z (hl is a link)
        for n in files:
            path = fast.path(n)
            assert fast.chunk_bytes(n) == generic.chunk_bytes(generic.find(path)), path
        assert len(fast.chunk_bytes(fast.find(b"/d/a"))) == 5 * 80  # 70000 bytes in 16 KiB chunks


def test_tree_from_image_rejects_a_name_listed_twice(tmp_path: Path) -> None:
    """A directory listing a name twice is refused, also when the names are not in order (then
    each is looked up); out of order alone is accepted."""
    with open_bootstrap(str(_v6_image(tmp_path))) as img:
        d = img.lookup(img.root_ino, b"d")
        ents = list(img.readdir(d))
        twice = _Generic(img, {d: [*ents, ents[0]]})
        with pytest.raises(FormatError, match="d/a'?: duplicate directory entry"):
            tree_from_image(twice)  # type: ignore[arg-type]
        shuffled = tree_from_image(_Generic(img, {d: ents[::-1]}))  # type: ignore[arg-type]
        assert describe(shuffled, data=False) == describe(tree_from_image(img), data=False)
