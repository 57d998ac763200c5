"""The packed build tree (`builder.packed.Tree`): name index, replaced and removed entries, hard
links, views. Byte-identical output against the old object tree is `test_output_identity`."""

import io
import stat
import tarfile

import pytest

from nydus_py.builder.merge import merge_layers
from nydus_py.builder.packed import DEAD, Node, Tree, as_tree
from nydus_py.builder.sources import tree_from_tar
from nydus_py.builder.tree import FileData, Inode
from nydus_py.rafs.errors import FormatError

from .treeutil import lookup, make_tar, member, read_all

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644


def paths(tree: Tree) -> list[bytes]:
    return [p for p, _ in tree.walk()]


def test_name_index_survives_its_own_growth() -> None:
    """An entry added while the name index grows is found as itself, not as an older entry it
    replaces (it used to be marked dead: every 32nd directory of a chain vanished)."""
    tree = Tree()
    parent = 0
    for _ in range(300):
        parent = tree.add(parent, b"a", DIR)
    assert len(paths(tree)) == 301
    assert DEAD not in tree.parent
    tree.freeze()
    assert tree.find(b"/" + b"/".join([b"a"] * 300)) == parent


def test_reserve_sizes_the_name_index_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`reserve(n)` makes room for n entries at once: adding them rebuilds the name index no
    more (it grew by half at a time: ten rebuilds for 1290 names, each rehashing every entry,
    5% of a build-cache layer's join); lookups still find every name, also past the reserve."""
    rebuilds = []
    real = Tree._rebuild_ns

    def counted(self: Tree, extra: int = 0) -> object:
        rebuilds.append(extra)
        return real(self, extra)

    monkeypatch.setattr(Tree, "_rebuild_ns", counted)
    tree = Tree()
    tree.reserve(2000)
    assert len(rebuilds) == 1
    for i in range(2000):
        tree.add(0, b"f%d" % i, REG)
    assert len(rebuilds) == 1
    for i in range(2000, 6000):  # (past it: grows as before)
        tree.add(0, b"f%d" % i, REG)
    assert len(rebuilds) > 1
    assert all(tree.lookup(0, b"f%d" % i) == i + 1 for i in range(6000))


def test_replace_remove_and_dead_subtrees() -> None:
    tree = Tree()
    d = tree.add(0, b"d", DIR)
    tree.add(d, b"kid", REG)
    f = tree.add(0, b"d", REG)  # a file replaces the directory: its children go with it
    assert tree.parent[d] == DEAD and tree.lookup(0, b"d") == f
    assert paths(tree) == [b"/", b"/d"]
    tree.add(0, b"x", REG)
    tree.remove(0, b"x")
    tree.remove(0, b"missing")
    assert tree.lookup(0, b"x") == -1 and paths(tree) == [b"/", b"/d"]
    for i in range(1000):  # tombstones and growth keep every live name findable
        tree.add(0, b"n%d" % i, REG)
        if i % 3 == 0:
            tree.remove(0, b"n%d" % i)
    assert sum(1 for p in paths(tree) if p.startswith(b"/n")) == 666
    assert all(tree.lookup(0, b"n%d" % i) >= 0 for i in range(1000) if i % 3)


def test_hard_link_keeps_its_inode_when_the_first_name_is_replaced() -> None:
    tree = Tree()
    a = tree.add(0, b"a", REG, uid=7)
    tree.add_link(0, b"b", a)
    tree.add(0, b"a", REG, uid=9)
    root = tree.root
    assert root.children is not None
    b, new_a = root.children[b"b"], root.children[b"a"]
    assert b.uid == 7 and new_a.uid == 9 and b != new_a
    with pytest.raises(FormatError, match="linked twice"):
        tree.add_link(0, b"dirlink", tree.add(0, b"dir", DIR))


def test_tar_member_under_a_replaced_ancestor() -> None:
    """Members come directory by directory, so the parent of the last member is reused; an
    ancestor replaced by a file in between must not be walked through, and a directory member
    again keeps its children."""
    raw = make_tar([member("a/b/x", data=b"1"), member("a", data=b"file now"), member("a/b/y", data=b"2")])
    with pytest.raises(FormatError, match="not a directory"):
        tree_from_tar(io.BytesIO(raw))
    raw = make_tar([member("a/b/x", data=b"1"), member("a/b", tarfile.DIRTYPE, mode=0o700), member("a/b/y")])
    tree = tree_from_tar(io.BytesIO(raw))
    assert paths(tree) == [b"/", b"/a", b"/a/b", b"/a/b/x", b"/a/b/y"]
    assert stat.S_IMODE(lookup(tree, "a/b").mode) == 0o700


def test_views_and_packing_of_inode_trees() -> None:
    shared = Inode(mode=REG, data=FileData(3, lambda: io.BytesIO(b"abc")))
    root = Inode(mode=DIR, children={b"x": shared, b"y": shared, b"s": Inode(mode=stat.S_IFLNK | 0o777, symlink=b"x")})
    tree = as_tree(root)
    assert lookup(tree, "x") == lookup(tree, "y") and read_all(lookup(tree, "y")) == b"abc"
    assert lookup(tree, "s").symlink == b"x" and lookup(tree, "s").size == 1
    assert as_tree(tree.root) is tree and isinstance(lookup(tree, "x"), Node)
    bad = Inode(mode=DIR, children={b"f": Inode(mode=REG, children={b"k": Inode(mode=REG)})})
    with pytest.raises(FormatError, match="only directories"):
        as_tree(bad)


def test_merge_copies_hard_links_once_per_layer() -> None:
    lower = tree_from_tar(io.BytesIO(make_tar([member("a", data=b"A"), member("b", tarfile.LNKTYPE, linkname="a")])))
    with pytest.raises(FormatError):  # a hard link must name a file of its own layer
        tree_from_tar(io.BytesIO(make_tar([member("c", tarfile.LNKTYPE, linkname="b")])))
    upper = tree_from_tar(io.BytesIO(make_tar([member(".wh.a", data=b""), member("c", data=b"C")])))
    layers: list[Inode | Tree] = [lower, upper]
    merged = merge_layers(layers, consume=True)
    assert layers == [] and paths(merged) == [b"/", b"/b", b"/c"]
    assert read_all(lookup(merged, "b")) == b"A"
