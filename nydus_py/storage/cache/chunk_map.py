"""Nydus's chunk map: which chunks of a blob are ready in `<blob id>.blob.data`.

File layout (NYDUSD-CONTRACT.md 6.8), so upstream tools and the snapshotter's GC read it as
their own: a 4096-byte header of u32 LE `magic 0x424D4150, version 1, magic2 0x434D4150,
all_ready (0x4D4D4150 once every chunk is cached)`, then ceil(chunks/8) bitmap bytes, MSB first
(chunk i is byte i/8, bit 7 - i%8). A file of any other size or header is discarded.

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
from collections.abc import Iterable

HEADER_SIZE = 4096
MAGIC = 0x424D4150
MAGIC2 = 0x434D4150
VERSION = 1
ALL_READY = 0x4D4D4150
_HEADER = struct.Struct("<IIII")


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
    """The on-disk readiness bitmap of one blob with `chunks` chunks, kept in memory too."""

    def __init__(self, path: str, chunks: int) -> None:
        if not 0 < chunks <= 1 << 24:
            raise ValueError(f"chunk map for {chunks} chunks")
        self.path = path
        self.chunks = chunks
        self.size = HEADER_SIZE + bitmap_size(chunks)
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
            head = os.pread(self.fd, HEADER_SIZE, 0) if st.st_size == self.size else b""
            if st.st_size == self.size and header_valid(head):
                bits = bytearray(os.pread(self.fd, self.size - HEADER_SIZE, HEADER_SIZE))
                if len(bits) == self.size - HEADER_SIZE:
                    self._clear_tail(bits)
                    return bits
            # absent, wrong size or foreign header: start empty
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, encode_header(False), 0)
            os.ftruncate(self.fd, self.size)
            return bytearray(self.size - HEADER_SIZE)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

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

    def mark(self, indices: Iterable[int]) -> None:
        """Ready in memory only: their bytes are written, not yet durable; `set_ready` persists."""
        with self._lock:
            for i in indices:
                if 0 <= i < self.chunks:
                    byte, mask = bit(i)
                    if not self.bits[byte] & mask:
                        self.bits[byte] |= mask
                        self.ready_count += 1

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
