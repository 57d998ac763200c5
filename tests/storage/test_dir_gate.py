"""The sans-IO parts of directory-aware read-around (storage/cache/around.py): which following
chunks continue the blob, and the record that lets the guesses go on or stops them."""

from __future__ import annotations

from nydus_py.rafs.model import ChunkFlags, ChunkInfo
from nydus_py.storage.cache.around import DirGate, take_adjacent


def chunk(off: int, size: int, index: int = 0) -> ChunkInfo:
    return ChunkInfo(digest=b"\0" * 32, blob_index=0, flags=ChunkFlags(0), compressed_offset=off, compressed_size=size,
                     uncompressed_offset=off, uncompressed_size=size, file_offset=0, index=index, crc32=0)


def test_takes_what_continues_the_blob_until_a_gap_the_budget_or_a_refusal() -> None:
    run = [chunk(100, 50), chunk(150, 50), chunk(210, 40), chunk(400, 10)]
    assert take_adjacent(run, 100, 1000, 16, lambda c: True) == run[:3]  # 400: a gap of 150
    assert take_adjacent(run, 100, 100, 16, lambda c: True) == run[:2]  # budget (gaps count too)
    assert take_adjacent(run, 100, 1000, 0, lambda c: True) == run[:2]  # no gap allowed
    assert take_adjacent(run, 100, 1000, 16, lambda c: c.compressed_offset != 150) == run[:1]
    assert take_adjacent(run, 90, 1000, 4, lambda c: True) == []  # the first does not continue


def test_a_file_stored_earlier_is_skipped_not_an_end() -> None:
    # the second file's chunk was deduplicated to offset 0: the third still continues the run
    run = [chunk(100, 50), chunk(0, 50), chunk(150, 50)]
    assert take_adjacent(run, 100, 1000, 0, lambda c: True) == [run[0], run[2]]


def test_the_credit_lets_first_guesses_go_then_only_their_use_does() -> None:
    g = DirGate(waste=2.0, credit=300, decay=1 << 30)
    assert g.allows(256, 0)
    g.fetched_along(256)
    assert not g.allows(256, 0)  # 256 unused + 256 > the credit
    assert g.allows(256, 300)  # what the blind budget leaves counts
    g.used_later(200)  # most of it was read
    assert g.allows(256, 0)  # 56 unused + 256 <= 2 * 200 + 300
    g.fetched_along(1000)
    assert not g.allows(256, 0)  # 1056 unused: more than twice the use and the credit
    assert not g.allows(256, -5000)  # an overspent blind budget counts as nothing left, not less
    g.used_later(5000)
    assert g.used == g.fetched  # (never more used than fetched)


def test_the_record_decays() -> None:
    g = DirGate(waste=1.0, credit=0, decay=1000)
    g.fetched_along(900)
    g.used_later(900)
    g.fetched_along(400)  # past the decay: both halved
    assert (g.fetched, g.used) == (650, 450)
