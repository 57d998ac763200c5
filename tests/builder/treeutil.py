"""Test helpers: crafting tars with tarfile and comparing build trees field by field."""

import hashlib
import io
import stat
import tarfile
from typing import Any

from nydus_py.builder.packed import Tree
from nydus_py.builder.tree import ChunkedData, Inode, ident, walk


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    linkname: str = "",
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_600_000_000,
    pax: dict[str, str] | None = None,
    dev: tuple[int, int] = (0, 0),
) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.linkname = linkname
    ti.uid, ti.gid, ti.mtime = uid, gid, mtime
    ti.devmajor, ti.devminor = dev
    ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    if pax:
        ti.pax_headers = dict(pax)
    return ti, data


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if ti.size else None)
    return buf.getvalue()


def lookup(root: Inode | Tree, path: str | bytes) -> Any:
    """The node at `path`: an `Inode`, or a `packed.Node` view of a packed tree (compare those
    with ==, not `is`)."""
    p = path.encode() if isinstance(path, str) else path
    node: Any = root.root if isinstance(root, Tree) else root
    for comp in p.split(b"/"):
        if comp:
            assert node.children is not None, f"{p!r}: {comp!r} under a non-directory"
            node = node.children[comp]
    return node


def read_all(node: Any) -> bytes:
    assert node.data is not None and not isinstance(node.data, ChunkedData)
    with node.data.open() as f:
        return f.read()


def describe(root: Inode | Tree, *, data: bool = True, mtime_nsec: bool = True) -> dict[bytes, tuple]:
    """path -> (type/mode, uid, gid, mtime, nsec, rdev, xattrs, symlink, size, sha256, link group)."""
    groups: dict[int, bytes] = {}
    out: dict[bytes, tuple] = {}
    for path, node in walk(root):
        group = b""
        if node.children is None:
            group = groups.setdefault(ident(node), path)
        digest = ""
        if data and node.is_reg and node.data is not None and node.size:
            digest = hashlib.sha256(read_all(node)).hexdigest()
        out[path] = (
            stat.filemode(node.mode),
            node.mode,
            node.uid,
            node.gid,
            node.mtime,
            node.mtime_nsec if mtime_nsec else 0,
            node.rdev,
            tuple(sorted(node.xattrs.items())),
            node.symlink,
            node.size,
            digest,
            group,
        )
    return out
