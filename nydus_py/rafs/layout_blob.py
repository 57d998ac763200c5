"""On-disk layout of a RAFS data blob's trailers (spec: shared/specs/RAFS-FORMAT.md section 5),
shared by the reader (`rafs/blobmeta.py`) and the writer (`builder/blob_writer.py`).

    chunk data | [tar "image.blob"] | blob.meta: chunk-info array + 4096-byte header
    | [tar "blob.meta"] | [blob.digest | tar "blob.digest"] | [ToC entries | tar "rafs.blob.toc"]

Each section is followed by a 512-byte GNU tar header, so a reader walks the blob backwards.
"""

from dataclasses import dataclass

from .constants import Compressor
from .errors import FormatError
from .layout_common import Record

TAR_HEADER_SIZE = 512
BLOB_META_MAGIC = 0xB10BB10B
BLOB_META_HEADER_SIZE = 4096

# section names (tar header names and ToC entry names)
TOC_NAME = "rafs.blob.toc"
BOOT_NAME = "image.boot"
DIGEST_NAME = "blob.digest"
META_NAME = "blob.meta"
META_HEADER_NAME = "blob.meta.header"
BLOB_NAME = "image.blob"

# ToC entry flags: the section's compressor
TOC_NONE, TOC_ZSTD, TOC_LZ4 = 0x1, 0x2, 0x4
TOC_FLAGS = {Compressor.NONE: TOC_NONE, Compressor.ZSTD: TOC_ZSTD, Compressor.LZ4_BLOCK: TOC_LZ4}

TOC_ENTRY = Record(
    "blob ToC entry",
    ("flags", "I"),
    ("", "4x"),
    ("name", "16s"),
    ("uncompressed_digest", "32s"),
    ("compressed_offset", "Q"),
    ("compressed_size", "Q"),
    ("uncompressed_size", "Q"),
    ("", "48x"),
)
TOC_ENTRY_SIZE = TOC_ENTRY.size

_META_FIELDS = (
    ("magic", "I"),
    ("features", "I"),
    ("ci_compressor", "I"),
    ("ci_entries", "I"),
    ("ci_offset", "Q"),
    ("ci_compressed_size", "Q"),
    ("ci_uncompressed_size", "Q"),
    ("ci_zran_offset", "Q"),
    ("ci_zran_size", "Q"),
    ("ci_zran_count", "I"),
)
# BlobCompressionContextHeader: the fields above, zeros, and the magic again in the last 4 bytes
BLOB_META_HEADER = Record(
    "blob.meta header",
    *_META_FIELDS,
    ("", f"{BLOB_META_HEADER_SIZE - Record('', *_META_FIELDS).size - 4}x"),
    ("magic2", "I"),
)

# blob.meta chunk-info entries (bit fields decoded below)
CI_V1 = Record("blob.meta v1 chunk info", ("uncompressed", "Q"), ("compressed", "Q"))
CI_V2 = Record("blob.meta v2 chunk info", ("uncompressed", "Q"), ("compressed", "Q"), ("data", "Q"))
CI_V1_ENTRY_SIZE = CI_V1.size
CI_V2_ENTRY_SIZE = CI_V2.size

assert TOC_ENTRY_SIZE == 128 and BLOB_META_HEADER.size == BLOB_META_HEADER_SIZE
assert CI_V1_ENTRY_SIZE == 16 and CI_V2_ENTRY_SIZE == 24


def pack_ci_v1(
    compressed_offset: int, compressed_size: int, uncompressed_offset: int, uncompressed_size: int
) -> bytes:
    """One 16-byte v1 chunk-info entry (spec 5.3)."""
    if uncompressed_offset & 0xFFF or uncompressed_offset >> 44:
        raise FormatError(
            f"uncompressed offset {uncompressed_offset:#x} not encodable in a v1 chunk-info entry"
        )
    if compressed_offset >> 40:
        raise FormatError(f"compressed offset {compressed_offset:#x} beyond 1 TiB")
    if not (0 < compressed_size <= 1 << 24 and 0 < uncompressed_size <= 1 << 24):
        raise FormatError(f"chunk sizes {compressed_size}/{uncompressed_size} not encodable")
    us, cs = uncompressed_size - 1, compressed_size - 1
    uncomp = uncompressed_offset | ((us & 0xFFFFF) << 44) | (((us >> 20) & 0xF) << 8)
    comp = compressed_offset | ((cs & 0xFFFFF) << 44) | (((cs >> 20) & 0xF) << 40)
    return CI_V1.pack(uncomp, comp)


def unpack_ci_v1(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """(compressed_offset, compressed_size, uncompressed_offset, uncompressed_size) of a v1 entry."""
    uncomp, comp = CI_V1.unpack_from(buf, offset)
    u_off = uncomp & 0xFFF_FFFF_F000
    u_size = ((uncomp >> 44) | ((uncomp & 0xF00) << 12)) + 1
    c_off = comp & 0xFF_FFFF_FFFF
    c_size = ((comp >> 44) | ((comp & 0xF00_0000_0000) >> 20)) + 1
    return c_off, c_size, u_off, u_size


def unpack_ci_v2(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int, int, int]:
    """(compressed_offset, compressed_size, uncompressed_offset, uncompressed_size, flags, data)
    of a v2 entry; flags is the top byte of the uncompressed word."""
    uncomp, comp, data = CI_V2.unpack_from(buf, offset)
    u_off = (uncomp & 0xFFFF_FFFF) << 12
    u_size = ((uncomp >> 32) & 0xFF_FFFF) + 1
    return comp & 0xFF_FFFF_FFFF, comp >> 40, u_off, u_size, uncomp >> 56, data


def pack_blob_meta_header(
    features: int, ci_compressor: int, entries: int, ci_offset: int, ci_compressed: int, ci_uncompressed: int
) -> bytes:
    return BLOB_META_HEADER.pack(
        BLOB_META_MAGIC,
        features,
        ci_compressor,
        entries,
        ci_offset,
        ci_compressed,
        ci_uncompressed,
        0,
        0,
        0,
        BLOB_META_MAGIC,
    )


def pack_toc_entry(
    name: str,
    compressor: Compressor,
    digest: bytes,
    offset: int,
    compressed_size: int,
    uncompressed_size: int,
) -> bytes:
    flags = TOC_FLAGS.get(compressor)
    if flags is None:
        raise ValueError(f"ToC cannot describe {compressor.nydus_name} data")
    return TOC_ENTRY.pack(flags, name.encode(), digest, offset, compressed_size, uncompressed_size)


# ---------------------------------------------------------------------------- tar headers


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte GNU header nydus-image writes after a section (tar-rs `Header::new_gnu()`
    with path, type '0', size and checksum)."""
    raw = name.encode("utf-8")
    if not raw or len(raw) > 100:
        raise ValueError(f"tar section name {name!r} must be 1..100 bytes")
    h = bytearray(TAR_HEADER_SIZE)
    h[: len(raw)] = raw
    if size < 8**11:
        h[124:136] = b"%011o\0" % size
    else:  # GNU base-256 for sizes >= 8 GiB
        h[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    h[136:148] = b"00000000000\0"
    h[156:157] = b"0"
    h[257:265] = b"ustar  \0"
    h[148:156] = b"%07o\0" % (sum(h) + 8 * 0x20)
    return bytes(h)


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if any(c not in b"01234567" for c in text):
        raise FormatError(f"tar header: {what} field {field!r} is not octal")
    return int(text, 8)


@dataclass(frozen=True)
class TarHeader:
    name: str
    size: int


def parse_tar_header(block: bytes) -> TarHeader:
    """The name and size of a 512-byte GNU/ustar header for a regular file."""
    if len(block) != TAR_HEADER_SIZE:
        raise FormatError(f"tar header must be {TAR_HEADER_SIZE} bytes, got {len(block)}")
    if block[257:263] not in (b"ustar ", b"ustar\0"):
        raise FormatError("tar header: no ustar/GNU magic")
    stored = _octal(block[148:156], "checksum")
    if stored != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise FormatError("tar header: checksum mismatch")
    if block[156:157] not in (b"0", b"\0"):
        raise FormatError(f"tar header: entry type {block[156:157]!r} is not a regular file")
    try:
        name = block[:100].split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("tar header: name is not UTF-8") from None
    return TarHeader(name, _octal(block[124:136], "size"))
