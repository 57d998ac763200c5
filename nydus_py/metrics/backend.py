"""Backend read accounting for nydusd's `/api/v1/metrics/backend`, whatever the backend is.

`MeteredBackend` wraps a blob source (localfs, registry, ...) and times every range read; other
attributes (the registry's own `counters`, `close`, `blob_size`, ...) pass through. `instrument()`
puts it under a blob cache manager when there is one, so cache hits are not counted as backend
reads.
"""

import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from ..rafs.model import BlobInfo
from .fsstats import BLOCK_BOUNDS

# backend latency bucket upper bounds in milliseconds (the last bucket is "more")
BACKEND_LATENCY_BOUNDS_MS = (1, 20, 50, 100, 500, 1000, 2000)
_clock = time.perf_counter


def backend_latency_bucket(ms: float) -> int:
    """Index of the first latency bound `ms` does not exceed (7: more than 2 s)."""
    return bisect_left(BACKEND_LATENCY_BOUNDS_MS, ms)


class BackendStats:
    def __init__(self, backend_type: str) -> None:
        self.backend_type = backend_type
        self.lock = threading.Lock()
        self.read_count = 0
        self.read_errors = 0
        self.read_amount_total = 0
        self.latency_ms_total = 0
        self.latency_dist = [0] * 8
        self.size_dist = [0] * 8
        self.sizes_latency = [[0] * 8 for _ in range(8)]
        self.prefetch_reads = 0
        self.prefetch_bytes = 0

    def record(self, nbytes: int, seconds: float, ok: bool, prefetch: bool) -> None:
        ms = seconds * 1000.0
        lb = bisect_left(BACKEND_LATENCY_BOUNDS_MS, ms)  # (backend_latency_bucket, size_bucket: inline)
        sb = bisect_right(BLOCK_BOUNDS, nbytes)
        with self.lock:
            self.read_count += 1
            if not ok:
                self.read_errors += 1
                return
            self.read_amount_total += nbytes
            self.latency_ms_total += int(ms)
            self.latency_dist[lb] += 1
            self.size_dist[sb] += 1
            self.sizes_latency[sb][lb] += 1
            if prefetch:
                self.prefetch_reads += 1
                self.prefetch_bytes += nbytes

    def json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "backend_type": self.backend_type,
                "read_count": self.read_count,
                "read_errors": self.read_errors,
                "read_amount_total": self.read_amount_total,
                "read_cumulative_latency_millis_total": self.latency_ms_total,
                "read_cumulative_latency_millis_dist": list(self.latency_dist),
                "read_count_block_size_dist": list(self.size_dist),
                "read_latency_sizes_dist": [list(r) for r in self.sizes_latency],
            }


class MeteredBackend:
    """A blob source that counts and times its reads into a BackendStats."""

    def __init__(self, inner: Any, stats: BackendStats) -> None:
        self.inner = inner
        self.stats = stats
        self.local = bool(getattr(inner, "local", False))
        # the raw-chunk preadv into a caller's buffers (localfs), metered, when the inner has it
        if callable(getattr(inner, "preadv_into", None)):
            self.preadv_into = self._preadv_into

    def _preadv_into(self, blob: BlobInfo, offset: int, bufs: list[memoryview], want: int,
                     nowait: bool = False) -> bool:
        t0 = time.perf_counter()
        try:
            ok: bool = self.inner.preadv_into(blob, offset, bufs, want, nowait)
        except BlockingIOError:
            raise  # (not a failure: the caller reads it on a thread that may wait)
        except BaseException:
            self.stats.record(0, time.perf_counter() - t0, False, False)
            raise
        self.stats.record(want if ok else 0, time.perf_counter() - t0, ok, False)
        return ok

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        # (_timed, inline: once per chunk a READ decodes)
        t0 = _clock()
        try:
            data: bytes = self.inner.read(blob, offset, size)
        except BaseException:
            self.stats.record(0, _clock() - t0, False, False)
            raise
        self.stats.record(len(data), _clock() - t0, True, False)
        return data

    def read_prefetch(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        fn = getattr(self.inner, "read_prefetch", None) or self.inner.read
        return self._timed(fn, blob, offset, size, True)

    def _timed(self, fn: Any, blob: BlobInfo, offset: int, size: int, prefetch: bool) -> bytes:
        t0 = time.perf_counter()
        try:
            data: bytes = fn(blob, offset, size)
        except BaseException:
            self.stats.record(0, time.perf_counter() - t0, False, prefetch)
            raise
        self.stats.record(len(data), time.perf_counter() - t0, True, prefetch)
        return data

    def _stream(self, fn: Callable[[BlobInfo, int, int], Iterator[bytes]], blob: BlobInfo, offset: int,
                size: int) -> Iterator[bytes]:
        """A stream is one read of all the bytes it brought, counted when it ends (also broken)."""
        t0 = time.perf_counter()
        n = 0
        ok = False
        try:
            for piece in fn(blob, offset, size):
                n += len(piece)
                yield piece
            ok = True
        finally:
            if ok:
                self.stats.record(n, time.perf_counter() - t0, True, True)
            else:  # the bytes that came still crossed the network
                self.stats.record(0, time.perf_counter() - t0, False, True)
                with self.stats.lock:
                    self.stats.read_amount_total += n

    def __getattr__(self, name: str) -> Any:
        if name == "read_chunks":  # never pretend to be a chunk source
            raise AttributeError(name)
        if name == "read_stream":  # only when the backend can stream (AttributeError otherwise)
            return partial(self._stream, self.inner.read_stream)
        return getattr(self.inner, name)


def instrument(source: Any, backend_type: str) -> tuple[Any, BackendStats]:
    """Wrap the backend of `source` (under its cache, if it has one) with a MeteredBackend."""
    stats = BackendStats(backend_type)
    inner = getattr(source, "source", None)
    if inner is not None and hasattr(source, "read_chunks"):
        source.source = MeteredBackend(inner, stats)
        return source, stats
    return MeteredBackend(source, stats), stats


def unwrap(source: Any) -> Any:
    """The backend object under any cache and meter (for its own counters)."""
    inner = getattr(source, "source", None)
    if inner is not None and hasattr(source, "read_chunks"):
        source = inner
    if isinstance(source, MeteredBackend):
        source = source.inner
    return source
