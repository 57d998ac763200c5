"""The chunk map file: Nydus's layout bit for bit, resets on foreign files, merging of bits set
by another process."""

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_py.storage.cache import chunk_map as cm


def test_layout(tmp_path):
    p = str(tmp_path / "x.blob.data.chunk_map")
    m = cm.ChunkMap(p, 20)
    assert os.path.getsize(p) == 4096 + 3
    m.set_ready([0, 9, 19])
    raw = Path(p).read_bytes()
    assert struct.unpack_from("<IIII", raw) == (0x424D4150, 1, 0x434D4150, 0)
    assert raw[4096:] == bytes([0b1000_0000, 0b0100_0000, 0b0001_0000])  # MSB first
    assert [i for i in range(20) if m.is_ready(i)] == [0, 9, 19]
    m.set_ready(range(20))
    raw = Path(p).read_bytes()
    assert struct.unpack_from("<I", raw, 12)[0] == 0x4D4D4150 and m.all_ready
    m.clear(9)
    raw = Path(p).read_bytes()
    assert struct.unpack_from("<I", raw, 12)[0] == 0 and not m.is_ready(9) and m.ready_count == 19
    m.close()


def test_reopen_keeps_bits(tmp_path):
    p = str(tmp_path / "m")
    m = cm.ChunkMap(p, 100)
    m.set_ready([1, 50, 99])
    m.close()
    m2 = cm.ChunkMap(p, 100)
    assert [i for i in range(100) if m2.is_ready(i)] == [1, 50, 99] and m2.ready_count == 3
    m2.close()


@pytest.mark.parametrize("damage", ["size", "magic", "version"])
def test_foreign_or_damaged_file_is_reset(tmp_path, damage):
    p = str(tmp_path / "m")
    m = cm.ChunkMap(p, 64)
    m.set_ready(range(64))
    m.close()
    raw = bytearray(Path(p).read_bytes())
    if damage == "size":
        raw += b"\xff"
    elif damage == "magic":
        raw[0] ^= 1
    else:
        raw[4] = 2
    Path(p).write_bytes(raw)
    m = cm.ChunkMap(p, 64)
    assert m.ready_count == 0 and not any(m.is_ready(i) for i in range(64))
    assert os.path.getsize(p) == 4096 + 8
    m.close()


def test_bits_past_the_end_do_not_count(tmp_path):
    p = str(tmp_path / "m")
    m = cm.ChunkMap(p, 3)
    m.close()
    with open(p, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff")
    m = cm.ChunkMap(p, 3)
    assert m.ready_count == 3 and m.all_ready and not m.is_ready(3) and not m.is_ready(-1)
    m.close()


def test_two_writers_merge(tmp_path):
    """Two daemons sharing a work_dir: neither loses the other's bits."""
    p = str(tmp_path / "m")
    a, b = cm.ChunkMap(p, 16), cm.ChunkMap(p, 16)
    a.set_ready([0, 2])
    b.set_ready([1, 3])  # same byte: read-modify-write under flock keeps 0 and 2
    assert b.is_ready(0) and b.is_ready(2)
    assert not a.is_ready(1)
    assert a.refresh(1) and a.is_ready(1)
    a.close()
    c = cm.ChunkMap(p, 16)
    assert [i for i in range(16) if c.is_ready(i)] == [0, 1, 2, 3]
    for m in (b, c):
        m.close()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.sets(st.integers(0, 2999), max_size=200))
def test_bits_roundtrip(tmp_path_factory, n, ready):
    d = tmp_path_factory.mktemp("cm")
    ready = {i for i in ready if i < n}
    m = cm.ChunkMap(str(d / "m"), n)
    m.set_ready(sorted(ready))
    m.close()
    m = cm.ChunkMap(str(d / "m"), n)
    assert {i for i in range(n) if m.is_ready(i)} == ready and m.ready_count == len(ready)
    assert m.all_ready == (len(ready) == n)
    m.close()


def test_invalid_sizes(tmp_path):
    for n in (0, -1, (1 << 24) + 1):
        with pytest.raises(ValueError):
            cm.ChunkMap(str(tmp_path / "m"), n)


def _bound(tmp_path, blob_id: str = "ab" * 32, size: int = 8 * 4096, chunks: int = 8):
    data = tmp_path / f"{blob_id}.blob.data"
    fd = os.open(data, os.O_RDWR | os.O_CREAT, 0o644)
    return fd, cm.ChunkMap(str(tmp_path / "m"), chunks, cm.Binding(blob_id, fd, size))


def test_stamp_ties_the_map_to_its_data_file(tmp_path):
    fd, m = _bound(tmp_path)
    assert os.fstat(fd).st_size == 8 * 4096 and m.invalid is None and m.generation == 1  # pre-sized
    m.set_ready([1, 2])
    m.close()
    raw = Path(tmp_path / "m").read_bytes()
    stamp = cm.Stamp.decode(raw[cm.STAMP_OFFSET:])
    assert stamp == cm.Stamp(bytes.fromhex("ab" * 32), 8, 8 * 4096, os.fstat(fd).st_ino, 1)
    assert raw[cm.STAMP_OFFSET + cm.STAMP_SIZE:4096] == bytes(4096 - cm.STAMP_OFFSET - cm.STAMP_SIZE)
    m = cm.ChunkMap(str(tmp_path / "m"), 8, cm.Binding("ab" * 32, fd, 8 * 4096))
    assert m.invalid is None and m.ready_count == 2
    m.close()
    # another blob's binding, another length, a shorter data file: each resets, generation moves on
    for blob_id, size, cut in (("cd" * 32, 8 * 4096, None), ("ab" * 32, 9 * 4096, None), ("ab" * 32, 8 * 4096, 5)):
        good = cm.ChunkMap(str(tmp_path / "m"), 8, cm.Binding("ab" * 32, fd, 8 * 4096))
        good.set_ready([3])
        good.close()
        if cut is not None:
            os.ftruncate(fd, cut)
        m = cm.ChunkMap(str(tmp_path / "m"), 8, cm.Binding(blob_id, fd, size))
        assert m.invalid is not None and m.dropped >= 1 and m.ready_count == 0, (blob_id, size, cut)
        assert os.fstat(fd).st_size >= 8 * 4096  # extended only after the map was reset
        gen = m.generation
        m.close()
        m = cm.ChunkMap(str(tmp_path / "m"), 8)  # unbound: accepts any valid stamp, changes nothing
        assert m.invalid is None and m.generation == gen
        m.close()
    os.close(fd)


def test_runtime_reset_refuses_marks_from_before(tmp_path):
    fd, m = _bound(tmp_path)
    m.set_ready([0, 5])
    gen = m.generation
    assert m.reset() == 2 and m.generation == gen + 1 and m.ready_count == 0
    assert not m.mark([1], gen) and not m.is_ready(1)  # written before the reset: refused
    assert m.mark([1], m.generation) and m.is_ready(1)
    m.close()
    m = cm.ChunkMap(str(tmp_path / "m"), 8, cm.Binding("ab" * 32, fd, 8 * 4096))
    assert m.invalid is None and m.ready_count == 0 and m.generation == gen + 1
    m.close()
    os.close(fd)
