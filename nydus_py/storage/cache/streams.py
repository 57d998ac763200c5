"""Adaptive fetching: a blob read densely switches to large sequential streams.

Chunk-sized fetches (even amplified ones, `follow`) pay a round trip each and leave the link idle
while the reader decodes and serves. When one blob's on-demand fetches take many distinct chunks
in a short window (`DenseDetector`: a whole-tree walk, a `tar` of the image, a reader of most
files; while another blob streams, a walk entering the next layer needs a quarter of that),
what is still missing of that blob is planned into ranges of at least `size` bytes
(`plan_streams`, starting where the reader is) and fetched by `streams` worker threads in
parallel, each a single ranged GET whose bytes are decoded and stored chunk by chunk as they
arrive. On-demand reads still go first:

* a stream claims its chunks (the blob cache's in-flight table) only `lookahead` bytes ahead of
  what has arrived, so a reader of a chunk further on fetches it itself, on the on-demand
  connections, instead of waiting behind the stream; the stream skips what was taken meanwhile;
* while a blob streams, on-demand reads of it fetch just their chunks (no amplification), so they
  do not fetch again what the streams are bringing;
* streams use the backend's prefetch connections.

A chunk that fails its digest is fetched once more alone (as every fetch), then it is EIO for
its readers, never wrong bytes. A stream that breaks (network, short body, stall) gives up its
claimed chunks (their readers fetch them themselves) and the blob goes back to per-chunk fetches
for good: logged and counted (`stream_failures`). Bytes are counted per mode (`ondemand_bytes`,
`stream_bytes`, `prefetch_data_amount`).
"""

from __future__ import annotations

import bisect
import errno
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from ...rafs.errors import FormatError
from ...rafs.model import BlobInfo, ChunkInfo

# (the blob cache's manager and its CachedBlob are `Any` here: blobcache imports this module)
BlobCacheManager = Any
CachedBlob = Any

log = logging.getLogger(__name__)

GAP = 4096  # as the cache's MERGE_GAP: unwanted bytes accepted between two chunks of one range

class FetchAbandoned(OSError):
    """A chunk was not fetched because an earlier range of the same fetch (or the stream that
    was bringing it) failed: its readers fetch it themselves."""


# a blob's chunk table in blob order
Table = Callable[[BlobInfo], Iterable[ChunkInfo]]


UNIT = 64 << 10  # a fetched chunk counts once per UNIT of its compressed bytes (at least once)
WALK_MIN = 16  # units that switch a blob while another blob of the image streams (or just did)


def dense_units(chunks: Iterable[ChunkInfo]) -> int:
    """What a fetch adds to its blob's density: one per chunk, and one per UNIT of a large one
    (a blob of large chunks read in order is as dense as one of small files; a sparse reader of
    small files stays sparse, and one large file in it adds little)."""
    return sum(max(1, c.compressed_size // UNIT) for c in chunks)


class DenseDetector:
    """Sans-IO: is a blob being read densely? `note(now, n)` records n units (`dense_units`)
    fetched on demand and answers True once, when the units fetched within the last `window`
    seconds reach `fraction` of the blob's `chunks` (and at least `min_chunks`, so a small
    blob's first read is not a walk)."""

    def __init__(self, chunks: int, fraction: float, window: float, min_chunks: int = 16) -> None:
        self.need = max(min_chunks, int(chunks * fraction) + 1) if chunks > 0 else 0
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0
        self.fired = False

    def note(self, now: float, n: int, walking: bool = False) -> bool:
        """`walking`: another blob of the image streamed moments ago (a walk crossing into the
        next layer): a quarter of the usual need (at least WALK_MIN units) is enough."""
        if self.fired or not self.need or n <= 0:
            return False
        self._events.append((now, n))
        self._sum += n
        while self._events and self._events[0][0] < now - self.window:
            self._sum -= self._events.popleft()[1]
        if self._sum >= (max(WALK_MIN, self.need // 4) if walking else self.need):
            self.fired = True
            self._events.clear()
        return self.fired


def plan_streams(missing: list[ChunkInfo], at: int, size: int) -> list[list[ChunkInfo]]:
    """Ranges of at least `size` compressed bytes (a shorter one only where the chunks stop being
    adjacent, or at the end) over `missing` (in blob order), each a list of chunks adjacent within
    GAP; the range holding or following blob offset `at` (where the reader is) comes first, then
    the rest of the blob after it, then what lies before it."""
    pieces: list[list[ChunkInfo]] = []
    cur: list[ChunkInfo] = []
    for c in missing:
        if cur:
            first, last = cur[0], cur[-1]
            end = last.compressed_offset + last.compressed_size
            if not 0 <= c.compressed_offset - end <= GAP or end - first.compressed_offset >= size:
                pieces.append(cur)
                cur = []
        cur.append(c)
    if cur:
        pieces.append(cur)
    ends = [p[-1].compressed_offset + p[-1].compressed_size for p in pieces]
    k = bisect.bisect_right(ends, at)
    return pieces[k:] + pieces[:k]


class Streamer:
    """The stream workers of one blob cache: `start(cb, table, at)` switches a blob to streams."""

    def __init__(self, manager: BlobCacheManager, *, streams: int, size: int, lookahead: int) -> None:
        self.m = manager
        self.streams = max(1, streams)
        self.size = max(64 << 10, size)
        self.lookahead = max(0, lookahead)
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.state: dict[str, str] = {}  # blob id -> "streaming" | "done" | "failed"
        self._left: dict[str, int] = {}  # blob id -> streams not finished yet
        self.idle = threading.Condition(self._lock)
        self._closed = False
        self.last_active = -1e9  # monotonic time a stream of any blob last received bytes (or started)

    def streaming(self, blob_id: str) -> bool:
        return self.state.get(blob_id) == "streaming"

    def walking(self, now: float, within: float) -> bool:
        """Some blob streamed within the last `within` seconds (a dense reader is about)."""
        return now - self.last_active < within

    def start(self, cb: CachedBlob, table: Table, at: int) -> bool:
        """Plan and stream what is missing of `cb`'s blob, once per blob; False when it already
        streamed (or failed to)."""
        bid = cb.blob.blob_id
        with self._lock:
            if self._closed or bid in self.state:
                return False
            self.state[bid] = "streaming"
            self._left[bid] = 1  # the plan itself
            self.last_active = time.monotonic()
            while len(self._threads) < self.streams:
                t = threading.Thread(target=self._work, name=f"blob-stream-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        self._jobs.put(lambda: self._plan(cb.blob, table, at))
        return True

    def busy(self) -> bool:
        with self._lock:
            return any(self._left.values())

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            t.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a bug in one job must not end the worker (and hang its readers)
                log.exception("blob stream job failed")

    def _finished(self, bid: str) -> None:
        with self._lock:
            self._left[bid] -= 1
            if not self._left[bid]:
                if self.state.get(bid) == "streaming":
                    self.state[bid] = "done"
                self.idle.notify_all()

    # -- planning -------------------------------------------------------------------------------
    def _plan(self, blob: BlobInfo, table: Table, at: int) -> None:
        m = self.m
        try:
            cb = m._pin(blob)
        except (OSError, FormatError) as e:
            log.warning("blob %s: not streamed: %s", blob.blob_id, e)
            self._fail(blob.blob_id)
            self._finished(blob.blob_id)
            return
        try:
            try:
                chunks = sorted(table(blob), key=lambda c: c.compressed_offset)
            except (OSError, FormatError) as e:
                log.warning("blob %s: not streamed, its chunk table failed: %s", blob.blob_id, e)
                self._fail(blob.blob_id)
                return
            missing = self._missing(cb, chunks)
            pieces = plan_streams(missing, at, self.size)
            with self._lock:
                self._left[blob.blob_id] += len(pieces)
            with m._lock:
                m.stats.stream_switches += 1
            log.info("blob %s read densely: streaming %d missing chunks (%d bytes) in %d ranges",
                     blob.blob_id, len(missing), sum(c.compressed_size for c in missing), len(pieces))
            for p in pieces:
                self._jobs.put(lambda p=p: self._stream(blob, p))  # type: ignore[misc]
        finally:
            m._unpin(cb)
            self._finished(blob.blob_id)

    def _missing(self, cb: CachedBlob, chunks: Iterable[ChunkInfo]) -> list[ChunkInfo]:
        """Chunks neither cached nor being fetched, one per compressed offset, cacheable."""
        m = self.m
        out: list[ChunkInfo] = []
        seen = -1
        todo = list(chunks)
        for lo in range(0, len(todo), 4096):  # the cache's lock in slices: readers keep going
            with m._lock:
                for c in todo[lo:lo + 4096]:
                    if c.compressed_offset == seen or not cb.cacheable(c):
                        continue
                    seen = c.compressed_offset
                    if (cb.blob.blob_id, c.compressed_offset) not in m._inflight and not cb.ready(c):
                        out.append(c)
        return out

    def _fail(self, bid: str) -> None:
        with self._lock:
            self.state[bid] = "failed"

    # -- one stream -----------------------------------------------------------------------------
    def _stream(self, blob: BlobInfo, planned: list[ChunkInfo]) -> None:
        try:
            if self.state.get(blob.blob_id) != "streaming" or self._closed:
                return  # an earlier stream of this blob failed (per-chunk fetches from now on), or closing
            cb = self.m._pin(blob)
            try:
                # what was fetched on demand since the plan is not fetched again: the rest, in
                # runs of adjacent chunks
                for run in plan_streams(self._missing(cb, planned), 0, 1 << 62):
                    if self.state.get(blob.blob_id) != "streaming" or self._closed:
                        break
                    _OneStream(self, cb, run).run()
            finally:
                self.m._unpin(cb)
        except (OSError, FormatError) as e:
            log.warning("blob %s: stream not started: %s", blob.blob_id, e)
        finally:
            self._finished(blob.blob_id)


class _OneStream:
    """One ranged GET over `chunks` (adjacent, blob order), decoded and stored as bytes arrive."""

    def __init__(self, streamer: Streamer, cb: CachedBlob, chunks: list[ChunkInfo]) -> None:
        self.s = streamer
        self.m = streamer.m
        self.cb = cb
        self.chunks = chunks
        self.start = chunks[0].compressed_offset
        self.end = chunks[-1].compressed_offset + chunks[-1].compressed_size
        self.mine: dict[int, Future[bytes]] = {}  # claimed, not yet resolved: offset -> future
        self._next = 0  # first chunk not considered for claiming yet

    def _claim_upto(self, limit: int) -> None:
        """Claim the chunks starting before `limit` that nobody fetches or has."""
        m, cb = self.m, self.cb
        bid = cb.blob.blob_id
        with m._lock:
            while self._next < len(self.chunks) and self.chunks[self._next].compressed_offset < limit:
                c = self.chunks[self._next]
                self._next += 1
                key = (bid, c.compressed_offset)
                if key not in m._inflight and not cb.ready(c):
                    fut: Future[bytes] = Future()
                    m._inflight[key] = (fut, True)  # readers treat it as a prefetch: on failure they fetch
                    self.mine[c.compressed_offset] = fut

    def _release(self, offsets: Iterable[int]) -> None:
        with self.m._lock:
            for off in offsets:
                self.m._inflight.pop((self.cb.blob.blob_id, off), None)

    def run(self) -> None:
        m, cb = self.m, self.cb
        source: Any = m.source
        read = getattr(source, "read_prefetch", None) or source.read
        self._claim_upto(self.start + self.s.lookahead + 1)
        with m._lock:
            m.stats.stream_reads += 1
        buf = bytearray()
        base = self.start  # blob offset of buf[0]
        k = 0  # next chunk to complete
        pieces: Iterator[bytes] | None = None
        try:
            pieces = source.read_stream(cb.blob, self.start, self.end - self.start)
            for piece in pieces:
                if self.s._closed:
                    break  # the cache is closing: what is claimed is abandoned below
                buf += piece
                got = base + len(buf)
                self.s.last_active = time.monotonic()
                with m._lock:
                    m.stats.stream_bytes += len(piece)
                    m.stats.backend_bytes += len(piece)
                self._claim_upto(got + self.s.lookahead + 1)
                good: list[tuple[ChunkInfo, Future[bytes], bytes]] = []
                bad: list[tuple[int, Future[bytes], BaseException]] = []
                skipped = 0
                while k < len(self.chunks) and self.chunks[k].compressed_offset + self.chunks[k].compressed_size <= got:
                    c = self.chunks[k]
                    k += 1
                    fut = self.mine.pop(c.compressed_offset, None)
                    if fut is None:
                        skipped += c.compressed_size  # fetched on demand meanwhile
                        continue
                    lo = c.compressed_offset - base
                    try:
                        data = m._decode(cb, bytes(buf[lo:lo + c.compressed_size]), c, read)
                    except (FormatError, OSError) as e:
                        bad.append((c.compressed_offset, fut, e))
                        continue
                    good.append((c, fut, data))
                if good:
                    m._store(cb, good)
                # out of the in-flight table before the failures are told: a reader then fetches
                # the chunk itself instead of finding this failed fetch again
                self._release([c.compressed_offset for c, _f, _d in good] + [off for off, _f, _e in bad])
                for _off, fut, err in bad:
                    fut.set_exception(err)
                with m._lock:
                    m.stats.streamed_chunks += len(good)
                    m.stats.stream_skipped_bytes += skipped
                # drop what was used, up to the next chunk (never past what arrived: the gap
                # before the next chunk may still be on its way)
                cut = min((self.chunks[k].compressed_offset if k < len(self.chunks) else got) - base, len(buf))
                if cut > 0:
                    del buf[:cut]
                    base += cut
            if k < len(self.chunks) and not self.s._closed:
                raise OSError(errno.EIO, f"stream ended at {base + len(buf)}, before {self.end}")
        except (OSError, FormatError) as e:
            self.s._fail(cb.blob.blob_id)
            with m._lock:
                m.stats.stream_failures += 1
                m.stats.backend_errors += 1
            log.warning("blob %s: stream %d+%d broke after %d bytes (%s); its chunks are fetched one by one "
                        "from now on", cb.blob.blob_id, self.start, self.end - self.start, base - self.start, e)
        finally:
            close = getattr(pieces, "close", None)
            if callable(close):  # a stream left early (closing) drops its connection now, not at GC
                close()
            left = list(self.mine.items())
            self.mine.clear()
            self._release(off for off, _f in left)
            for _off, fut in left:
                if not fut.done():
                    fut.set_exception(FetchAbandoned(errno.EIO, "the stream bringing this chunk broke; fetch it alone"))
