"""`ChunkRecords` (digest -> packed chunk record): `reserve` sizes its table once."""

import hashlib

import pytest

from nydus_py.builder.chunk_records import ChunkRecords, SharedChunkRecords
from nydus_py.rafs.layout_common import CHUNK


def record(n: int) -> bytes:
    return CHUNK.pack(hashlib.sha256(b"%d" % n).digest(), 0, 0, 10, 10, 0, 0, 0, n, 0)


@pytest.mark.parametrize("cls", [ChunkRecords, SharedChunkRecords])
def test_reserve_sizes_the_table_once(cls: type[ChunkRecords], monkeypatch: pytest.MonkeyPatch) -> None:
    """After `reserve(n)`, n adds rehash nothing (the table doubled as it filled: six rehashes
    of every record for a 1350-chunk cached layer); an `update` into a map that has records
    grows it once for all of the other's; every record is still found."""
    grows: list[int] = []
    real = ChunkRecords._grow

    def counted(self: ChunkRecords, cap: int = 0) -> None:
        grows.append(cap)
        real(self, cap)

    monkeypatch.setattr(ChunkRecords, "_grow", counted)
    recs = cls()
    recs.reserve(1500)
    assert len(grows) == 1
    assert all(recs.add(record(n)) for n in range(1500))
    assert len(grows) == 1 and len(recs) == 1500
    other = ChunkRecords()
    other.reserve(3000)
    for n in range(1000, 4000):  # (1000 of them known already)
        other.add(record(n))
    grows.clear()
    recs.update(other)
    assert len(grows) == 1 and len(recs) == 4000
    assert all(recs.get(record(n)[:32], 7) is not None for n in range(4000))
    assert recs.get(hashlib.sha256(b"none").digest(), 0) is None
