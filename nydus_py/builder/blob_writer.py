"""Writing one Nydus data blob: chunked, deduplicated, compressed file data plus trailers.

Layout (spec section 5.1, as nydus-image >= 2.2 writes it with `--features blob-toc`):

    chunk data | [tar "image.blob"] | blob.meta array + 4096-byte header | [tar "blob.meta"]
    | [blob.digest | tar "blob.digest"] | [ToC entries | tar "rafs.blob.toc"]

Bracketed parts are written only with `BuildOptions.blob_toc`. Tar headers follow the data they
describe so a reader can walk the blob backwards from its end.

For RAFS v5 (`opts.fs_version == 5`) the blob is plain chunk data, as nydus-image writes it for
v5 (blob.meta is v6-only there and `--features blob-toc` is refused with v5): no trailers, chunks'
uncompressed offsets packed back to back (no 4K alignment), features CAP_TAR_TOC only, and
`blob_toc` is ignored. v5 readers locate chunks through the bootstrap's chunk records alone.

Chunks are digested, CRC'd and compressed in a thread pool (zstd, lz4, blake3, hashlib and crc32c
release the GIL), but decisions (dedup, offsets, chunk indexes) are taken in submission order, so
the blob is byte-for-byte deterministic whatever the scheduling. A converted layer
(`spill_file` with `archive_order`) stores its chunks in the tar's order as it is parsed, as
upstream's tarball builder does (`Node::dump_node_data_with_reader` while it walks the tar): a
file a later member of the same tar replaces keeps its chunks in the blob, as there.

One deviation from nydus, on purpose: the ToC entry `image.blob` records offset 0 and the sha256
of the chunk data region, where nydus writes the data size as offset and hashes data + tar header
(spec 5.4 calls that a quirk nobody may rely on).
"""

import bisect
import contextlib
import dataclasses
import errno
import hashlib
import os
import tempfile
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ..rafs import codec
from ..rafs.constants import BlobFeatures, ChunkFlags, Compressor
from ..rafs.errors import FormatError
from ..rafs.layout_blob import (
    BLOB_NAME,
    CI_V1_ENTRY_SIZE,
    DIGEST_NAME,
    META_HEADER_NAME,
    META_NAME,
    TOC_FLAGS,
    TOC_NAME,
    pack_blob_meta_header,
    pack_ci_v1,
    pack_toc_entry,
    tar_header,
    unpack_ci_v1,
)
from ..rafs.layout_common import CHUNK, CHUNK_RECORD_SIZE, U32, unpack_chunk, unpack_chunks
from ..rafs.layout_v6 import EROFS_BLOCK_SIZE
from ..rafs.model import BlobInfo, ChunkInfo
from .chunk_records import ChunkLookup, ChunkRecords
from .options import BuildOptions
from .tree import FileData

MAX_CI_INDEX = 1 << 24  # v6 chunk indexes carry 24 bits of ci_index
_BATCH_BYTES = 256 << 10  # chunks smaller than this go to the workers together ...
_BATCH_CHUNKS = 64  # ... up to this many
_WRITE_GATHER = 1 << 20
_WRITE_PARTS = 256  # at most this many pieces per writev (IOV_MAX is 1024)


def blob_features(blob_toc: bool) -> BlobFeatures:
    """Feature word of a blob this writer produces (blob table and blob.meta header)."""
    f = BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC
    if blob_toc:
        f |= BlobFeatures.HAS_TAR_HEADER | BlobFeatures.HAS_TOC | BlobFeatures.INLINED_CHUNK_DIGEST
    return f


class BlobWatch(Protocol):
    """Hears how far the blob file has been written, so a reader can follow it while it grows
    (convert uploads a layer's blob as it is written). The file only ever grows: bytes once
    announced never change."""

    def opened(self, path: str) -> None:
        """The (still unnamed) blob file exists at `path`, empty; called in the building thread
        (a reader opens it now: the file is renamed when finished, unlinked when dropped)."""

    def grew(self, size: int) -> None:
        """The file's first `size` bytes are written (the writer thread)."""

    def closed(self, blob_id: str | None) -> None:
        """The blob is complete as `blob_id` (every byte announced), or None: dropped (aborted,
        no chunk stored, or to be written again elsewhere), its bytes no blob of the image."""


class ChunkSource(Protocol):
    """Where `BlobWriter.spill_file` reads a file's bytes (a layer tar's backing file)."""

    def pread(self, offset: int, n: int) -> bytes: ...


@dataclass
class _Prepared:
    """Worker output for one chunk; `packed` is shared by every occurrence of the digest."""

    digest: bytes
    crc: int
    size: int
    packed: "Future[tuple[bytes, bool]] | None"  # None: already in an existing blob


class BlobWriter:
    """Cuts files into chunks and writes the new blob of one build.

    `blob_index` is the position the new blob will take in the image's blob table; `existing`
    holds the chunk records (blob_index already relative to that table) of chunks that other
    blobs of the image hold: identical chunks are referenced there instead of stored again.
    Digests must come from the same digester as `opts.digester`. Chunks are packed records
    throughout (`chunk_records`), never a Python object per chunk.
    """

    def __init__(
        self,
        blob_dir: str,
        opts: BuildOptions,
        blob_index: int,
        existing: ChunkLookup | None = None,
        workers: int | None = None,
        durable: bool = True,
        settle: Callable[[bytes], None] | None = None,
        archive_order: bool = False,
        watch: BlobWatch | None = None,
    ) -> None:
        if opts.compressor not in TOC_FLAGS:
            raise ValueError(f"compressor {opts.compressor.nydus_name} cannot be used for RAFS v6 blobs")
        self.opts = opts
        self.blob_dir = blob_dir
        self.blob_index = blob_index
        self.existing: ChunkLookup = existing if existing is not None else ChunkRecords()
        # called (blob order) for a spilled chunk `existing` does not hold: a blob below that is
        # still being written and may store it is waited for (see `spill_pending`)
        self.settle = settle
        # `spill_file` stores each new chunk in the blob at once, in the order files come (a
        # tar's, as upstream's tarball builder dumps them): no spill, no second pass; the blob's
        # bytes (and sha256) grow while the layer is chunked (`written`)
        self.archive_order = archive_order
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        # fsync the finished blob (an output file); a blob that is uploaded and deleted at once
        # (convert) skips it: the fsync cost ~20-100 ms per blob on the path to its upload
        self.durable = durable
        self.watch = watch  # told of the blob file's growth (a reader follows it)
        self._watched = watch is not None  # `watch` has yet to hear of the blob's end (once)
        self._announce = False  # `watch` was told of the file: it hears of its growth
        self._written = 0  # bytes in the file (writer thread)
        # RAFS v5: plain chunk data, unaligned, no trailers (see the module docstring)
        self.plain = opts.fs_version == 5
        self.features = BlobFeatures.CAP_TAR_TOC if self.plain else blob_features(opts.blob_toc)
        # results, filled in order
        self.chunks = ChunkRecords()  # the chunks stored in this blob, by index
        self.ci_entries = bytearray()
        self.digests = bytearray()
        self.deduplicated = 0
        self.late_deduplicated = 0  # of those, chunks spilled and then found below (`add_spilled_stream`)
        self.uncompressed_bytes = 0  # file bytes consumed (all references)
        self.stored_uncompressed = 0  # bytes of distinct new chunks
        self.stored_compressed = 0
        self._uoff = 0
        self._lock = threading.Lock()
        self._packing: dict[bytes, Future[tuple[bytes, bool]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._fd: int | None = None
        self._tmp: str | None = None
        self._pos = 0
        self._hash = hashlib.sha256()
        self.path: str | None = None  # the finished blob file
        self._writer: ThreadPoolExecutor | None = None
        self._writes: deque[Future[None]] = deque()
        self._wbuf: list[bytes] = []  # small writes gathered for the writer thread
        self._wsize = 0
        self._closed = False
        # archive order first (`spill_file`), blob order after (`add_spilled_stream`)
        self._spill_fd: int | None = None
        self._spill_pos = 0
        self._spilled = ChunkRecords()  # digest -> record whose compressed_offset is in the spill
        # each spilled file's chunk digests, packed (no object per file: a layer has 100k of them):
        # file keys (increasing, as a tar's data offsets are), where each file's digests start
        self._spill_file_keys = array("q")
        self._spill_file_starts = array("q")
        self._spill_digests = bytearray()
        self._spill_items: deque[tuple[Future[list[bytes]], list[int]]] = deque()
        self._spill_batch: list[bytes] = []
        self._spill_keys: list[int] = []
        self._spill_bytes = 0
        self._spill_closed = threading.Event()  # the blob-order write is done (or given up)
        # archive order: signalled when chunks leave `_packing` (stored, or found below) and at
        # the close, for a layer above waiting on one of them (`wait_chunk`)
        self._settled = threading.Condition(self._lock)
        self._chunk_waiters = 0
        # archive order: each spilled file's chunk records (same keys/starts as the digests)
        self._file_records = bytearray()
        self._direct_items: deque[tuple[Future[list[_Prepared]], list[tuple[int, int]]]] = deque()
        self._direct_places: list[tuple[int, int]] = []  # (record slot, file offset) per batch chunk
        self.spill_writes = 0  # pwritev calls into the spill (one per batch with a new chunk)
        self.spill_reads = 0  # preads of the spill (a window serves the small chunks near each other)

    # -- chunk pipeline -------------------------------------------------------------------------

    def _prepare(self, data: bytes) -> _Prepared:
        """Worker: digest + CRC, and compression once per new digest."""
        d = codec.digest(self.opts.digester, data)
        crc = codec.crc32c(data)
        own: Future[tuple[bytes, bool]] | None = None
        with self._lock:
            if d in self.chunks:
                return _Prepared(d, crc, len(data), None)
            fut = self._packing.get(d)
            if fut is None:
                if d in self.existing:
                    return _Prepared(d, crc, len(data), None)
                fut = own = Future()
                self._packing[d] = fut
        if own is not None:
            try:
                own.set_result(self._pack(data))
            except BaseException as e:
                own.set_exception(e)
        return _Prepared(d, crc, len(data), fut)

    def _pack(self, data: bytes) -> tuple[bytes, bool]:
        if self.opts.compressor == Compressor.NONE:
            return data, False
        out = codec.compress(self.opts.compressor, data)
        if len(out) < len(data):
            return out, True
        return data, False

    def _open(self) -> None:
        if self._fd is None:
            os.makedirs(self.blob_dir, exist_ok=True)
            self._fd, self._tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=".blob-", suffix=".tmp")
            if self.watch is not None:
                self.watch.opened(self._tmp)
                self._announce = True

    def _write(self, data: "bytes | bytearray") -> None:
        """Queue `data` for the writer thread (file write + blob sha256 overlap chunk work).
        Small pieces are gathered up to 1 MiB (one hand-off each), as a list written with one
        writev: big pieces are never copied (a copy holds the GIL); runs of small ones are joined
        by the writer thread (`_coalesce`: one hash update each, not one per chunk)."""
        self._pos += len(data)
        self._wbuf.append(bytes(data) if isinstance(data, bytearray) else data)  # (a bytearray may change)
        self._wsize += len(data)
        if self._wsize >= _WRITE_GATHER or len(self._wbuf) >= _WRITE_PARTS:
            self._send(self._wbuf)
            self._wbuf, self._wsize = [], 0

    def _send(self, parts: list[bytes]) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="nydus-blob-write")
        self._writes.append(self._writer.submit(self._write_now, parts))
        # bounded memory: a few MiB queued (in archive order this overlaps the chunk window)
        while len(self._writes) > (2 if self.archive_order else 4):
            self._writes.popleft().result()

    def _write_now(self, parts: list[bytes]) -> None:
        assert self._fd is not None
        parts = _coalesce(parts)
        _writev_all(self._fd, parts)
        for p in parts:
            self._hash.update(p)
            self._written += len(p)
        if self._announce:
            assert self.watch is not None
            self.watch.grew(self._written)

    def _flush(self) -> None:
        if self._wbuf:
            self._send(self._wbuf)
            self._wbuf, self._wsize = [], 0
        while self._writes:
            self._writes.popleft().result()

    def _commit(self, prep: _Prepared, file_offset: int) -> bytes:
        """Consumer side, in submission order: reference or store the chunk; its packed record."""
        known = self.chunks.get(prep.digest, file_offset)
        if known is None and prep.packed is None:
            # another blob holds it (the worker saw it in `existing`)
            self.deduplicated += 1
            other = self.existing.get(prep.digest, file_offset)
            assert other is not None
            return other
        if known is not None:
            self.deduplicated += 1
            return known
        assert prep.packed is not None
        if self.archive_order and self.settle is not None:
            # a layer below, prepared beside this one, may have it by now, or be about to store
            # it (pending there): referenced then, not stored twice (else the commit writes this
            # blob again without it; the result is the same either way)
            other = self.existing.get(prep.digest, file_offset)
            if other is None:
                self.settle(prep.digest)
                other = self.existing.get(prep.digest, file_offset)
            if other is not None:
                with self._lock:
                    self._packing.pop(prep.digest, None)
                    if self._chunk_waiters:
                        self._settled.notify_all()
                self.deduplicated += 1
                self.late_deduplicated += 1
                return other
        stored, compressed = prep.packed.result()
        flags = ChunkFlags.HAS_CRC32 | (ChunkFlags.COMPRESSED if compressed else ChunkFlags(0))
        return self._store(prep.digest, stored, flags, prep.size, prep.crc, file_offset)

    def _store(self, digest: bytes, stored: bytes, flags: ChunkFlags, size: int, crc: int, file_offset: int) -> bytes:
        """Append one chunk's stored bytes; its packed record (in this blob, at `file_offset`)."""
        index = len(self.chunks)
        limit = 1 << 32 if self.plain else MAX_CI_INDEX  # v5 records: u32 index; v6: 24 bits
        if index >= limit:
            raise FormatError(f"blob would hold more than {limit} chunks; use a bigger chunk size")
        self._open()
        uoff = self._uoff
        if not self.plain:
            self.ci_entries += pack_ci_v1(self._pos, len(stored), uoff, size)
            self.digests += digest
        record = CHUNK.pack(
            digest,
            self.blob_index,
            int(flags),
            len(stored),
            size,
            self._pos,
            uoff,
            file_offset,
            index,
            crc,
        )
        self._write(stored)
        unaligned = self.plain and not self.opts.aligned_chunk
        self._uoff = uoff + size if unaligned else _align(uoff + size, EROFS_BLOCK_SIZE)
        self.stored_uncompressed += size
        self.stored_compressed += len(stored)
        with self._lock:
            self.chunks.add(record)
            self._packing.pop(digest, None)
        return record

    def add_stored(self, chunk: ChunkInfo, stored: bytes) -> bytes:
        """Copy a chunk as another blob stores it (`stored`: its compressed bytes, same
        compressor and digester as this blob; compaction): its packed record here, keeping its
        digest, flags and CRC. A chunk whose digest this blob already holds is referenced, not
        stored twice."""
        if self._closed:
            raise RuntimeError("BlobWriter already finished")
        if len(stored) != chunk.compressed_size:
            raise FormatError(f"chunk {chunk.digest.hex()[:12]}: {len(stored)} stored bytes, the record says "
                              f"{chunk.compressed_size}")
        known = self.chunks.get(chunk.digest, chunk.file_offset)
        if known is not None:
            self.deduplicated += 1
            return known
        self.uncompressed_bytes += chunk.uncompressed_size
        return self._store(chunk.digest, stored, chunk.flags, chunk.uncompressed_size, chunk.crc32, chunk.file_offset)

    def add_files(self, files: Iterable[FileData]) -> list[bytes]:
        """Chunk lists (file order, `file_offset` set) for each of `files`, in order, each as
        packed chunk records (`ChunkedData.chunks`)."""
        results: list[bytes] = []
        self.add_files_stream(files, lambda _i, chunks: results.append(chunks))
        return results

    def add_files_stream(self, files: Iterable[FileData], done: Callable[[int, bytes], None]) -> None:
        """Write `files` (an iterable: each is opened once, in order), calling `done(i, chunks)`
        with the packed chunk records of the i-th file as soon as it is complete, in order; only
        the files of the in-flight window are held here.

        All files share one pipeline so small files keep every worker busy.
        """
        if self._closed:
            raise RuntimeError("BlobWriter already finished")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nydus-blob")
        pool = self._pool
        cs = self.opts.chunk_size
        window = self.workers + 2  # work items in flight (each up to ~1 MiB in, ~1 MiB out)
        partial: dict[int, bytearray] = {}  # files with chunks in flight
        # work items in chunk order: a future of one chunk, or of a batch of small ones (one
        # hand-off per batch, not per chunk: thread wake-ups cost more than hashing 4 KiB)
        items: deque[tuple[Future[list[_Prepared]], list[tuple[int, int]]]] = deque()
        batch: list[bytes] = []
        where: list[tuple[int, int]] = []  # (file, offset) of each chunk of `batch`
        batch_bytes = 0
        nfiles = 0
        finished = 0  # files [0, finished) were reported

        def report(upto: int) -> None:
            nonlocal finished
            while finished < upto:
                got = partial.pop(finished, None)
                done(finished, bytes(got) if got is not None else b"")
                finished += 1

        def submit() -> None:
            nonlocal batch, where, batch_bytes
            if batch:
                items.append((pool.submit(self._prepare_all, batch), where))
                batch, where, batch_bytes = [], [], 0

        def drain(limit: int) -> None:
            while len(items) > limit:
                fut, places = items.popleft()
                for prep, (fidx, foff) in zip(fut.result(), places, strict=True):
                    report(fidx)  # files before this chunk's are complete
                    partial[fidx] += self._commit(prep, foff)

        try:
            for fdata in files:
                fidx = nfiles
                nfiles += 1
                if fdata.size <= 0:
                    if not items and not batch:
                        report(nfiles)
                    continue
                partial[fidx] = bytearray()
                with fdata.open() as stream:
                    off = 0
                    while off < fdata.size:
                        want = min(cs, fdata.size - off)
                        buf = _read_exact(stream, want)
                        if len(buf) != want:
                            raise FormatError(
                                f"file data ended after {off + len(buf)} bytes, expected {fdata.size}"
                            )
                        self.uncompressed_bytes += want
                        batch.append(buf)
                        where.append((fidx, off))
                        batch_bytes += want
                        if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_CHUNKS:
                            submit()
                            drain(window)
                        off += want
            submit()
            drain(0)
            report(nfiles)
        except BaseException:
            for fut, _ in items:
                fut.cancel()
            raise

    # -- archive order first, blob order after (a layer chunked while it downloads) -------------

    def spill_file(self, source: "ChunkSource", key: int, size: int) -> None:
        """Chunk a file now, in the order files come (a tar's). In archive order, its new chunks
        are stored in the blob now (`_direct_file`); otherwise, as follows. Digest, CRC and - for a chunk
        neither this blob nor `existing` holds - compression, the stored bytes going to an
        anonymous spill file. `source.pread(key + off, n)` gives its bytes (`key`: the file's
        offset in the source, which names it for `add_spilled_stream`). Then
        `spill_finish`, and `add_spilled_stream` writes the blob in its own order from the
        spill: the same blob as `add_files_stream` over the same files (no chunk is digested
        or compressed twice, so the work can run while the archive is still arriving)."""
        if self._closed:
            raise RuntimeError("BlobWriter already finished")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nydus-blob")
        if self.archive_order:
            self._open()  # (the blob file is what a spill was)
            self._direct_file(source, key, size)
            return
        if self._spill_fd is None:
            os.makedirs(self.blob_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=".spill-", suffix=".tmp")
            os.unlink(tmp)  # anonymous: gone with its fd, whatever happens
            self._spill_fd = fd
        self._queue_chunks(source, key, size, self._spill_digests, 32, direct=False)

    def _queue_chunks(self, source: "ChunkSource", key: int, size: int, table: bytearray, unit: int, *,
                      direct: bool) -> None:
        """Queue file `key`'s chunks for the workers, in batches, each with its slot in `table`
        (`unit` bytes a chunk: a digest for the spill, a chunk record in archive order)."""
        cs = self.opts.chunk_size
        keys = self._spill_file_keys
        if keys and key <= keys[-1]:
            raise ValueError(f"spill_file: file key {key} after {keys[-1]} (keys must increase)")
        slot = len(table)
        keys.append(key)
        self._spill_file_starts.append(slot)
        table += bytes(unit * chunk_count(size, cs))
        off = 0
        while off < size:
            want = min(cs, size - off)
            self._spill_batch.append(source.pread(key + off, want))
            if direct:
                self._direct_places.append((slot, off))
            else:
                self._spill_keys.append(slot)
            slot += unit
            self._spill_bytes += want
            if self._spill_bytes >= _BATCH_BYTES or len(self._spill_batch) >= _BATCH_CHUNKS:
                if direct:
                    self._direct_submit()
                    self._direct_drain(self.workers + 2)
                else:
                    self._spill_submit()
                    self._spill_drain(self.workers + 2)
            off += want

    def _spill_submit(self) -> None:
        if self._spill_batch:
            assert self._pool is not None
            self._spill_items.append((self._pool.submit(self._spill_all, self._spill_batch), self._spill_keys))
            self._spill_batch, self._spill_keys, self._spill_bytes = [], [], 0

    def _spill_drain(self, limit: int) -> None:
        items = self._spill_items
        while len(items) > limit:
            fut, slots = items.popleft()
            digests = self._spill_digests
            for digest, slot in zip(fut.result(), slots, strict=True):
                digests[slot:slot + 32] = digest

    def spill_finish(self) -> None:
        """Wait for the chunks of every `spill_file` so far."""
        try:
            if self.archive_order:
                self._direct_submit()
                self._direct_drain(0)
                return
            self._spill_submit()
            self._spill_drain(0)
        except BaseException:
            for fut, _ in self._spill_items:
                fut.cancel()
            for dfut, _ in self._direct_items:
                dfut.cancel()
            raise

    # -- archive order: the blob written as the files come ----------------------------------------

    def _direct_file(self, source: "ChunkSource", key: int, size: int) -> None:
        """`spill_file` in archive order: the chunks go through the workers (`_prepare_batch`)
        and are stored (or referenced) in submission order by `_direct_drain`, as
        `add_files_stream` does: the same decisions at any thread timing."""
        self._queue_chunks(source, key, size, self._file_records, CHUNK_RECORD_SIZE, direct=True)

    def _direct_submit(self) -> None:
        if self._spill_batch:
            assert self._pool is not None
            self._direct_items.append((self._pool.submit(self._prepare_batch, self._spill_batch),
                                       self._direct_places))
            self._spill_batch, self._direct_places, self._spill_bytes = [], [], 0

    def _direct_drain(self, limit: int) -> None:
        items, records = self._direct_items, self._file_records
        while len(items) > limit:
            fut, places = items.popleft()
            for prep, (slot, foff) in zip(fut.result(), places, strict=True):
                records[slot:slot + CHUNK_RECORD_SIZE] = self._commit(prep, foff)
            if self._chunk_waiters:
                with self._settled:
                    self._settled.notify_all()

    def _prepare_batch(self, bufs: list[bytes]) -> list[_Prepared]:
        """Worker: `_prepare` of each chunk, the new ones compressed together
        (`codec.compress_many`: one GIL hand-off for a batch of small chunks)."""
        out: list[_Prepared] = []
        own: list[tuple[Future[tuple[bytes, bool]], bytes]] = []
        for data in bufs:
            d = codec.digest(self.opts.digester, data)
            crc = codec.crc32c(data)
            fut: Future[tuple[bytes, bool]] | None = None
            with self._lock:
                if d not in self.chunks:
                    fut = self._packing.get(d)
                    if fut is None and d not in self.existing:
                        fut = Future()
                        self._packing[d] = fut
                        own.append((fut, data))
            out.append(_Prepared(d, crc, len(data), fut))
        if own:
            try:
                if self.opts.compressor == Compressor.NONE:
                    packed: list[tuple[bytes, bool]] = [(data, False) for _f, data in own]
                else:
                    outs = codec.compress_many(self.opts.compressor, [data for _f, data in own])
                    # (small chunks only come more than one a batch: copied out of its buffer)
                    packed = [(bytes(c), True) if len(c) < len(data) else (data, False)
                              for c, (_f, data) in zip(outs, own, strict=True)]
            except BaseException as e:
                for f, _data in own:
                    f.set_exception(e)
                raise
            for (f, _data), got in zip(own, packed, strict=True):
                f.set_result(got)
        return out

    def written(self) -> int:
        """Bytes of the blob handed to its writer so far (archive order: they reach the file
        in order, behind the chunking)."""
        return self._pos

    def _spill_all(self, bufs: list[bytes]) -> list[bytes]:
        """Worker: each chunk's digest; the new ones are compressed together
        (`codec.compress_many`) and appended to the spill with one pwritev per batch (a pwrite
        and a compression call per chunk each gave the GIL up and took it back once per small
        file: under contention each such hand-off waits for the GIL again)."""
        out: list[bytes] = []
        new: list[tuple[bytes, bytes, int]] = []  # digest, data, crc
        taken: set[bytes] = set()  # (a chunk twice in the batch is compressed once)
        for data in bufs:
            d = codec.digest(self.opts.digester, data)
            out.append(d)
            if d in taken:
                continue
            with self._lock:
                if d in self._spilled:
                    continue
            if d in self.existing:
                continue
            taken.add(d)
            new.append((d, data, codec.crc32c(data)))
        if not new:
            return out
        if self.opts.compressor == Compressor.NONE:
            packed: list[bytes | memoryview] = [data for _d, data, _c in new]
        else:
            packed = codec.compress_many(self.opts.compressor, [data for _d, data, _c in new])
        parts: list[bytes | memoryview] = []
        with self._lock:  # the batch's new chunks take one contiguous run of the spill
            start = pos = self._spill_pos
            for (d, data, crc), out_c in zip(new, packed, strict=True):
                if d in self._spilled:  # another worker (or this batch) had the same chunk
                    continue
                compressed = self.opts.compressor != Compressor.NONE and len(out_c) < len(data)
                stored = out_c if compressed else data
                flags = ChunkFlags.HAS_CRC32 | (ChunkFlags.COMPRESSED if compressed else ChunkFlags(0))
                self._spilled.add(CHUNK.pack(d, 0, int(flags), len(stored), len(data), pos, 0, 0, 0, crc))
                parts.append(stored)
                pos += len(stored)
            self._spill_pos = pos
        assert self._spill_fd is not None
        self.spill_writes += 1
        _writev_all(self._spill_fd, parts, start)
        return out

    def add_spilled_stream(self, files: Iterable[tuple[int, int]], done: Callable[[int, bytes], None]) -> None:
        """Write the blob from the spill: `files` are (key, size) of files given to
        `spill_file`, in blob order; `done(i, chunks)` as in `add_files_stream`."""
        if self._closed:
            raise RuntimeError("BlobWriter already finished")
        if self.archive_order:
            self._spilled_records(files, done)
            return
        cs = self.opts.chunk_size
        spilled = self._spilled
        assert self._spill_fd is not None or not self._spill_file_keys
        spill = _SpillReader(self._spill_fd if self._spill_fd is not None else -1)
        all_digests = self._spill_digests
        for i, (key, size) in enumerate(files):
            start, end = self._spilled_span(key, size, all_digests, 32)
            digests = all_digests[start:end]
            out = bytearray()
            for k in range(len(digests) // 32):
                d = bytes(digests[32 * k:32 * k + 32])
                foff = k * cs
                self.uncompressed_bytes += min(cs, size - foff)
                known = self.chunks.get(d, foff)
                if known is not None:
                    self.deduplicated += 1
                    out += known
                    continue
                rec = spilled.get(d, 0)
                # `existing` had it when it was looked at; or it has it now: a layer below, prepared
                # beside this one, stored it meanwhile (referenced, not stored twice: the commit
                # then need not write this blob again without it)
                other = self.existing.get(d, foff)
                if other is None and rec is not None and self.settle is not None:
                    self.settle(d)
                    other = self.existing.get(d, foff)
                if other is not None:
                    self.deduplicated += 1
                    self.late_deduplicated += rec is not None
                    out += other
                    continue
                assert rec is not None
                (_d, _bi, flags, c_size, u_size, c_off, _uo, _fo, _ix, crc) = CHUNK.unpack(rec)
                stored = spill.read(c_off, c_size)
                out += self._store(d, stored, ChunkFlags(flags), u_size, crc, foff)
            done(i, bytes(out))
        self.spill_reads += spill.reads
        self._close_spill()

    def _spilled_records(self, files: Iterable[tuple[int, int]], done: Callable[[int, bytes], None]) -> None:
        """Archive order: the chunk records `spill_file` kept for each of `files`."""
        records = self._file_records
        for i, (key, size) in enumerate(files):
            start, end = self._spilled_span(key, size, records, CHUNK_RECORD_SIZE)
            self.uncompressed_bytes += size
            done(i, bytes(records[start:end]))
        self._file_records = bytearray()
        self._close_spill()

    def _spilled_span(self, key: int, size: int, table: bytearray, unit: int) -> tuple[int, int]:
        """Where file `key`'s slots (`unit` bytes a chunk) lie in `table`, as `_queue_chunks`
        placed them; AssertionError if the file was not given to `spill_file` whole."""
        keys, starts = self._spill_file_keys, self._spill_file_starts
        j = bisect.bisect_left(keys, key)
        if j == len(keys) or keys[j] != key:
            raise AssertionError(f"file at {key} was not spilled")
        start = starts[j]
        end = starts[j + 1] if j + 1 < len(starts) else len(table)
        if end - start != unit * chunk_count(size, self.opts.chunk_size):
            raise AssertionError(f"file at {key} was not spilled whole")
        return start, end

    def _close_spill(self) -> None:
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
        with self._lock:
            self._spilled = ChunkRecords()
        self._spill_file_keys = array("q")
        self._spill_file_starts = array("q")
        self._spill_digests = bytearray()
        self._spill_closed.set()
        with self._settled:
            self._settled.notify_all()

    def spill_pending(self, digest: bytes) -> bool:
        """Whether `digest` is spilled here and the blob-order write has not ended: this blob
        may still store it (unless its file turns out to be replaced). In archive order: it is
        being compressed or waits for its turn to be stored."""
        with self._lock:
            if self._spill_closed.is_set():
                return False
            return digest in (self._packing if self.archive_order else self._spilled)

    def wait_chunk(self, digest: bytes) -> None:
        """Until `digest` is no longer pending here (`spill_pending`): stored, found below, or
        the layer ended. In archive order that is the next drain of this layer's chunks; with a
        spill, the end of the blob-order write."""
        if not self.archive_order:
            self.wait_spill_closed()
            return
        with self._settled:
            self._chunk_waiters += 1
            try:
                self._settled.wait_for(lambda: self._spill_closed.is_set() or digest not in self._packing)
            finally:
                self._chunk_waiters -= 1

    def wait_spill_closed(self) -> None:
        """Until the blob-order write has ended (`add_spilled_stream` or `abort`)."""
        self._spill_closed.wait()

    def _prepare_all(self, bufs: list[bytes]) -> list[_Prepared]:
        return [self._prepare(b) for b in bufs]

    def add_file(self, data: FileData) -> list[ChunkInfo]:
        """One file's chunks, decoded (for callers building a few files by hand)."""
        return unpack_chunks(self.add_files([data])[0])

    # -- held blobs (layers prepared in parallel, committed in order) ------------------------------

    def hold(self) -> None:
        """All chunk data is in: wait for the writes and stop the workers, keeping the blob open
        (unnamed, no trailers) until `finish` or `abort`."""
        self._shutdown()
        self._flush()

    def set_blob_index(self, index: int) -> None:
        """Place the (held) blob at `index` of the image's blob table: the records kept here
        say so from now on; those already handed out are the caller's (`with_blob_index`)."""
        self.blob_index = index
        self.chunks.records[:] = with_blob_index(self.chunks.records, index)

    def holds(self, digest: bytes) -> bool:
        """Whether this blob stores `digest` (safe while other threads write it)."""
        with self._lock:
            return digest in self.chunks

    def stored_digests(self) -> list[bytes]:
        """The digests this blob stores so far (safe while other threads write it)."""
        with self._lock:
            return list(self.chunks)

    def chunks_final(self) -> bool:
        """Whether every chunk this blob will store is stored (the chunk writing has ended, or
        was given up): what it holds changes no more."""
        return self._spill_closed.is_set()

    def held_record(self, digest: bytes, file_offset: int) -> bytes | None:
        with self._lock:
            return self.chunks.get(digest, file_offset)

    def stored_chunks(self) -> "Iterator[tuple[ChunkInfo, bytes]]":
        """Each stored chunk, in blob order, with its stored bytes (after `hold`)."""
        assert not self._writes and not self._wbuf, "hold() first"
        recs = self.chunks.records
        for off in range(0, len(recs), CHUNK_RECORD_SIZE):
            c = unpack_chunk(recs, off)
            assert self._fd is not None
            data = os.pread(self._fd, c.compressed_size, c.compressed_offset)
            if len(data) != c.compressed_size:
                raise FormatError(f"held blob: chunk {c.index} is short")
            yield c, data


    def finish(self) -> BlobInfo | None:
        """Append blob.meta / digests / ToC, name the blob and return its table entry.

        Returns None (and writes no file) when no new chunk was stored: every file was empty or
        deduplicated against existing blobs.
        """
        if self._closed:
            raise RuntimeError("BlobWriter already finished")
        self._shutdown()
        self._closed = True
        if not self.chunks:
            self._discard()
            return None
        try:
            return self._finish()
        except BaseException:
            self._discard()
            raise

    def _finish(self) -> BlobInfo:
        if self.plain:
            return self._name_blob(
                BlobInfo(
                    index=self.blob_index,
                    blob_id="",
                    compressor=self.opts.compressor,
                    digester=self.opts.digester,
                    chunk_size=self.opts.chunk_size,
                    chunk_count=len(self.chunks),
                    features=self.features,
                    compressed_size=self._pos,
                    uncompressed_size=self._uoff,
                )
            )
        opts = self.opts
        features = int(self.features)
        toc: list[bytes] = []
        data_size = self._pos
        uncompressed_size = self._uoff
        if opts.blob_toc:
            self._flush()
            data_digest = self._hash.copy().digest()
            self._write(tar_header(BLOB_NAME, data_size))
            toc.append(pack_toc_entry(BLOB_NAME, Compressor.NONE, data_digest, 0, data_size, uncompressed_size))

        ci_raw = bytes(self.ci_entries)
        ci_compressor = Compressor.NONE
        ci_data = ci_raw
        if opts.compressor != Compressor.NONE:
            packed = codec.compress(opts.compressor, ci_raw)
            if len(packed) < len(ci_raw):
                ci_data, ci_compressor = packed, opts.compressor
        ci_offset = self._pos
        header = pack_blob_meta_header(
            features, int(ci_compressor), len(self.chunks), ci_offset, len(ci_data), len(ci_raw)
        )
        self._write(ci_data)
        self._write(header)
        if opts.blob_toc:
            self._write(tar_header(META_NAME, len(ci_data) + len(header)))
            toc.append(
                pack_toc_entry(
                    META_NAME,
                    ci_compressor,
                    hashlib.sha256(ci_raw).digest(),
                    ci_offset,
                    len(ci_data),
                    len(ci_raw),
                )
            )
            toc.append(
                pack_toc_entry(
                    META_HEADER_NAME,
                    Compressor.NONE,
                    hashlib.sha256(header).digest(),
                    ci_offset + len(ci_data),
                    len(header),
                    len(header),
                )
            )
            digests = bytes(self.digests)
            doff = self._pos
            self._write(digests)
            self._write(tar_header(DIGEST_NAME, len(digests)))
            toc.append(
                pack_toc_entry(
                    DIGEST_NAME,
                    Compressor.NONE,
                    hashlib.sha256(digests).digest(),
                    doff,
                    len(digests),
                    len(digests),
                )
            )
        toc_size = 0
        toc_digest = b"\0" * 32
        if opts.blob_toc:
            entries = b"".join(toc)
            theader = tar_header(TOC_NAME, len(entries))
            self._write(entries)
            self._write(theader)
            toc_digest = hashlib.sha256(entries + theader).digest()
            toc_size = len(entries) + len(theader)

        return self._name_blob(
            BlobInfo(
                index=self.blob_index,
                blob_id="",
                compressor=opts.compressor,
                digester=opts.digester,
                chunk_size=opts.chunk_size,
                chunk_count=len(self.chunks),
                features=self.features,
                compressed_size=self._pos,
                uncompressed_size=uncompressed_size,
                ci_compressor=ci_compressor,
                ci_offset=ci_offset,
                ci_compressed_size=len(ci_data),
                ci_uncompressed_size=len(ci_raw),
                blob_toc_size=toc_size,
                blob_toc_digest=toc_digest,
            )
        )

    def _name_blob(self, info: BlobInfo) -> BlobInfo:
        """Flush, name the file by blob id (sha256 of the whole file unless given) and return
        `info` with that id."""
        self._flush()
        blob_id = self.opts.blob_id or self._hash.hexdigest()
        validate_blob_id(blob_id)
        assert self._fd is not None and self._tmp is not None
        self._stop_writer()
        if self._watched:  # every byte is in the file, and announced
            assert self.watch is not None
            self._watched = False
            self.watch.closed(blob_id)
        if self.durable:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        final = os.path.join(self.blob_dir, blob_id)
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, final)
        self._tmp = None
        self.path = final
        return dataclasses.replace(info, blob_id=blob_id)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._writes.clear()
        self._wbuf, self._wsize = [], 0

    def _discard(self) -> None:
        self._stop_writer()
        self._close_spill()
        if self._watched:
            assert self.watch is not None
            self._watched = False
            self.watch.closed(None)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None

    def abort(self) -> None:
        """Drop the partial blob (on build errors)."""
        self._shutdown()
        self._closed = True
        self._discard()

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


def validate_blob_id(blob_id: str) -> None:
    """Blob ids name files and fill 64-byte device-slot tags."""
    if (
        not (0 < len(blob_id) <= 64)
        or not blob_id.isascii()
        or any(c in blob_id for c in "/\0")
        or blob_id
        in (
            ".",
            "..",
        )
    ):
        raise ValueError(f"invalid blob id {blob_id!r}: need 1..64 ASCII characters, no '/' or NUL")


_BLOB_INDEX_AT = CHUNK.offset("blob_index")


def with_blob_index(records: "bytes | bytearray | memoryview", index: int) -> bytearray:
    """Packed chunk records (all of one blob) with their blob_index set to `index`."""
    out = bytearray(records)
    field = U32.pack(index)
    for off in range(_BLOB_INDEX_AT, len(out), CHUNK_RECORD_SIZE):
        out[off:off + 4] = field
    return out


_SPILL_WINDOW = 1 << 20
_SMALL_PART = 64 << 10


def _coalesce(parts: list[bytes]) -> list[bytes]:
    """`parts` with each run of small ones joined: the blob's sha256 then takes one update per
    run, not one per small chunk (each update of 2 KiB or more gives the GIL up and takes it
    back: a wake-up under contention). Only small parts are copied (big ones are most bytes)."""
    if len(parts) <= 4:
        return parts
    out: list[bytes] = []
    run: list[bytes] = []
    for p in parts:
        if len(p) < _SMALL_PART:
            run.append(p)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
        out.append(p)
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


class _SpillReader:
    """Reads of the spill in blob order: a chunk smaller than the window is served from a
    1 MiB read-ahead window (small files spilled near each other are read back near each
    other), so a layer of many small files costs a few preads, not one per chunk."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reads = 0
        self._start = 0
        self._win = b""

    def read(self, offset: int, n: int) -> bytes:
        start, win = self._start, self._win
        if not (start <= offset and offset + n <= start + len(win)):
            self.reads += 1
            if n >= _SPILL_WINDOW:
                return self._exact(offset, n)
            start, win = offset, os.pread(self.fd, _SPILL_WINDOW, offset)
            if len(win) < n:
                raise OSError(errno.EIO, "spill file is short")
            self._start, self._win = start, win
        return win[offset - start:offset - start + n]

    def _exact(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise OSError(errno.EIO, "spill file is short")
        return data


def _writev_all(fd: int, parts: "Sequence[bytes | memoryview]", pos: int | None = None) -> None:
    """Write `parts` back to back: at `pos` (pwritev), or at the file's offset (writev) without
    one; in rounds of at most _WRITE_PARTS buffers, short writes resumed."""
    views = [memoryview(p) for p in parts if p]
    while views:
        if pos is None:
            n = os.writev(fd, views[:_WRITE_PARTS])
        else:
            n = os.pwritev(fd, views[:_WRITE_PARTS], pos)
            pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    buf = stream.read(n)
    if len(buf) == n or not buf:
        return buf
    parts = [buf]
    got = len(buf)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def decode_ci_array(raw: bytes, info: BlobInfo) -> Sequence[tuple[int, int, int, int]]:
    """Entries of the stored (maybe compressed) blob.meta v1 array of `info`, in ci_index order.

    Each entry is (compressed_offset, compressed_size, uncompressed_offset, uncompressed_size).
    """
    if info.features & BlobFeatures.CHUNK_INFO_V2:
        raise FormatError(f"blob {info.blob_id}: v2 chunk-info entries are not supported here")
    if len(raw) != info.ci_compressed_size:
        raise FormatError(f"blob {info.blob_id}: blob.meta array truncated")
    if info.ci_compressor != Compressor.NONE:
        raw = codec.decompress(info.ci_compressor, raw, info.ci_uncompressed_size)
    if len(raw) != info.ci_uncompressed_size or len(raw) % CI_V1_ENTRY_SIZE:
        raise FormatError(f"blob {info.blob_id}: blob.meta array has bad size {len(raw)}")
    return [unpack_ci_v1(raw, i) for i in range(0, len(raw), CI_V1_ENTRY_SIZE)]
