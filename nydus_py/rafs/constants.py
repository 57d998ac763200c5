"""Algorithms and flag words shared by RAFS v5 and v6 and by the image model (spec:
shared/specs/RAFS-FORMAT.md section 2). The on-disk records, their magic numbers and the flags
that belong to one record live in layout_common, layout_v5, layout_v6 and layout_blob."""

from enum import IntEnum, IntFlag

MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x100_0000
DEFAULT_CHUNK_SIZE = 0x10_0000


class Compressor(IntEnum):
    """Algorithm ids as stored in the v6 blob table and blob.meta header."""

    NONE = 0
    LZ4_BLOCK = 1
    GZIP = 2
    ZSTD = 3

    @property
    def nydus_name(self) -> str:
        return {0: "none", 1: "lz4_block", 2: "gzip", 3: "zstd"}[int(self)]

    @classmethod
    def from_name(cls, name: str) -> "Compressor":
        table = {"none": cls.NONE, "lz4_block": cls.LZ4_BLOCK, "gzip": cls.GZIP, "zstd": cls.ZSTD}
        try:
            return table[name]
        except KeyError:
            raise ValueError(f"unknown compressor {name!r}; expected one of {sorted(table)}") from None


class Digester(IntEnum):
    BLAKE3 = 0
    SHA256 = 1

    @property
    def nydus_name(self) -> str:
        return "blake3" if self is Digester.BLAKE3 else "sha256"

    @classmethod
    def from_name(cls, name: str) -> "Digester":
        table = {"blake3": cls.BLAKE3, "sha256": cls.SHA256}
        try:
            return table[name]
        except KeyError:
            raise ValueError(f"unknown digester {name!r}; expected one of {sorted(table)}") from None


class SuperFlags(IntFlag):
    """RafsSuperFlags: v5 superblock s_flags, v6 extended superblock s_flags."""

    COMPRESSION_NONE = 0x1
    COMPRESSION_LZ4 = 0x2
    HASH_BLAKE3 = 0x4
    HASH_SHA256 = 0x8
    EXPLICIT_UID_GID = 0x10
    HAS_XATTR = 0x20
    COMPRESSION_GZIP = 0x40
    COMPRESSION_ZSTD = 0x80
    INLINED_CHUNK_DIGEST = 0x100
    TARFS_MODE = 0x200
    ENCRYPTION_NONE = 0x0100_0000
    ENCRYPTION_ASE_128_XTS = 0x0200_0000
    # Reserved compat bits nydus accepts.
    COMPAT_RESERVED = 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000 | 0x8000_0000

    @property
    def compressor(self) -> Compressor:
        for bit, algo in (
            (SuperFlags.COMPRESSION_NONE, Compressor.NONE),
            (SuperFlags.COMPRESSION_LZ4, Compressor.LZ4_BLOCK),
            (SuperFlags.COMPRESSION_GZIP, Compressor.GZIP),
            (SuperFlags.COMPRESSION_ZSTD, Compressor.ZSTD),
        ):
            if self & bit:
                return algo
        return Compressor.LZ4_BLOCK

    @property
    def digester(self) -> Digester:
        if self & SuperFlags.HASH_BLAKE3:
            return Digester.BLAKE3
        if self & SuperFlags.HASH_SHA256:
            return Digester.SHA256
        return Digester.BLAKE3

    @staticmethod
    def for_algorithms(compressor: Compressor, digester: Digester) -> "SuperFlags":
        comp = {
            Compressor.NONE: SuperFlags.COMPRESSION_NONE,
            Compressor.LZ4_BLOCK: SuperFlags.COMPRESSION_LZ4,
            Compressor.GZIP: SuperFlags.COMPRESSION_GZIP,
            Compressor.ZSTD: SuperFlags.COMPRESSION_ZSTD,
        }[compressor]
        dig = SuperFlags.HASH_BLAKE3 if digester is Digester.BLAKE3 else SuperFlags.HASH_SHA256
        return comp | dig


SUPER_FLAGS_KNOWN = 0x3FF | 0xFF00_0000


class ChunkFlags(IntFlag):
    COMPRESSED = 0x1
    HOLECHUNK = 0x2
    ENCRYPTED = 0x4
    BATCH = 0x8
    HAS_CRC32 = 0x10


class BlobFeatures(IntFlag):
    ALIGNED = 0x1
    INLINED_FS_META = 0x2
    CHUNK_INFO_V2 = 0x4
    ZRAN = 0x8
    SEPARATE = 0x10
    INLINED_CHUNK_DIGEST = 0x20
    TARFS = 0x40
    BATCH = 0x80
    ENCRYPTED = 0x100
    IS_CHUNKDICT_GENERATED = 0x200
    IS_SEPARATED_WITH_PREFETCH_FILES = 0x400
    EXTERNAL = 0x800
    HAS_TAR_HEADER = 0x1000_0000
    HAS_TOC = 0x2000_0000
    CAP_TAR_TOC = 0x4000_0000


BLOB_FEATURES_INVALID = 0x0000_F000 | 0x8000_0000
