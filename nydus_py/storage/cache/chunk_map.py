"""Nydus's chunk map: which chunks of a blob are ready in `<blob id>.blob.data`.

File layout (NYDUSD-CONTRACT.md 6.8), so upstream tools and the snapshotter's GC read it as
their own: a 4096-byte header of u32 LE `magic 0x424D4150, version 1, magic2 0x434D4150,
all_ready (0x4D4D4150 once every chunk is cached)`, then ceil(chunks/8) bitmap bytes, MSB first
(chunk i is byte i/8, bit 7 - i%8). A file of any other size or header is discarded.

Our own integrity stamp lives in the header's reserved bytes (nydusd leaves them zero): blob id,
chunk count, the data file's pre-sized length and inode, and a generation bumped on every reset,
under a CRC. It ties the bits to one data file, so a map copied from another blob, left behind
when the data file was replaced, written by another tool (no stamp) or with a damaged stamp is
reset instead of trusted, and so is a map whose data file is shorter than stamped (truncated:
chunks past the cut would read back as zeros). The chunk table is not known here, so which ready
chunks a cut loses cannot be told: all of them are dropped (refetched; never wrong bytes). A
reset writes the stamp last, so an interrupted one leaves no stamp and is redone on next open.
The bits themselves carry no checksum (it would have to be rewritten with every bit set): a
flipped bit, like a flipped data byte, is only caught by the cache's digest validation.

A bit is only ever set in the file after the chunk's bytes are validated, written and
fdatasync'ed (the cache does that, in batches); until then `mark` keeps it in memory only, so this
daemon already serves the chunk from the (page-cached) data file. Bits are merged into the file
under an flock so two of our daemons sharing a work_dir never lose each other's bits.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

HEADER_SIZE = 4096
MAGIC = 0x424D4150
MAGIC2 = 0x434D4150
VERSION = 1
ALL_READY = 0x4D4D4150
_HEADER = struct.Struct("<IIII")
STAMP_OFFSET = _HEADER.size
STAMP_MAGIC = 0x4359504E  # "NPYC"
STAMP_VERSION = 1
# magic, version, blob id, chunks, data file size, data file inode, generation; then a crc32
_STAMP = struct.Struct("<II32sIQQQ")
_CRC = struct.Struct("<I")
STAMP_SIZE = _STAMP.size + _CRC.size


@dataclass(frozen=True)
class Binding:
    """The data file a map belongs to: checked against the stamp on open, stamped on reset."""

    blob_id: str  # 64 hex digits
    data_fd: int
    data_size: int  # the length the data file is pre-sized to; 0 when unknown (not pre-sized)


@dataclass(frozen=True)
class Stamp:
    blob_id: bytes
    chunks: int
    data_size: int
    data_ino: int
    generation: int

    def encode(self) -> bytes:
        body = _STAMP.pack(STAMP_MAGIC, STAMP_VERSION, self.blob_id, self.chunks, self.data_size, self.data_ino,
                           self.generation)
        return body + _CRC.pack(zlib.crc32(body))

    @staticmethod
    def decode(raw: bytes) -> Stamp | None:
        """The stamp in `raw` (the bytes at STAMP_OFFSET), or None when absent or damaged."""
        if len(raw) < STAMP_SIZE:
            return None
        body = raw[:_STAMP.size]
        if _CRC.unpack_from(raw, _STAMP.size)[0] != zlib.crc32(body):
            return None
        magic, version, blob_id, chunks, size, ino, gen = _STAMP.unpack(body)
        if magic != STAMP_MAGIC or version != STAMP_VERSION:
            return None
        return Stamp(blob_id, chunks, size, ino, gen)


def encode_header(all_ready: bool) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, MAGIC2, ALL_READY if all_ready else 0).ljust(HEADER_SIZE, b"\0")


def header_valid(data: bytes) -> bool:
    if len(data) < _HEADER.size:
        return False
    magic, version, magic2, _ready = _HEADER.unpack_from(data)
    return magic == MAGIC and version == VERSION and magic2 == MAGIC2


def bitmap_size(chunks: int) -> int:
    return (chunks + 7) // 8


def bit(i: int) -> tuple[int, int]:
    """(byte index, mask) of chunk i."""
    return i >> 3, 0x80 >> (i & 7)


class ChunkMap:
    """The on-disk readiness bitmap of one blob with `chunks` chunks, kept in memory too.

    With a `bind`ing (the cache) the map must carry a stamp matching it and the data file must be
    as long as stamped, else it is reset: `invalid` says why and `dropped` how many ready bits
    were lost. Without one (tools, tests) any valid stamp is accepted, so looking at a live map
    never resets it.
    """

    def __init__(self, path: str, chunks: int, bind: Binding | None = None) -> None:
        if not 0 < chunks <= 1 << 24:
            raise ValueError(f"chunk map for {chunks} chunks")
        self.path = path
        self.chunks = chunks
        self.bind = bind
        self.size = HEADER_SIZE + bitmap_size(chunks)
        self.generation = 0
        self.invalid: str | None = None
        self.dropped = 0
        self._lock = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self.bits = self._load()
        except BaseException:
            os.close(self.fd)
            raise
        self.ready_count = sum(bin(b).count("1") for b in self.bits)

    def _load(self) -> bytearray:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            st = os.fstat(self.fd)
            raw = os.pread(self.fd, self.size, 0) if st.st_size == self.size else b""
            stamp = Stamp.decode(raw[STAMP_OFFSET:]) if len(raw) == self.size and header_valid(raw) else None
            if st.st_size == 0:
                reason = None  # new
            elif len(raw) != self.size or not header_valid(raw):
                reason = f"size {st.st_size} or header is not a chunk map for {self.chunks} chunks"
            else:
                reason = self._mismatch(stamp)
                if reason is None:
                    assert stamp is not None
                    bits = bytearray(raw[HEADER_SIZE:])
                    self._clear_tail(bits)
                    self.generation = stamp.generation
                    self._presize()
                    return bits
                old = bytearray(raw[HEADER_SIZE:])
                self._clear_tail(old)
                self.dropped = sum(bin(b).count("1") for b in old)
            self.invalid = reason
            self._write_empty((stamp.generation + 1) if stamp is not None else 1, sync=self.dropped > 0)
            self._presize()
            return bytearray(self.size - HEADER_SIZE)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _mismatch(self, stamp: Stamp | None) -> str | None:
        """Why a well-formed map cannot be trusted, or None."""
        if stamp is None:
            return "no valid integrity stamp (another tool's map, an interrupted reset or damage)"
        if stamp.chunks != self.chunks:
            return f"stamped for {stamp.chunks} chunks, not {self.chunks}"
        b = self.bind
        if b is None:
            return None
        if stamp.blob_id != bytes.fromhex(b.blob_id):
            return f"stamped for blob {stamp.blob_id.hex()}"
        if stamp.data_size != b.data_size:
            return f"stamped for a data file of {stamp.data_size} bytes, not {b.data_size}"
        dst = os.fstat(b.data_fd)
        if stamp.data_ino != dst.st_ino:
            return f"the data file was replaced (inode {dst.st_ino}, stamped {stamp.data_ino})"
        if dst.st_size < b.data_size:
            return f"the data file is {dst.st_size} bytes, shorter than its {b.data_size} (truncated)"
        return None

    def verify(self) -> str | None:
        """Check the file's stamp against our binding and data file again now (as on open):
        why the map cannot be trusted, or None. Never resets anything."""
        raw = os.pread(self.fd, self.size, 0)
        if len(raw) != self.size or not header_valid(raw):
            return "the chunk map file is no longer a valid map"
        stamp = Stamp.decode(raw[STAMP_OFFSET:])
        reason = self._mismatch(stamp)
        if reason is None and stamp is not None and stamp.generation != self.generation:
            reason = f"the map was reset (generation {stamp.generation}, ours {self.generation})"
        return reason

    def _stamp(self, generation: int) -> Stamp:
        b = self.bind
        if b is None:
            return Stamp(bytes(32), self.chunks, 0, 0, generation)
        return Stamp(bytes.fromhex(b.blob_id), self.chunks, b.data_size, os.fstat(b.data_fd).st_ino, generation)

    def _write_empty(self, generation: int, sync: bool) -> None:
        """(flock held) An empty map; the stamp goes last. With `sync` (ready bits were dropped) it
        is made durable before the data file may be extended again (`_presize`): otherwise a
        power cut could bring back the old bits over a re-extended (zero) data file."""
        stamp = self._stamp(generation)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, encode_header(False), 0)
        os.ftruncate(self.fd, self.size)
        os.pwrite(self.fd, stamp.encode(), STAMP_OFFSET)
        if sync:
            os.fdatasync(self.fd)
        self.generation = generation

    def _presize(self) -> None:
        """(flock held) Extend the data file to its full, sparse length, as nydusd lays it out;
        only after the map was checked against the length it had."""
        b = self.bind
        if b is not None and b.data_size > 0 and os.fstat(b.data_fd).st_size < b.data_size:
            os.ftruncate(b.data_fd, b.data_size)

    def reset(self) -> int:
        """Forget every chunk (the data file was found damaged while in use); returns how many
        were ready. The generation changes first, so a reader that checked readiness before
        can tell its bytes may be from after the reset (see BlobCacheManager._cached)."""
        with self._lock:
            self.generation += 1
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                dropped = self.ready_count
                self._write_empty(self.generation, sync=dropped > 0)
                self.bits = bytearray(self.size - HEADER_SIZE)
                self.ready_count = 0
                self._presize()
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        return dropped

    def _clear_tail(self, bits: bytearray) -> None:
        """Bits past the last chunk mean nothing; never let them count as ready."""
        extra = len(bits) * 8 - self.chunks
        if extra:
            bits[-1] &= (0xFF << extra) & 0xFF

    def is_ready(self, i: int) -> bool:
        if not 0 <= i < self.chunks:
            return False
        byte, mask = bit(i)
        return bool(self.bits[byte] & mask)

    def refresh(self, i: int) -> bool:
        """Re-read chunk i's bit from the file (another daemon may have cached it)."""
        if not 0 <= i < self.chunks:
            return False
        byte, mask = bit(i)
        cur = os.pread(self.fd, 1, HEADER_SIZE + byte)
        if cur and cur[0] & mask and not self.bits[byte] & mask:
            with self._lock:
                if not self.bits[byte] & mask:
                    self.bits[byte] |= mask
                    self.ready_count += 1
        return bool(self.bits[byte] & mask)

    def mark(self, indices: Iterable[int], generation: int | None = None) -> bool:
        """Ready in memory only: their bytes are written, not yet durable; `set_ready` persists.
        Refused (False) when the map was reset since `generation`: the bytes were written before
        the damage that caused it and may be gone."""
        with self._lock:
            if generation is not None and generation != self.generation:
                return False
            for i in indices:
                if 0 <= i < self.chunks:
                    byte, mask = bit(i)
                    if not self.bits[byte] & mask:
                        self.bits[byte] |= mask
                        self.ready_count += 1
        return True

    def set_ready(self, indices: Iterable[int]) -> None:
        """Mark chunks ready in the file (their data must already be durable in the data file)."""
        idx = sorted({i for i in indices if 0 <= i < self.chunks})
        if not idx:
            return
        lo, hi = idx[0] >> 3, (idx[-1] >> 3) + 1
        with self._lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                disk = bytearray(os.pread(self.fd, hi - lo, HEADER_SIZE + lo).ljust(hi - lo, b"\0"))
                for i in idx:
                    byte, mask = bit(i)
                    disk[byte - lo] |= mask
                for k in range(hi - lo):  # adopt bits others set meanwhile
                    new = disk[k] & ~self.bits[lo + k]
                    if new:
                        self.ready_count += bin(new).count("1")
                        self.bits[lo + k] |= new
                os.pwrite(self.fd, bytes(disk), HEADER_SIZE + lo)
                if self.ready_count >= self.chunks:
                    os.pwrite(self.fd, encode_header(True)[:_HEADER.size], 0)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def clear(self, i: int) -> None:
        """Forget chunk i (its cached bytes turned out bad)."""
        if not 0 <= i < self.chunks:
            return
        byte, mask = bit(i)
        with self._lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                cur = os.pread(self.fd, 1, HEADER_SIZE + byte)
                val = (cur[0] if cur else 0) & ~mask
                os.pwrite(self.fd, bytes([val]), HEADER_SIZE + byte)
                os.pwrite(self.fd, encode_header(False)[:_HEADER.size], 0)
                if self.bits[byte] & mask:
                    self.bits[byte] &= ~mask
                    self.ready_count -= 1
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    @property
    def all_ready(self) -> bool:
        return self.ready_count >= self.chunks

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
