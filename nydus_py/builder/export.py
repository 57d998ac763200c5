"""Writing a build tree out as a POSIX (PAX) tar: the `unpack` side of the builder.

Hard links become LNKTYPE members naming the first path written for the inode; xattrs go into
`SCHILY.xattr.*` PAX records (binary values kept byte-exact via hdrcharset=BINARY); mtimes with
nanoseconds get an exact PAX `mtime`. Sockets cannot be represented in tar and are skipped
(reported to the caller), as GNU tar does.
"""

import logging
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from ..rafs.errors import FormatError
from .packed import K_LINK, Tree
from .tree import ChunkedData, Inode, ident, walk

log = logging.getLogger(__name__)

_TAR_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


@dataclass
class ExportStats:
    entries: int = 0
    data_bytes: int = 0
    skipped: list[bytes] = field(default_factory=list)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _linked(root: "Inode | Tree") -> set[int] | None:
    """Inode entries of a packed tree that hard links point at; None for an `Inode` tree."""
    if not isinstance(root, Tree):
        return None
    kind, a = root.kind, root.a
    return {a[i] for i in range(len(root)) if kind[i] == K_LINK}


def write_tar(root: "Inode | Tree", out: BinaryIO) -> ExportStats:
    """Write every object of `root` to `out` as a PAX tar (root directory as `./`).

    Regular files need FileData (a tree from `tree_from_image(..., rewrite=True)`, a directory or
    a tar); ChunkedData cannot be read without its blobs and is refused.
    """
    stats = ExportStats()
    first_path: dict[int, str] = {}  # only inodes with several names (every non-dir of an Inode tree)
    linked = _linked(root)
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for path, node in walk(root):
            name = "." if path == b"/" else _text(path.lstrip(b"/"))
            fmt = stat.S_IFMT(node.mode)
            if fmt == stat.S_IFSOCK:
                log.warning("%r: sockets cannot be stored in tar; skipped", path)
                stats.skipped.append(path)
                continue
            ti = tarfile.TarInfo(name)
            ti.mode = node.mode & 0o7777
            ti.uid, ti.gid = node.uid, node.gid
            ti.uname = ti.gname = ""
            ti.mtime = node.mtime
            pax: dict[str, str] = {}
            if node.mtime_nsec:
                pax["mtime"] = f"{node.mtime}.{node.mtime_nsec:09d}"
            for xname, value in sorted(node.xattrs.items()):
                try:
                    key = "SCHILY.xattr." + xname.decode("utf-8")
                except UnicodeDecodeError:
                    raise FormatError(f"{path!r}: xattr name {xname!r} is not UTF-8; PAX cannot hold it") from None
                pax[key] = _text(value)
            ti.pax_headers = pax
            if node.children is None and ident(node) in first_path:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first_path[ident(node)]
                ti.size = 0
                tar.addfile(ti)
                stats.entries += 1
                continue
            if node.children is None and (linked is None or ident(node) in linked):
                first_path[ident(node)] = name
            try:
                ti.type = _TAR_TYPES[fmt]
            except KeyError:
                raise FormatError(f"{path!r}: unknown file type {fmt:o}") from None
            if fmt == stat.S_IFLNK:
                ti.linkname = _text(node.symlink or b"")
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                ti.devmajor, ti.devminor = os.major(node.rdev), os.minor(node.rdev)
            if fmt == stat.S_IFREG and node.data is not None and node.data.size > 0:
                if isinstance(node.data, ChunkedData):
                    raise FormatError(f"{path!r}: file data is only in blobs; open the tree with a blob dir")
                ti.size = node.data.size
                with node.data.open() as f:
                    try:
                        tar.addfile(ti, f)
                    except tarfile.ReadError:
                        raise FormatError(f"{path!r}: data shorter than its size {ti.size}") from None
                stats.data_bytes += ti.size
            else:
                tar.addfile(ti)
            stats.entries += 1
    return stats
