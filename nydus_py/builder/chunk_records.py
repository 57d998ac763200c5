"""Chunks a build can deduplicate against, kept as packed 80-byte records (`rafs.layout_common.CHUNK`).

A layer of 100k small files has ~100k distinct chunks; as `ChunkInfo` tuples they cost ~400 B
each for the whole build. Here each costs its record (80 B in one shared bytearray) plus one dict
slot keyed by its digest (issue 16, item 10).
"""

from collections.abc import Iterator

from ..rafs.layout_common import CHUNK_RECORD_SIZE, with_file_offset


class ChunkRecords:
    """digest -> packed chunk record; the first record added for a digest wins."""

    __slots__ = ("records", "_at")

    def __init__(self) -> None:
        self.records = bytearray()  # CHUNK records, in the order added
        self._at: dict[bytes, int] = {}  # digest -> position of its record in `records`

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, digest: object) -> bool:
        return digest in self._at

    def add(self, record: bytes) -> bool:
        """Keep `record` unless its digest is known already; True if it was kept."""
        digest = bytes(record[:32])
        if digest in self._at:
            return False
        self._at[digest] = len(self.records) // CHUNK_RECORD_SIZE
        self.records += record
        return True

    def update(self, other: "ChunkRecords") -> None:
        """Add every record of `other` (in its order) whose digest is new here; `other` is left
        empty (its storage is taken over when this map is empty, not copied)."""
        if not self._at:
            self.records, self._at = other.records, other._at
            other.records, other._at = bytearray(), {}
            return
        for digest, pos in other._at.items():
            if digest not in self._at:
                self._at[digest] = len(self.records) // CHUNK_RECORD_SIZE
                off = pos * CHUNK_RECORD_SIZE
                self.records += other.records[off : off + CHUNK_RECORD_SIZE]
        other.records, other._at = bytearray(), {}

    def get(self, digest: bytes, file_offset: int) -> bytes | None:
        """The record of `digest` referenced at `file_offset` of a file, or None."""
        pos = self._at.get(digest)
        if pos is None:
            return None
        return with_file_offset(self.records, pos * CHUNK_RECORD_SIZE, file_offset)

    def __iter__(self) -> Iterator[bytes]:
        """The digests, in the order added."""
        return iter(self._at)
