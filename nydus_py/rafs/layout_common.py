"""On-disk pieces shared by RAFS v5 and v6 (spec: shared/specs/RAFS-FORMAT.md section 2).

Every fixed-size record of the formats is declared once, as a `Record` of named fields, and the
readers (`v5.py`, `v6.py`, `blobmeta.py`) and the writers (`builder/`) pack and unpack through
it, as Nydus shares `rafs/src/metadata/layout/` between nydusd and nydus-image. Field names
follow Nydus; a field named "" is reserved space, zero when written and skipped when read.
"""

import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .constants import ChunkFlags
from .model import ChunkInfo

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


class Record:
    """A little-endian on-disk record defined by its fields, in order: (name, struct code).

    It packs and unpacks like the `struct.Struct` it wraps (`pack`, `unpack_from`, ... are that
    Struct's own bound methods, so no extra call on hot paths); `view(*names)` is a Struct as
    wide as the record that decodes only `names`, so a reader can skip fields it does not need
    (a digest copy) without restating the layout; `offset(name)` is where a field starts.
    """

    __slots__ = ("title", "fields", "size", "pack", "pack_into", "unpack", "unpack_from", "iter_unpack")

    def __init__(self, title: str, *fields: tuple[str, str]) -> None:
        for name, code in fields:
            if (not name) != code.endswith("x"):
                raise ValueError(f"{title}: only reserved fields (named '') are padding, got {name!r} {code!r}")
        self.title = title
        self.fields = fields
        st = struct.Struct("<" + "".join(code for _name, code in fields))
        self.size: int = st.size
        self.pack: Callable[..., bytes] = st.pack
        self.pack_into: Callable[..., None] = st.pack_into
        self.unpack: Callable[[Any], tuple[Any, ...]] = st.unpack
        self.unpack_from: Callable[..., tuple[Any, ...]] = st.unpack_from
        self.iter_unpack: Callable[[Any], Iterator[tuple[Any, ...]]] = st.iter_unpack

    def offset(self, name: str) -> int:
        pos = 0
        for field, code in self.fields:
            if field == name:
                return pos
            pos += struct.calcsize("<" + code)
        raise KeyError(f"{self.title} has no field {name!r}")

    def view(self, *names: str) -> struct.Struct:
        known = [field for field, _code in self.fields if field]
        if [n for n in known if n in names] != list(names):
            raise KeyError(f"{self.title}: {names} are not fields of it in record order")
        codes = [code if field in names else f"{struct.calcsize('<' + code)}x" for field, code in self.fields]
        return struct.Struct("<" + "".join(codes))

    def unpack_dict(self, buf: Any, offset: int = 0) -> dict[str, Any]:
        """Named fields of the record at `offset` (for cold paths that prefer names to positions)."""
        names = [field for field, _code in self.fields if field]
        return dict(zip(names, self.unpack_from(buf, offset), strict=True))


# RafsV5ChunkInfo (spec 2.5): a v5 file's chunk list and the v6 bootstrap chunk table are
# arrays of this 80-byte record.
CHUNK = Record(
    "chunk record",
    ("digest", "32s"),
    ("blob_index", "I"),
    ("flags", "I"),
    ("compressed_size", "I"),
    ("uncompressed_size", "I"),
    ("compressed_offset", "Q"),
    ("uncompressed_offset", "Q"),
    ("file_offset", "Q"),
    ("index", "I"),
    ("crc32", "I"),
)
CHUNK_RECORD_SIZE = CHUNK.size
# (blob_index, uncompressed_offset, index): the v6 reader's sort key over the chunk table
CHUNK_KEY = CHUNK.view("blob_index", "uncompressed_offset", "index")
# (blob_index + 1, ci_index) big-endian: after a digest, bytes sort as the v6 chunk table's
# (digest, blob_index + 1, ci_index) order (the v6 writer's key)
CHUNK_SORT_TAIL = struct.Struct(">QQ")
# (uncompressed_size, file_offset): where a v5 chunk ends in its file
CHUNK_EXTENT = CHUNK.view("uncompressed_size", "file_offset")

assert CHUNK_RECORD_SIZE == 80


def pack_chunk(c: ChunkInfo) -> bytes:
    return CHUNK.pack(
        c.digest,
        c.blob_index,
        int(c.flags),
        c.compressed_size,
        c.uncompressed_size,
        c.compressed_offset,
        c.uncompressed_offset,
        c.file_offset,
        c.index,
        c.crc32,
    )


# ChunkFlags(x) costs an Enum call on every chunk of every READ; images use a handful of values
_FLAGS: dict[int, ChunkFlags] = {}


def chunk_flags(flags: int) -> ChunkFlags:
    """ChunkFlags(flags), memoized (at most 256 distinct values are kept)."""
    f = _FLAGS.get(flags)
    if f is None:
        f = ChunkFlags(flags)
        if len(_FLAGS) < 256:
            _FLAGS[flags] = f
    return f


def unpack_chunk(buf: Any, offset: int) -> ChunkInfo:
    """The record at `offset` as it is stored, unvalidated (readers check what they rely on)."""
    (digest, blob_index, flags, c_size, u_size, c_off, u_off, f_off, index,
     crc) = CHUNK.unpack_from(buf, offset)  # fmt: skip
    return ChunkInfo(digest, blob_index, chunk_flags(flags), c_off, c_size, u_off, u_size, f_off, index, crc)


# the one per-reference field of a chunk record: the same chunk referenced from another file (or
# offset) is the same record with these 8 bytes changed
CHUNK_FILE_OFFSET = CHUNK.offset("file_offset")


def pack_chunks(chunks: Iterator[ChunkInfo] | Sequence[ChunkInfo]) -> bytes:
    """A chunk list as consecutive records (the v5 on-disk form of a file's chunks)."""
    return b"".join(pack_chunk(c) for c in chunks)


def unpack_chunks(buf: Any) -> list[ChunkInfo]:
    """Every record of a packed chunk list, in order (a transient view for checks)."""
    return [unpack_chunk(buf, off) for off in range(0, len(buf), CHUNK_RECORD_SIZE)]


def with_file_offset(buf: Any, offset: int, file_offset: int) -> bytes:
    """The chunk record at `offset` of `buf`, referenced at `file_offset` of a file."""
    head = bytes(buf[offset : offset + CHUNK_FILE_OFFSET])
    tail = bytes(buf[offset + CHUNK_FILE_OFFSET + 8 : offset + CHUNK_RECORD_SIZE])
    return head + U64.pack(file_offset) + tail


def pack_u32s(values: Sequence[int]) -> bytes:
    """A u32 array (inode and prefetch tables)."""
    return struct.pack(f"<{len(values)}I", *values)


def unpack_u32s(buf: Any, offset: int, count: int) -> list[int]:
    return list(struct.unpack_from(f"<{count}I", buf, offset))


# POSIX ACL xattr values (system.posix_acl_*; stored verbatim): posix_acl_xattr_header
# (le32 version) then posix_acl_xattr_entry records (le16 tag, le16 perm, le32 id)
ACL_XATTR_HEADER = struct.Struct("<I")
ACL_XATTR_ENTRY = struct.Struct("<HHI")
