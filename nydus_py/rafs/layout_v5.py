"""RAFS v5 on-disk layout (spec: shared/specs/RAFS-FORMAT.md section 3), shared by the reader
(`rafs/v5.py`) and the writer (`builder/v5_writer.py`).

    superblock (8192) | inode table u32[slots] | prefetch table u32[inos] | blob table
    | extended blob table (64 B per blob) | inode records, 8-byte aligned

An inode record is 128 bytes followed by its name, its symlink target (each padded to 8), its
xattr table (u64 size, then u32-sized "name\\0value" pairs, padded to 8) when INODE_XATTR is set,
and a regular file's 80-byte chunk records (`layout_common.CHUNK`).
"""

from .layout_common import Record

RAFS_V5_MAGIC = 0x52414653
RAFS_V5_VERSION = 0x500
RAFS_V4_VERSION = 0x400
RAFS_V5_SUPERBLOCK_SIZE = 8192  # only the first SUPERBLOCK.size bytes are used

ROOT_INO = 1
MAX_NAME = 255
MAX_BLOB_ID = 255

# i_flags
V5_INODE_SYMLINK = 0x1
V5_INODE_HARDLINK = 0x2
V5_INODE_XATTR = 0x4
V5_INODE_HAS_HOLE = 0x8

# xattr names RAFS stores: these prefixes with a non-empty suffix, or these whole names
XATTR_NAME_PREFIXES = (b"user.", b"security.", b"trusted.")
XATTR_NAMES_EXACT = (b"system.posix_acl_access", b"system.posix_acl_default")

SUPERBLOCK = Record(
    "RafsV5SuperBlock",
    ("magic", "I"),
    ("version", "I"),
    ("sb_size", "I"),
    ("block_size", "I"),
    ("flags", "Q"),
    ("inodes_count", "Q"),
    ("inode_table_offset", "Q"),
    ("prefetch_table_offset", "Q"),
    ("blob_table_offset", "Q"),
    ("inode_table_entries", "I"),
    ("prefetch_table_entries", "I"),
    ("blob_table_size", "I"),
    ("extended_blob_table_entries", "I"),
    ("extended_blob_table_offset", "Q"),
)

INODE = Record(
    "RafsV5Inode",
    ("digest", "32s"),
    ("parent", "Q"),
    ("ino", "Q"),
    ("uid", "I"),
    ("gid", "I"),
    ("projid", "I"),
    ("mode", "I"),
    ("size", "Q"),
    ("blocks", "Q"),
    ("flags", "Q"),
    ("nlink", "I"),
    ("child_index", "I"),
    ("child_count", "I"),
    ("name_size", "H"),
    ("symlink_size", "H"),
    ("rdev", "I"),
    ("mtime_nsec", "I"),
    ("mtime", "Q"),
    ("", "8x"),
)
INODE_RECORD_SIZE = INODE.size
# every field but the digest: what the reader validates on each access
INODE_BODY = INODE.view(*(name for name, _code in INODE.fields if name and name != "digest"))
INODE_INO_OFFSET = INODE.offset("ino")

# blob table entry: this head, then the blob id, entries separated by NUL, table padded to 8
BLOB_ENTRY_HEAD = Record("blob table entry head", ("readahead_offset", "I"), ("readahead_size", "I"))

EXT_BLOB_ENTRY = Record(
    "RafsV5ExtBlobEntry",
    ("chunk_count", "I"),
    ("features", "I"),
    ("uncompressed_size", "Q"),
    ("compressed_size", "Q"),
    ("", "40x"),
)
EXT_BLOB_ENTRY_SIZE = EXT_BLOB_ENTRY.size

assert SUPERBLOCK.size == 80 and INODE_RECORD_SIZE == 128 and EXT_BLOB_ENTRY_SIZE == 64


def align8(n: int) -> int:
    return (n + 7) & ~7
