"""The file tree an image shows, as comparable facts, from two independent sides:

- `OverlayTree`: OCI layer tars applied in order with overlay/whiteout semantics (`.wh.NAME`
  deletes, `.wh..wh..opq` hides the lower content of its directory, hard links share one node);
- `rafs_tree`: a RAFS image walked through the reader, file data read through a `BlobDevice`
  (chunk digests checked), i.e. what nydusd would serve.

`diff` names every difference path by path. The overlay side is deliberately not the builder's
merge code, so a bug there shows up here instead of being repeated.
"""

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from ..rafs.model import RafsImage
from ..storage.device import BlobDevice

READ_PIECE = 1 << 20
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_XATTR_PAX = "SCHILY.xattr."


@dataclass
class Node:
    """What is compared for one path (directory sizes and link counts are not: they differ
    between filesystems for the same content)."""

    mode: int  # S_IFMT | permission bits
    uid: int
    gid: int
    mtime: int
    size: int = 0
    target: bytes = b""  # symlink target
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    sha256: str = ""  # regular file data
    nlink: int = 1  # regular files only
    implicit: bool = False  # a parent directory no tar listed: only its type is compared

    def facts(self) -> dict[str, object]:
        out: dict[str, object] = {"type": _type(self.mode), "mode": f"{stat.S_IMODE(self.mode):o}", "uid": self.uid,
                                  "gid": self.gid, "mtime": self.mtime, "xattrs": dict(sorted(self.xattrs.items()))}
        if stat.S_ISREG(self.mode):
            out.update(size=self.size, sha256=self.sha256, nlink=self.nlink)
        elif stat.S_ISLNK(self.mode):
            out["target"] = self.target
        elif stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode):
            out["rdev"] = self.rdev
        return out


def _type(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return f"type {stat.S_IFMT(mode):o}"


def _norm(name: str) -> str:
    """A tar member name as an absolute path without `./`, `//` or a trailing slash."""
    parts = [p for p in name.split("/") if p and p != "."]
    return "/" + "/".join(parts)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


class OverlayTree:
    """Layers applied lowest first; `nodes` maps absolute paths to facts. Hard links share one
    `Node` object, so the link count is the number of paths holding it."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self._layer_paths: set[str] = set()  # paths the layer being applied has put in place

    def _drop(self, path: str) -> None:
        node = self.nodes.pop(path, None)
        if node is not None and stat.S_ISREG(node.mode):
            node.nlink -= 1  # one name fewer for the rest of a hard link group

    def _remove(self, path: str) -> None:
        self._drop(path)
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self.nodes if p.startswith(prefix)]:
            self._drop(p)

    def _ensure_parents(self, path: str, mtime: int) -> None:
        """Parents of `path` exist as directories. One this layer fills without listing it gets
        attributes from whoever unpacks the layer (tar extraction makes them up, builders use
        defaults), so only its type is compared from now on."""
        cur = path
        while cur != "/":
            cur = _parent(cur)
            node = self.nodes.get(cur)
            if node is None:
                self.nodes[cur] = Node(stat.S_IFDIR | 0o755, 0, 0, mtime, implicit=True)
            elif cur not in self._layer_paths:
                node.implicit = True

    def _touch_parents(self, path: str) -> None:
        """A whiteout is unpacked inside its directory too: the same as `_ensure_parents` for
        the directories that exist (none is created for it)."""
        cur = path
        while cur != "/":
            cur = _parent(cur)
            node = self.nodes.get(cur)
            if node is not None and cur not in self._layer_paths:
                node.implicit = True

    def apply(self, tar_stream: BinaryIO) -> None:
        """One uncompressed layer tar, on top of what is there."""
        self._layer_paths = set()
        opaque_done: set[str] = set()
        with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
            for m in tar:
                path = _norm(m.name)
                base = path.rsplit("/", 1)[1]
                if base.startswith(WHITEOUT):
                    self._touch_parents(path)
                if base == OPAQUE:
                    d = _parent(path)
                    if d not in opaque_done:  # lower content hidden; this layer's own stays
                        prefix = d.rstrip("/") + "/"
                        for p in [p for p in self.nodes if p.startswith(prefix) and p not in self._layer_paths]:
                            self._drop(p)
                        opaque_done.add(d)
                    continue
                if base.startswith(WHITEOUT):
                    self._remove(_parent(path).rstrip("/") + "/" + base[len(WHITEOUT):])
                    continue
                self._add(path, m, tar)

    def _add(self, path: str, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self._layer_paths.add(path)
        xattrs = {k[len(_XATTR_PAX):].encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
                  for k, v in m.pax_headers.items() if k.startswith(_XATTR_PAX)}
        perm = m.mode & 0o7777
        mtime = int(m.mtime)
        if m.islnk():
            src = self.nodes.get(_norm(m.linkname))
            if src is None:
                raise ValueError(f"{path}: hard link to {m.linkname!r}, which the layers do not have")
            self._remove(path)
            self._ensure_parents(path, mtime)
            src.nlink += 1
            self.nodes[path] = src
            return
        if m.isdir():
            old = self.nodes.get(path)
            node = Node(stat.S_IFDIR | perm, m.uid, m.gid, mtime, xattrs=xattrs)
            if old is not None and not stat.S_ISDIR(old.mode):
                self._remove(path)
            self._ensure_parents(path, mtime)
            self.nodes[path] = node  # a directory listed again keeps its lower children
            return
        self._remove(path)
        self._ensure_parents(path, mtime)
        if m.isreg():
            h = hashlib.sha256()
            f = tar.extractfile(m)
            assert f is not None
            while piece := f.read(READ_PIECE):
                h.update(piece)
            node = Node(stat.S_IFREG | perm, m.uid, m.gid, mtime, size=m.size, xattrs=xattrs, sha256=h.hexdigest())
        elif m.issym():
            node = Node(stat.S_IFLNK | perm, m.uid, m.gid, mtime, target=m.linkname.encode("utf-8", "surrogateescape"),
                        xattrs=xattrs)
        elif m.ischr() or m.isblk():
            fmt = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            node = Node(fmt | perm, m.uid, m.gid, mtime, rdev=_makedev(m.devmajor, m.devminor), xattrs=xattrs)
        elif m.isfifo():
            node = Node(stat.S_IFIFO | perm, m.uid, m.gid, mtime, xattrs=xattrs)
        else:
            raise ValueError(f"{path}: tar member type {m.type!r} is not supported")
        self.nodes[path] = node


def _makedev(major: int, minor: int) -> int:
    return os.makedev(major, minor)


def rafs_tree(image: RafsImage, device: BlobDevice) -> dict[str, Node]:
    """Every path of `image` with its facts; file data read (and chunk digests checked) through
    `device`. Hard links share one Node, as in `OverlayTree`."""
    out: dict[str, Node] = {}
    by_ino: dict[int, Node] = {}
    for raw, ino in _walk(image):
        path = raw.decode("utf-8", "surrogateescape")
        if ino in by_ino:
            out[path] = by_ino[ino]
            continue
        a = image.getattr(ino)
        xattrs = {}
        for name in image.listxattr(ino):
            value = image.getxattr(ino, name)
            if value is not None:
                xattrs[name] = value
        node = Node(a.mode, a.uid, a.gid, a.mtime, xattrs=xattrs)
        if stat.S_ISREG(a.mode):
            node = replace(node, size=a.size, sha256=_file_sha(device, ino, a.size), nlink=a.nlink)
        elif stat.S_ISLNK(a.mode):
            node.target = image.readlink(ino)
        elif stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode):
            node.rdev = a.rdev
        by_ino[ino] = node
        out[path] = node
    return out


def _walk(image: RafsImage) -> Iterator[tuple[bytes, int]]:
    yield b"/", image.root_ino
    stack = [(image.root_ino, b"")]
    while stack:
        ino, path = stack.pop()
        for ent in image.readdir(ino):
            if ent.name in (b".", b".."):
                continue
            cpath = path + b"/" + ent.name
            yield cpath, ent.ino
            if stat.S_ISDIR(image.getattr(ent.ino).mode):
                stack.append((ent.ino, cpath))


def _file_sha(device: BlobDevice, ino: int, size: int) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        data = device.read(ino, pos, min(READ_PIECE, size - pos), size)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return h.hexdigest()


def diff(source: dict[str, Node], nydus: dict[str, Node], *, limit: int = 200) -> list[str]:
    """Readable differences, one line each, sorted by path (at most `limit`, then a count)."""
    out: list[str] = []
    for path in sorted(source.keys() | nydus.keys()):
        s, n = source.get(path), nydus.get(path)
        if n is None:
            out.append(f"{path}: only in the source image")
            continue
        if s is None:
            out.append(f"{path}: only in the Nydus image")
            continue
        sf, nf = s.facts(), n.facts()
        if sf["type"] != nf["type"]:
            out.append(f"{path}: {sf['type']} in the source, {nf['type']} in the Nydus image")
            continue
        if s.implicit:
            continue
        for key in sf:
            if sf[key] != nf.get(key):
                out.append(f"{path}: {key} {_show(sf[key])} in the source, {_show(nf.get(key))} in the Nydus image")
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more differences"]
    return out


def _show(v: object) -> str:
    if isinstance(v, bytes):
        return repr(v.decode("utf-8", "backslashreplace"))
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_show(k)}: {_show(x)}" for k, x in v.items()) + "}"
    return str(v) if not isinstance(v, str) else v
