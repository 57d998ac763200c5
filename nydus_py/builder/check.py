"""`nydus-image check` and `inspect`: walk a whole image, collect problems instead of stopping.

Structure is checked through the reader interface (so every reader validation runs); with a blob
directory every distinct chunk is fetched, decompressed and matched against its digest (and
CRC32C when recorded). Problems are reported as text naming the path, chunk and blob.
"""

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..rafs import codec
from ..rafs.chunkdata import decode_chunk
from ..rafs.constants import ChunkFlags
from ..rafs.errors import FormatError
from ..rafs.model import BlobInfo, ChunkInfo, RafsImage
from ..storage.localfs import LocalBlobDir

MAX_REPORTED_ERRORS = 200

TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    inodes: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    others: int = 0
    chunk_refs: int = 0
    chunks_verified: int = 0
    blobs_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def error(self, msg: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(msg)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error_count": self.error_count,
            "errors": self.errors,
            "inodes": self.inodes,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "others": self.others,
            "chunk_refs": self.chunk_refs,
            "chunks_verified": self.chunks_verified,
            "blobs_checked": self.blobs_checked,
        }


def _p(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def _check_chunks(image: RafsImage, path: bytes, size: int, chunks: list[ChunkInfo], report: CheckReport) -> bool:
    ok = True
    prev_end = 0
    for i, c in enumerate(chunks):
        where = f"{_p(path)}: chunk #{i} (file offset {c.file_offset})"
        if not 0 <= c.blob_index < len(image.blobs):
            report.error(f"{where}: blob index {c.blob_index}, image has {len(image.blobs)} blobs")
            ok = False
            continue
        if not 0 < c.uncompressed_size <= image.chunk_size:
            report.error(f"{where}: uncompressed size {c.uncompressed_size} (chunk size {image.chunk_size})")
            ok = False
        if c.file_offset < prev_end:
            report.error(f"{where}: overlaps the previous chunk (ends at {prev_end})")
            ok = False
        if c.file_offset + c.uncompressed_size > size:
            report.error(f"{where}: ends at {c.file_offset + c.uncompressed_size}, past file size {size}")
            ok = False
        prev_end = c.file_offset + c.uncompressed_size
    return ok


def check_image(image: RafsImage, blob_dir: str | None = None) -> CheckReport:
    """Walk every inode (and with `blob_dir`, every chunk) of `image`; never raises FormatError."""
    report = CheckReport()
    # distinct chunk -> (path, position in that file) of its first user
    refs: dict[tuple[int, int, int, int, bytes], tuple[bytes, int, ChunkInfo]] = {}
    seen: set[int] = set()
    try:
        root = image.root_ino
        rattr = image.getattr(root)
    except FormatError as e:
        report.error(f"root inode: {e}")
        return report
    if not stat.S_ISDIR(rattr.mode):
        report.error(f"root inode {root} is not a directory (mode {rattr.mode:o})")
        return report
    stack: list[tuple[int, bytes]] = [(root, b"/")]
    seen.add(root)
    report.inodes += 1
    report.dirs += 1
    _check_xattrs(image, root, b"/", report)
    while stack:
        ino, path = stack.pop()
        try:
            entries = list(image.readdir(ino))
        except FormatError as e:
            report.error(f"{_p(path)}: cannot read directory: {e}")
            continue
        names: set[bytes] = set()
        for ent in entries:
            cpath = path.rstrip(b"/") + b"/" + ent.name
            if not ent.name or b"/" in ent.name or ent.name in (b".", b".."):
                report.error(f"{_p(path)}: invalid entry name {ent.name!r}")
                continue
            if ent.name in names:
                report.error(f"{_p(cpath)}: duplicate entry")
            names.add(ent.name)
            try:
                attr = image.getattr(ent.ino)
            except FormatError as err:
                report.error(f"{_p(cpath)}: {err}")
                continue
            fmt = stat.S_IFMT(attr.mode)
            if ent.type and ent.type != fmt:
                report.error(f"{_p(cpath)}: entry type {ent.type:o} differs from inode type {fmt:o}")
            if fmt == stat.S_IFDIR:
                if ent.ino in seen:
                    report.error(f"{_p(cpath)}: directory inode {ent.ino} reached twice (loop)")
                    continue
                stack.append((ent.ino, cpath))
            elif ent.ino in seen:
                continue  # another name of a checked inode (hard link)
            seen.add(ent.ino)
            report.inodes += 1
            _check_xattrs(image, ent.ino, cpath, report)
            try:
                if fmt == stat.S_IFDIR:
                    report.dirs += 1
                elif fmt == stat.S_IFLNK:
                    report.symlinks += 1
                    target = image.readlink(ent.ino)
                    if not target:
                        report.error(f"{_p(cpath)}: empty symlink target")
                elif fmt == stat.S_IFREG:
                    report.files += 1
                    chunks = image.chunks(ent.ino)
                    report.chunk_refs += len(chunks)
                    if _check_chunks(image, cpath, attr.size, chunks, report):
                        for i, c in enumerate(chunks):
                            key = (c.blob_index, c.compressed_offset, c.compressed_size, c.uncompressed_size, c.digest)
                            refs.setdefault(key, (cpath, i, c))
                elif fmt in TYPE_NAMES:
                    report.others += 1
                else:
                    report.error(f"{_p(cpath)}: unknown file type {fmt:o}")
            except FormatError as err:
                report.error(f"{_p(cpath)}: {err}")
    if blob_dir is not None:
        _check_blobs(image, blob_dir, refs, report)
    return report


def _check_xattrs(image: RafsImage, ino: int, path: bytes, report: CheckReport) -> None:
    try:
        for name in image.listxattr(ino):
            if image.getxattr(ino, name) is None:
                report.error(f"{_p(path)}: xattr {name!r} listed but has no value")
    except FormatError as e:
        report.error(f"{_p(path)}: xattrs: {e}")


def _check_blobs(
    image: RafsImage,
    blob_dir: str,
    refs: dict[tuple[int, int, int, int, bytes], tuple[bytes, int, ChunkInfo]],
    report: CheckReport,
) -> None:
    source = LocalBlobDir(blob_dir)
    missing: set[int] = set()
    try:
        for b in image.blobs:
            try:
                if not os.path.isfile(source.path(b.blob_id)):
                    report.error(f"blob {b.blob_id} (index {b.index}): not found in {blob_dir}")
                    missing.add(b.index)
                    continue
            except FormatError as e:
                report.error(f"blob index {b.index}: {e}")
                missing.add(b.index)
                continue
            report.blobs_checked += 1
            records = [c for _p, _i, c in refs.values() if c.blob_index == b.index]
            _check_blob_meta(image, b.index, source, records, report)
        for key in sorted(refs):
            path, i, c = refs[key]
            if c.blob_index in missing:
                continue
            blob = image.blobs[c.blob_index]
            where = (
                f"{_p(path)}: chunk #{i} (file offset {c.file_offset}) in blob {blob.blob_id} "
                f"at compressed offset {c.compressed_offset}"
            )
            try:
                raw = source.read(blob, c.compressed_offset, c.compressed_size)
                data = decode_chunk(raw, c, blob, validate=True)
                if c.flags & ChunkFlags.HAS_CRC32 and any(c.digest):
                    got = codec.digest(blob.digester, data)
                    if got != c.digest:
                        raise FormatError(f"digest {got.hex()} != recorded {c.digest.hex()}")
                report.chunks_verified += 1
            except FormatError as e:
                report.error(f"{where}: {e}")
    finally:
        source.close()


class _BlobFile:
    """blobmeta.RangeReader over a local blob file."""

    def __init__(self, source: LocalBlobDir, blob: BlobInfo) -> None:
        self._source, self._blob = source, blob
        self._size = os.path.getsize(source.path(blob.blob_id))

    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        return self._source.read(self._blob, offset, size)


def _check_blob_meta(
    image: RafsImage, index: int, source: LocalBlobDir, records: list[ChunkInfo], report: CheckReport
) -> None:
    """v6: the blob's own chunk table (blob.meta, blob.digest) must agree with the bootstrap."""
    blob = image.blobs[index]
    if image.version != 6 or not (blob.ci_uncompressed_size or blob.chunk_count):
        return
    from ..rafs import blobmeta

    try:
        reader = _BlobFile(source, blob)
        _header, table = blobmeta.read_blob_meta(reader, blob)
        digests = blobmeta.read_blob_digests(reader, blob)
        blobmeta.cross_check_chunks(records, blob, table, digests)
    except FormatError as e:
        report.error(f"blob {blob.blob_id}: blob.meta: {e}")


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def describe_image(image: RafsImage, with_tree: bool = True) -> dict[str, Any]:
    """Everything `inspect` prints: image parameters, blob table, counts and (optionally) the tree."""
    stats = {"inodes": 0, "files": 0, "dirs": 0, "symlinks": 0, "hardlinks": 0, "others": 0, "total_size": 0,
             "chunks": 0}  # fmt: skip
    tree: list[dict[str, Any]] = []
    seen: set[int] = set()
    for path, ino in image.walk():
        a = image.getattr(ino)
        fmt = stat.S_IFMT(a.mode)
        first = ino not in seen
        seen.add(ino)
        nchunks = len(image.chunks(ino)) if fmt == stat.S_IFREG else 0
        if first:
            stats["inodes"] += 1
            key = {"file": "files", "dir": "dirs", "symlink": "symlinks"}.get(TYPE_NAMES.get(fmt, ""), "others")
            stats[key] += 1
            if fmt == stat.S_IFREG:
                stats["total_size"] += a.size
                stats["chunks"] += nchunks
        elif fmt != stat.S_IFDIR:
            stats["hardlinks"] += 1
        if not with_tree:
            continue
        entry: dict[str, Any] = {
            "path": _p(path),
            "ino": ino,
            "type": TYPE_NAMES.get(fmt, f"unknown({fmt:o})"),
            "mode": a.mode & 0o7777,
            "uid": a.uid,
            "gid": a.gid,
            "size": a.size,
            "nlink": a.nlink,
            "mtime": a.mtime,
            "chunks": nchunks,
        }
        if fmt == stat.S_IFLNK:
            entry["target"] = _p(image.readlink(ino))
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            entry["rdev"] = [os.major(a.rdev), os.minor(a.rdev)]
        xattrs = image.listxattr(ino)
        if xattrs:
            entry["xattrs"] = sorted(_p(x) for x in xattrs)
        tree.append(entry)
    out: dict[str, Any] = {
        "version": image.version,
        "compressor": image.compressor.nydus_name,
        "digester": image.digester.nydus_name,
        "chunk_size": image.chunk_size,
        "flags": int(image.flags),
        "blobs": [
            {
                "index": b.index,
                "blob_id": b.blob_id,
                "compressor": b.compressor.nydus_name,
                "digester": b.digester.nydus_name,
                "chunk_size": b.chunk_size,
                "chunk_count": b.chunk_count,
                "compressed_size": b.compressed_size,
                "uncompressed_size": b.uncompressed_size,
                "features": int(b.features),
            }
            for b in image.blobs
        ],
        "stats": stats,
    }
    if with_tree:
        out["tree"] = tree
    return out
