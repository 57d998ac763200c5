"""The checker's own overlay model of OCI layers (independent of the builder's merge) and its diff."""

import io
import stat

from nydus_py.convert.treediff import Node, OverlayTree, diff

from . import ociimage as oi


def apply(tree: OverlayTree, entries: list[oi.Entry]) -> None:
    tree.apply(io.BytesIO(oi.make_tar(entries)))


def test_whiteouts_opaque_dirs_and_hard_links():
    t = OverlayTree()
    apply(t, [oi.Entry("./", "dir"), oi.Entry("a", "dir"), oi.Entry("a/x", data=b"x"),
              oi.Entry("a/y", data=b"y"), oi.Entry("a/hl", "link", target="a/x"), oi.Entry("o", "dir"),
              oi.Entry("o/old", data=b"1"), oi.Entry("gone", data=b"g")])
    assert t.nodes["/a/x"] is t.nodes["/a/hl"] and t.nodes["/a/x"].nlink == 2
    apply(t, [oi.Entry("o", "dir"), oi.Entry("o/new", data=b"2"), oi.Entry("o/.wh..wh..opq"),
              oi.Entry(".wh.gone"), oi.Entry("a/.wh.hl")])
    assert sorted(t.nodes) == ["/", "/a", "/a/x", "/a/y", "/o", "/o/new"]
    assert t.nodes["/a/x"].nlink == 1  # one name of the group went
    assert t.nodes["/a"].implicit and not t.nodes["/o"].implicit  # layer 2 filled /a without listing it


def test_diff_names_each_field():
    f = Node(stat.S_IFREG | 0o644, 0, 0, 5, size=1, sha256="aa")
    g = Node(stat.S_IFREG | 0o600, 0, 1, 5, size=1, sha256="bb", xattrs={b"user.k": b"v"})
    lines = diff({"/f": f, "/only-src": f}, {"/f": g, "/only-ny": f})
    assert lines == [
        "/f: mode 644 in the source, 600 in the Nydus image",
        "/f: gid 0 in the source, 1 in the Nydus image",
        "/f: xattrs {} in the source, {'user.k': 'v'} in the Nydus image",
        "/f: sha256 aa in the source, bb in the Nydus image",
        "/only-ny: only in the Nydus image",
        "/only-src: only in the source image",
    ]
