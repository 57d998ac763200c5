"""One walker for every reader test that feeds a bootstrap hostile bytes (v5 and v6).

`exercise` touches every reader entry point on every reachable inode; a hostile image may make
any of them raise FormatError, nothing else. The v5/v6 hostile tests, the reliability sweep and
the fuzz target all use it, so a reader path added here is covered everywhere.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping

from nydus_py.rafs.chunkdata import read_chunk
from nydus_py.rafs.model import RafsImage
from nydus_py.rafs.v5 import V5Image
from nydus_py.rafs.v6 import V6Image


class MemBlobs:
    """chunkdata.BlobSource over in-memory blobs keyed by blob id."""

    def __init__(self, blobs: Mapping[str, bytes]) -> None:
        self.blobs = blobs

    def read(self, blob: object, offset: int, size: int) -> bytes:
        data = self.blobs[blob.blob_id]  # type: ignore[attr-defined]
        return data[offset : offset + size]


def exercise(img: object, blob: bytes | Mapping[str, bytes] | None = None) -> int:
    """Touch every reader path of every reachable inode; returns the number of paths walked.

    Directory ops, attributes, xattrs, links, chunk resolution (whole file and a middle range),
    the image-wide tables, and chunk decoding + digest checks when blob data is given (`blob`:
    one blob's bytes, or bytes per blob id; chunks of blobs not given are resolved, not read).
    """
    assert isinstance(img, RafsImage)
    if isinstance(blob, bytes | bytearray):
        blobs: Mapping[str, bytes] = {b.blob_id: bytes(blob) for b in img.blobs}
    else:
        blobs = blob or {}
    src = MemBlobs(blobs)
    count = 0
    for _path, ino in img.walk():
        count += 1
        a = img.getattr(ino)
        for name in img.listxattr(ino):
            img.getxattr(ino, name)
        img.getxattr(ino, b"user.absent")
        if stat.S_ISDIR(a.mode):
            img.parent(ino)
            entries = list(img.readdir(ino))
            list(img.readdir(ino, 1))
            for e in entries[:50]:
                assert img.lookup(ino, e.name) == e.ino
            img.lookup(ino, b"zz-absent")
        elif stat.S_ISLNK(a.mode):
            img.readlink(ino)
        elif stat.S_ISREG(a.mode):
            img.chunks(ino, a.size // 2, 8192)
            for c in img.chunks(ino):
                known = 0 <= c.blob_index < len(img.blobs)
                if blobs and (not known or img.blobs[c.blob_index].blob_id in blobs):
                    read_chunk(src, img, c)  # a bad blob index is read_chunk's FormatError
    img.prefetch_table()
    img.inode_count()
    if isinstance(img, V6Image):
        img.check_chunk_table()
    if isinstance(img, V5Image):
        for slot in range(1, img.slot_count + 1):
            img.inode_digest_ok(slot)
    return count
