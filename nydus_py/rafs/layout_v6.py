"""RAFS v6 (EROFS-compatible) on-disk layout (spec: shared/specs/RAFS-FORMAT.md section 4),
shared by the reader (`rafs/v6.py`), the writer (`builder/v6_writer.py`) and `cache_view`.

    block 0   EROFS superblock @1024, RAFS extended superblock @1152, device slots @1408
    block 1.. blob table (256 B per blob), prefetch table (u32 nids)
    meta area inodes (nid = offset / 32), each followed by its xattr ibody, then an inline tail
              or a regular file's 8-byte chunk indexes
    data      directory and symlink blocks
    chunk table (80-byte `layout_common.CHUNK` records)
"""

import stat

from .layout_common import Record

EROFS_MAGIC = 0xE0F5E1E2
EROFS_BLOCK_SIZE = 4096
EROFS_BLKSZBITS = 12
EROFS_SUPER_OFFSET = 1024
RAFS_V6_EXT_SUPER_OFFSET = 1152
RAFS_V6_DEVTABLE_OFFSET = 1408
RAFS_V6_DEVT_SLOTOFF = 11  # device table offset / device slot size
EROFS_FEATURE_COMPAT_RAFS_V6 = 0x4000_0000
EROFS_FEATURE_INCOMPAT_RAFS_V6 = 0xC  # CHUNKED_FILE | DEVICE_TABLE
EROFS_NID_SIZE = 32  # nid = offset in the meta area / 32
MAX_NAME = 255

# EROFS inode data layouts (i_format bits 1..3); bit 0 set = extended (64-byte) inode
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_CHUNK_BASED = 4
# chunk format (low 16 bits of i_u of a chunk-based file)
EROFS_CHUNK_FORMAT_INDEXES = 0x20
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x1F
HOLE_BLKADDR = 0xFFFF_FFFF  # a chunk index with this blkaddr is a hole

# EROFS dirent file types
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7
FT_TO_IFMT = {
    EROFS_FT_REG_FILE: stat.S_IFREG,
    EROFS_FT_DIR: stat.S_IFDIR,
    EROFS_FT_CHRDEV: stat.S_IFCHR,
    EROFS_FT_BLKDEV: stat.S_IFBLK,
    EROFS_FT_FIFO: stat.S_IFIFO,
    EROFS_FT_SOCK: stat.S_IFSOCK,
    EROFS_FT_SYMLINK: stat.S_IFLNK,
}
IFMT_TO_FT = {ifmt: ft for ft, ifmt in FT_TO_IFMT.items()}

# xattr name prefixes by EROFS name_index; the two ACL entries are whole names (empty suffix)
XATTR_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}
XATTR_WHOLE_NAMES = frozenset((2, 3))

SUPERBLOCK = Record(
    "erofs_super_block",
    ("magic", "I"),
    ("checksum", "I"),
    ("feature_compat", "I"),
    ("blkszbits", "B"),
    ("extslots", "B"),
    ("root_nid", "H"),
    ("inos", "Q"),
    ("build_time", "Q"),
    ("build_time_nsec", "I"),
    ("blocks", "I"),
    ("meta_blkaddr", "I"),
    ("xattr_blkaddr", "I"),
    ("uuid", "16s"),
    ("volume_name", "16s"),
    ("feature_incompat", "I"),
    ("u1", "H"),
    ("extra_devices", "H"),
    ("devt_slotoff", "H"),
    ("", "38x"),
)

EXT_SUPERBLOCK = Record(
    "RafsV6SuperBlockExt",
    ("flags", "Q"),
    ("blob_table_offset", "Q"),
    ("blob_table_size", "I"),
    ("chunk_size", "I"),
    ("chunk_table_offset", "Q"),
    ("chunk_table_size", "Q"),
    ("prefetch_table_offset", "Q"),
    ("prefetch_table_size", "I"),
    ("", "4x"),
    ("", "200x"),
)

DEVSLOT = Record("erofs_deviceslot", ("tag", "64s"), ("blocks", "I"), ("mapped_blkaddr", "I"), ("", "56x"))
V6_DEVSLOT_SIZE = DEVSLOT.size

BLOB_ENTRY = Record(
    "RafsV6Blob",
    ("blob_id", "64s"),
    ("blob_index", "I"),
    ("chunk_size", "I"),
    ("chunk_count", "I"),
    ("compression_algo", "I"),
    ("digest_algo", "I"),
    ("features", "I"),
    ("compressed_size", "Q"),
    ("uncompressed_size", "Q"),
    ("blob_toc_size", "I"),
    ("ci_compressor", "I"),
    ("ci_offset", "Q"),
    ("ci_compressed_size", "Q"),
    ("ci_uncompressed_size", "Q"),
    ("blob_toc_digest", "32s"),
    ("blob_meta_digest", "32s"),
    ("blob_meta_size", "Q"),
    ("", "8x"),
    ("cipher_algo", "I"),
    ("", "36x"),
)
V6_BLOB_ENTRY_SIZE = BLOB_ENTRY.size

COMPACT_INODE = Record(
    "erofs_inode_compact",
    ("format", "H"),
    ("xattr_icount", "H"),
    ("mode", "H"),
    ("nlink", "H"),
    ("size", "I"),
    ("mtime_delta", "I"),
    ("u", "I"),
    ("ino", "I"),
    ("uid", "H"),
    ("gid", "H"),
    ("", "4x"),
)

EXTENDED_INODE = Record(
    "erofs_inode_extended",
    ("format", "H"),
    ("xattr_icount", "H"),
    ("mode", "H"),
    ("", "2x"),
    ("size", "Q"),
    ("u", "I"),
    ("ino", "I"),
    ("uid", "I"),
    ("gid", "I"),
    ("mtime", "Q"),
    ("mtime_nsec", "I"),
    ("nlink", "I"),
    ("", "16x"),
)

# inline xattr ibody: this header, then 4-aligned entries (entry head + name suffix + value)
XATTR_IBODY_HEADER = Record("erofs_xattr_ibody_header", ("name_filter", "I"), ("shared_count", "B"), ("", "7x"))
XATTR_ENTRY = Record("erofs_xattr_entry", ("name_len", "B"), ("name_index", "B"), ("value_size", "H"))

DIRENT = Record("erofs_dirent", ("nid", "Q"), ("nameoff", "H"), ("file_type", "B"), ("", "1x"))
DIRENT_SIZE = DIRENT.size
DIRENT_NAMEOFF = DIRENT.view("nameoff")

CHUNK_INDEX = Record("erofs_inode_chunk_index", ("advise", "H"), ("device_id", "H"), ("blkaddr", "I"))
CHUNK_INDEX_SIZE = CHUNK_INDEX.size

assert SUPERBLOCK.size == 128 and EXT_SUPERBLOCK.size == 256
assert V6_DEVSLOT_SIZE == 128 and V6_BLOB_ENTRY_SIZE == 256
assert COMPACT_INODE.size == 32 and EXTENDED_INODE.size == 64
assert XATTR_IBODY_HEADER.size == 12 and DIRENT_SIZE == 12 and CHUNK_INDEX_SIZE == 8
assert RAFS_V6_DEVT_SLOTOFF * V6_DEVSLOT_SIZE == RAFS_V6_DEVTABLE_OFFSET
