"""The persistent blob cache: decoded chunks in `<work_dir>/<blob id>.blob.data`, readiness in
`<blob id>.blob.data.chunk_map` (Nydus's names and layout, NYDUSD-CONTRACT.md 6.8).

What it promises:
* A chunk enters the cache only after its digest checked out, and is marked ready in the chunk
  map file only after its bytes are written and fdatasync'ed, so a crash can lose work but never
  leave a ready chunk with wrong bytes. The sync is batched: a written chunk is ready in memory
  at once (this daemon reads it back from the page cache), and a flusher thread persists the
  bits every `sync_delay` seconds, one fdatasync per blob then the bits (a crash loses at most
  that much work). With `validate`, cached bytes are checked again on every read; a bad one is
  dropped and fetched again instead of being served.
* Concurrent readers of one missing chunk cause one fetch (a reader of a chunk that a prefetch or
  another reader is fetching waits for that fetch); missing chunks that sit next to each other in
  the blob are fetched with one ranged read of up to `amplify_io` bytes, and a read may pull in
  following chunks of the same file (`extra`) within that budget.
* Across files (`follow`, the blob's chunks in blob order): an on-demand miss that continues where
  an earlier fetch of the same blob ended also takes the next adjacent, missing chunks of the blob,
  whatever file they belong to, in a window that doubles on each such sequential miss up to
  `amplify_io` and closes on a random one (the kernel's readahead rule). Files packed in the order
  they are read (a build with prefetch files) then come in large reads.
* Read-around (a random on-demand miss, no hints): the miss also takes the blob's next adjacent
  missing chunks within `read_around` bytes (64 KiB), whatever file they belong to, while the
  bytes fetched along that no read has used stay within a budget: `AROUND_WASTE` (1/5) of the
  compressed bytes reads have used (asked for, or fetched along and then read), so what
  read-around adds keeps bytes fetched within 1.2x of bytes read, inside issue 12's 1.3x bound
  for a startup set. Files read together sit together in the blob (a package's modules in one
  directory), so a first command read without hints waits for fewer round trips one after
  another; scattered reads that never use their neighbours waste at most a fifth as many bytes
  again as they need, then fetch only what they read.
* Directory-aware read-around (`around.py`): a cold read of a file from its start may bring
  `around(c)`, the chunks of the files that follow it in its directory (the filesystem knows
  them); the miss then takes those that continue the blob right after it, missing, within
  `dir_around` bytes (256 KiB), instead of the blind window, while the guesses' own record
  allows (`around.DirGate`: unused bytes within twice the used ones, plus what the blind budget
  leaves and a credit for the first guesses). A guess that takes nothing (the next file is
  stored elsewhere, or refused) leaves the miss to the blind window's rule.
* Dense reads switch a blob to streams (adaptive fetching, `streams.py`): many distinct chunks
  of one blob fetched on demand in a short window make the rest of it come in large parallel
  ranged reads, decoded as they arrive, without ever making an on-demand read wait behind one.
* On-demand reads go first: prefetch waits while an on-demand backend fetch is running (not while
  a reader merely waits for a prefetch fetch or reads the cache), and an on-demand reader never
  waits for a prefetch fetch that failed - it fetches the chunk itself.
* `size_limit` > 0 caps the bytes on disk by evicting whole blobs, least recently used first,
  never one that a read is using right now, nor one whose data file the kernel reads directly
  (a `CompleteData` handed out for FUSE passthrough holds the blob until released).

Damage from outside (another tool, a disk, a person) - what is caught, and what only `validate` catches:
* On open, the chunk map must carry our stamp for this blob, chunk count, data file (inode) and
  its pre-sized length, and the data file must still be that long; otherwise the map is reset
  (logged, counted in `invalidated_maps` / `dropped_chunks`): a truncated data file, a map copied
  from another blob, a replaced data file or a map without or with a damaged stamp costs a refetch.
* While open, a ready chunk that reads back short, or a data file found shorter than pre-sized
  before a write or a flush (truncated meanwhile), resets the map the same way; chunks written
  before such a reset are never persisted as ready. A blob whose image does not record its
  uncompressed size (old v5) has no pre-sized length: only the stamp and short reads guard it.
* Bytes changed in place (flipped, zeroed, a punched hole) keep the file's size and inode: only
  `validate` (`digest_validate`) finds them, by checking each cached chunk's digest on every read
  (the bad chunk is dropped and fetched again; `cache_corruptions`). With validation off such
  bytes are served as they are: that is the price of not hashing every cached read. Telling
  zeros from data would need a look at the data itself and cannot be done right (chunks may be
  all zeros), so it is not attempted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from ...rafs.chunkdata import BlobSource, decode_chunk, verify_chunk
from ...rafs.errors import DigestMismatch, FormatError
from ...rafs.model import BlobInfo, ChunkInfo
from .around import DIR_AROUND, DirGate, take_adjacent
from .chunk_map import Binding, ChunkMap
from .streams import DenseDetector, FetchAbandoned, Streamer, Table, dense_units

log = logging.getLogger(__name__)

DATA_SUFFIX = ".blob.data"
MAP_SUFFIX = ".blob.data.chunk_map"
MERGE_GAP = 4096  # bytes of unwanted data we accept between two chunks to save a request
MAX_UNCOMPRESSED = 1 << 40
FOLLOW_MIN = 128 << 10  # first cross-file amplification window after a sequential miss
READ_AROUND = 64 << 10  # window of a random miss's read-around
AROUND_WASTE = 0.2  # unused bytes fetched along allowed per compressed byte reads used
_AHEAD_MAX = 1 << 16  # chunks fetched along remembered (to credit their later use)
LATE_MARK = 1  # window of a stream's first sequential miss with `follow_late`: no chunk fits
_STREAMS = 16  # sequential streams remembered per blob
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_FAULT_AROUND = 1 << 20  # bytes read in around a direct read of cached chunks not in the page cache
_BLOB_ID = re.compile(r"^[0-9a-f]{64}$")


class CacheStats:
    """Counters named after nydusd's blobcache metrics where one exists."""

    def __init__(self) -> None:
        self.total = 0  # read_chunks calls
        self.whole_hits = 0  # calls served entirely from the cache
        self.partial_hits = 0  # calls served partly from the cache
        self.chunk_hits = 0
        self.chunk_misses = 0
        self.waited = 0  # chunks another reader was already fetching
        self.backend_reads = 0
        self.backend_bytes = 0
        self.merged_chunks = 0  # chunks that shared a backend read with another chunk
        self.amplified_chunks = 0  # chunks fetched ahead of need (`extra`)
        self.followed_chunks = 0  # of those, chunks of other files taken along (`follow`)
        self.around_chunks = 0  # of those, taken along by a random miss's read-around
        self.around_refused = 0  # random misses without read-around: the byte budget was spent
        self.dir_guesses = 0  # random misses that took following files of their directory along
        self.dir_chunks = 0  # chunks they took (also in amplified/followed_chunks, not in around_chunks)
        self.dir_bytes = 0  # their compressed bytes (also in ahead_bytes)
        self.dir_used_bytes = 0  # of those, bytes of chunks a read used later (also in ahead_used_bytes)
        self.dir_refused = 0  # directory guesses offered but refused: their record was spent
        self.demand_bytes = 0  # compressed bytes of the chunks on-demand reads asked for (read-around's budget)
        self.ahead_bytes = 0  # compressed bytes fetched along on demand (amplification, read-around)
        self.ahead_used_bytes = 0  # of those, bytes of chunks a read used later
        self.sequential_misses = 0  # on-demand misses continuing an earlier fetch of the blob
        self.digest_errors = 0  # fetched chunks whose digest was wrong (never cached)
        self.cache_corruptions = 0  # cached chunks that failed validation and were dropped
        self.backend_errors = 0
        self.ondemand_bytes = 0  # bytes fetched for on-demand reads (with their amplification)
        self.stream_bytes = 0  # bytes that came in streams (adaptive fetching, see streams.py)
        self.stream_switches = 0  # blobs switched to streams because they were read densely
        self.stream_reads = 0  # streams started
        self.streamed_chunks = 0  # chunks a stream brought
        self.stream_skipped_bytes = 0  # stream bytes dropped: their chunk was fetched on demand meanwhile
        self.stream_failures = 0  # streams that broke (their blob went back to per-chunk fetches)
        self.prefetch_data_amount = 0
        self.prefetch_requests_count = 0
        self.prefetch_waits = 0  # times prefetch stood aside for on-demand reads
        self.evictions = 0
        self.evicted_bytes = 0
        self.uncacheable = 0  # chunks of blobs without a chunk count (not persisted)
        self.invalidated_maps = 0  # chunk maps reset because they or their data file were damaged
        self.dropped_chunks = 0  # ready chunks forgotten with them (fetched again when read)
        self.direct_reads = 0  # runs of ready chunks read with preadv into a caller's buffers (no copy)
        self.direct_bytes = 0
        self.nowait_refused = 0  # RWF_NOWAIT refused by the work dir's filesystem (then plain reads)
        self.cold_fault_arounds = 0  # direct reads of chunks not in the page cache: the chunks read in around them

    def snapshot(self) -> dict[str, Any]:
        return dict(vars(self))


class CachedBlob:
    """Open files of one blob's cache entry."""

    def __init__(self, work_dir: str, blob: BlobInfo) -> None:
        self.blob = blob
        self.data_path = os.path.join(work_dir, blob.blob_id + DATA_SUFFIX)
        self.map_path = os.path.join(work_dir, blob.blob_id + MAP_SUFFIX)
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.map: ChunkMap | None = None
        size = blob.uncompressed_size if 0 < blob.uncompressed_size <= MAX_UNCOMPRESSED else 0
        self.size = size  # the data file's full length, 0 when unknown
        try:
            if 0 < blob.chunk_count <= 1 << 24:
                # checks the map against the data file's length, then pre-sizes it (sparse, like nydusd)
                self.map = ChunkMap(self.map_path, blob.chunk_count, Binding(blob.blob_id, self.fd, size))
            elif size and os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            self.used = os.fstat(self.fd).st_blocks * 512
        except BaseException:
            os.close(self.fd)
            raise
        self.pins = 0
        self.dirty = False
        # written and ready in memory, not yet durable: index -> map generation (manager lock)
        self.pending: dict[int, int] = {}
        self.flush_lock = threading.Lock()  # held across fdatasync + persisting the bits, and map resets

    def cacheable(self, c: ChunkInfo) -> bool:
        limit = self.blob.uncompressed_size or MAX_UNCOMPRESSED
        return (self.map is not None and 0 <= c.index < self.map.chunks
                and c.uncompressed_offset >= 0 and c.uncompressed_offset + c.uncompressed_size <= limit)

    def ready(self, c: ChunkInfo) -> bool:
        return self.map is not None and self.cacheable(c) and (self.map.is_ready(c.index) or self.map.refresh(c.index))

    def read(self, c: ChunkInfo) -> bytes:
        """The cached bytes; fewer than the chunk's size when the data file was cut short."""
        return os.pread(self.fd, c.uncompressed_size, c.uncompressed_offset)

    def write(self, c: ChunkInfo, data: bytes) -> None:
        n = os.pwrite(self.fd, data, c.uncompressed_offset)
        if n != len(data):
            raise OSError(errno.EIO, f"short write to {self.data_path}")
        self.used += len(data)

    def short(self) -> int | None:
        """The data file's length when it is shorter than pre-sized (truncated from outside)."""
        if not self.size:
            return None
        n = os.fstat(self.fd).st_size
        return n if n < self.size else None

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CompleteData:
    """A complete blob's data file, opened read-only, held out of eviction until `release()`:
    what a FUSE passthrough open hands to the kernel (which then reads it without us)."""

    def __init__(self, manager: BlobCacheManager, cb: CachedBlob, fd: int) -> None:
        self.blob_id = cb.blob.blob_id
        self.path = cb.data_path
        self.fd = fd
        self._manager: BlobCacheManager | None = manager
        self._cb = cb

    def release(self) -> None:
        """Close our fd and let the blob be evicted again (idempotent)."""
        m, self._manager = self._manager, None
        if m is None:
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        m._unpin(self._cb)


class BlobCacheManager:
    """A ChunkSource: decoded, validated chunks of any blob, through the persistent cache."""

    def __init__(self, work_dir: str, source: BlobSource, *, validate: bool = False, amplify_io: int = 1 << 20,
                 size_limit: int = 0, sync_delay: float = 0.1, stream_size: int = 8 << 20, streams: int = 4,
                 stream_lookahead: int = 1 << 20, dense_fraction: float = 0.15, dense_window: float = 5.0,
                 dense_min_chunks: int = 64, read_around: int = READ_AROUND,
                 dir_around: int = DIR_AROUND) -> None:
        """Adaptive fetching (streams.py), for backends that can stream (`read_stream`): a blob
        whose on-demand fetches took `dense_fraction` of its chunks (at least `dense_min_chunks`;
        a large chunk counts once per 64 KiB) within `dense_window` seconds streams the rest in
        `streams` parallel ranges of at least `stream_size` bytes, claiming chunks
        `stream_lookahead` bytes ahead of what arrived.
        `stream_size` 0 turns it off. `read_around` 0 turns read-around off, `dir_around` 0 its
        directory-aware form (module docstring)."""
        os.makedirs(work_dir, exist_ok=True)
        self.work_dir = work_dir
        self.source = source
        self.validate = validate
        self.nowait_supported = True  # RWF_NOWAIT reads of the data files (`read_ready_into`)
        self.amplify_io = max(0, amplify_io)
        self.read_around = max(0, read_around)
        self.dir_around = max(0, dir_around)
        self._dir_gate = DirGate()  # (lock) the directory guesses' record
        # chunks fetched along (amplification) that no read has used yet: (blob id, offset) ->
        # (size, taken by a directory guess)
        self._ahead: dict[tuple[str, int], tuple[int, bool]] = {}
        self.size_limit = max(0, size_limit)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._blobs: OrderedDict[str, CachedBlob] = OrderedDict()  # LRU order, most recent last
        self._inflight: dict[tuple[str, int], tuple[Future[bytes], bool]] = {}
        self._demand = 0
        self._demand_idle = threading.Condition(self._lock)
        # blob id -> {compressed end of an on-demand fetch: its cross-file window}, oldest first
        self._streams: dict[str, OrderedDict[int, int]] = {}
        self._on_disk: dict[str, tuple[float, int]] = self._scan() if self.size_limit else {}
        self._closed = False
        self.sync_delay = max(0.0, sync_delay)
        self._flush_wake = threading.Condition(self._lock)
        self._flush_stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.dense_fraction = dense_fraction
        self.dense_window = dense_window
        self.dense_min_chunks = dense_min_chunks
        self._dense: dict[str, DenseDetector] = {}
        self.streamer = (Streamer(self, streams=streams, size=stream_size, lookahead=stream_lookahead)
                         if stream_size > 0 else None)

    # -- files and eviction ---------------------------------------------------------------------
    def _scan(self) -> dict[str, tuple[float, int]]:
        """Blobs already in work_dir (other images, earlier runs): mtime and bytes on disk."""
        out: dict[str, tuple[float, int]] = {}
        with os.scandir(self.work_dir) as it:
            for e in it:
                if e.name.endswith(DATA_SUFFIX) and _BLOB_ID.match(e.name[: -len(DATA_SUFFIX)]):
                    with contextlib.suppress(OSError):
                        st = e.stat(follow_symlinks=False)
                        out[e.name[: -len(DATA_SUFFIX)]] = (st.st_mtime, st.st_blocks * 512)
        return out

    def _pin(self, blob: BlobInfo) -> CachedBlob:
        if not _BLOB_ID.match(blob.blob_id):
            raise FormatError(f"invalid blob id {blob.blob_id!r}")
        with self._lock:
            if self._closed:
                raise OSError(errno.EIO, "blob cache is closed")
            cb = self._blobs.get(blob.blob_id)
            if cb is None:
                cb = CachedBlob(self.work_dir, blob)
                self._blobs[blob.blob_id] = cb
                self._on_disk.pop(blob.blob_id, None)
                if cb.map is not None and cb.map.invalid is not None:
                    self.stats.invalidated_maps += 1
                    self.stats.dropped_chunks += cb.map.dropped
                    log.warning("cache: chunk map of blob %s reset on open: %s; %d ready chunks dropped "
                                "(fetched again), generation %d", blob.blob_id, cb.map.invalid, cb.map.dropped,
                                cb.map.generation)
            self._blobs.move_to_end(blob.blob_id)
            cb.pins += 1
            return cb

    def _unpin(self, cb: CachedBlob) -> None:
        with self._lock:
            cb.pins -= 1
            over = self.size_limit and cb.dirty and self._usage() > self.size_limit
            cb.dirty = False
        if over:
            self.evict()

    def _usage(self) -> int:
        return sum(cb.used for cb in self._blobs.values()) + sum(n for _t, n in self._on_disk.values())

    def usage(self) -> int:
        """Bytes the cache holds on disk (as accounted; sparse holes excluded)."""
        with self._lock:
            return self._usage()

    def evict(self) -> int:
        """Drop least recently used blobs not in use until under `size_limit`; returns bytes freed."""
        freed = 0
        with self._lock:
            victims: list[str] = [b for b, _ in sorted(self._on_disk.items(), key=lambda kv: kv[1][0])]
            victims += [b for b, cb in self._blobs.items() if cb.pins == 0]
            for blob_id in victims:
                if self._usage() <= self.size_limit:
                    break
                cb = self._blobs.pop(blob_id, None)
                if cb is not None:
                    size = cb.used
                    cb.close()
                else:
                    size = self._on_disk.pop(blob_id)[1]
                self._remove_files(blob_id)
                freed += size
                self.stats.evictions += 1
                self.stats.evicted_bytes += size
                log.info("cache: evicted blob %s (%d bytes)", blob_id, size)
        return freed

    def _remove_files(self, blob_id: str) -> None:
        # the map goes first: a crash in between leaves data without a map, i.e. nothing ready
        for suffix in (MAP_SUFFIX, DATA_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.work_dir, blob_id + suffix))

    def underlying_files(self) -> list[str]:
        with self._lock:
            return sorted(b + DATA_SUFFIX for b in self._blobs)

    def data_all_ready(self) -> bool:
        with self._lock:
            return all(cb.map is not None and cb.map.all_ready for cb in self._blobs.values())

    def ready_chunks(self, blob: BlobInfo) -> int:
        cb = self._pin(blob)
        try:
            return cb.map.ready_count if cb.map is not None else 0
        finally:
            self._unpin(cb)

    def complete_data(self, blob: BlobInfo) -> CompleteData | str:
        """The blob's data file when every chunk of it is in the cache and checks out (chunk map
        all ready, its stamp still bound to this data file, the file as long as pre-sized), so
        the file is exactly the blob's uncompressed view; else why not. The blob stays pinned
        (never evicted) until the CompleteData is released. With `validate` on, never: each
        cached read must be digest-checked, which a reader of the file itself would skip."""
        if self.validate:
            return "cache digest validation is on (reads of the data file itself would skip it)"
        cb = self._pin(blob)
        try:
            got = self._open_complete(cb)
        except OSError as e:
            got = f"checking the data file failed: {e}"
        if isinstance(got, str):
            self._unpin(cb)
            return got
        return CompleteData(self, cb, got)  # the pin now belongs to it

    @staticmethod
    def _open_complete(cb: CachedBlob) -> int | str:
        """A read-only fd on the data file of a complete, intact blob; else why not."""
        m = cb.map
        if m is None:
            return "the blob has no chunk map (chunk count unknown)"
        if not m.all_ready:
            return f"{m.ready_count} of {m.chunks} chunks cached"
        if not cb.size:
            return "the blob's uncompressed size is unknown"
        with cb.flush_lock:  # not while a flush or a map reset is under way
            cut = cb.short()
            if cut is not None:
                return f"the data file is {cut} bytes, not {cb.size} (truncated)"
            bad = m.verify()
            if bad is not None:
                return f"chunk map check failed: {bad}"
            if not m.all_ready:
                return "chunks were dropped meanwhile"
            return os.open(f"/proc/self/fd/{cb.fd}", os.O_RDONLY | os.O_CLOEXEC)  # the very same inode

    # -- on-demand first ------------------------------------------------------------------------
    def _demand_begin(self) -> None:
        with self._lock:
            self._demand += 1

    def _demand_end(self) -> None:
        with self._lock:
            self._demand -= 1
            if self._demand == 0:
                self._demand_idle.notify_all()

    def wait_demand_idle(self, timeout: float = 5.0) -> None:
        """Prefetch calls this before each fetch: stand aside while on-demand reads fetch."""
        with self._lock:
            if self._demand:
                self.stats.prefetch_waits += 1
                self._demand_idle.wait_for(lambda: self._demand == 0, timeout)

    # -- reads ----------------------------------------------------------------------------------
    def read_chunks(self, blob: BlobInfo, chunks: Sequence[ChunkInfo], extra: Sequence[ChunkInfo] = (),
                    prefetch: bool = False,
                    follow: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None,
                    follow_late: bool = False, table: Table | None = None,
                    around: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None) -> list[bytes]:
        """Decoded bytes of `chunks` (all of `blob`), fetching what is missing; chunks in `extra`
        are fetched along when missing and within the `amplify_io` budget, but not returned.
        `follow(c)` gives the chunks stored after `c` in the blob, for cross-file amplification
        of sequential misses (see the module docstring); it is only called on a miss.
        `follow_late`: the window opens at the second sequential miss of a stream, not the first
        (blob views: the first is usually the tail of the file the kernel is reading).
        `table(blob)` gives all of the blob's chunks: with it, dense reading switches the blob to
        streams (adaptive fetching, see streams.py).
        `around(c)`: the chunks of the files after this one in its directory, in order (`c`:
        the last chunk this read claims), for a random miss's directory-aware read-around; it
        is only called on such a miss.

        A chunk that cannot be had raises OSError(EIO) or FormatError (DigestMismatch); the
        caller answers EIO. Nothing wrong is ever returned or cached.
        """
        if prefetch:
            self.wait_demand_idle()
        cb = self._pin(blob)
        try:
            with self._lock:
                self.stats.total += 1
            return self._read(cb, chunks, extra, prefetch, None if prefetch else follow, follow_late,
                              None if prefetch else table, None if prefetch else around)
        finally:
            self._unpin(cb)

    def cached_chunks(self, blob: BlobInfo, chunks: Sequence[ChunkInfo]) -> list[bytes] | None:
        """Decoded bytes of `chunks` when every one is in the cache now, else None; never
        fetches (a reader that must not wait for the backend)."""
        cb = self._pin(blob)
        try:
            out = []
            for c in chunks:
                data = self._cached(cb, c)
                if data is None:
                    return None
                out.append(data)
            return out
        finally:
            self._unpin(cb)

    def chunks_ready(self, blob: BlobInfo, chunks: Sequence[ChunkInfo]) -> bool:
        """Whether every chunk of `chunks` (all of `blob`) is ready in the cache now, as its
        chunk map's bits in memory say: no lock, no pin, no file read, nothing per chunk of the
        blob. A hint for a transport choosing whether a READ may wait (`read_waits`), correct
        under concurrent fetches in the direction that matters: a chunk is marked only after its
        bytes are written, so one still being fetched (claimed in flight) reads as not ready and
        its READ is handed off; a chunk marked just after this answer only costs a needless
        hand-off. A blob not opened yet is opened (once: a restarted daemon's warm cache); one
        without a chunk map is never ready. A bit set by another daemon since the map was
        loaded is not seen here (the read's own check rereads the file). What may still happen
        after True: an eviction or a map reset in between makes the READ fetch on the thread
        that asked, as any READ would."""
        cb = self._blobs.get(blob.blob_id)  # (a dict read is atomic; the entry may go meanwhile)
        if cb is None:
            cb = self._pin(blob)
            self._unpin(cb)
        m = cb.map
        if m is None:
            return False
        return all(cb.cacheable(c) and m.is_ready(c.index) for c in chunks)

    def read_ready_into(self, blob: BlobInfo, chunks: Sequence[ChunkInfo], offset: int,
                        bufs: list[memoryview], want: int, nowait: bool = False) -> bool:
        """preadv bytes [offset, +want) of the blob's data file straight into `bufs` (`want` bytes, guest
        memory) when every chunk of `chunks`, which cover that range, is ready; False when one is
        not, or when validation is on (each cached read must be digest-checked: `_cached`), and
        then `bufs` hold garbage the caller overwrites. The checks are `_cached`'s: a short read
        (the data file was cut) resets the map, a reset during the read refuses the bytes.
        `nowait`: RWF_NOWAIT, BlockingIOError when the bytes are not in the page cache."""
        if self.validate or len(bufs) > _IOV_MAX:
            return False
        cb = self._pin(blob)
        try:
            m = cb.map
            if m is None:
                return False
            gen = m.generation  # before the readiness checks: a reset in between shows
            for c in chunks:
                if not cb.ready(c):
                    return False
            n = -1
            if nowait and self.nowait_supported:
                try:
                    n = os.preadv(cb.fd, bufs, offset, os.RWF_NOWAIT)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        raise BlockingIOError(errno.EAGAIN, "not in the page cache") from None
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.nowait_supported = False  # then as `_cached` reads: a plain read
                    with self._lock:
                        self.stats.nowait_refused += 1
                    log.warning("cache: the work dir's filesystem refuses RWF_NOWAIT reads (%s); cached "
                                "READs may wait for the disk in a queue's dispatcher", e)
                if 0 <= n != want:  # partly in the page cache (or cut: the plain read tells)
                    raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
            if n < 0:
                n = self._preadv_cold(cb, chunks, bufs, offset, want) if not nowait else -1
                if n < 0:
                    n = os.preadv(cb.fd, bufs, offset)
                if n != want:
                    self._truncated(cb, gen, f"ready chunks at {offset} read back {n} of {want} bytes")
                    return False
            if m.generation != gen:
                return False  # reset while we read: the bytes may be the re-extended file's zeros
            with self._lock:
                self.stats.direct_reads += 1
                self.stats.direct_bytes += n
                self._note_hits(cb.blob.blob_id, chunks, [b""] * len(chunks))  # (as `_read` counts them)
            return True
        finally:
            self._unpin(cb)

    def _preadv_cold(self, cb: CachedBlob, chunks: Sequence[ChunkInfo], bufs: list[memoryview], offset: int,
                     want: int) -> int:
        """The read from the page cache if it is all there (RWF_NOWAIT: that read is the read);
        else -1, after asking the kernel to read the chunks around it in (WILLNEED, at most
        `_FAULT_AROUND` bytes, async) so that the blocking read that follows is one disk I/O
        for its neighbours too. A random 4 KiB read of a cached file whose pages were dropped
        otherwise costs one small disk read each (the daemon's preads of a random pattern get no
        readahead): 2.4x the time of decompressing whole chunks from a local blob in
        bench_fusedev's cold random reads. The undecoded path brings whole chunks too."""
        if not self.nowait_supported:
            return -1
        try:
            n = os.preadv(cb.fd, bufs, offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                return -1  # (the plain read tells, or marks RWF_NOWAIT unsupported)
            n = -1
        if n == want:
            return n
        lo = min(c.uncompressed_offset for c in chunks)
        hi = max(c.uncompressed_offset + c.uncompressed_size for c in chunks)
        if hi - lo > _FAULT_AROUND:  # (big chunks: a window around the read)
            lo = max(lo, offset + want // 2 - _FAULT_AROUND // 2)
            hi = min(hi, lo + _FAULT_AROUND)
        with contextlib.suppress(OSError):
            os.posix_fadvise(cb.fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            with self._lock:
                self.stats.cold_fault_arounds += 1
        return -1

    def prefetch(self, blob: BlobInfo, chunks: Sequence[ChunkInfo], merging_size: int = 1 << 20) -> int:
        """Fetch the chunks of `blob` that are neither cached nor being fetched, in reads of up
        to `merging_size` bytes; returns how many it got. Failures are counted and logged, never
        raised (a prefetch is only a hint).

        Chunks are claimed one ranged read at a time, right before it is sent and after any
        running on-demand fetch, so an on-demand reader never waits for a prefetch read that has
        not started yet: it claims the chunk itself.
        """
        cb = self._pin(blob)
        got = 0
        try:
            todo: list[tuple[ChunkInfo, Future[bytes]]] = []
            seen: set[int] = set()
            for c in chunks:
                if c.compressed_offset not in seen and not cb.ready(c):
                    seen.add(c.compressed_offset)
                    todo.append((c, Future()))  # placeholder futures: only used for grouping
            for run in self._runs(todo, merging_size):
                self.wait_demand_idle()
                mine: list[tuple[ChunkInfo, Future[bytes]]] = []
                with self._lock:
                    if self._closed:
                        break
                    for c, _ in run:
                        key = (blob.blob_id, c.compressed_offset)
                        if key in self._inflight or cb.ready(c):
                            continue
                        fut: Future[bytes] = Future()
                        self._inflight[key] = (fut, True)
                        mine.append((c, fut))
                try:
                    self._fetch(cb, mine, True, merging_size)
                finally:
                    self._settle(cb, mine)
                got += sum(1 for _c, f in mine if f.exception() is None)
            return got
        finally:
            self._unpin(cb)

    def _cached(self, cb: CachedBlob, c: ChunkInfo) -> bytes | None:
        if cb.map is None:
            return None
        gen = cb.map.generation  # before the readiness check: a reset in between shows
        if not cb.ready(c):
            return None
        data = cb.read(c)
        if len(data) != c.uncompressed_size:
            self._truncated(cb, gen, f"a ready chunk at {c.uncompressed_offset} read back {len(data)} of "
                                     f"{c.uncompressed_size} bytes")
            return None
        if cb.map.generation != gen:
            return None  # reset while we read: the bytes may be the re-extended file's zeros
        if self.validate:
            try:
                verify_chunk(data, c, cb.blob)
            except DigestMismatch as e:
                with cb.flush_lock:  # after any flush that may be persisting this chunk's bit
                    with self._lock:
                        cb.pending.pop(c.index, None)
                    cb.map.clear(c.index)
                with self._lock:
                    self.stats.cache_corruptions += 1
                log.error("cache: %s; dropped it, fetching again", e)
                return None
        return data

    def _truncated(self, cb: CachedBlob, gen: int, what: str) -> None:
        with cb.flush_lock:
            self._truncated_locked(cb, gen, what)

    def _truncated_locked(self, cb: CachedBlob, gen: int, what: str) -> None:
        """(flush_lock held) The data file was cut while in use (`what` showed it). Which ready
        chunks the cut took is unknown here, so the map is reset as on open, unless that already
        happened since `gen`; chunks written but not yet durable go too (their bytes may be gone)."""
        assert cb.map is not None
        if cb.map.generation != gen:
            return
        dropped = cb.map.reset()
        with self._lock:
            cb.pending.clear()
            self.stats.invalidated_maps += 1
            self.stats.dropped_chunks += dropped
        log.error("cache: blob %s: %s, the data file was truncated; chunk map reset, %d ready chunks dropped "
                  "(fetched again), generation %d", cb.blob.blob_id, what, dropped, cb.map.generation)

    def _read(self, cb: CachedBlob, chunks: Sequence[ChunkInfo], extra: Sequence[ChunkInfo],
              prefetch: bool, follow: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None,
              follow_late: bool = False, table: Table | None = None,
              around: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None) -> list[bytes]:
        out: list[bytes | None] = [self._cached(cb, c) for c in chunks]
        missing = [k for k, d in enumerate(out) if d is None]
        with self._lock:
            self._note_hits(cb.blob.blob_id, chunks, out, prefetch, follow is not None)
        if not missing:
            return out  # type: ignore[return-value]
        streaming = self.streamer is not None and self.streamer.streaming(cb.blob.blob_id)
        if streaming:  # the streams bring the rest: fetch just what this read needs
            extra, follow, around = (), None, None
        mine, waits, recheck = self._claim(cb, chunks, missing, extra, prefetch)
        guessed = 0
        if mine and (follow is not None or around is not None):
            guessed = self._follow(cb, mine, follow, follow_late, around)
        if mine and table is not None and not streaming:
            # (read-around's chunks are no sign of dense reading: a scattered reader takes them)
            self._note_dense(cb, mine[:len(mine) - guessed], table)
        demand = bool(mine) and not prefetch
        if demand:
            self._demand_begin()
        try:
            self._fetch(cb, mine, prefetch)
        finally:
            self._settle(cb, mine)
            if demand:
                self._demand_end()
        for k in recheck:
            out[k] = self._cached(cb, chunks[k])
        by_off = {c.compressed_offset: fut for c, fut in mine}
        for k in missing:
            c = chunks[k]
            fut = by_off.get(c.compressed_offset)
            if fut is not None:
                out[k] = fut.result()
        for k, fut, owner_prefetch in waits:
            try:
                out[k] = fut.result()
            except (OSError, FormatError) as e:
                if prefetch or not (owner_prefetch or isinstance(e, FetchAbandoned)):
                    raise
                # a prefetch gives up sooner than we may, an abandoned chunk was never tried:
                # fetch it ourselves
                out[k] = self._read(cb, [chunks[k]], (), False)[0]
        for k, d in enumerate(out):
            if d is None:  # ready at claim time but gone since (evicted or corrupt): fetch now
                out[k] = self._read(cb, [chunks[k]], (), prefetch)[0]
        return out  # type: ignore[return-value]

    def _note_hits(self, bid: str, chunks: Sequence[ChunkInfo], out: Sequence[bytes | None],
                   prefetch: bool = False, follows: bool = True) -> None:
        """(lock held) What a read found in the cache (`out[k]` None: missing): an on-demand
        read's credit towards read-around's budget (`_credit`), a sequential reader's stream
        carried over its hits (`follows`: the reader amplifies across files), the hit counters."""
        if not prefetch:
            self._credit(bid, chunks, out)
        hits = [c for c, d in zip(chunks, out, strict=True) if d is not None]
        streams = self._streams.get(bid) if follows and hits else None
        if streams:
            self._advance(streams, hits)
        self.stats.chunk_hits += len(hits)
        if len(hits) == len(chunks):
            self.stats.whole_hits += 1
        elif hits:
            self.stats.partial_hits += 1

    def _credit(self, bid: str, chunks: Sequence[ChunkInfo], out: Sequence[bytes | None]) -> None:
        """(lock held) What an on-demand read asks for, towards read-around's budget: its
        missing chunks, and the chunks fetched along earlier that it uses now (each once)."""
        ahead = self._ahead
        s = self.stats
        for c, d in zip(chunks, out, strict=True):
            was = ahead.pop((bid, c.compressed_offset), None) if ahead else None
            if was is not None:
                s.ahead_used_bytes += c.compressed_size
                if was[1]:
                    s.dir_used_bytes += c.compressed_size
                    self._dir_gate.used_later(c.compressed_size)
            if d is None or was is not None:
                s.demand_bytes += c.compressed_size

    def _fetched_along(self, bid: str, taken: Iterable[ChunkInfo], guess: bool = False) -> None:
        """(lock held) Remember chunks fetched ahead of need, to credit their later use;
        `guess`: taken by a directory guess (also on its own record)."""
        if len(self._ahead) > _AHEAD_MAX:
            self._ahead.clear()  # (their use goes uncredited: read-around only stops sooner)
        for c in taken:
            self._ahead[(bid, c.compressed_offset)] = (c.compressed_size, guess)
            self.stats.ahead_bytes += c.compressed_size
            if guess:
                self.stats.dir_bytes += c.compressed_size
                self._dir_gate.fetched_along(c.compressed_size)

    def _note_dense(self, cb: CachedBlob, mine: list[tuple[ChunkInfo, Future[bytes]]], table: Table) -> None:
        """Count an on-demand fetch's chunks towards the blob's density; a blob read densely
        switches to streams starting where this fetch ends (adaptive fetching)."""
        if self.streamer is None or not callable(getattr(self.source, "read_stream", None)):
            return
        bid = cb.blob.blob_id
        with self._lock:
            det = self._dense.get(bid)
            if det is None:
                det = self._dense[bid] = DenseDetector(cb.blob.chunk_count, self.dense_fraction, self.dense_window,
                                                       self.dense_min_chunks)
            now = time.monotonic()
            dense = det.note(now, dense_units(c for c, _ in mine), self.streamer.walking(now, self.dense_window))
        if dense:
            at = max(c.compressed_offset + c.compressed_size for c, _ in mine)
            self.streamer.start(cb, table, at)

    def _claim(self, cb: CachedBlob, chunks: Sequence[ChunkInfo], missing: list[int], extra: Sequence[ChunkInfo],
               prefetch: bool) -> tuple[list[tuple[ChunkInfo, Future[bytes]]],
                                        list[tuple[int, Future[bytes], bool]], list[int]]:
        """Split missing chunks into ours to fetch, others' fetches to wait for, and chunks that
        became ready meanwhile; add `extra` chunks within the amplification budget."""
        bid = cb.blob.blob_id
        mine: list[tuple[ChunkInfo, Future[bytes]]] = []
        waits: list[tuple[int, Future[bytes], bool]] = []
        recheck: list[int] = []
        with self._lock:
            for k in missing:
                c = chunks[k]
                key = (bid, c.compressed_offset)
                ent = self._inflight.get(key)
                if ent is not None:
                    waits.append((k, ent[0], ent[1]))
                    self.stats.waited += 1
                elif any(m.compressed_offset == c.compressed_offset for m, _ in mine):
                    continue  # the same chunk twice in one read (a file repeating itself)
                elif cb.ready(c):
                    recheck.append(k)
                else:
                    fut: Future[bytes] = Future()
                    self._inflight[key] = (fut, prefetch)
                    mine.append((c, fut))
            self.stats.chunk_misses += len(mine)
            budget = self.amplify_io - sum(c.compressed_size for c, _ in mine)
            for c in extra:
                if budget < c.compressed_size:
                    break
                key = (bid, c.compressed_offset)
                if key in self._inflight or cb.ready(c):
                    continue
                fut = Future()
                self._inflight[key] = (fut, prefetch)
                mine.append((c, fut))
                budget -= c.compressed_size
                self.stats.amplified_chunks += 1
                if not prefetch:
                    self._fetched_along(bid, (c,))
        return mine, waits, recheck

    def _follow(self, cb: CachedBlob, mine: list[tuple[ChunkInfo, Future[bytes]]],
                follow: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None, late: bool = False,
                around: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None) -> int:
        """Cross-file amplification of an on-demand miss: when the miss starts where an earlier
        fetch of this blob ended (within MERGE_GAP), claim the blob's next adjacent missing chunks in a
        window that doubles per sequential miss (up to what `amplify_io` leaves); a random
        miss closes the window, and takes the following files of its directory (`around`,
        within `dir_around`) or else reads around within `read_around`, each while its budget
        allows. Remembers where this fetch ends for the next miss. Returns how many chunks
        read-around added (last in `mine`)."""
        bid = cb.blob.blob_id
        first = min(c.compressed_offset for c, _ in mine)
        last = max((c for c, _ in mine), key=lambda c: c.compressed_offset + c.compressed_size)
        end = last.compressed_offset + last.compressed_size
        budget = self.amplify_io - sum(c.compressed_size for c, _ in mine)
        with self._lock:
            streams = self._streams.setdefault(bid, OrderedDict())
            window = 0
            random_miss = True
            for e, w in list(streams.items()):
                if abs(first - e) <= MERGE_GAP:
                    del streams[e]
                    # `late`: a stream's first sequential miss only marks it (a 1-byte window
                    # takes no chunk); the next one opens FOLLOW_MIN
                    window = LATE_MARK if late and w == 0 else min(self.amplify_io, max(2 * w, FOLLOW_MIN))
                    self.stats.sequential_misses += 1
                    random_miss = False
                    break
            guess = random_miss and around is not None and budget > 0 and self._dir_allowed()
        seq_window = window
        taken: list[tuple[ChunkInfo, Future[bytes]]] = []
        if guess:
            assert around is not None
            taken = self._take_guess(cb, around, last, min(budget, self.dir_around))
        blind = False
        if random_miss and not taken and follow is not None:
            with self._lock:
                blind = self._around_allowed()
            if blind:
                window = self.read_around
        budget = min(budget, window)
        if budget > 0 and follow is not None and not taken:
            try:
                for c in follow(last):
                    gap = c.compressed_offset - end
                    if not 0 <= gap <= MERGE_GAP or c.compressed_size > budget or not cb.cacheable(c):
                        break
                    with self._lock:
                        key = (bid, c.compressed_offset)
                        if key in self._inflight or cb.ready(c):
                            break
                        fut: Future[bytes] = Future()
                        self._inflight[key] = (fut, False)
                    taken.append((c, fut))
                    budget -= c.compressed_size + gap
                    end = c.compressed_offset + c.compressed_size
            except (FormatError, OSError) as e:  # a broken table only ends the amplification
                log.warning("blob %s: cross-file amplification stopped: %s", bid, e)
        if taken:
            last = max((c for c, _ in taken), key=lambda c: c.compressed_offset + c.compressed_size)
            end = max(end, last.compressed_offset + last.compressed_size)
        mine.extend(taken)
        guessed = bool(taken) and guess
        with self._lock:
            self.stats.amplified_chunks += len(taken)
            self.stats.followed_chunks += len(taken)
            if guessed:
                self.stats.dir_guesses += 1
                self.stats.dir_chunks += len(taken)
            elif blind:
                self.stats.around_chunks += len(taken)
            self._fetched_along(bid, (c for c, _ in taken), guessed)
            streams = self._streams.setdefault(bid, OrderedDict())
            streams[end] = seq_window
            while len(streams) > _STREAMS:
                streams.popitem(last=False)
        return len(taken) if guessed or blind else 0

    def _take_guess(self, cb: CachedBlob, around: Callable[[ChunkInfo], Iterable[ChunkInfo]], last: ChunkInfo,
                    budget: int) -> list[tuple[ChunkInfo, Future[bytes]]]:
        """Claim the chunks of the following files of the directory that continue the blob
        right after `last`, missing, within `budget` bytes (`around.take_adjacent`)."""
        bid = cb.blob.blob_id
        claimed: list[tuple[ChunkInfo, Future[bytes]]] = []

        def claim(c: ChunkInfo) -> bool:
            if c.blob_index != last.blob_index or not cb.cacheable(c):
                return False
            with self._lock:
                key = (bid, c.compressed_offset)
                if key in self._inflight or cb.ready(c):
                    return False
                fut: Future[bytes] = Future()
                self._inflight[key] = (fut, False)
            claimed.append((c, fut))
            return True

        try:
            take_adjacent(around(last), last.compressed_offset + last.compressed_size, budget, MERGE_GAP, claim)
        except (FormatError, OSError) as e:  # a broken directory or chunk table only ends the guess
            log.warning("blob %s: directory read-around stopped: %s", bid, e)
        return claimed

    def _dir_allowed(self) -> bool:
        """(lock held) A random miss may take its directory's following files while their
        record allows (`around.DirGate`), with what the blind budget leaves as a shared part."""
        if self.dir_around <= 0:
            return False
        if self._dir_gate.allows(self.dir_around, self._blind_room()):
            return True
        self.stats.dir_refused += 1
        return False

    def _around_allowed(self) -> bool:
        """(lock held) A random miss may read around while the unused bytes fetched along, with
        a full window more, stay within the budget (module docstring)."""
        if self.read_around <= 0:
            return False
        if self.read_around <= self._blind_room():
            return True
        self.stats.around_refused += 1
        return False

    def _blind_room(self) -> float:
        """(lock held) Bytes the read-around budget has left: `AROUND_WASTE` of what reads used,
        less the bytes fetched along that no read has used yet (negative when overspent)."""
        s = self.stats
        return AROUND_WASTE * (s.demand_bytes + s.ahead_used_bytes) - (s.ahead_bytes - s.ahead_used_bytes)

    @staticmethod
    def _advance(streams: OrderedDict[int, int], hits: list[ChunkInfo]) -> None:
        """(lock held) A sequential reader passing over cached chunks carries its stream along, so
        its next miss still counts as sequential."""
        for c in sorted(hits, key=lambda c: c.compressed_offset):
            for e, w in streams.items():
                if abs(c.compressed_offset - e) <= MERGE_GAP:
                    del streams[e]
                    streams[c.compressed_offset + c.compressed_size] = w
                    break

    def _settle(self, cb: CachedBlob, mine: list[tuple[ChunkInfo, Future[bytes]]]) -> None:
        """Every claimed future ends resolved and out of the in-flight table, whatever happened."""
        with self._lock:
            for c, _fut in mine:
                self._inflight.pop((cb.blob.blob_id, c.compressed_offset), None)
        for _c, fut in mine:
            if not fut.done():
                fut.set_exception(OSError(errno.EIO, "chunk fetch was abandoned"))

    def _runs(self, claimed: list[tuple[ChunkInfo, Future[bytes]]],
              limit: int) -> list[list[tuple[ChunkInfo, Future[bytes]]]]:
        """Group chunks into ranged reads: adjacent in the blob (gaps <= MERGE_GAP), each read
        at most `limit` bytes (but always at least one chunk)."""
        order = sorted(claimed, key=lambda cf: cf[0].compressed_offset)
        runs: list[list[tuple[ChunkInfo, Future[bytes]]]] = []
        for cf in order:
            c = cf[0]
            if runs:
                first, last = runs[-1][0][0], runs[-1][-1][0]
                end = last.compressed_offset + last.compressed_size
                gap = c.compressed_offset - end
                if 0 <= gap <= MERGE_GAP and c.compressed_offset + c.compressed_size - first.compressed_offset <= max(
                        limit, first.compressed_size):
                    runs[-1].append(cf)
                    continue
            runs.append([cf])
        return runs

    def _fetch(self, cb: CachedBlob, claimed: list[tuple[ChunkInfo, Future[bytes]]], prefetch: bool,
               limit: int | None = None) -> None:
        blob = cb.blob
        reader = getattr(self.source, "read_prefetch", None) if prefetch else None
        read = reader if callable(reader) else self.source.read
        failed: BaseException | None = None
        for run in self._runs(claimed, self.amplify_io if limit is None else limit):
            if failed is not None:
                # one range already failed after all its retries: this read is EIO anyway, and
                # the next ranges would each take another deadline; readers waiting for these
                # chunks fetch them themselves
                for _c, fut in run:
                    fut.set_exception(FetchAbandoned(errno.EIO, f"not fetched after an earlier failure: {failed}"))
                continue
            start = run[0][0].compressed_offset
            end = run[-1][0].compressed_offset + run[-1][0].compressed_size
            try:
                raw = read(blob, start, end - start)
            except (OSError, FormatError) as e:
                with self._lock:
                    self.stats.backend_errors += 1
                for _c, fut in run:
                    fut.set_exception(e)
                failed = e
                continue
            with self._lock:
                self.stats.backend_reads += 1
                self.stats.backend_bytes += len(raw)
                if len(run) > 1:
                    self.stats.merged_chunks += len(run)
                if not prefetch:
                    self.stats.ondemand_bytes += len(raw)
                if prefetch:
                    self.stats.prefetch_requests_count += 1
                    self.stats.prefetch_data_amount += len(raw)
            good: list[tuple[ChunkInfo, Future[bytes], bytes]] = []
            for c, fut in run:
                lo = c.compressed_offset - start
                try:
                    data = self._decode(cb, raw[lo:lo + c.compressed_size], c, read)
                except (FormatError, OSError) as e:
                    fut.set_exception(e)
                    continue
                good.append((c, fut, data))
            self._store(cb, good)

    def _decode(self, cb: CachedBlob, raw: bytes, c: ChunkInfo, read: Any) -> bytes:
        """Decode and validate a fetched chunk; bytes that fail are fetched once more, alone
        (a flipped bit on the way), and a second failure is the reader's EIO."""
        try:
            return decode_chunk(raw, c, cb.blob, validate=True)
        except FormatError as e:
            self._bad_chunk(cb, c, e, "; fetching it again")
        raw = read(cb.blob, c.compressed_offset, c.compressed_size)
        with self._lock:
            self.stats.backend_reads += 1
            self.stats.backend_bytes += len(raw)
        try:
            return decode_chunk(raw, c, cb.blob, validate=True)
        except FormatError as e:
            self._bad_chunk(cb, c, e, "")
            raise

    def _bad_chunk(self, cb: CachedBlob, c: ChunkInfo, e: FormatError, then: str) -> None:
        if isinstance(e, DigestMismatch):
            with self._lock:
                self.stats.digest_errors += 1
        log.error("blob %s: fetched chunk at %d is bad: %s%s", cb.blob.blob_id, c.compressed_offset, e, then)

    def _store(self, cb: CachedBlob, good: list[tuple[ChunkInfo, Future[bytes], bytes]]) -> None:
        """Write, mark ready in memory, queue for the flusher (fdatasync, then the bits on disk);
        hand the bytes out even if the cache write fails."""
        ready: list[int] = []
        gen = cb.map.generation if cb.map is not None else 0
        try:
            cut = cb.short() if good else None
            if cut is not None:  # caught before a write past the cut hides it
                self._truncated(cb, gen, f"the data file is {cut} bytes, not {cb.size}")
                gen = cb.map.generation if cb.map is not None else 0
            for c, _fut, data in good:
                if cb.cacheable(c):
                    cb.write(c, data)
                    ready.append(c.index)
                else:
                    with self._lock:
                        self.stats.uncacheable += 1
        except OSError as e:
            log.error("cache: writing blob %s failed (%s); serving without caching", cb.blob.blob_id, e)
        if ready:
            assert cb.map is not None
            if self.sync_delay > 0:
                if cb.map.mark(ready, gen):
                    with self._lock:
                        cb.dirty = True
                        cb.pending.update(dict.fromkeys(ready, gen))
                        self._wake_flusher()
                else:
                    log.info("cache: blob %s: %d chunks written while its chunk map was reset are not marked",
                             cb.blob.blob_id, len(ready))
            else:
                with cb.flush_lock:
                    self._persist(cb, ready, gen)
        for _c, fut, data in good:
            fut.set_result(data)

    # -- durability -----------------------------------------------------------------------------
    def _wake_flusher(self) -> None:
        """(lock held) Start the flusher on first use, or wake it."""
        if self._closed:
            return
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="blobcache-sync", daemon=True)
            self._flusher.start()
        self._flush_wake.notify()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                self._flush_wake.wait_for(lambda: self._closed or any(cb.pending for cb in self._blobs.values()))
                if self._closed:
                    return
            if self._flush_stop.wait(self.sync_delay):  # gather a batch; close() does the last flush
                return
            self.flush()

    def flush(self) -> int:
        """Make every chunk written so far durable and ready on disk: per blob one fdatasync, then
        its bits. Returns how many chunks were persisted (by this call). A batch the flusher is
        persisting right now is waited for (its flush_lock is held), so the promise holds when this
        returns."""
        with self._lock:
            todo = [cb for cb in self._blobs.values() if cb.pending or cb.flush_lock.locked()]
            for cb in todo:
                cb.pins += 1  # not evicted (its fd closed) under our feet
        done = 0
        try:
            for cb in todo:
                with cb.flush_lock:
                    with self._lock:
                        batch, cb.pending = cb.pending, {}
                    if batch and cb.fd >= 0:
                        for gen in set(batch.values()):
                            done += self._persist(cb, sorted(i for i, g in batch.items() if g == gen), gen)
        finally:
            with self._lock:
                for cb in todo:
                    cb.pins -= 1
        return done

    def _persist(self, cb: CachedBlob, indices: list[int], gen: int) -> int:
        """(flush_lock held) fdatasync the data, then set the bits in the chunk map file; returns
        how many were persisted. When the data cannot be made durable, or the map was reset
        since the chunks were written (`gen`), or the data file turns out cut short, the chunks
        are forgotten (fetched again), never marked."""
        assert cb.map is not None
        cut = cb.short()
        if cut is not None:  # a fact about the file now, whatever generation the batch is from
            self._truncated_locked(cb, cb.map.generation, f"the data file is {cut} bytes, not {cb.size}")
        if cb.map.generation != gen:
            log.info("cache: blob %s: %d chunks written before its chunk map was reset are not persisted",
                     cb.blob.blob_id, len(indices))
            return 0
        try:
            os.fdatasync(cb.fd)
        except OSError as e:
            log.error("cache: fdatasync of blob %s failed (%s); dropping %d chunks", cb.blob.blob_id, e, len(indices))
            for i in indices:
                cb.map.clear(i)
            return 0
        try:
            cb.map.set_ready(indices)
            with self._lock:
                cb.dirty = True
        except OSError as e:
            log.error("cache: marking chunks of blob %s failed (%s); they will be fetched again next time",
                      cb.blob.blob_id, e)
        return len(indices)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            flusher = self._flusher
        if self.streamer is not None:
            self.streamer.close()
        if flusher is not None:
            with self._lock:
                self._closed = True
                self._flush_stop.set()
                self._flush_wake.notify_all()
            flusher.join(30)
        self.flush()
        with self._lock:
            self._closed = True
            for cb in self._blobs.values():
                cb.close()
            self._blobs.clear()
        close = getattr(self.source, "close", None)
        if callable(close):
            close()

    def snapshot(self, id: str = "") -> dict[str, Any]:
        """nydusd's `/api/v1/metrics/blobcache` fields this cache can fill, plus its own counters."""
        with self._lock:
            files = sorted(b + DATA_SUFFIX for b in self._blobs)
            all_ready = all(cb.map is not None and cb.map.all_ready for cb in self._blobs.values())
        s = self.stats
        return {"underlying_files": files, "store_path": self.work_dir, "partial_hits": s.partial_hits,
                "whole_hits": s.whole_hits, "total": s.total, "entries_count": len(files),
                "prefetch_data_amount": s.prefetch_data_amount, "prefetch_requests_count": s.prefetch_requests_count,
                "data_all_ready": all_ready, "cache": s.snapshot(), "usage": self.usage(), "id": id,
                "time": time.time()}
