"""A layer of many small files costs a few spill writes and reads, not one per chunk: the
chunks a worker spills from one batch go out with one pwritev, and the blob-order write reads
the spill back through a 1 MiB window. Each syscall per chunk gave the GIL up and took it back
(a wake-up under contention); the blob is the same byte for byte."""

import os
import random

import pytest

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.options import BuildOptions
from tests.builder.test_blob_writer import fd

FILES = 300


class _Bytes:
    """A ChunkSource over bytes in memory (a layer tar's data at offsets)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread(self, offset: int, n: int) -> bytes:
        return self.data[offset:offset + n]


def _files(rng: random.Random) -> list[bytes]:
    # small files, half of them repeated once (dedup inside the layer), one bigger than a chunk
    out = [rng.randbytes(rng.randint(100, 12 << 10)) for _ in range(FILES)]
    out += out[: FILES // 2]
    out.append(rng.randbytes(300 << 10))
    return out


def _blob(path: str, w: BlobWriter) -> bytes:
    info = w.finish()
    assert info is not None
    with open(os.path.join(path, info.blob_id), "rb") as f:
        return f.read()


def test_small_files_are_spilled_and_read_back_in_a_few_syscalls(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(random.Random(7))
    opts = BuildOptions(chunk_size=0x10000)
    ref = BlobWriter(str(tmp_path / "ref"), opts, blob_index=0, workers=2)
    ref_chunks = ref.add_files([fd(d) for d in files])
    ref_blob = _blob(str(tmp_path / "ref"), ref)

    data = b"".join(files)
    offsets = []
    pos = 0
    for d in files:
        offsets.append(pos)
        pos += len(d)
    calls = {"write": 0, "read": 0}
    for name, kind in (("pwrite", "write"), ("pwritev", "write"), ("pread", "read")):
        real = getattr(os, name)

        def counted(*a, _real=real, _kind=kind):  # type: ignore[no-untyped-def]
            calls[_kind] += 1
            return _real(*a)

        monkeypatch.setattr(os, name, counted)
    w = BlobWriter(str(tmp_path / "spill"), opts, blob_index=0, workers=2)
    src = _Bytes(data)
    for off, d in zip(offsets, files, strict=True):
        w.spill_file(src, off, len(d))
    w.spill_finish()
    writes = calls["write"]
    got: list[bytes] = []
    w.add_spilled_stream(((off, len(d)) for off, d in zip(offsets, files, strict=True)), lambda _i, c: got.append(c))
    reads = calls["read"]
    monkeypatch.undo()
    assert _blob(str(tmp_path / "spill"), w) == ref_blob
    assert got == ref_chunks
    # ~3 MiB of new small chunks: 256 KiB batches -> about 14 writes and 4 window reads (one per chunk before: 300+)
    assert writes <= 40, writes
    assert reads <= 20, reads
    assert w.spill_writes == writes and w.spill_reads == reads


class _CountingHash:
    """Stands in for the blob's sha256, counting its updates."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.updates = 0

    def update(self, data) -> None:  # type: ignore[no-untyped-def]
        self.updates += 1
        self.inner.update(data)

    def copy(self):  # type: ignore[no-untyped-def]
        return self.inner.copy()

    def hexdigest(self) -> str:
        return str(self.inner.hexdigest())

    def digest(self) -> bytes:
        return bytes(self.inner.digest())


def test_the_blob_hash_takes_runs_of_small_chunks_at_once(tmp_path) -> None:
    """Each hash update of 2 KiB or more is a GIL hand-off: a blob of small chunks hashed chunk
    by chunk had one per small file. The blob and its id (its sha256) stay the same."""
    files = _files(random.Random(11))
    opts = BuildOptions(chunk_size=0x10000)
    ref = BlobWriter(str(tmp_path / "ref"), opts, blob_index=0, workers=2)
    ref.add_files([fd(d) for d in files])
    ref_blob = _blob(str(tmp_path / "ref"), ref)
    w = BlobWriter(str(tmp_path / "counted"), opts, blob_index=0, workers=2)
    counting = _CountingHash(w._hash)
    w._hash = counting  # type: ignore[assignment]
    w.add_files([fd(d) for d in files])
    assert _blob(str(tmp_path / "counted"), w) == ref_blob
    # ~300 stored small chunks and the trailers: one update per chunk before (300+)
    assert counting.updates <= 30, counting.updates


def test_a_batch_of_small_chunks_is_compressed_in_one_call(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zstd call per small chunk gave the GIL up and took it back each time; a spill batch
    now goes to zstd at once (`codec.compress_many`), with the same frames: the same blob."""
    from nydus_py.rafs import codec

    files = _files(random.Random(13))
    opts = BuildOptions(chunk_size=0x10000)
    ref = BlobWriter(str(tmp_path / "ref"), opts, blob_index=0, workers=2)
    ref.add_files([fd(d) for d in files])
    ref_blob = _blob(str(tmp_path / "ref"), ref)
    calls = {"compress": 0, "many": 0}
    real_one, real_many = codec.compress, codec.compress_many

    def one(algo, data):  # type: ignore[no-untyped-def]
        calls["compress"] += 1
        return real_one(algo, data)

    def many(algo, datas):  # type: ignore[no-untyped-def]
        calls["many"] += 1
        return real_many(algo, datas)

    monkeypatch.setattr(codec, "compress", one)
    monkeypatch.setattr(codec, "compress_many", many)
    w = BlobWriter(str(tmp_path / "spill"), opts, blob_index=0, workers=2)
    data = b"".join(files)
    src = _Bytes(data)
    offsets, pos = [], 0
    for d in files:
        offsets.append(pos)
        pos += len(d)
    for off, d in zip(offsets, files, strict=True):
        w.spill_file(src, off, len(d))
    w.spill_finish()
    monkeypatch.undo()
    w.add_spilled_stream(((off, len(d)) for off, d in zip(offsets, files, strict=True)), lambda _i, _c: None)
    assert _blob(str(tmp_path / "spill"), w) == ref_blob
    # ~300 new small chunks in 256 KiB batches: ~14 batch calls, a few single ones (300 before)
    assert calls["compress"] + calls["many"] <= 40, calls


def test_compress_many_gives_each_chunks_own_frame() -> None:
    """(Guard) the batch call gives byte for byte what one call per chunk gives."""
    from nydus_py.rafs import codec
    from nydus_py.rafs.constants import Compressor

    rng = random.Random(3)
    text = b"".join(b"%06d lorem ipsum dolor sit amet\n" % i for i in range(4000))
    datas = [rng.randbytes(rng.randint(1, 5000)) + text[:rng.randint(0, 90000)] for _ in range(80)]
    for algo in (Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE):
        assert [bytes(x) for x in codec.compress_many(algo, datas)] == [bytes(codec.compress(algo, d)) for d in datas]
