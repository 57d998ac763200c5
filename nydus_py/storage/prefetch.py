"""Background prefetch into the blob cache: hinted files first, then (optionally) everything.

Hints come from `--prefetch-files` (one absolute path per line, blank lines skipped) or, when
that is not given, the bootstrap's prefetch table; directories mean their whole subtree. With
`prefetch_all` every file follows. A planner thread turns files into per-blob batches for
`threads` workers, each batch one ranged read: chunks adjacent in the blob, at most
`merging_size` bytes (files packed in prefetch order make few large reads; scattered files make
many small ones, which the workers then send in parallel instead of one after another); a token
bucket caps the bandwidth. Prefetch never
delays an on-demand read: the cache makes each batch wait while on-demand fetches run, and uses
the backend's separate prefetch connections.
"""

from __future__ import annotations

import logging
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator

from ..rafs.errors import FormatError
from ..rafs.model import ChunkInfo, RafsImage
from .cache.blobcache import MERGE_GAP, BlobCacheManager

log = logging.getLogger(__name__)

_DONE = None


def read_prefetch_list(path: str) -> list[bytes]:
    """Paths from a `--prefetch-files` file: one per line, blank lines skipped."""
    with open(path, "rb") as f:
        data = f.read(16 << 20)
    return [line.strip() for line in data.splitlines() if line.strip()]


def resolve_path(image: RafsImage, path: bytes) -> int | None:
    """Inode of absolute `path` in the image, or None when some component is missing."""
    ino = image.root_ino
    for comp in path.split(b"/"):
        if not comp or comp == b".":
            continue
        if not stat.S_ISDIR(image.getattr(ino).mode):
            return None
        nxt = image.parent(ino) if comp == b".." else image.lookup(ino, comp)
        if nxt is None:
            return None
        ino = nxt
    return ino


class TokenBucket:
    """Smooth bandwidth cap: `consume(n)` waits until n more bytes fit under `rate` bytes/s."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._next = 0.0
        self._lock = threading.Lock()

    def delay_for(self, n: int) -> float:
        """Reserve n bytes; returns how long the caller must wait before sending them."""
        if self.rate <= 0 or n <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + n / self.rate
            return start - now


class Prefetcher:
    def __init__(self, image: RafsImage, cache: BlobCacheManager, *, threads: int = 8, bandwidth: int = 0,
                 merging_size: int = 1 << 20, files: list[bytes] | None = None, use_table: bool = True,
                 prefetch_all: bool = False, clock: Callable[[], float] = time.monotonic,
                 pause: Callable[[float], bool] | None = None) -> None:
        """`clock` paces the bandwidth cap and `pause(seconds)` waits for the cap, returning
        True when prefetch was stopped meanwhile (default: the stop event's wait); tests pass
        a manual clock and a pause that advances it, so the cap is checked without waiting."""
        self.image = image
        self.cache = cache
        self.threads = max(1, min(threads, 1024))
        self.bucket = TokenBucket(bandwidth, clock)
        self.merging_size = max(4096, merging_size)
        self.files = files
        self.use_table = use_table
        self.prefetch_all = prefetch_all
        self._queue: queue.Queue[tuple[int, list[ChunkInfo]] | None] = queue.Queue(maxsize=self.threads * 4)
        self._stop = threading.Event()
        self._pause = pause or self._stop.wait
        self._threads: list[threading.Thread] = []
        self.batches = 0
        self.chunks_fetched = 0
        self.bytes_planned = 0
        self.errors = 0
        self.started_at = 0.0
        self.finished_at = 0.0
        self.done = threading.Event()

    # -- planning -------------------------------------------------------------------------------
    def hint_inodes(self) -> list[int]:
        if self.files is not None:
            out = []
            for p in self.files:
                try:
                    ino = resolve_path(self.image, p)
                except FormatError as e:
                    log.warning("prefetch: %r: %s", p, e)
                    continue
                if ino is None:
                    log.warning("prefetch: %r is not in the image", p)
                else:
                    out.append(ino)
            return out
        return self.image.prefetch_table() if self.use_table else []

    def _files(self) -> Iterator[int]:
        """Regular-file inodes: hinted subtrees first, then the whole image when asked."""
        seen: set[int] = set()
        roots = self.hint_inodes()
        if self.prefetch_all:
            roots.append(self.image.root_ino)
        for root in roots:
            for _path, ino in self.image.walk(root):
                if self._stop.is_set():
                    return
                if ino in seen:
                    continue
                if stat.S_ISREG(self.image.getattr(ino).mode):
                    seen.add(ino)  # only files, and hard links repeat: bounded by regular files hinted
                    yield ino

    def _plan(self) -> None:
        try:
            batches: dict[int, list[ChunkInfo]] = {}
            sizes: dict[int, int] = {}
            for ino in self._files():
                for c in self.image.chunks(ino):
                    b = batches.get(c.blob_index)
                    if b:
                        last = b[-1]
                        gap = c.compressed_offset - (last.compressed_offset + last.compressed_size)
                        if (not 0 <= gap <= MERGE_GAP or sizes[c.blob_index] + gap + c.compressed_size
                                > self.merging_size):
                            self._put(c.blob_index, batches.pop(c.blob_index))  # one read's worth
                            b = None
                    if not b:
                        b = batches[c.blob_index] = []
                        sizes[c.blob_index] = 0
                    b.append(c)
                    sizes[c.blob_index] += c.compressed_size
                if self._stop.is_set():
                    return
            for bi, chunks in batches.items():
                self._put(bi, chunks)
        except FormatError as e:
            self.errors += 1
            log.error("prefetch: planning stopped: %s", e)
        finally:
            for _ in self._threads:
                self._queue_put(_DONE)

    def _put(self, blob_index: int, chunks: list[ChunkInfo]) -> None:
        self.bytes_planned += sum(c.compressed_size for c in chunks)
        self._queue_put((blob_index, chunks))

    def _queue_put(self, item: tuple[int, list[ChunkInfo]] | None) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._stop.is_set():
                    return

    # -- workers --------------------------------------------------------------------------------
    def _work(self) -> None:
        blobs = self.image.blobs
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            blob_index, chunks = item
            if not 0 <= blob_index < len(blobs):
                continue
            wait = self.bucket.delay_for(sum(c.compressed_size for c in chunks))
            if wait and self._pause(wait):
                return
            try:
                self.chunks_fetched += self.cache.prefetch(blobs[blob_index], chunks, self.merging_size)
                self.batches += 1
            except (OSError, FormatError) as e:
                self.errors += 1
                log.warning("prefetch batch of blob %s failed: %s", blobs[blob_index].blob_id, e)

    def start(self) -> Prefetcher:
        self.started_at = time.time()
        for i in range(self.threads):
            t = threading.Thread(target=self._work, name=f"prefetch-{i}", daemon=True)
            self._threads.append(t)
        planner = threading.Thread(target=self._run, name="prefetch-plan", daemon=True)
        for t in self._threads:
            t.start()
        planner.start()
        self._planner = planner
        return self

    def _run(self) -> None:
        self._plan()
        for t in self._threads:
            t.join()
        self.finished_at = time.time()
        log.info("prefetch done: %d chunks in %d batches, %d errors, %.2fs", self.chunks_fetched, self.batches,
                 self.errors, self.finished_at - self.started_at)
        self.done.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        planner = getattr(self, "_planner", None)
        if planner is not None:
            planner.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)
