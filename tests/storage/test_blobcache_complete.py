"""`BlobCacheManager.complete_data`: a blob's data file handed out for the kernel to read
directly only when every chunk is cached and the file checks out; held out of eviction until
released."""

import os

from nydus_py.storage.cache import BlobCacheManager, CompleteData
from nydus_py.storage.cache.blobcache import DATA_SUFFIX, MAP_SUFFIX

from .synth import FakeSource, make_blob


def manager(tmp_path, src, **kw) -> BlobCacheManager:
    return BlobCacheManager(str(tmp_path / "cache"), src, **kw)


def view_of(b) -> bytes:
    """The blob's uncompressed view: each chunk at its uncompressed offset, zeros between."""
    out = bytearray(b.info.uncompressed_size)
    for c, data in zip(b.chunks, b.plain, strict=True):
        out[c.uncompressed_offset:c.uncompressed_offset + len(data)] = data
    return bytes(out)


def test_complete_blob_hands_out_its_data_file(tmp_path):
    b = make_blob(12, seed=1)
    m = manager(tmp_path, FakeSource().add(b))
    try:
        m.read_chunks(b.info, b.chunks[:11])
        reason = m.complete_data(b.info)
        assert reason == "11 of 12 chunks cached"
        m.read_chunks(b.info, b.chunks[11:])
        got = m.complete_data(b.info)
        assert isinstance(got, CompleteData)
        path = os.path.join(m.work_dir, b.info.blob_id + DATA_SUFFIX)
        assert os.fstat(got.fd).st_ino == os.stat(path).st_ino
        assert os.pread(got.fd, b.info.uncompressed_size + 1, 0) == view_of(b)
        got.release()
        got.release()  # idempotent
        assert got.fd == -1
    finally:
        m.close()


def test_pinned_complete_blob_is_never_evicted(tmp_path):
    a = make_blob(8, seed=2, compress=False)
    m = manager(tmp_path, FakeSource().add(a))
    try:
        m.read_chunks(a.info, a.chunks)
        got = m.complete_data(a.info)
        assert isinstance(got, CompleteData)
        m.size_limit = 1  # now far over the limit
        assert m.evict() == 0
        a_data = os.path.join(m.work_dir, a.info.blob_id + DATA_SUFFIX)
        assert os.path.exists(a_data), "a blob handed out for passthrough was evicted"
        assert os.pread(got.fd, 8, 0) == view_of(a)[:8]
        got.release()
        assert m.evict() > 0  # no longer held
        assert not os.path.exists(a_data)
    finally:
        m.close()


def test_damaged_or_validated_blob_is_refused(tmp_path):
    b = make_blob(6, seed=4)
    src = FakeSource().add(b)
    m = manager(tmp_path, src)
    try:
        m.read_chunks(b.info, b.chunks)
        data = os.path.join(m.work_dir, b.info.blob_id + DATA_SUFFIX)
        os.truncate(data, b.info.uncompressed_size - 4096)  # cut from outside
        assert "truncated" in str(m.complete_data(b.info))
    finally:
        m.close()
    m = manager(tmp_path / "v", src, validate=True)
    try:
        m.read_chunks(b.info, b.chunks)
        assert "validation" in str(m.complete_data(b.info))
    finally:
        m.close()
    m = manager(tmp_path / "s", src)
    try:
        m.read_chunks(b.info, b.chunks)
        mp = os.path.join(m.work_dir, b.info.blob_id + MAP_SUFFIX)
        with open(mp, "r+b") as f:  # the integrity stamp damaged behind the cache's back
            f.seek(20)
            f.write(b"\xff\xff\xff\xff")
        assert "chunk map check failed" in str(m.complete_data(b.info))
    finally:
        m.close()
