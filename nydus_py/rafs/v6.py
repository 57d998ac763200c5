"""RAFS v6 (EROFS-compatible) bootstrap reader, decoding on demand from an mmap or bytes.

Spec: shared/specs/RAFS-FORMAT.md sections 2, 4 and 6. Loading parses only the superblocks,
device slots and blob table (O(blobs)); inodes, directory blocks, xattrs and chunk indexes are
decoded from the buffer when asked for, and every decode validates what it reads, so a hostile
bootstrap yields a FormatError, never an IndexError, a hang or a loop.

Chunk resolution uses the bootstrap chunk table. It is sorted by digest, not by the
(blob, ci_index) key a chunk index carries, so on the first `chunks()` call the reader builds a
compact index once: an `array('Q')` of packed keys `blob_index<<56 | ci_index<<32 | blkaddr` in
sorted order plus an `array('I')` of record numbers (12 bytes per chunk, no per-chunk objects),
then binary-searches it. The key includes blkaddr, like nydusd's own chunk map, so a chunk index
whose uncompressed offset disagrees with the table is caught. blob.meta (read from the blob,
see blobmeta.py) is the other source nydusd uses; `check` compares the two.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import os
import re
import stat
import struct
import weakref
from array import array
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .constants import (
    BLOB_FEATURES_INVALID,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SUPER_FLAGS_KNOWN,
    BlobFeatures,
    ChunkFlags,
    Compressor,
    Digester,
    SuperFlags,
)
from .errors import FormatError
from .layout_common import CHUNK, CHUNK_KEY, CHUNK_RECORD_SIZE, U32, Record, chunk_flags, unpack_chunk
from .layout_v6 import (
    BLOB_ENTRY,
    CHUNK_INDEX,
    CHUNK_INDEX_SIZE,
    COMPACT_INODE,
    DEVSLOT,
    DIRENT,
    DIRENT_NAMEOFF,
    DIRENT_SIZE,
    EROFS_BLKSZBITS,
    EROFS_BLOCK_SIZE,
    EROFS_CHUNK_FORMAT_BLKBITS_MASK,
    EROFS_CHUNK_FORMAT_INDEXES,
    EROFS_FEATURE_COMPAT_RAFS_V6,
    EROFS_FEATURE_INCOMPAT_RAFS_V6,
    EROFS_FT_DIR,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_MAGIC,
    EROFS_NID_SIZE,
    EROFS_SUPER_OFFSET,
    EXT_SUPERBLOCK,
    EXTENDED_INODE,
    FT_TO_IFMT,
    HOLE_BLKADDR,
    MAX_NAME,
    RAFS_V6_DEVT_SLOTOFF,
    RAFS_V6_DEVTABLE_OFFSET,
    RAFS_V6_EXT_SUPER_OFFSET,
    SUPERBLOCK,
    V6_BLOB_ENTRY_SIZE,
    V6_DEVSLOT_SIZE,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
)
from .model import Attr, BlobInfo, ChunkInfo, DirEntry, RafsImage

BLOCK = EROFS_BLOCK_SIZE
MAX_SYMLINK = 4096
MAX_CHUNKS_PER_BLOB = 1 << 24
BLOB_MAX_UNCOMPRESSED = 1 << 44
BLOB_MAX_COMPRESSED = 1 << 40
CHUNK_FLAGS_KNOWN = 0x1F
# plain ints: IntFlag operators build a new flag object per call, on every chunk of every READ
_PACKED_FLAGS = int(ChunkFlags.COMPRESSED | ChunkFlags.BATCH | ChunkFlags.ENCRYPTED)
_REFUSED_FEATURES = int(BlobFeatures.ZRAN | BlobFeatures.BATCH)
# Decoded inodes kept for all the images of the process together (~0.5 KiB each): one budget, so
# a shared daemon with 50 images walked holds at most this many, not this many per image.
INODE_CACHE = 8192
# parsed directory blocks, for all the images of the process together: a listing comes in several
# READDIR(PLUS) requests (a 4 KiB reply holds ~25 entries) that each start over in the same block;
# ~15 KiB each at most
DIR_BLOCK_CACHE = 64
# validated '..' of recently seen directories, for all the images of the process together: a
# directory's parent is checked when its parent lists it, when it is listed itself and when a
# LOOKUP or READDIR asks for its '..' (one int each, ~100 bytes with the cache's own entry)
PARENT_CACHE = 4096

_BLOB_ID_RE = re.compile(rb"[0-9A-Za-z_.\-]{64}")

_VALID_IFMT = frozenset(FT_TO_IFMT.values())
_FT_IFMT = tuple(FT_TO_IFMT.get(ft, -1) for ft in range(max(FT_TO_IFMT) + 1))  # file type -> S_IFMT bits
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
# the chunk format bits that must be exactly INDEXES (unknown bits clear) for a chunk-based file
_CHUNK_FMT_CHECK = 0xFFFF & ~EROFS_CHUNK_FORMAT_BLKBITS_MASK
_FT_NAMES = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFCHR: "char device",
             stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
             stat.S_IFLNK: "symlink"}  # fmt: skip


class DeviceSlot(NamedTuple):
    """One EROFS device-table slot (@1408): what the kernel sees as extra device N+1."""

    blob_id: str
    blocks: int
    mapped_blkaddr: int


class _Inode(NamedTuple):
    """A decoded, validated on-disk inode (small tuple, made per call and LRU-cached)."""

    nid: int
    off: int
    extended: bool
    layout: int
    mode: int
    nlink: int
    size: int
    i_u: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    xattr_off: int  # end of the inode core = start of the xattr ibody
    xattr_size: int
    data_off: int  # end of inode + xattr ibody


def decode_dev(dev: int) -> int:
    """Linux new_decode_dev of a 32-bit EROFS rdev, as an os.makedev value."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


# serial -> the open image (a plain dict of weak references: its get() is C, a WeakValueDictionary's
# is Python code, on every miss of the caches below)
_open_images: dict[int, weakref.ref[V6Image]] = {}


def _NOT_OPEN() -> None:  # noqa: N802 (stands in for a dead weak reference)
    return None


def _forget_serial(serial: int) -> Callable[[object], None]:
    """The weak reference's callback: an image collected without close() leaves the table."""

    def forget(_ref: object) -> None:
        _open_images.pop(serial, None)

    return forget


_serials = itertools.count(1)


@functools.lru_cache(maxsize=INODE_CACHE)
def _cached_inode(serial: int, nid: int) -> _Inode:
    """Inode `nid` of open image `serial`, from the process-wide cache (errors are not cached)."""
    image = _open_images.get(serial, _NOT_OPEN)()
    if image is None:
        raise FormatError("image is closed")
    return image._decode_inode(nid)


@functools.lru_cache(maxsize=DIR_BLOCK_CACHE)
def _cached_dir_block(serial: int, dir_nid: int, b: int) -> tuple[tuple[bytes, int, int], ...]:
    """Block `b` of directory `dir_nid` of open image `serial`, parsed, from the process-wide cache
    (one budget for every image, as for inodes)."""
    image = _open_images.get(serial, _NOT_OPEN)()
    if image is None:
        raise FormatError("image is closed")
    return image._decode_dir_block(dir_nid, b)


@functools.lru_cache(maxsize=PARENT_CACHE)
def _cached_parent(serial: int, dir_nid: int) -> int:
    """The validated '..' of directory `dir_nid` of open image `serial` (process-wide cache)."""
    image = _open_images.get(serial, _NOT_OPEN)()
    if image is None:
        raise FormatError("image is closed")
    return image._decode_dotdot(dir_nid)


_NAME = operator.itemgetter(0)
# NamedTuples made without their Python-level __new__ (on every decoded inode and listed entry)
_TUPLE_NEW = tuple.__new__
_CHUNK_PACK = CHUNK.pack


class V6Image(RafsImage):
    """A RAFS v6 bootstrap. `buf` is an mmap (closed by close()) or any bytes-like object."""

    version = 6

    def __init__(self, buf: bytes | bytearray | memoryview | object) -> None:
        self._buf = buf
        self._len = len(buf)  # type: ignore[arg-type]
        self._closed = False
        self._chunk_keys: array[int] | None = None
        self._chunk_pos: array[int] | None = None
        self._blob_maps: dict[int, array[int]] = {}  # blob index -> sorted blkaddr<<32 | record
        self._inode_count: int | None = None
        self._inode_count_error: str | None = None
        self._serial = next(_serials)
        _open_images[self._serial] = weakref.ref(self, _forget_serial(self._serial))
        self._inode: Callable[[int], _Inode] = functools.partial(_cached_inode, self._serial)
        self._dir_blocks: Callable[[int, int], tuple[tuple[bytes, int, int], ...]] = functools.partial(
            _cached_dir_block, self._serial)
        self._parent: Callable[[int], int] = functools.partial(_cached_parent, self._serial)
        self._parse_superblocks()
        self.blobs: list[BlobInfo] = self._parse_blob_table()
        self.devices: list[DeviceSlot] = self._parse_device_slots()
        # per blob: its chunks are zran/batch ones, which chunks() refuses
        self._refused = [bool(int(b.features) & _REFUSED_FEATURES) for b in self.blobs]
        root = self._inode(self.root_ino)
        if not stat.S_ISDIR(root.mode):
            raise FormatError(f"root nid {self.root_ino} is not a directory (mode {root.mode:o})")

    # ------------------------------------------------------------------ low-level reads

    def _unpack(self, st: struct.Struct | Record, off: int, what: str) -> tuple[Any, ...]:
        if off < 0 or off + st.size > self._len:
            raise FormatError(f"{what} at offset {off} (+{st.size}) is outside the {self._len}-byte bootstrap")
        return st.unpack_from(self._buf, off)  # type: ignore[arg-type]

    def _bytes(self, off: int, size: int, what: str) -> bytes:
        if off < 0 or size < 0 or off + size > self._len:
            raise FormatError(f"{what} at offset {off} (+{size}) is outside the {self._len}-byte bootstrap")
        return bytes(self._buf[off : off + size])  # type: ignore[index]

    # ------------------------------------------------------------------ superblocks

    def _parse_superblocks(self) -> None:
        n = self._len
        if n < BLOCK or n % BLOCK:
            raise FormatError(f"RAFS v6 bootstrap size {n} is not a non-zero multiple of {BLOCK}")
        (magic, checksum, compat, blkszbits, extslots, root_nid, inos, build_time, build_time_nsec,
         blocks, meta_blkaddr, xattr_blkaddr, _uuid, _vol, incompat, s_u, extra_devices,
         devt_slotoff) = self._unpack(SUPERBLOCK, EROFS_SUPER_OFFSET, "EROFS superblock")  # fmt: skip
        if magic != EROFS_MAGIC:
            raise FormatError(f"bad EROFS magic {magic:#x} at offset {EROFS_SUPER_OFFSET}")
        if not compat & EROFS_FEATURE_COMPAT_RAFS_V6:
            raise FormatError(
                f"EROFS image is not RAFS v6: feature_compat {compat:#x} lacks {EROFS_FEATURE_COMPAT_RAFS_V6:#x}"
            )
        if checksum != 0:
            raise FormatError(f"RAFS v6 superblock checksum must be 0, got {checksum:#x}")
        if blkszbits == 9:
            raise FormatError("RAFS v6 with 512-byte blocks (tarfs mode) is not supported")
        if blkszbits != EROFS_BLKSZBITS:
            raise FormatError(f"invalid block size bits {blkszbits} in RAFS v6 superblock")
        if extslots != 0:
            raise FormatError(f"invalid superblock extslots {extslots}")
        if inos == 0:
            raise FormatError("RAFS v6 superblock has inode count 0")
        if s_u != 0:
            raise FormatError(f"RAFS v6 superblock union field must be 0, got {s_u:#x}")
        if xattr_blkaddr != 0:
            raise FormatError("shared xattr area (xattr_blkaddr != 0) is not supported by RAFS v6")
        if extra_devices == 0 and blocks not in (0, 4096):
            raise FormatError(f"RAFS v6 superblock: {blocks} blocks but no extra devices")
        if devt_slotoff * V6_DEVSLOT_SIZE != RAFS_V6_DEVTABLE_OFFSET or devt_slotoff != RAFS_V6_DEVT_SLOTOFF:
            raise FormatError(f"invalid device table slot offset {devt_slotoff} (must be {RAFS_V6_DEVT_SLOTOFF})")
        if incompat != EROFS_FEATURE_INCOMPAT_RAFS_V6:
            raise FormatError(
                f"RAFS v6 feature_incompat must be {EROFS_FEATURE_INCOMPAT_RAFS_V6:#x}, got {incompat:#x}"
            )
        meta_start = meta_blkaddr * BLOCK
        if meta_start >= n:
            raise FormatError(f"meta_blkaddr {meta_blkaddr} is beyond the {n}-byte bootstrap")

        (flags, blob_off, blob_size, chunk_size, ct_off, ct_size, pf_off,
         pf_size) = self._unpack(EXT_SUPERBLOCK, RAFS_V6_EXT_SUPER_OFFSET, "RAFS v6 extended superblock")  # fmt: skip
        if flags & ~SUPER_FLAGS_KNOWN:
            raise FormatError(f"unknown RAFS superblock flags {flags & ~SUPER_FLAGS_KNOWN:#x}")
        comp_bits = SuperFlags.COMPRESSION_NONE | SuperFlags.COMPRESSION_LZ4
        comp_bits |= SuperFlags.COMPRESSION_GZIP | SuperFlags.COMPRESSION_ZSTD
        if (flags & comp_bits).bit_count() != 1:
            raise FormatError(f"RAFS v6 flags {flags:#x} must set exactly one compression bit")
        if (flags & (SuperFlags.HASH_BLAKE3 | SuperFlags.HASH_SHA256)).bit_count() != 1:
            raise FormatError(f"RAFS v6 flags {flags:#x} must set exactly one digest bit")
        if flags & SuperFlags.TARFS_MODE:
            raise FormatError("RAFS v6 tarfs mode is not supported")
        if chunk_size.bit_count() != 1 or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise FormatError(f"invalid chunk size {chunk_size:#x} in RAFS v6 extended superblock")

        devslot_end = RAFS_V6_DEVTABLE_OFFSET + V6_DEVSLOT_SIZE * extra_devices
        if (
            blob_off % BLOCK
            or blob_off < BLOCK
            or blob_off < devslot_end
            or blob_size % V6_BLOB_ENTRY_SIZE
            or blob_off + blob_size > n
        ):
            raise FormatError(f"invalid blob table offset {blob_off:#x} / size {blob_size:#x}")
        ranges = [("blob table", blob_off, blob_size)]
        if ct_size:
            if ct_off % BLOCK or ct_off < BLOCK or ct_off < devslot_end or ct_size % CHUNK_RECORD_SIZE or ct_off + ct_size > n:
                raise FormatError(f"invalid chunk table offset {ct_off:#x} / size {ct_size:#x}")
            ranges.append(("chunk table", ct_off, ct_size))
        if pf_size and pf_off:
            if pf_off < BLOCK or pf_size % 4 or pf_off < devslot_end or pf_off + pf_size > n:
                raise FormatError(f"invalid prefetch table offset {pf_off:#x} / size {pf_size:#x}")
            ranges.append(("prefetch table", pf_off, pf_size))
        else:
            pf_size = 0
        for i, (na, oa, sa) in enumerate(ranges):
            for nb, ob, sb in ranges[i + 1 :]:
                if sa and sb and oa < ob + sb and ob < oa + sa:
                    raise FormatError(f"{na} [{oa:#x}, +{sa:#x}) overlaps {nb} [{ob:#x}, +{sb:#x})")

        # The meta area runs from meta_blkaddr to the chunk table (nydus writes it last), else to EOF.
        meta_end = ct_off if ct_size and ct_off > meta_start else n
        self.flags = SuperFlags(flags)
        self.chunk_size = chunk_size
        self.root_ino = root_nid
        self.sb_inos = inos
        self.build_time = build_time
        self.build_time_nsec = build_time_nsec
        self.sb_blocks = blocks
        self.meta_blkaddr = meta_blkaddr
        self._meta_start = meta_start
        self._meta_end = meta_end
        self._max_nid = (meta_end - meta_start) // EROFS_NID_SIZE - 1
        self._extra_devices = extra_devices
        self._blob_off, self._blob_size = blob_off, blob_size
        self._ct_off, self._ct_size = ct_off, ct_size
        self._pf_off, self._pf_size = pf_off, pf_size
        if self.flags & SuperFlags.EXPLICIT_UID_GID:
            self._own_ids: tuple[int, int] | None = None
        else:
            self._own_ids = (os.geteuid(), os.getegid())

    def _parse_blob_table(self) -> list[BlobInfo]:
        blobs = []
        for i in range(self._blob_size // V6_BLOB_ENTRY_SIZE):
            blobs.append(self._parse_blob(i, self._blob_off + i * V6_BLOB_ENTRY_SIZE))
        return blobs

    def _parse_blob(self, i: int, off: int) -> BlobInfo:
        (raw_id, index, chunk_size, chunk_count, comp, dig, features, c_size, u_size, toc_size, ci_comp,
         ci_off, ci_c, ci_u, toc_digest, _meta_digest, _meta_size, cipher) = self._unpack(
            BLOB_ENTRY, off, f"blob table entry {i}")  # fmt: skip
        where = f"blob table entry {i}"
        if not _BLOB_ID_RE.fullmatch(raw_id):
            raise FormatError(f"{where}: blob id {raw_id!r} is not 64 characters of [0-9A-Za-z_.-]")
        if index != i:
            raise FormatError(f"{where}: blob_index {index} does not match its position")
        if chunk_size != self.chunk_size:
            raise FormatError(f"{where}: chunk size {chunk_size:#x} != superblock chunk size {self.chunk_size:#x}")
        if chunk_count > MAX_CHUNKS_PER_BLOB:
            raise FormatError(f"{where}: chunk count {chunk_count} exceeds {MAX_CHUNKS_PER_BLOB}")
        try:
            compressor, ci_compressor, digester = Compressor(comp), Compressor(ci_comp), Digester(dig)
        except ValueError:
            raise FormatError(f"{where}: unknown algorithm ids (compressor {comp}, ci {ci_comp}, digest {dig})") from None
        if cipher > 3:
            raise FormatError(f"{where}: unknown cipher id {cipher}")
        if u_size > BLOB_MAX_UNCOMPRESSED or c_size > BLOB_MAX_COMPRESSED:
            raise FormatError(f"{where}: blob sizes {c_size}/{u_size} exceed the format limits")
        if features & BLOB_FEATURES_INVALID:
            raise FormatError(f"{where}: invalid blob feature bits {features & BLOB_FEATURES_INVALID:#x}")
        feats = BlobFeatures(features)
        if not feats & BlobFeatures.ALIGNED:
            raise FormatError(f"{where}: blob lacks the ALIGNED feature required for RAFS v6")
        if ci_c > ci_u:
            raise FormatError(f"{where}: chunk-info compressed size {ci_c} > uncompressed size {ci_u}")
        special = BlobFeatures.BATCH | BlobFeatures.ZRAN | BlobFeatures.ENCRYPTED
        if feats & BlobFeatures.CHUNK_INFO_V2:
            ok = ci_u >= chunk_count * 24 if feats & special else ci_u == chunk_count * 24
        elif feats & special:
            ok = False
        else:
            ok = bool(feats & BlobFeatures.IS_CHUNKDICT_GENERATED) or ci_u == chunk_count * 16
        if not ok:
            raise FormatError(
                f"{where}: chunk-info size {ci_u} inconsistent with {chunk_count} chunks and features {features:#x}"
            )
        return BlobInfo(
            index=i,
            blob_id=raw_id.decode("ascii"),
            compressor=compressor,
            digester=digester,
            chunk_size=chunk_size,
            chunk_count=chunk_count,
            features=feats,
            compressed_size=c_size,
            uncompressed_size=u_size,
            ci_compressor=ci_compressor,
            ci_offset=ci_off,
            ci_compressed_size=ci_c,
            ci_uncompressed_size=ci_u,
            blob_toc_size=toc_size,
            blob_toc_digest=bytes(toc_digest),
        )

    def _parse_device_slots(self) -> list[DeviceSlot]:
        if self._extra_devices != len(self.blobs):
            raise FormatError(
                f"superblock has {self._extra_devices} device slots but the blob table has {len(self.blobs)} blobs"
            )
        slots = []
        seen: set[bytes] = set()
        for i in range(self._extra_devices):
            raw_id, blocks, mapped = self._unpack(
                DEVSLOT, RAFS_V6_DEVTABLE_OFFSET + i * V6_DEVSLOT_SIZE, "device slot"
            )
            if not _BLOB_ID_RE.fullmatch(raw_id):
                raise FormatError(f"device slot {i}: blob id {raw_id!r} is not 64 characters of [0-9A-Za-z_.-]")
            if raw_id in seen:
                raise FormatError(f"device slot {i}: duplicated blob id {raw_id.decode()}")
            seen.add(raw_id)
            if blocks == 0:
                raise FormatError(f"device slot {i}: zero blocks")
            if raw_id.decode("ascii") != self.blobs[i].blob_id:
                raise FormatError(f"device slot {i} names blob {raw_id.decode()}, blob table has {self.blobs[i].blob_id}")
            slots.append(DeviceSlot(raw_id.decode("ascii"), blocks, mapped))
        return slots

    # ------------------------------------------------------------------ inodes

    def _decode_inode(self, nid: int) -> _Inode:
        if self._closed:
            raise FormatError("image is closed")
        if not isinstance(nid, int) or nid < 0 or nid > self._max_nid:
            raise FormatError(f"nid {nid} is outside the meta area (max {self._max_nid})")
        off = self._meta_start + nid * EROFS_NID_SIZE
        # a nid <= _max_nid leaves room for a compact inode before the meta area's end; i_format
        # comes first in both forms, so one unpack serves the (usual) compact inode
        (fmt, icount, mode, nlink, size, mdelta, i_u, _ino, uid,
         gid) = COMPACT_INODE.unpack_from(self._buf, off)  # fmt: skip
        extended = bool(fmt & 1)
        if fmt & ~0xF:
            raise FormatError(f"inode {nid}: unknown i_format bits {fmt:#x}")
        layout = (fmt >> 1) & 7
        if layout in (1, 3):
            raise FormatError(f"inode {nid}: compressed EROFS data layout {layout} is not supported by RAFS")
        if layout not in (EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE, EROFS_INODE_CHUNK_BASED):
            raise FormatError(f"inode {nid}: unknown data layout {layout}")
        if extended:
            isize = EXTENDED_INODE.size
            if off + isize > self._meta_end:
                raise FormatError(f"inode {nid} at {off} runs past the meta area end {self._meta_end}")
            (_f, icount, mode, size, i_u, _ino, uid, gid, mtime, mtime_nsec,
             nlink) = EXTENDED_INODE.unpack_from(self._buf, off)  # fmt: skip
        else:
            isize = COMPACT_INODE.size
            mtime, mtime_nsec = self.build_time + mdelta, self.build_time_nsec
        ifmt = stat.S_IFMT(mode)
        if ifmt not in _VALID_IFMT:
            raise FormatError(f"inode {nid}: invalid file type in mode {mode:o}")
        if nlink == 0:
            raise FormatError(f"inode {nid}: link count 0")
        xsize = XATTR_IBODY_HEADER.size + 4 * (icount - 1) if icount else 0
        xattr_off = off + isize
        data_off = xattr_off + xsize
        if data_off > self._meta_end:
            raise FormatError(f"inode {nid}: xattr ibody runs past the meta area end")
        if self._own_ids is not None:
            uid, gid = self._own_ids
        ino = _TUPLE_NEW(_Inode, (nid, off, extended, layout, mode, nlink, size, i_u, uid, gid, mtime, mtime_nsec,
                                  xattr_off, xsize, data_off))  # fmt: skip
        # the common case inline: a chunk-based file whose chunk indexes lie in the meta area
        if not (ifmt == _S_IFREG and layout == EROFS_INODE_CHUNK_BASED and (i_u & 0xFFFF) & _CHUNK_FMT_CHECK
                == EROFS_CHUNK_FORMAT_INDEXES
                and ((data_off + 7) & ~7) + CHUNK_INDEX_SIZE * -(-size // self.chunk_size) <= self._meta_end):
            self._check_layout(ino, ifmt)
        return ino

    def _check_layout(self, ino: _Inode, ifmt: int) -> None:
        nid, size, layout = ino.nid, ino.size, ino.layout
        kind = _FT_NAMES[ifmt]
        if ifmt == stat.S_IFREG:
            if layout != EROFS_INODE_CHUNK_BASED:
                if size:
                    raise FormatError(f"inode {nid}: non-empty regular file is not chunk-based (layout {layout})")
                return
            fmt = ino.i_u & 0xFFFF
            if fmt & ~(EROFS_CHUNK_FORMAT_INDEXES | EROFS_CHUNK_FORMAT_BLKBITS_MASK):
                raise FormatError(f"inode {nid}: unknown chunk format bits {fmt:#x}")
            if not fmt & EROFS_CHUNK_FORMAT_INDEXES:
                raise FormatError(f"inode {nid}: block-map chunk format (no INDEXES bit) is not RAFS")
            count = -(-size // self.chunk_size)
            end = _align(ino.data_off, CHUNK_INDEX.size) + CHUNK_INDEX.size * count
            if end > self._meta_end:
                raise FormatError(f"inode {nid}: {count} chunk indexes for size {size} run past the meta area")
            return
        if layout == EROFS_INODE_CHUNK_BASED:
            raise FormatError(f"inode {nid}: {kind} cannot be chunk-based")
        if ifmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            if size:
                raise FormatError(f"inode {nid}: {kind} has non-zero size {size}")
            return
        if ifmt == stat.S_IFLNK and not 0 < size <= MAX_SYMLINK:
            raise FormatError(f"inode {nid}: symlink target size {size} not in 1..{MAX_SYMLINK}")
        if ifmt == stat.S_IFDIR and size == 0:
            raise FormatError(f"inode {nid}: directory with size 0")
        nblocks = -(-size // BLOCK)
        full = nblocks if layout == EROFS_INODE_FLAT_PLAIN else nblocks - 1
        if full and (ino.i_u < 1 or (ino.i_u + full) * BLOCK > self._len):
            raise FormatError(f"inode {nid}: {full} data blocks at block {ino.i_u} are outside the bootstrap")
        if layout == EROFS_INODE_FLAT_INLINE:
            tail = size - BLOCK * (nblocks - 1)
            if ino.data_off % BLOCK + tail > BLOCK or ino.data_off + tail > self._len:
                raise FormatError(f"inode {nid}: inline tail of {tail} bytes crosses a block boundary")

    def _data_block(self, ino: _Inode, b: int) -> tuple[int, int]:
        """(offset, length) of data block `b` of a flat (plain/inline) inode."""
        nblocks = -(-ino.size // BLOCK)
        length = BLOCK if b < nblocks - 1 else ino.size - BLOCK * (nblocks - 1)
        if ino.layout == EROFS_INODE_FLAT_INLINE and b == nblocks - 1:
            return ino.data_off, length
        return (ino.i_u + b) * BLOCK, length

    def _ifmt_inode(self, nid: int, ifmt: int, what: str) -> _Inode:
        ino = self._inode(nid)
        if stat.S_IFMT(ino.mode) != ifmt:
            raise FormatError(f"inode {nid} is not a {what} (mode {ino.mode:o})")
        return ino

    # ------------------------------------------------------------------ RafsImage API

    def inode_count(self) -> int:
        """Distinct inodes reachable from the root (hard links once); one validating walk, cached.

        The superblock's `inos` (kept as `sb_inos`) counts hard links per link in nydus images.
        A failed walk is cached too: the image does not change, so neither would the answer.
        """
        if self._inode_count_error is not None:
            raise FormatError(self._inode_count_error)
        if self._inode_count is None:
            seen = bytearray((self._max_nid >> 3) + 1)
            count = 0
            try:
                for _path, nid in self.walk():
                    byte, bit = nid >> 3, 1 << (nid & 7)
                    if not seen[byte] & bit:
                        seen[byte] |= bit
                        count += 1
            except FormatError as e:
                self._inode_count_error = str(e)
                raise
            self._inode_count = count
        return self._inode_count

    def superblock_inodes(self) -> int:
        return self.sb_inos

    def getattr(self, ino: int) -> Attr:
        return self._attr_of(ino, self._inode(ino))

    @staticmethod
    def _attr_of(nid: int, i: _Inode) -> Attr:
        mode = i.mode
        ifmt = mode & _S_IFMT
        rdev = decode_dev(i.i_u) if ifmt == stat.S_IFCHR or ifmt == stat.S_IFBLK else 0
        size = i.size
        return _TUPLE_NEW(Attr, (nid, mode, i.nlink, i.uid, i.gid, rdev, size, -(-size // 512), i.mtime,
                                 i.mtime_nsec))

    def mode(self, ino: int) -> int:
        return self._inode(ino).mode

    def _block_count(self, ino: _Inode) -> int:
        return -(-ino.size // BLOCK)

    def _dir_block(self, ino: _Inode, b: int) -> tuple[tuple[bytes, int, int], ...]:
        """Validated (name, nid, file_type) entries of directory block `b` (cached, shared)."""
        return self._dir_blocks(ino.nid, b)

    def _decode_dir_block(self, dir_nid: int, b: int) -> tuple[tuple[bytes, int, int], ...]:
        ino = self._inode(dir_nid)
        data, n, where = self._block_head(ino, b)
        nameoff0 = DIRENT_SIZE * n
        length = len(data)
        ents = list(DIRENT.iter_unpack(data[:nameoff0]))
        # names lie back to back from nameoff0 (checked below: increasing offsets, the first at
        # nameoff0), so two scans of the block say whether any name has a NUL (all but the last,
        # which ends at one) or a '/'; only then is each name searched, for the error to report
        scan = data.find(b"/", nameoff0) >= 0 or data.find(b"\0", nameoff0, ents[-1][1]) >= 0
        out = []
        prev = b""
        last = n - 1
        ft_ok = FT_TO_IFMT
        for i, (nid, nameoff, ftype) in enumerate(ents):
            end = ents[i + 1][1] if i < last else length
            if not nameoff < end <= length or nameoff < nameoff0:
                raise FormatError(f"{where}: entry {i} name offsets {nameoff}..{end} are not increasing inside the block")
            name = data[nameoff:end]
            if i == last:
                nul = name.find(b"\0")
                if nul >= 0:
                    name = name[:nul]
            elif scan and b"\0" in name:
                raise FormatError(f"{where}: entry {i} name contains NUL")
            if not name:
                raise FormatError(f"{where}: entry {i} has an empty name")
            if len(name) > MAX_NAME or scan and b"/" in name:
                raise FormatError(f"{where}: invalid name {name[:64]!r}")
            if ftype not in ft_ok:
                raise FormatError(f"{where}: entry {name!r} has invalid file type {ftype}")
            if name <= prev:
                raise FormatError(f"{where}: entries not sorted ({prev!r} then {name!r})")
            prev = name
            out.append((name, nid, ftype))
        return tuple(out)

    def _block_head(self, ino: _Inode, b: int) -> tuple[bytes, int, str]:
        """Raw bytes of directory block `b` and its entry count (first nameoff validated)."""
        off, length = self._data_block(ino, b)
        where = f"directory {ino.nid} block {b}"
        if length < DIRENT_SIZE:
            raise FormatError(f"{where}: {length} bytes cannot hold a dirent")
        data = self._bytes(off, length, where)
        nameoff0 = DIRENT_NAMEOFF.unpack_from(data, 0)[0]
        if nameoff0 < DIRENT_SIZE or nameoff0 % DIRENT_SIZE or nameoff0 >= length:
            raise FormatError(f"{where}: invalid first name offset {nameoff0}")
        return data, nameoff0 // DIRENT_SIZE, where

    def _find(self, ino: _Inode, name: bytes) -> tuple[int, int] | None:
        """(nid, file_type) of `name` in directory `ino`, like the kernel: binary search over the
        blocks' first names, then inside one block. Blocks come parsed and validated from the
        process-wide block cache, so the LOOKUPs of the names of one directory parse each of its
        blocks once (and a READDIR(PLUS) of it parses them for the LOOKUPs that follow, too).

        Ordering across blocks is fully checked by readdir; here a corrupt order can only make a
        lookup miss.
        """
        nid = ino.nid
        blocks = self._dir_blocks
        lo, hi = 0, self._block_count(ino) - 1
        target: tuple[tuple[bytes, int, int], ...] | None = None
        if hi == 0:
            target = blocks(nid, 0)
        else:
            while lo <= hi:
                mid = (lo + hi) // 2
                ents = blocks(nid, mid)
                if ents[0][0] <= name:
                    target, lo = ents, mid + 1
                else:
                    hi = mid - 1
            if target is None:
                return None
        j = bisect.bisect_left(target, name, key=_NAME)
        if j < len(target):
            got, child, ftype = target[j]
            if got == name:
                return child, ftype
        return None

    def _dotdot(self, dir_ino: _Inode) -> int:
        return self._parent(dir_ino.nid)

    def _decode_dotdot(self, dir_nid: int) -> int:
        """The '..' of directory `dir_nid`, checked: a directory entry, the root's is the root."""
        dir_ino = self._inode(dir_nid)
        hit = self._find(dir_ino, b"..")
        if hit is None:
            raise FormatError(f"directory {dir_ino.nid} has no '..' entry")
        nid, ftype = hit
        if ftype != EROFS_FT_DIR:
            raise FormatError(f"directory {dir_ino.nid}: '..' has file type {ftype}, not a directory")
        self._ifmt_inode(nid, stat.S_IFDIR, "directory ('..' target)")
        if dir_ino.nid == self.root_ino and nid != self.root_ino:
            raise FormatError(f"root directory's '..' is {nid}, not the root")
        return nid

    def _check_child(self, parent: int, name: bytes, nid: int, ftype: int) -> int:
        """S_IFMT of child `nid`, after checking it matches the dirent and can't form a loop."""
        child = self._inode(nid)
        ifmt = stat.S_IFMT(child.mode)
        if FT_TO_IFMT[ftype] != ifmt:
            raise FormatError(
                f"directory {parent}: entry {name!r} says {_FT_NAMES[FT_TO_IFMT[ftype]]} but inode {nid} is a {_FT_NAMES[ifmt]}"
            )
        if ifmt == stat.S_IFDIR:
            if nid == parent or nid == self.root_ino:
                raise FormatError(f"directory {parent}: entry {name!r} points back to directory {nid} (loop)")
            up = self._dotdot(child)
            if up != parent:
                raise FormatError(
                    f"directory {parent}: subdirectory {name!r} (nid {nid}) has '..' = {up}; "
                    "a directory must have exactly one parent"
                )
        return ifmt

    def lookup(self, parent: int, name: bytes) -> int | None:
        d = self._ifmt_inode(parent, stat.S_IFDIR, "directory")
        if name in (b".", b"..") or not name or len(name) > MAX_NAME or b"/" in name or b"\0" in name:
            return None
        hit = self._find(d, name)
        if hit is None:
            return None
        self._check_child(parent, name, hit[0], hit[1])
        return hit[0]

    def lookup_attr(self, parent: int, name: bytes) -> Attr | None:
        """`lookup` + `getattr` in one frame, each inode fetched from the cache once (a cold
        LOOKUP's work: about a fifth fewer Python calls)."""
        d = self._inode(parent)
        if (d.mode & _S_IFMT != _S_IFDIR or name == b"." or name == b".." or not name or len(name) > MAX_NAME
                or b"/" in name or b"\0" in name):
            return None
        hit = self._find(d, name)
        if hit is None:
            return None
        nid = hit[0]
        self._check_child(parent, name, nid, hit[1])
        return self._attr_of(nid, self._inode(nid))

    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        d = self._ifmt_inode(ino, stat.S_IFDIR, "directory")
        return (_TUPLE_NEW(DirEntry, (name, nid, ifmt)) for name, nid, ifmt, _i in
                self._readdir(d, max(0, offset), self._inode))

    def listing(self, ino: int, limit: int) -> list[tuple[bytes, int, int, Attr]] | None:
        """`readdir` with each child's attributes, decoded once here (not through the inode cache,
        not looked up again by a getattr: what a READDIRPLUS needs); None past `limit` children."""
        d = self._ifmt_inode(ino, stat.S_IFDIR, "directory")
        out: list[tuple[bytes, int, int, Attr]] = []
        attr_of = self._attr_of
        for name, nid, ifmt, child in self._readdir(d, 0, self._decode_inode):
            if len(out) == limit:
                return None
            out.append((name, nid, ifmt, attr_of(nid, child)))
        return out

    def _readdir(self, d: _Inode, skip: int,
                 inode: Callable[[int], _Inode]) -> Iterator[tuple[bytes, int, int, _Inode]]:
        """(name, nid, S_IFMT, decoded inode) of each child after the first `skip`, each checked
        against its dirent and, for a directory, its '..' (`inode`: how children are decoded)."""
        nblocks = self._block_count(d)
        prev_last: bytes | None = None
        saw_dot = saw_dotdot = False
        complete = skip == 0
        subdirs: set[int] = set()
        dnid, root, parent_of = d.nid, self.root_ino, self._parent
        for b in range(nblocks):
            ents = self._dir_block(d, b)
            if prev_last is not None and ents[0][0] <= prev_last:
                raise FormatError(f"directory {d.nid}: block {b} starts with {ents[0][0]!r}, not after {prev_last!r}")
            prev_last = ents[-1][0]
            for name, nid, ftype in ents:
                if name == b".":
                    if nid != dnid or ftype != EROFS_FT_DIR:
                        raise FormatError(f"directory {dnid}: '.' points to {nid} (type {ftype})")
                    saw_dot = True
                    continue
                if name == b"..":
                    parent_of(dnid)
                    saw_dotdot = True
                    continue
                if skip:
                    skip -= 1
                    continue
                # _check_child inlined (on every entry of every listing); it raises the errors
                child = inode(nid)
                ifmt = child.mode & _S_IFMT
                if _FT_IFMT[ftype] != ifmt or ifmt == _S_IFDIR and (
                        nid in (dnid, root) or parent_of(nid) != dnid):
                    self._check_child(dnid, name, nid, ftype)
                if ifmt == _S_IFDIR:
                    if nid in subdirs:
                        raise FormatError(f"directory {dnid}: subdirectory {nid} listed twice")
                    subdirs.add(nid)
                yield name, nid, ifmt, child
        if complete and not (saw_dot and saw_dotdot):
            raise FormatError(f"directory {d.nid} lacks '.' or '..'")

    def walk(self, ino: int | None = None, path: bytes = b"/") -> Iterator[tuple[bytes, int]]:
        """Depth-first pre-order (path, inode), children in byte order.

        No ancestor set is needed: readdir proves every subdirectory's '..' is the directory
        listing it (and never the root or itself), so each directory is reached at most once.
        """
        start = self.root_ino if ino is None else ino
        stack: list[tuple[bytes, int]] = [(path, start)]
        while stack:
            p, i = stack.pop()
            yield p, i
            if not stat.S_ISDIR(self._inode(i).mode):
                continue
            base = p if p.endswith(b"/") else p + b"/"
            kids = list(self.readdir(i))
            stack.extend((base + e.name, e.ino) for e in reversed(kids))

    def parent(self, ino: int) -> int:
        d = self._ifmt_inode(ino, stat.S_IFDIR, "directory")
        return self._dotdot(d)

    def readlink(self, ino: int) -> bytes:
        i = self._ifmt_inode(ino, stat.S_IFLNK, "symlink")
        off, length = self._data_block(i, 0)
        target = self._bytes(off, length, f"symlink {ino} target")
        if b"\0" in target:
            raise FormatError(f"symlink {ino}: target contains NUL")
        return target

    def _xattrs(self, ino: int) -> list[tuple[bytes, int, int]]:
        """(full name, value offset, value size) of the inline xattrs of `ino`."""
        i = self._inode(ino)
        if not i.xattr_size:
            return []
        shared_at = i.xattr_off + XATTR_IBODY_HEADER.offset("shared_count")
        shared = self._bytes(shared_at, 1, f"inode {ino} xattr header")[0]
        if shared:
            raise FormatError(f"inode {ino}: {shared} shared xattrs; RAFS v6 supports inline xattrs only")
        pos, end = i.xattr_off + XATTR_IBODY_HEADER.size, i.xattr_off + i.xattr_size
        out = []
        names: set[bytes] = set()
        while pos < end:
            if pos + XATTR_ENTRY.size > end:
                raise FormatError(f"inode {ino}: truncated xattr entry")
            nlen, nidx, vsize = XATTR_ENTRY.unpack_from(self._buf, pos)
            total = XATTR_ENTRY.size + nlen + vsize
            if pos + total > end:
                raise FormatError(f"inode {ino}: xattr entry of {total} bytes overruns the ibody")
            prefix = XATTR_PREFIXES.get(nidx)
            if prefix is None:
                raise FormatError(f"inode {ino}: unknown xattr name index {nidx}")
            name = prefix + self._bytes(pos + XATTR_ENTRY.size, nlen, "xattr name")
            if name in names:
                raise FormatError(f"inode {ino}: duplicate xattr {name!r}")
            if b"\0" in name:
                raise FormatError(f"inode {ino}: xattr name contains NUL")
            names.add(name)
            out.append((name, pos + XATTR_ENTRY.size + nlen, vsize))
            pos += _align(total, 4)
        return out

    def listxattr(self, ino: int) -> list[bytes]:
        return [name for name, _o, _s in self._xattrs(ino)]

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        for n, off, size in self._xattrs(ino):
            if n == name:
                return self._bytes(off, size, "xattr value")
        return None

    # ------------------------------------------------------------------ chunks

    def _chunk_index(self) -> tuple[array[int], array[int]]:
        """Sorted packed keys and record numbers of the chunk table (built once, compact)."""
        if self._chunk_keys is not None and self._chunk_pos is not None:
            return self._chunk_keys, self._chunk_pos
        nblobs = len(self.blobs)
        packed: list[int] = []
        mv = memoryview(self._buf)  # type: ignore[arg-type]
        table = mv[self._ct_off : self._ct_off + self._ct_size]
        try:
            for i, (blob_index, uoff, index) in enumerate(CHUNK_KEY.iter_unpack(table)):
                if blob_index >= nblobs or blob_index >= 255:
                    raise FormatError(f"chunk table record {i}: blob index {blob_index} out of range ({nblobs} blobs)")
                if index >= MAX_CHUNKS_PER_BLOB:
                    raise FormatError(f"chunk table record {i}: chunk index {index} exceeds 2^24")
                if uoff % BLOCK or uoff >> 12 >= HOLE_BLKADDR:
                    raise FormatError(f"chunk table record {i}: uncompressed offset {uoff:#x} is not a 4K block address")
                packed.append(((blob_index << 56 | index << 32 | uoff >> 12) << 32) | i)
        finally:
            table.release()
            mv.release()
        packed.sort()
        keys = array("Q", (p >> 32 for p in packed))
        pos = array("I", (p & 0xFFFF_FFFF for p in packed))
        del packed
        for j in range(1, len(keys)):
            if keys[j] == keys[j - 1]:
                raise FormatError(f"chunk table records {pos[j - 1]} and {pos[j]} describe the same chunk")
        self._chunk_keys, self._chunk_pos = keys, pos
        return keys, pos

    def chunk_record(self, i: int) -> ChunkInfo:
        """Record `i` of the bootstrap chunk table (file_offset is the first user's, meaningless in v6)."""
        if not 0 <= i < self._ct_size // CHUNK_RECORD_SIZE:
            raise FormatError(f"chunk table record {i} out of range")
        return unpack_chunk(self._buf, self._ct_off + i * CHUNK_RECORD_SIZE)

    def chunk_table_len(self) -> int:
        return self._ct_size // CHUNK_RECORD_SIZE

    def check_chunk_table(self) -> int:
        """Deep O(chunks) check of the chunk table (for `check`): every record valid, strictly
        sorted by (digest, blob_index+1) as nydus-image writes it, keys unique. Returns the count."""
        self._chunk_index()
        prev: tuple[bytes, int] | None = None
        n = self.chunk_table_len()
        for i in range(n):
            rec = self.chunk_record(i)
            self._check_record(rec, f"chunk table record {i}")
            key = (rec.digest, rec.blob_index + 1)
            if prev is not None and key <= prev:
                raise FormatError(f"chunk table record {i} is out of (digest, blob) order")
            prev = key
        return n

    def _check_record(self, rec: ChunkInfo, where: str) -> BlobInfo:
        problem = self._record_problem(rec.blob_index, int(rec.flags), rec.compressed_size, rec.uncompressed_size,
                                       rec.index, rec.compressed_offset, rec.uncompressed_offset)
        if problem is not None:
            raise FormatError(f"{where}: {problem}")
        return self.blobs[rec.blob_index]

    def _record_problem(self, blob_index: int, flags: int, c_size: int, u_size: int, index: int, c_off: int,
                        u_off: int) -> str | None:
        """What is wrong with a chunk record's fields (None: nothing), on plain ints."""
        if not 0 <= blob_index < len(self.blobs):
            return f"blob index {blob_index} out of range"
        blob = self.blobs[blob_index]
        if flags & ~CHUNK_FLAGS_KNOWN:
            return f"unknown chunk flags {flags:#x}"
        if c_size == 0 or not 0 < u_size <= self.chunk_size:
            return f"invalid sizes {c_size}/{u_size}"
        if not flags & _PACKED_FLAGS and c_size != u_size:
            return f"uncompressed chunk stored in {c_size} bytes, not {u_size}"
        if index >= blob.chunk_count:
            return f"chunk index {index} >= blob {blob.index} chunk count {blob.chunk_count}"
        if blob.compressed_size and c_off + c_size > blob.compressed_size:
            return f"compressed range ends past blob size {blob.compressed_size}"
        if blob.uncompressed_size and u_off + u_size > blob.uncompressed_size:
            return f"uncompressed range ends past blob size {blob.uncompressed_size}"
        return None

    def chunks(self, ino: int, offset: int = 0, size: int | None = None) -> list[ChunkInfo]:
        return self._chunks(ino, offset, size, False)

    def packed_chunks(self, ino: int) -> bytes:
        """The whole file's chunk records packed as a v5 chunk list (`pack_chunks(chunks(ino))`,
        with the same checks, but no ChunkInfo per chunk): what a build tree of the image keeps
        (`builder.merge.tree_from_image`, a build-cache layer joining a conversion)."""
        return b"".join(self._chunks(ino, 0, None, True))

    def _chunks(self, ino: int, offset: int, size: int | None, packed: bool) -> list[Any]:
        """`chunks`' ChunkInfos, or with `packed` each as its packed record (the same checks)."""
        i = self._ifmt_inode(ino, stat.S_IFREG, "regular file")
        start = max(0, offset)
        isize = i.size
        end = isize if size is None else min(isize, start + size)
        if end <= start or i.layout != EROFS_INODE_CHUNK_BASED:
            return []
        cs = self.chunk_size
        base = _align(i.data_off, CHUNK_INDEX_SIZE)
        buf = self._buf
        nblobs = len(self.blobs)
        keys, pos = self._chunk_index()
        out: list[Any] = []
        for k in range(start // cs, (end - 1) // cs + 1):
            advise, device_id, blkaddr = CHUNK_INDEX.unpack_from(buf, base + CHUNK_INDEX_SIZE * k)
            if blkaddr == HOLE_BLKADDR:
                continue
            blob_index = (device_id & 0xFF) - 1
            if not 0 <= blob_index < nblobs:
                raise FormatError(f"inode {ino} chunk {k}: device id {device_id & 0xFF} names no blob ({nblobs} blobs)")
            if self._refused[blob_index]:
                raise FormatError(f"inode {ino} chunk {k}: blob {self.blobs[blob_index].blob_id} uses zran/batch "
                                  "chunks, which are not supported")
            ci_index = ((device_id >> 8) << 16) | advise
            key = blob_index << 56 | ci_index << 32 | blkaddr
            j = bisect.bisect_left(keys, key)
            if j >= len(keys) or keys[j] != key:
                raise FormatError(f"inode {ino} chunk {k}: (blob {blob_index}, ci_index {ci_index}, blkaddr "
                                  f"{blkaddr:#x}) is not in the chunk table")
            r = pos[j]
            # the record's fields as ints (no IntFlag arithmetic, no _replace: on every READ)
            (digest, b_index, flags, c_size, u_size, c_off, u_off, _f_off, index,
             crc) = CHUNK.unpack_from(buf, self._ct_off + r * CHUNK_RECORD_SIZE)  # fmt: skip
            problem = self._record_problem(b_index, flags, c_size, u_size, index, c_off, u_off)
            if problem is not None:
                raise FormatError(f"inode {ino} chunk {k} (chunk table record {r}): {problem}")
            want = min(cs, isize - k * cs)
            if u_size != want:
                raise FormatError(f"inode {ino} chunk {k}: chunk table says {u_size} bytes, file needs {want}")
            if packed:  # (the record as stored, at this file offset: pack_chunk of the ChunkInfo below)
                out.append(_CHUNK_PACK(digest, b_index, flags, c_size, u_size, c_off, u_off, k * cs, index, crc))
            else:
                out.append(_TUPLE_NEW(ChunkInfo, (digest, b_index, chunk_flags(flags), c_off, c_size, u_off, u_size,
                                                  k * cs, index, crc)))
        return out

    def chunk_index_span(self, ino: int) -> tuple[int, int]:
        """(byte offset in the bootstrap, entry count) of regular file `ino`'s EROFS chunk index
        array: what a tool rewriting chunk addresses (a flat block export) patches."""
        i = self._ifmt_inode(ino, stat.S_IFREG, "regular file")
        if i.layout != EROFS_INODE_CHUNK_BASED or not i.size:
            return 0, 0
        return _align(i.data_off, CHUNK_INDEX.size), -(-i.size // self.chunk_size)

    def chunks_after(self, chunk: ChunkInfo) -> Iterator[ChunkInfo]:
        """The blob's chunks with ci_index > chunk.index in index order (the builder numbers
        chunks in blob order), decoded one at a time from the sorted chunk index."""
        keys, pos = self._chunk_index()
        b = chunk.blob_index
        if not 0 <= b < len(self.blobs) or not 0 <= chunk.index < MAX_CHUNKS_PER_BLOB:
            return
        j = bisect.bisect_left(keys, b << 56 | (chunk.index + 1) << 32)
        last = chunk.index
        while j < len(keys) and keys[j] >> 56 == b:
            index = keys[j] >> 32 & 0xFF_FFFF
            if index != last:  # one record per chunk index is enough
                rec = self.chunk_record(pos[j])
                self._check_record(rec, f"chunk table record {pos[j]}")
                last = index
                yield rec
            j += 1

    def check_blob_alignment(self) -> None:
        """FormatError unless every chunk starts on a 4 KiB block of its blob's uncompressed space
        (what the kernel EROFS driver needs to read the blob view as a device)."""
        self._chunk_index()  # validates every record's uncompressed offset

    def _blob_map(self, b: int) -> array[int]:
        """Chunks of blob `b` sorted by uncompressed offset: `blkaddr << 32 | record number`,
        one per block address (built once per blob, 8 bytes per chunk)."""
        m = self._blob_maps.get(b)
        if m is not None:
            return m
        keys, pos = self._chunk_index()
        lo, hi = bisect.bisect_left(keys, b << 56), bisect.bisect_left(keys, (b + 1) << 56)
        first: dict[int, int] = {}
        for j in range(lo, hi):
            first.setdefault(keys[j] & 0xFFFF_FFFF, pos[j])
        m = array("Q", sorted(blk << 32 | p for blk, p in first.items()))
        self._blob_maps[b] = m  # a racing builder makes the same array
        return m

    def blob_chunks(self, blob_index: int, offset: int, size: int) -> list[ChunkInfo]:
        """Chunks of blob `blob_index` overlapping [offset, offset+size) of its uncompressed view,
        in offset order, with `file_offset` = the chunk's uncompressed offset (the view's file
        offset). Ranges no chunk covers read as zeros."""
        if not 0 <= blob_index < len(self.blobs):
            raise FormatError(f"blob index {blob_index} out of range ({len(self.blobs)} blobs)")
        end = offset + size
        if size <= 0 or offset < 0:
            return []
        m = self._blob_map(blob_index)
        j = max(0, bisect.bisect_right(m, (offset >> 12) << 32 | 0xFFFF_FFFF) - 1)
        out: list[ChunkInfo] = []
        prev_end = 0
        while j < len(m) and (m[j] >> 32) << 12 < end:
            rec = self.chunk_record(m[j] & 0xFFFF_FFFF)
            j += 1
            self._check_record(rec, f"blob {blob_index} chunk at {rec.uncompressed_offset:#x}")
            if rec.uncompressed_offset + rec.uncompressed_size <= offset:
                continue
            if rec.uncompressed_offset < prev_end:
                raise FormatError(f"blob {blob_index}: chunks overlap at uncompressed offset {rec.uncompressed_offset:#x}")
            prev_end = rec.uncompressed_offset + rec.uncompressed_size
            out.append(rec._replace(file_offset=rec.uncompressed_offset))
        return out

    def prefetch_table(self) -> list[int]:
        out = []
        for k in range(self._pf_size // 4):
            (nid,) = U32.unpack_from(self._buf, self._pf_off + 4 * k)  # type: ignore[arg-type]
            if nid == 0:  # padding: nydusd stops at the first 0
                break
            self._inode(nid)
            out.append(nid)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _open_images.pop(self._serial, None)
        # (these raise: closed; the shared caches' entries age out)
        self._inode = self._decode_inode
        self._dir_blocks = self._decode_dir_block
        self._parent = self._decode_dotdot
        self._chunk_keys = self._chunk_pos = None
        self._blob_maps.clear()
        close = getattr(self._buf, "close", None)
        if callable(close):
            close()
