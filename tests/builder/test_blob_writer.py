"""Blob writer: trailers parsed back independently (tarfile, struct), dedup, fallbacks."""

import hashlib
import io
import os
import struct
import tarfile

import pytest

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.chunk_records import ChunkRecords
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.tree import FileData
from nydus_py.rafs import codec
from nydus_py.rafs.constants import BlobFeatures, ChunkFlags, Compressor, Digester
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.layout_blob import BLOB_META_MAGIC, pack_ci_v1, tar_header, unpack_ci_v1
from nydus_py.rafs.layout_common import pack_chunk, unpack_chunks

CS = 0x4000


def fd(data: bytes) -> FileData:
    return FileData(len(data), lambda: io.BytesIO(data))


def walk_trailers(blob: bytes) -> dict[str, tuple[int, int]]:
    """Sections by tar name -> (offset, size), walking the tar headers backwards from the end."""
    out: dict[str, tuple[int, int]] = {}
    end = len(blob)
    while end > 0:
        hdr = blob[end - 512 : end]
        ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")  # validates the checksum
        start = end - 512 - ti.size
        out[ti.name] = (start, ti.size)
        end = start
        if ti.name == "image.blob":
            assert start == 0
            break
    return out


def parse_toc(blob: bytes, toc_off: int, toc_size: int) -> dict[str, tuple]:
    out = {}
    for i in range(toc_size // 128):
        flags, _r, name, dig, off, csize, usize = struct.unpack_from("<II16s32sQQQ", blob, toc_off + 128 * i)
        out[name.rstrip(b"\0").decode()] = (flags, dig, off, csize, usize)
    return out


def write_blob(tmp_path, files: list[bytes], **kw) -> tuple[BlobWriter, object, list, bytes]:
    opts = BuildOptions(chunk_size=kw.pop("chunk_size", CS), **kw)
    w = BlobWriter(str(tmp_path), opts, blob_index=0)
    chunks = [unpack_chunks(r) for r in w.add_files([fd(d) for d in files])]
    info = w.finish()
    blob = b""
    if info:
        with open(os.path.join(tmp_path, info.blob_id), "rb") as f:
            blob = f.read()
    return w, info, chunks, blob


def test_tar_header_is_gnu_and_parses():
    h = tar_header("blob.meta", 4128)
    assert len(h) == 512 and h[257:265] == b"ustar  \0"
    ti = tarfile.TarInfo.frombuf(h, "utf-8", "strict")
    assert (ti.name, ti.size, ti.type) == ("blob.meta", 4128, tarfile.REGTYPE)
    big = tarfile.TarInfo.frombuf(tar_header("image.blob", 9 << 30), "utf-8", "strict")
    assert big.size == 9 << 30


def test_ci_v1_roundtrip_and_fixture_values():
    # values from the Nydus 2.2 fixture blob be7d77..: (coff, csize, uoff, usize)
    for e in [(0, 4828, 0, 16931), (4828, 2974, 20480, 13400), (1 << 39, 1 << 24, 0xFFF_FFFF_F000, 1 << 24)]:
        assert unpack_ci_v1(pack_ci_v1(*e)) == e
    assert pack_ci_v1(0, 4828, 0, 16931).hex() == "00000000002022040000000000b02d01"
    with pytest.raises(FormatError):
        pack_ci_v1(0, 10, 100, 10)


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE])
@pytest.mark.parametrize("digester", [Digester.BLAKE3, Digester.SHA256])
def test_trailers_parse_back(tmp_path, compressor, digester):
    rnd = os.urandom(3 * CS + 100)
    text = b"nydus chunk " * 5000
    w, info, chunks, blob = write_blob(
        tmp_path, [rnd, text, b"", rnd[:CS]], compressor=compressor, digester=digester
    )
    assert info is not None
    assert info.blob_id == hashlib.sha256(blob).hexdigest()
    assert info.compressed_size == len(blob)
    assert info.features == (
        BlobFeatures.ALIGNED
        | BlobFeatures.CAP_TAR_TOC
        | BlobFeatures.HAS_TAR_HEADER
        | BlobFeatures.HAS_TOC
        | BlobFeatures.INLINED_CHUNK_DIGEST
    )
    secs = walk_trailers(blob)
    assert list(secs) == ["rafs.blob.toc", "blob.digest", "blob.meta", "image.blob"]

    # ToC: digest over entries + header, every entry's hash checks out
    toc_off, toc_size = secs["rafs.blob.toc"]
    assert info.blob_toc_size == toc_size + 512
    assert hashlib.sha256(blob[toc_off:]).digest() == info.blob_toc_digest
    toc = parse_toc(blob, toc_off, toc_size)
    assert list(toc) == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    for name, (flags, dig, off, csize, usize) in toc.items():
        raw = blob[off : off + csize]
        if name == "blob.meta" and flags != 1:
            raw = codec.decompress(info.ci_compressor, raw, usize)
        assert hashlib.sha256(raw).digest() == dig, name
    assert toc["image.blob"][2:] == (0, secs["image.blob"][1], info.uncompressed_size)

    # blob.meta = array + 4096-byte header with both magics; tar size covers both
    meta_off, meta_size = secs["blob.meta"]
    assert meta_off == info.ci_offset and meta_size == info.ci_compressed_size + 4096
    hdr = blob[meta_off + info.ci_compressed_size : meta_off + meta_size]
    magic, feats, ci_comp, entries, ci_off, ci_c, ci_u = struct.unpack_from("<IIIIQQQ", hdr)
    assert magic == BLOB_META_MAGIC and struct.unpack_from("<I", hdr, 4092)[0] == BLOB_META_MAGIC
    assert (feats, ci_comp, entries, ci_off, ci_c, ci_u) == (
        int(info.features),
        int(info.ci_compressor),
        info.chunk_count,
        info.ci_offset,
        info.ci_compressed_size,
        info.ci_uncompressed_size,
    )
    raw_ci = blob[ci_off : ci_off + ci_c]
    if info.ci_compressor != Compressor.NONE:
        assert ci_c < ci_u
        raw_ci = codec.decompress(info.ci_compressor, raw_ci, ci_u)
    assert ci_u == 16 * info.chunk_count
    digests_off, digests_size = secs["blob.digest"]
    assert digests_size == 32 * info.chunk_count

    # every blob.meta entry decodes to data matching blob.digest and the chunk records
    stored = {c.index: c for file in chunks for c in file}
    assert sorted(stored) == list(range(info.chunk_count))
    prev_end = 0
    for i in range(info.chunk_count):
        coff, csize, uoff, usize = unpack_ci_v1(raw_ci[16 * i : 16 * i + 16])
        assert uoff % 4096 == 0 and uoff >= prev_end
        prev_end = uoff + usize
        c = stored[i]
        assert (c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size) == (
            coff,
            csize,
            uoff,
            usize,
        )
        data = blob[coff : coff + csize]
        assert c.compressed == (csize != usize) == bool(c.flags & ChunkFlags.COMPRESSED)
        if c.compressed:
            data = codec.decompress(compressor, data, usize)
        assert (
            codec.digest(digester, data) == blob[digests_off + 32 * i : digests_off + 32 * i + 32] == c.digest
        )
        assert codec.crc32c(data) == c.crc32 and c.flags & ChunkFlags.HAS_CRC32
    assert info.uncompressed_size == (prev_end + 4095) // 4096 * 4096

    # file chunk lists: dense, in file order; the last file is fully deduplicated
    assert [c.file_offset for c in chunks[0]] == [0, CS, 2 * CS, 3 * CS]
    assert chunks[2] == []
    assert chunks[3][0]._replace(file_offset=0) == chunks[0][0]
    assert w.deduplicated >= 1


def test_incompressible_chunks_stay_raw(tmp_path):
    rnd = os.urandom(CS)
    _w, info, chunks, blob = write_blob(tmp_path, [rnd, b"a" * CS])
    raw, packed = chunks[0][0], chunks[1][0]
    assert not raw.compressed and raw.compressed_size == CS
    assert blob[raw.compressed_offset : raw.compressed_offset + CS] == rnd
    assert packed.compressed and packed.compressed_size < CS


def test_dedup_against_existing_and_no_blob_when_nothing_new(tmp_path):
    data = os.urandom(2 * CS)
    w1, info1, chunks1, _ = write_blob(tmp_path / "a", [data])
    existing = ChunkRecords()
    for c in chunks1[0]:
        existing.add(pack_chunk(c))
    opts = BuildOptions(chunk_size=CS)
    w2 = BlobWriter(str(tmp_path / "b"), opts, blob_index=1, existing=existing)
    got = [unpack_chunks(r) for r in w2.add_files([fd(data[CS:] + data[:CS]), fd(b"")])]
    assert w2.finish() is None
    assert not (tmp_path / "b").exists() or os.listdir(tmp_path / "b") == []
    assert [c.blob_index for c in got[0]] == [0, 0]
    assert got[0][0]._replace(file_offset=0) == chunks1[0][1]._replace(file_offset=0)
    assert got[0][1].file_offset == CS and w2.deduplicated == 2


def test_zero_chunks_dedup_and_partial_new(tmp_path):
    zeros = b"\0" * (5 * CS)
    w, info, chunks, _ = write_blob(tmp_path, [zeros, zeros + b"x"])
    assert info.chunk_count == 2  # one zero chunk + the 1-byte tail
    assert w.deduplicated == 9
    assert len({c.uncompressed_offset for c in chunks[0]}) == 1


def test_output_is_deterministic_across_worker_counts(tmp_path):
    files = [os.urandom(n) for n in (0, 1, CS - 1, CS, 7 * CS + 3)] + [b"abc" * 9000] * 3
    ids = []
    for workers in (1, 4):
        w = BlobWriter(str(tmp_path / str(workers)), BuildOptions(chunk_size=CS), 0, workers=workers)
        w.add_files([fd(d) for d in files])
        ids.append(w.finish().blob_id)
    assert ids[0] == ids[1]


def test_without_blob_toc_and_explicit_id(tmp_path):
    _w, info, _c, blob = write_blob(tmp_path, [b"q" * 100], blob_toc=False, blob_id="b" * 64)
    assert info.blob_id == "b" * 64 and os.path.exists(tmp_path / ("b" * 64))
    assert info.features == BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC
    assert info.blob_toc_size == 0 and info.blob_toc_digest == b"\0" * 32
    assert len(blob) == info.ci_offset + info.ci_compressed_size + 4096  # no tar headers


def test_short_file_is_format_error_and_leaves_nothing(tmp_path):
    w = BlobWriter(str(tmp_path), BuildOptions(chunk_size=CS), 0)
    with pytest.raises(FormatError, match="ended after"), w:
        w.add_files([FileData(3 * CS, lambda: io.BytesIO(b"x" * CS))])
    assert [n for n in os.listdir(tmp_path)] == []


def test_chunk_records_keep_the_first_record_per_digest(tmp_path):
    _w, _info, chunks, _ = write_blob(tmp_path, [os.urandom(2 * CS), os.urandom(CS)])
    a, b, c = chunks[0][0], chunks[0][1], chunks[1][0]
    lower = ChunkRecords()
    assert lower.add(pack_chunk(a)) and not lower.add(pack_chunk(a._replace(index=99)))
    upper = ChunkRecords()
    upper.add(pack_chunk(b._replace(blob_index=1)))
    upper.add(pack_chunk(a._replace(blob_index=1)))  # lower's stays
    upper.add(pack_chunk(c._replace(blob_index=1)))
    lower.update(upper)
    assert len(upper) == 0 and list(lower) == [a.digest, b.digest, c.digest]
    got = unpack_chunks(lower.get(a.digest, 7 * CS) + lower.get(b.digest, 0))
    assert got == [a._replace(file_offset=7 * CS), b._replace(blob_index=1, file_offset=0)]
    assert lower.get(b"\1" * 32, 0) is None
    fresh = ChunkRecords()
    fresh.update(lower)  # an empty map takes the storage over
    assert len(lower) == 0 and list(fresh) == [a.digest, b.digest, c.digest]
