"""Pure parsers for the trailers of a RAFS data blob (spec RAFS-FORMAT.md 5.1, 5.3-5.6).

A v6 blob is chunk data followed by sections, each trailed by a 512-byte GNU tar header, so a
reader can walk it backwards from the end: `image.blob`, `blob.meta` (chunk-info array + 4096-byte
header), `blob.digest`, `image.boot`, and the ToC (`rafs.blob.toc`). Everything here works on
bytes or on a `RangeReader` (anything with `size()` and `read_at()`), does no I/O of its own, and
raises FormatError for anything malformed. `cross_check_chunks` lets `check` compare the
bootstrap chunk table against blob.meta / blob.digest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import zstandard

from . import codec
from .constants import BlobFeatures, Compressor, Digester
from .errors import FormatError
from .layout_blob import (
    BLOB_META_HEADER,
    BLOB_META_HEADER_SIZE,
    BLOB_META_MAGIC,
    BOOT_NAME,
    CI_V1_ENTRY_SIZE,
    CI_V2_ENTRY_SIZE,
    DIGEST_NAME,
    TAR_HEADER_SIZE,
    TOC_ENTRY,
    TOC_ENTRY_SIZE,
    TOC_FLAGS,
    TOC_NAME,
    parse_tar_header,
    unpack_ci_v1,
    unpack_ci_v2,
)
from .model import BlobInfo, ChunkInfo

MAX_BOOTSTRAP = 1 << 32
MAX_CHUNK_INFO = 1 << 30
ZERO_DIGEST = b"\0" * 32
_TOC_COMPRESSORS = {flag: algo for algo, flag in TOC_FLAGS.items()}


class RangeReader(Protocol):
    """Random access to one blob: local file, cache, or registry range requests."""

    def size(self) -> int: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


class BytesReader:
    """RangeReader over an in-memory blob (bytes, bytearray, mmap)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = data

    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset : offset + size])


def as_reader(src: RangeReader | bytes | bytearray | memoryview) -> RangeReader:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return BytesReader(src)
    return src


def _read(src: RangeReader, offset: int, size: int, what: str) -> bytes:
    total = src.size()
    if offset < 0 or size < 0 or offset + size > total:
        raise FormatError(f"{what} [{offset}, +{size}) is outside the {total}-byte blob")
    data = src.read_at(offset, size)
    if len(data) != size:
        raise FormatError(f"{what}: short read, {len(data)} of {size} bytes at {offset}")
    return data


# ---------------------------------------------------------------------------- tar headers


@dataclass(frozen=True)
class Section:
    """One tar-framed section of a blob: its data is [offset, offset+size)."""

    name: str
    offset: int
    size: int


def list_sections(src: RangeReader | bytes | bytearray | memoryview) -> list[Section]:
    """Sections found by walking tar headers backwards from the blob end, in blob order.

    The walk stops at the first 512 bytes that are not a valid header (older blobs have header-less
    chunk data) or at offset 0; a header whose size reaches before the blob start is a FormatError.
    """
    r = as_reader(src)
    end = r.size()
    out: list[Section] = []
    while end >= TAR_HEADER_SIZE:
        try:
            hdr = parse_tar_header(_read(r, end - TAR_HEADER_SIZE, TAR_HEADER_SIZE, "tar header"))
        except FormatError:
            break
        start = end - TAR_HEADER_SIZE - hdr.size
        if start < 0:
            raise FormatError(f"tar header for {hdr.name!r} claims {hdr.size} bytes before offset {end - TAR_HEADER_SIZE}")
        out.append(Section(hdr.name, start, hdr.size))
        end = start
    out.reverse()
    return out


# ---------------------------------------------------------------------------- ToC


@dataclass(frozen=True)
class TocEntry:
    flags: int
    name: str
    uncompressed_digest: bytes  # sha256 of the uncompressed section, zero when not recorded
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    @property
    def compressor(self) -> Compressor:
        algo = _TOC_COMPRESSORS.get(self.flags & 0xF)
        if algo is None or self.flags & ~0xF:
            raise FormatError(f"ToC entry {self.name!r}: unknown flags {self.flags:#x}")
        return algo


def parse_toc(data: bytes, expected_digest: bytes | None = None) -> list[TocEntry]:
    """Entries of a ToC from a blob tail `data` that ends with the `rafs.blob.toc` tar header.

    `expected_digest` (the blob table's blob_toc_digest) is sha256 of entries + tar header; a zero
    or None digest is not checked.
    """
    if len(data) < TAR_HEADER_SIZE:
        raise FormatError(f"blob ToC of {len(data)} bytes is too small")
    hdr = parse_tar_header(bytes(data[-TAR_HEADER_SIZE:]))
    if hdr.name != TOC_NAME:
        raise FormatError(f"last tar header names {hdr.name!r}, not {TOC_NAME!r}")
    if hdr.size % TOC_ENTRY_SIZE or hdr.size + TAR_HEADER_SIZE > len(data):
        raise FormatError(f"ToC size {hdr.size} is not a multiple of {TOC_ENTRY_SIZE} within {len(data)} bytes")
    body = bytes(data[len(data) - TAR_HEADER_SIZE - hdr.size :])
    if expected_digest and expected_digest != ZERO_DIGEST and codec.digest(Digester.SHA256, body) != expected_digest:
        raise FormatError("blob ToC digest does not match the blob table")
    out = []
    for flags, raw_name, dig, c_off, c_size, u_size in TOC_ENTRY.iter_unpack(body[: hdr.size]):
        try:
            name = raw_name.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"ToC entry name {raw_name!r} is not UTF-8") from None
        out.append(TocEntry(flags, name, bytes(dig), c_off, c_size, u_size))
    return out


def read_toc(src: RangeReader | bytes | bytearray | memoryview, blob: BlobInfo | None = None) -> list[TocEntry]:
    """The blob's ToC: its last `blob_toc_size` bytes (or the last 4 KiB when unknown), digest-checked."""
    r = as_reader(src)
    total = r.size()
    size = blob.blob_toc_size if blob is not None and blob.blob_toc_size else min(0x1000, total)
    if size > total:
        raise FormatError(f"ToC size {size} exceeds the {total}-byte blob")
    return parse_toc(_read(r, total - size, size, "blob ToC"), blob.blob_toc_digest if blob is not None else None)


def toc_entry_data(src: RangeReader | bytes | bytearray | memoryview, entry: TocEntry, max_size: int = MAX_BOOTSTRAP) -> bytes:
    """The uncompressed bytes of one ToC section, size- and sha256-checked."""
    r = as_reader(src)
    algo = entry.compressor
    if entry.uncompressed_size > max_size:
        raise FormatError(f"ToC entry {entry.name!r}: {entry.uncompressed_size} bytes exceeds limit {max_size}")
    raw = _read(r, entry.compressed_offset, entry.compressed_size, f"ToC entry {entry.name!r}")
    if algo == Compressor.NONE:
        if entry.compressed_size != entry.uncompressed_size:
            raise FormatError(f"ToC entry {entry.name!r}: uncompressed but sizes differ")
        data = raw
    elif algo == Compressor.ZSTD:
        data = _zstd_stream(raw, entry.uncompressed_size, f"ToC entry {entry.name!r}")
    else:  # nydusd does not support lz4_block ToC sections either
        raise FormatError(f"ToC entry {entry.name!r}: {algo.nydus_name} sections are not supported")
    if len(data) != entry.uncompressed_size:
        raise FormatError(f"ToC entry {entry.name!r}: {len(data)} bytes, expected {entry.uncompressed_size}")
    if entry.uncompressed_digest != ZERO_DIGEST and codec.digest(Digester.SHA256, data) != entry.uncompressed_digest:
        raise FormatError(f"ToC entry {entry.name!r}: sha256 mismatch")
    return data


def _zstd_stream(raw: bytes, size: int, what: str) -> bytes:
    """Decompress zstd frame(s) that may lack a content size, refusing more than `size` bytes.

    Output grows only as data is produced, so a lying size cannot force a huge allocation.
    """
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        while len(out) <= size:
            piece = reader.read(min(1 << 20, size + 1 - len(out)))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: cannot decompress zstd data: {e}") from None
    if len(out) != size:
        raise FormatError(f"{what}: decompressed to {len(out)}{'+' if len(out) > size else ''} bytes, expected {size}")
    return bytes(out)


# ---------------------------------------------------------------------------- blob.meta


@dataclass(frozen=True)
class BlobMetaHeader:
    features: BlobFeatures
    ci_compressor: Compressor
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    extra_offset: int  # zran/batch context, inside the uncompressed chunk-info data
    extra_size: int
    extra_count: int


def parse_blob_meta_header(data: bytes) -> BlobMetaHeader:
    if len(data) != BLOB_META_HEADER_SIZE:
        raise FormatError(f"blob.meta header must be {BLOB_META_HEADER_SIZE} bytes, got {len(data)}")
    (magic, features, ci_comp, entries, ci_off, ci_c, ci_u, x_off, x_size, x_count,
     magic2) = BLOB_META_HEADER.unpack(data)  # fmt: skip
    if magic != BLOB_META_MAGIC or magic2 != BLOB_META_MAGIC:
        raise FormatError(f"blob.meta header magics {magic:#x}/{magic2:#x} != {BLOB_META_MAGIC:#x}")
    try:
        comp = Compressor(ci_comp)
    except ValueError:
        raise FormatError(f"blob.meta header: unknown ci_compressor {ci_comp}") from None
    if ci_c > ci_u:
        raise FormatError(f"blob.meta header: compressed size {ci_c} > uncompressed size {ci_u}")
    return BlobMetaHeader(BlobFeatures(features), comp, entries, ci_off, ci_c, ci_u, x_off, x_size, x_count)


class MetaChunk(NamedTuple):
    """One blob.meta chunk-info entry (v1 or v2), decoded."""

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    flags: int  # v2 flag byte (0x1 compressed, 0x2 zran, 0x4 batch, 0x8 encrypted, 0x10 crc32); v1: 0/1
    data: int  # v2 third word (crc32 in the low 32 bits when flags & 0x10); v1: 0

    @property
    def crc32(self) -> int:
        return self.data & 0xFFFF_FFFF if self.flags & 0x10 else 0


def decode_v1(raw: bytes, off: int = 0) -> MetaChunk:
    c_off, c_size, u_off, u_size = unpack_ci_v1(raw, off)
    compressed = c_size != u_size
    return MetaChunk(c_off, c_size, u_off, u_size, compressed, int(compressed), 0)


def decode_v2(raw: bytes, off: int = 0) -> MetaChunk:
    c_off, c_size, u_off, u_size, flags, data = unpack_ci_v2(raw, off)
    if flags & ~0x1F:
        raise FormatError(f"blob.meta v2 entry has unknown flags {flags:#x}")
    return MetaChunk(c_off, c_size, u_off, u_size, bool(flags & 1), flags, data)


class ChunkInfoTable:
    """The uncompressed blob.meta chunk-info array; entries decoded on demand."""

    def __init__(self, data: bytes, entries: int, v2: bool) -> None:
        self.entry_size = CI_V2_ENTRY_SIZE if v2 else CI_V1_ENTRY_SIZE
        if len(data) < entries * self.entry_size:
            raise FormatError(f"blob.meta array of {len(data)} bytes cannot hold {entries} entries")
        self._data = data
        self._n = entries
        self._decode = decode_v2 if v2 else decode_v1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> MetaChunk:
        if not 0 <= i < self._n:
            raise FormatError(f"blob.meta entry {i} out of range ({self._n} entries)")
        return self._decode(self._data, i * self.entry_size)

    def check(self, blob: BlobInfo) -> None:
        """Every entry non-empty, consistent and inside the blob (nydusd's per-entry validate)."""
        for i in range(self._n):
            e = self[i]
            if e.uncompressed_size == 0 or e.compressed_size == 0:
                raise FormatError(f"blob {blob.blob_id}: blob.meta entry {i} has a zero size")
            if not e.compressed and not e.flags & 0xE and e.compressed_size != e.uncompressed_size:
                raise FormatError(f"blob {blob.blob_id}: blob.meta entry {i} uncompressed but sizes differ")
            if blob.compressed_size and e.compressed_offset + e.compressed_size > blob.compressed_size:
                raise FormatError(f"blob {blob.blob_id}: blob.meta entry {i} ends past the blob")
            if blob.uncompressed_size and e.uncompressed_offset + e.uncompressed_size > blob.uncompressed_size:
                raise FormatError(f"blob {blob.blob_id}: blob.meta entry {i} ends past the uncompressed blob")


def decode_chunk_info(raw: bytes, header: BlobMetaHeader) -> ChunkInfoTable:
    """The chunk-info array from its stored (maybe compressed) bytes, per its header."""
    if len(raw) != header.ci_compressed_size:
        raise FormatError(f"blob.meta array is {len(raw)} bytes, header says {header.ci_compressed_size}")
    if header.ci_uncompressed_size > MAX_CHUNK_INFO:
        raise FormatError(f"blob.meta array of {header.ci_uncompressed_size} bytes exceeds {MAX_CHUNK_INFO}")
    if header.ci_compressor == Compressor.NONE:
        if header.ci_compressed_size != header.ci_uncompressed_size:
            raise FormatError("blob.meta array is uncompressed but its sizes differ")
        data = bytes(raw)
    else:
        data = codec.decompress(header.ci_compressor, raw, header.ci_uncompressed_size)
    return ChunkInfoTable(data, header.ci_entries, bool(header.features & BlobFeatures.CHUNK_INFO_V2))


def read_blob_meta(src: RangeReader | bytes | bytearray | memoryview, blob: BlobInfo) -> tuple[BlobMetaHeader, ChunkInfoTable]:
    """blob.meta located by the blob-table ci_* fields; header cross-checked with the blob table."""
    r = as_reader(src)
    if not blob.ci_uncompressed_size and not blob.chunk_count:
        raise FormatError(f"blob {blob.blob_id} records no blob.meta")
    raw = _read(r, blob.ci_offset, blob.ci_compressed_size + BLOB_META_HEADER_SIZE, f"blob {blob.blob_id} blob.meta")
    header = parse_blob_meta_header(raw[blob.ci_compressed_size :])
    mine = (header.ci_offset, header.ci_compressed_size, header.ci_uncompressed_size, header.ci_compressor)
    theirs = (blob.ci_offset, blob.ci_compressed_size, blob.ci_uncompressed_size, blob.ci_compressor)
    if mine != theirs:
        raise FormatError(f"blob {blob.blob_id}: blob.meta header {mine} disagrees with the blob table {theirs}")
    if header.ci_entries != blob.chunk_count:
        raise FormatError(f"blob {blob.blob_id}: blob.meta has {header.ci_entries} entries, blob table {blob.chunk_count}")
    if int(header.features) != int(blob.features):
        raise FormatError(
            f"blob {blob.blob_id}: blob.meta features {int(header.features):#x} != blob table {int(blob.features):#x}"
        )
    return header, decode_chunk_info(raw[: blob.ci_compressed_size], header)


# ---------------------------------------------------------------------------- blob.digest


class BlobDigests:
    """The blob.digest array: digest of chunk i (with the blob's digester) at i*32."""

    def __init__(self, data: bytes, count: int) -> None:
        if len(data) != 32 * count:
            raise FormatError(f"blob.digest is {len(data)} bytes, expected 32 * {count}")
        self._data = bytes(data)
        self._n = count

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < self._n:
            raise FormatError(f"blob.digest entry {i} out of range ({self._n})")
        return self._data[32 * i : 32 * i + 32]


def read_blob_digests(src: RangeReader | bytes | bytearray | memoryview, blob: BlobInfo) -> BlobDigests | None:
    """blob.digest from the ToC (preferred) or the tar sections; None when the blob has none."""
    r = as_reader(src)
    if not blob.features & BlobFeatures.INLINED_CHUNK_DIGEST:
        return None
    if blob.features & BlobFeatures.HAS_TOC:
        for e in read_toc(r, blob):
            if e.name == DIGEST_NAME:
                return BlobDigests(toc_entry_data(r, e, 32 * blob.chunk_count), blob.chunk_count)
    for s in list_sections(r):
        if s.name == DIGEST_NAME:
            return BlobDigests(_read(r, s.offset, s.size, DIGEST_NAME), blob.chunk_count)
    raise FormatError(f"blob {blob.blob_id} has INLINED_CHUNK_DIGEST but no blob.digest section")


# ---------------------------------------------------------------------------- image.boot


def extract_inline_bootstrap(src: RangeReader | bytes | bytearray | memoryview, max_size: int = MAX_BOOTSTRAP) -> bytes:
    """The bootstrap stored inside a blob (`--blob-inline-meta`, spec 5.6).

    With a ToC: its `image.boot` entry, decompressed (zstd or none) and sha256-checked. Without:
    the last tar header must be `image.boot`, stored raw.
    """
    r = as_reader(src)
    total = r.size()
    if total < TAR_HEADER_SIZE:
        raise FormatError(f"blob of {total} bytes has no trailer")
    last = parse_tar_header(_read(r, total - TAR_HEADER_SIZE, TAR_HEADER_SIZE, "last tar header"))
    if last.name == TOC_NAME:
        size = min(total, last.size + TAR_HEADER_SIZE)
        for e in parse_toc(_read(r, total - size, size, "blob ToC")):
            if e.name == BOOT_NAME:
                return toc_entry_data(r, e, max_size)
        raise FormatError("blob ToC has no image.boot entry")
    if last.name != BOOT_NAME:
        raise FormatError(f"last tar header is {last.name!r}: no inlined bootstrap")
    if last.size > max_size or last.size + TAR_HEADER_SIZE > total:
        raise FormatError(f"image.boot size {last.size} is invalid for a {total}-byte blob")
    return _read(r, total - TAR_HEADER_SIZE - last.size, last.size, BOOT_NAME)


# ---------------------------------------------------------------------------- cross-check


def cross_check_chunks(
    records: Iterable[ChunkInfo], blob: BlobInfo, table: ChunkInfoTable, digests: BlobDigests | None = None
) -> int:
    """Compare bootstrap chunk-table records of `blob` against its blob.meta (and blob.digest).

    Records of other blobs are skipped. Returns how many were compared; FormatError on the first
    disagreement.
    """
    n = 0
    for rec in records:
        if rec.blob_index != blob.index:
            continue
        e = table[rec.index]
        mine = (rec.compressed_offset, rec.compressed_size, rec.uncompressed_offset, rec.uncompressed_size, rec.compressed)
        theirs = (e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size, e.compressed)
        if mine != theirs:
            raise FormatError(
                f"blob {blob.blob_id} chunk {rec.index}: chunk table (c_off, c_size, u_off, u_size, compressed) "
                f"{mine} != blob.meta {theirs}"
            )
        if digests is not None and digests[rec.index] != rec.digest:
            raise FormatError(f"blob {blob.blob_id} chunk {rec.index}: digest differs from blob.digest")
        n += 1
    return n
