"""Stacking layer trees into one (whiteouts applied) and turning a bootstrap back into a tree.

Layer semantics follow the OCI image spec / overlayfs:
* `.wh.NAME` in a layer removes NAME coming from the layers below; the marker is not kept.
* `.wh..wh..opq` in a directory hides everything the lower layers had in that directory.
* Any other `.wh..wh.*` name is AUFS metadata and is dropped (as containerd does).
* A non-directory replaces whatever was below; a directory over a non-directory replaces it; a
  directory over a directory merges, taking the upper directory's attributes.
* Within a layer, whiteouts apply before that layer's own entries, so `.wh.x` plus a new `x`
  means "replace x".

Inputs are never modified: the result is a new packed tree (`packed.Tree`); hard links inside a
layer stay one inode there.
"""

import io
import os
import stat
from collections.abc import Sequence
from typing import BinaryIO

from ..rafs.chunkdata import read_file_range
from ..rafs.errors import FormatError
from ..rafs.layout_common import pack_chunks
from ..rafs.model import Attr, BlobInfo, RafsImage
from ..rafs.v6 import V6Image
from ..storage.localfs import LocalBlobDir
from .packed import DEAD, K_LINK, Tree, as_tree
from .tree import Inode

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
WHITEOUT_OPAQUE = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"

WHITEOUT_SPECS = ("oci", "overlayfs", "none")


def _classify(name: bytes, layer: Tree, node: int, spec: str) -> tuple[str, bytes]:
    """('whiteout', target) | ('meta', b'') | ('entry', name) for one upper-layer entry."""
    if spec == "oci":
        if name == WHITEOUT_OPAQUE or name.startswith(WHITEOUT_META_PREFIX):
            return "meta", b""
        if name.startswith(WHITEOUT_PREFIX) and len(name) > len(WHITEOUT_PREFIX):
            return "whiteout", name[len(WHITEOUT_PREFIX) :]
    elif spec == "overlayfs" and stat.S_ISCHR(layer.mode[node]) and layer.rdev(node) == 0:
        return "whiteout", name
    return "entry", name


def merge_layers(layers: "Sequence[Inode | Tree]", whiteout_spec: str = "oci", *, consume: bool = False) -> Tree:
    """One packed tree from `layers` (lowest first) with whiteouts applied and removed.

    `whiteout_spec`: "oci" (`.wh.` files, the default), "overlayfs" (0/0 char devices and
    `trusted.overlay.opaque=y`), or "none" (plain union, every name kept). The layers are not
    modified; entries are copied into the result (hard links within a layer stay one inode).
    With `consume` (`layers` must then be a list the caller gives up), each layer is dropped
    from the list once applied, so its memory can go before the next one is merged.
    """
    merger = LayerMerger(whiteout_spec)
    if not layers:
        raise ValueError("merge_layers needs at least one layer")
    trees: list[Tree] = []
    for i, layer in enumerate(layers):
        trees.append(_layer_tree(layer, i))
    if consume:
        assert isinstance(layers, list)
        layers.clear()
    trees.reverse()
    while trees:
        merger.add(trees.pop())
    return merger.result()


def _layer_tree(layer: "Inode | Tree", i: int) -> Tree:
    if isinstance(layer, Inode) and (not layer.is_dir or layer.children is None):
        raise FormatError(f"layer {i}: root is not a directory")
    tree = as_tree(layer)
    if not tree.is_dir(0):
        raise FormatError(f"layer {i}: root is not a directory")
    return tree


class LayerMerger:
    """`merge_layers` one layer at a time (lowest first), so a caller can merge each layer as
    soon as it has it (the converter, while the layers above still build): `result()` is what
    `merge_layers` of the same layers gives."""

    def __init__(self, whiteout_spec: str = "oci") -> None:
        if whiteout_spec not in WHITEOUT_SPECS:
            raise ValueError(f"unknown whiteout spec {whiteout_spec!r}; expected one of {WHITEOUT_SPECS}")
        self.spec = whiteout_spec
        self.tree = Tree()
        self.count = 0

    def add(self, layer: "Inode | Tree") -> None:
        tree = _layer_tree(layer, self.count)
        self.tree.reserve(len(tree))  # (at most one new entry per layer entry)
        _apply(self.tree, tree, self.spec)
        self.count += 1

    def result(self) -> Tree:
        if not self.count:
            raise ValueError("merge_layers needs at least one layer")
        self.tree.freeze()
        return self.tree


def _apply(result: Tree, layer: Tree, spec: str) -> None:
    """Apply `layer` onto `result` (iteratively, any depth)."""
    ch = layer.children()
    # layer inodes with several names -> their copy in `result` (only while this layer applies)
    targets = {layer.a[i] for i in range(len(layer)) if layer.kind[i] == K_LINK and layer.parent[i] != DEAD}
    copies: dict[int, int] = {}
    stack: list[tuple[int, int]] = [(0, 0)]
    while stack:
        low, up = stack.pop()
        kids = ch.of(up)
        up_xattrs = layer.xattrs(up) if layer.xlen[up] else {}
        if spec == "oci":
            opaque = any(layer.name(c) == WHITEOUT_OPAQUE for c in kids)
        else:
            opaque = spec == "overlayfs" and up_xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y"
        if opaque:
            low = _emptied(result, low)
        result.copy_attrs(low, layer, up)
        if spec == "overlayfs" and OVERLAY_OPAQUE_XATTR in up_xattrs:
            result.set_xattrs(low, {k: v for k, v in up_xattrs.items() if k != OVERLAY_OPAQUE_XATTR})
        entries: list[int] = []
        for c in kids:
            kind, key = _classify(layer.name(c), layer, layer.resolve(c), spec)
            if kind == "whiteout":
                result.remove(low, key)
            elif kind == "entry":
                entries.append(c)
        for c in entries:
            name = layer.name(c)
            n = layer.resolve(c)
            if not stat.S_ISDIR(layer.mode[n]):
                prev = copies.get(n)
                if prev is not None:
                    result.add_link(low, name, prev)
                else:
                    idx = result.copy_entry(low, name, layer, n)
                    if n in targets:
                        copies[n] = idx
                continue
            old = result.lookup(low, name)
            if old < 0 or not result.is_dir(old):
                old = result.add(low, name, layer.mode[n])
            stack.append((old, c))


def _emptied(result: Tree, d: int) -> int:
    """Directory `d` of `result` with its children gone (an opaque upper directory): a fresh
    entry in its place (the root: a fresh tree)."""
    if d == 0:
        result.reset()
        return 0
    return result.add(result.parent[d], result.name(d), result.mode[d])


# --------------------------------------------------------------------------------------------
# Bootstrap -> tree
# --------------------------------------------------------------------------------------------


class _ImageFileReader(io.RawIOBase):
    """Stream of one regular file of an image, chunks fetched and digest-checked on demand."""

    def __init__(self, source: LocalBlobDir, image: RafsImage, ino: int, size: int, step: int) -> None:
        self._src, self._img, self._ino = source, image, ino
        self._size, self._step, self._pos = size, step, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: "bytearray | memoryview") -> int:  # type: ignore[override]
        n = min(len(buf), self._size - self._pos, self._step)
        if n <= 0:
            return 0
        data = read_file_range(self._src, self._img, self._ino, self._pos, n, validate=True)
        if len(data) != n:
            raise FormatError(f"inode {self._ino}: short read at {self._pos}")
        memoryview(buf)[:n] = data
        self._pos += n
        return n


class _ImageBacking:
    """`packed.Backing` of a rewritten image: the "range" of a K_TAR entry is (inode number,
    size), read and verified through the image's chunks (one object per image, not per file)."""

    def __init__(self, source: LocalBlobDir, image: RafsImage, step: int) -> None:
        self.source, self.image, self.step = source, image, step

    def open_range(self, offset: int, size: int) -> BinaryIO:
        reader = _ImageFileReader(self.source, self.image, offset, size, self.step)
        return io.BufferedReader(reader, buffer_size=self.step)


def _check_name(name: bytes, path: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FormatError(f"{path!r}: invalid directory entry name {name!r}")


def tree_from_image(image: RafsImage, blob_dir: str | None = None, *, rewrite: bool = False) -> Tree:
    """The packed build tree of a bootstrap.

    Default: regular files carry the image's chunk records (and blob table), so a new bootstrap
    can reference the existing blobs without touching data. With `blob_dir`, every referenced
    blob must exist there. With `rewrite=True` (needs `blob_dir`), files read and verify their
    chunks instead, for writing the data anew (unpack, format conversion); the image must then
    stay open while the tree is used.
    """
    if rewrite and blob_dir is None:
        raise ValueError("rewrite=True needs blob_dir")
    blobs: list[BlobInfo] = list(image.blobs)
    source: LocalBlobDir | None = None
    if blob_dir is not None:
        source = LocalBlobDir(blob_dir)
        for b in blobs:
            if not os.path.isfile(source.path(b.blob_id)):
                raise FormatError(f"blob {b.blob_id} not found in {blob_dir}")
    tree = Tree()
    # the superblock's inode count (names, in nydus images) sizes the name index; capped, as an
    # image may say anything (past the cap the index grows as entries come)
    tree.reserve(min(max(image.superblock_inodes(), 0), 1 << 16))
    bset = tree.blob_set(blobs)
    if rewrite:
        assert source is not None
        tree.backings.append(_ImageBacking(source, image, max(image.chunk_size, 4096)))

    # a v6 image packs each file's chunk list itself (the same checks, no ChunkInfo per chunk;
    # its chunks' blob indexes and sizes are checked against the blob table and the file there)
    packed_chunks = image.packed_chunks if isinstance(image, V6Image) and not rewrite else None

    def fill(idx: int, ino: int, a: Attr) -> None:
        """The attributes `add` did not set (xattrs) and the data of entry `idx` (inode `ino`)."""
        names = image.listxattr(ino)
        if names:
            xattrs: dict[bytes, bytes] = {}
            for name in names:
                value = image.getxattr(ino, name)
                if value is not None:
                    xattrs[name] = value
            tree.set_xattrs(idx, xattrs)
        fmt = stat.S_IFMT(a.mode)
        if fmt == stat.S_IFREG:
            if rewrite:
                tree.set_tar(idx, ino, a.size)
            elif packed_chunks is not None:
                tree.set_chunks(idx, packed_chunks(ino), a.size, bset)
            else:
                chunks = image.chunks(ino)
                for c in chunks:
                    if not 0 <= c.blob_index < len(blobs):
                        raise FormatError(f"{tree.path(idx)!r}: chunk refers to blob index {c.blob_index} of "
                                          f"{len(blobs)}")
                    if c.file_offset + c.uncompressed_size > a.size + image.chunk_size:
                        raise FormatError(f"{tree.path(idx)!r}: chunk at file offset {c.file_offset} beyond size "
                                          f"{a.size}")
                tree.set_chunks(idx, pack_chunks(chunks), a.size, bset)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            tree.set_rdev(idx, a.rdev)
        elif fmt == stat.S_IFLNK:
            tree.set_symlink(idx, image.readlink(ino))
        elif fmt not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFDIR):
            raise FormatError(f"{tree.path(idx)!r}: unknown file type {fmt:o}")

    root_ino = image.root_ino
    ra = image.getattr(root_ino)
    tree.set_attrs(0, ra.mode, ra.uid, ra.gid, ra.mtime, ra.mtime_nsec, {})
    fill(0, root_ino, ra)
    if not tree.is_dir(0):
        raise FormatError("image root is not a directory")
    shared: dict[int, int] = {}  # inode number -> entry, non-directories (only while reading)
    seen_dirs = {root_ino}
    getattr_ = image.getattr
    # (inode, entry); an entry's path is only made for an error message (tree.path)
    stack: list[tuple[int, int]] = [(root_ino, 0)]
    while stack:
        ino, d = stack.pop()
        prev = b""
        for e in image.readdir(ino):
            name = e.name
            if not name or name == b"." or name == b".." or b"/" in name or b"\0" in name:
                _check_name(name, tree.path(d))
            # names in increasing byte order cannot repeat (v6 and v5 readers list them so):
            # only one out of order is looked up
            if name <= prev and tree.lookup(d, name) >= 0:
                raise FormatError(f"{tree.path(d).rstrip(b'/') + b'/' + name!r}: duplicate directory entry")
            prev = name
            existing = shared.get(e.ino)
            if existing is not None:
                tree.add_link(d, name, existing)
                continue
            if e.ino in seen_dirs:
                raise FormatError(f"{tree.path(d).rstrip(b'/') + b'/' + name!r}: directory inode {e.ino} reached "
                                  "twice (loop or hard-linked dir)")
            a = getattr_(e.ino)
            child = tree.add(d, name, a.mode, a.uid, a.gid, a.mtime, a.mtime_nsec)
            fill(child, e.ino, a)
            if stat.S_ISDIR(a.mode):
                seen_dirs.add(e.ino)
                stack.append((e.ino, child))
            else:
                shared[e.ino] = child
    tree.freeze()
    return tree
