"""Streaming layer decompression (checked, bounded memory) and the bootstrap layer tar."""

import gzip
import hashlib
import io
import random
import tarfile
import tracemalloc
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_py.convert.layer import Inflater, decompress_to, extract_bootstrap, write_bootstrap_layer
from nydus_py.rafs.errors import FormatError


class Dribble(io.RawIOBase):
    """A source that answers reads with short, seeded-random pieces (piece boundaries anywhere)."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data, self.pos, self.rng = data, 0, random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        k = min(n if n >= 0 else len(self.data), self.rng.randint(1, 4096))
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out


class Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.n += len(b)
        return len(b)


def gz_members(data: bytes, cuts: list[int]) -> bytes:
    pieces, last = [], 0
    for c in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        pieces.append(gzip.compress(data[last:c], mtime=0))
        last = c
    return b"".join(pieces)


def zstd_frames(data: bytes, cuts: list[int]) -> bytes:
    c = zstandard.ZstdCompressor(level=1)
    pieces, last = [], 0
    for cut in sorted({min(x, len(data)) for x in cuts}) + [len(data)]:
        pieces.append(c.compress(data[last:cut]))
        last = cut
    return b"".join(pieces)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20_000), cuts=st.lists(st.integers(0, 20_000), max_size=4),
       kind=st.sampled_from(["gzip", "zstd", "tar"]), seed=st.integers(0, 1000), pad=st.integers(0, 600))
def test_roundtrip_any_piece_boundaries(data, cuts, kind, seed, pad):
    if kind == "gzip":
        blob = gz_members(data, cuts) + b"\0" * pad  # zero padding after the last member is allowed
    elif kind == "zstd":
        blob = zstd_frames(data, cuts)
    else:
        blob = data
    if kind == "tar" and blob[:2] in (b"\x1f\x8b", b"\x28\xb5"):
        return
    out = io.BytesIO()
    seen = []
    diff_id, size, got_kind = decompress_to(Dribble(blob, seed), out, seen.append)  # type: ignore[arg-type]
    assert out.getvalue() == data and size == len(data) and diff_id == hashlib.sha256(data).hexdigest()
    assert got_kind == kind if data or kind != "tar" else got_kind == "tar"
    assert sum(seen) == len(blob)


@pytest.mark.parametrize("blob,match", [
    (gzip.compress(b"x" * 100_000, mtime=0)[:-9], "truncated gzip"),
    (gzip.compress(b"x" * 100, mtime=0)[:12], "truncated gzip"),
    (gzip.compress(b"x" * 100, mtime=0) + b"garbage", "junk after"),
    (b"\x1f\x8b\x08\x00" + b"\xff" * 40, "gzip"),
    (zstandard.ZstdCompressor().compress(random.Random(1).randbytes(100_000))[:-7], "truncated zstd"),
    (zstandard.ZstdCompressor().compress(b"y" * 1000) + b"junk", "corrupt zstd"),
    (b"\x28\xb5\x2f\xfd" + b"\x00" * 8, "zstd"),
])
def test_corrupt_layers(blob, match):
    with pytest.raises(FormatError, match=match):
        decompress_to(io.BytesIO(blob), io.BytesIO())


def test_gzip_corruption_in_the_middle_is_caught():
    data = random.Random(2).randbytes(300_000)
    blob = bytearray(gzip.compress(data, mtime=0))
    blob[len(blob) // 2] ^= 0x55
    with pytest.raises(FormatError, match="gzip"):
        decompress_to(io.BytesIO(bytes(blob)), Sink())  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_memory_does_not_follow_the_layer_size(kind):
    """A 256 MiB layer of zeros (a bomb: its compressed form is tiny) goes through in pieces
    (with the bomb caps off: they would refuse it, see tests/reliability/test_hostile_tars.py)."""
    size = 256 << 20
    if kind == "gzip":
        co = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        blob = b"".join(co.compress(bytes(1 << 20)) for _ in range(size >> 20)) + co.flush()
    else:
        w = io.BytesIO()
        with zstandard.ZstdCompressor(level=3).stream_writer(w, closefd=False) as z:
            for _ in range(size >> 20):
                z.write(bytes(1 << 20))
        blob = w.getvalue()
    sink = Sink()
    tracemalloc.start()
    try:
        decompress_to(io.BytesIO(blob), sink, limits=None)  # type: ignore[arg-type]
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.n == size
    assert peak < 40 << 20, peak


def test_bootstrap_layer_roundtrip_and_determinism():
    boot = random.Random(3).randbytes(300_000)
    outs = []
    for _ in range(2):
        dst = io.BytesIO()
        digest, size, diff_id = write_bootstrap_layer(io.BytesIO(boot), len(boot), dst)
        blob = dst.getvalue()
        assert digest == hashlib.sha256(blob).hexdigest() and size == len(blob)
        assert diff_id == hashlib.sha256(gzip.decompress(blob)).hexdigest()
        outs.append(blob)
    assert outs[0] == outs[1]
    with tarfile.open(fileobj=io.BytesIO(outs[0]), mode="r:gz") as t:
        assert t.getnames() == ["image", "image/image.boot"]
        m = t.getmember("image/image.boot")
        assert m.mode == 0o644 and m.mtime == 0 and m.uid == 0
    got = io.BytesIO()
    assert extract_bootstrap(io.BytesIO(outs[0]), got) == len(boot) and got.getvalue() == boot


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in entries.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_extract_bootstrap_variants_and_errors():
    got = io.BytesIO()
    extract_bootstrap(io.BytesIO(gzip.compress(_tar({"image.boot": b"legacy"}))), got)  # legacy location
    assert got.getvalue() == b"legacy"
    got = io.BytesIO()
    extract_bootstrap(io.BytesIO(_tar({"./image/image.boot": b"plain tar"})), got)
    assert got.getvalue() == b"plain tar"
    with pytest.raises(FormatError, match="has no image/image.boot"):
        extract_bootstrap(io.BytesIO(gzip.compress(_tar({"image/other": b"x"}))), io.BytesIO())
    with pytest.raises(FormatError, match="not a valid tar.gz"):
        extract_bootstrap(io.BytesIO(gzip.compress(_tar({"image/image.boot": b"x" * 5000}))[:-30]), io.BytesIO())
    with pytest.raises(FormatError, match="more than"):
        extract_bootstrap(io.BytesIO(gzip.compress(_tar({"image/image.boot": b"x" * 5000}))), io.BytesIO(),
                          max_size=100)


def test_inflater_defers_bad_data_to_finish_and_keeps_hashing_the_layer():
    """The converter compares the layer digest first: bad data must not stop the hashing, and
    the error (with nothing written past it) comes from `finish`."""
    good = gzip.compress(random.Random(3).randbytes(200_000), mtime=0)
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0x55
    out, keep = io.BytesIO(), io.BytesIO()
    inf = Inflater(out, None, len(blob), keep)
    for i in range(0, len(blob), 7000):
        inf.feed(bytes(blob[i:i + 7000]))  # no raise while feeding
    assert inf.layer_hash.hexdigest() == hashlib.sha256(blob).hexdigest() and inf.layer_size == len(blob)
    assert keep.getvalue() == bytes(blob)  # the original is copied whole
    with pytest.raises(FormatError, match="corrupt gzip"):
        inf.finish()


def test_inflater_takes_pieces_smaller_than_the_magic():
    data = b"hello tar" * 1000
    blob = zstandard.ZstdCompressor().compress(data)
    out = io.BytesIO()
    inf = Inflater(out, None)
    for i in range(len(blob)):
        inf.feed(blob[i:i + 1])
    assert inf.finish() == (hashlib.sha256(data).hexdigest(), len(data), "zstd") and out.getvalue() == data


def test_an_inflater_without_diff_id_copies_the_same_tar_and_still_checks_the_layer():
    data = random.Random(5).randbytes(300_000)
    blob = gzip.compress(data, mtime=0)
    outs = []
    for want in (True, False):
        out = io.BytesIO()
        inflater = Inflater(out, diff_id=want)
        for pos in range(0, len(blob), 7000):
            inflater.feed(blob[pos:pos + 7000])
        outs.append((inflater.finish(), out.getvalue(), inflater.layer_hash.hexdigest()))
    (hashed, tar1, layer1), (unhashed, tar2, layer2) = outs
    assert hashed == (hashlib.sha256(data).hexdigest(), len(data), "gzip")
    assert unhashed == ("", len(data), "gzip")
    assert tar1 == tar2 == data and layer1 == layer2 == hashlib.sha256(blob).hexdigest()
    broken = Inflater(io.BytesIO(), diff_id=False)
    broken.feed(blob[:-9])
    with pytest.raises(FormatError, match="truncated gzip"):
        broken.finish()
