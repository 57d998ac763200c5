"""Chunks a build can deduplicate against, kept as packed 80-byte records (`rafs.layout_common.CHUNK`).

A layer of 100k small files has ~100k distinct chunks; as `ChunkInfo` tuples they cost ~400 B
each for the whole build, and a dict keyed by digest still ~130 B (a bytes key and an int per
chunk). Here each costs its record (80 B in one shared bytearray) plus 2-4 slots of an
open-addressing table of record numbers (`array('q')`, probed with Python's per-process keyed
`hash` of the digest, so crafted digests cannot pile up on one slot): no Python object per chunk
(issue 16, item 10).
"""

import threading
from array import array
from collections.abc import Iterator
from typing import Protocol

from ..rafs.layout_common import CHUNK_RECORD_SIZE, with_file_offset

_DIGEST = 32  # the digest opens every record


class ChunkLookup(Protocol):
    """What a `BlobWriter` asks of the chunks other blobs hold."""

    def __contains__(self, digest: object) -> bool: ...

    def get(self, digest: bytes, file_offset: int) -> bytes | None: ...


class ChunkRecords:
    """digest -> packed chunk record; the first record added for a digest wins."""

    __slots__ = ("records", "_table", "_count")

    def __init__(self) -> None:
        self.records = bytearray()  # CHUNK records, in the order added
        self._table = array("q", bytes(8 * 64))  # record number + 1; 0 = free
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _find(self, digest: bytes) -> tuple[int, int]:
        """(table slot, record number or -1 when absent: then the slot is where it goes)."""
        table, records = self._table, self.records
        mask = len(table) - 1
        h = hash(digest) & mask
        while True:
            v = table[h]
            if v == 0:
                return h, -1
            off = (v - 1) * CHUNK_RECORD_SIZE
            if records[off : off + _DIGEST] == digest:
                return h, v - 1
            h = (h + 1) & mask

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, bytes | bytearray):
            return False
        return self._find(bytes(digest))[1] >= 0

    def add(self, record: "bytes | bytearray | memoryview") -> bool:
        """Keep `record` unless its digest is known already; True if it was kept."""
        slot, pos = self._find(bytes(record[:_DIGEST]))
        if pos >= 0:
            return False
        self.records += record
        self._count += 1
        self._table[slot] = self._count
        if self._count * 2 > len(self._table):
            self._grow()
        return True

    def reserve(self, n: int) -> None:
        """Room for `n` more records at once: no rehash while they are added (the table doubles
        as it fills otherwise, each time rehashing every record)."""
        cap = len(self._table)
        while (self._count + n) * 2 > cap:
            cap *= 2
        if cap != len(self._table):
            self._grow(cap)

    def _grow(self, cap: int = 0) -> None:
        cap = cap or len(self._table) * 2
        table = array("q", bytes(8 * cap))
        mask = cap - 1
        records = self.records
        for n in range(self._count):
            off = n * CHUNK_RECORD_SIZE
            h = hash(bytes(records[off : off + _DIGEST])) & mask
            while table[h]:
                h = (h + 1) & mask
            table[h] = n + 1
        self._table = table

    def update(self, other: "ChunkRecords") -> None:
        """Add every record of `other` (in its order) whose digest is new here; `other` is left
        empty (its storage is taken over when this map is empty, not copied)."""
        if not self._count:
            self.records, self._table, self._count = other.records, other._table, other._count
        else:
            self.reserve(other._count)
            view = memoryview(other.records)
            for n in range(other._count):
                self.add(view[n * CHUNK_RECORD_SIZE : (n + 1) * CHUNK_RECORD_SIZE])
            view.release()
        other.records, other._table, other._count = bytearray(), array("q", bytes(8 * 64)), 0

    def get(self, digest: bytes, file_offset: int) -> bytes | None:
        """The record of `digest` referenced at `file_offset` of a file, or None."""
        pos = self._find(bytes(digest))[1]
        if pos < 0:
            return None
        return with_file_offset(self.records, pos * CHUNK_RECORD_SIZE, file_offset)

    def __iter__(self) -> Iterator[bytes]:
        """The digests, in the order added."""
        records = self.records
        for n in range(self._count):
            off = n * CHUNK_RECORD_SIZE
            yield bytes(records[off : off + _DIGEST])


class SharedChunkRecords(ChunkRecords):
    """A `ChunkRecords` that threads may read while another adds to it (a lock around each
    call): layers being prepared look up what the layers committed so far hold."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return super().__contains__(digest)

    def get(self, digest: bytes, file_offset: int) -> bytes | None:
        with self._lock:
            return super().get(digest, file_offset)

    def add(self, record: "bytes | bytearray | memoryview") -> bool:
        with self._lock:
            return super().add(record)

    def update(self, other: ChunkRecords) -> None:
        with self._lock:
            super().update(other)

    def reserve(self, n: int) -> None:
        with self._lock:
            super().reserve(n)
