"""Chunk readahead for sequential readers.

The kernel asks for a file in 128 KiB READs, so a reader walks one 1 MiB chunk eight requests at
a time and, without help, waits for each chunk's fetch + decompression in turn. Once a file is
read sequentially, the next chunks are loaded into the device's chunk cache by a small thread
pool while the current one is being served; the decompressors and pread release the GIL, so
this overlaps on another core. Random readers never trigger it (it would only waste work).
With `release_behind`, the chunks a sequential reader has passed are dropped from the in-memory
chunk cache: the kernel's page cache holds those bytes now, and the next chunks decode into
memory already mapped instead of fresh pages (in a micro-benchmark a third of a 1 MiB zstd
decode was page faults and zeroing). The blob views do it for any read (EROFS's page cache
holds the file); `rafs_fs` only for files of at least a quarter of the chunk cache, which a
sequential read would otherwise flush of everything else (a smaller file read again, say
with O_DIRECT, still hits).

The same serves the blob views of the EROFS driver (`chunks_of`: a blob's chunks by view offset
instead of a file's): EROFS asks for a big file in 1 MiB READs that straddle two chunks, so
without it each READ waited for the previous one's second chunk, and every chunk of the file
was decoded in turn on one thread.
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..rafs.model import ChunkInfo, RafsImage
from ..storage.device import BlobDevice

log = logging.getLogger(__name__)

# how far a READ may land from where the previous one ended and still count as sequential:
# the kernel's async readahead requests arrive out of order across worker threads, by about a
# request or two
_MIN_SLACK = 256 << 10
_MAX_TRACKED = 4096


# (key, offset, size) -> the chunks overlapping that range of the file (or blob view) `key`
ChunksOf = Callable[[int, int, int], list[ChunkInfo]]


# the metrics keys of `SequentialReadahead.snapshot`, and the attributes they count
_COUNTERS = (("decode_ahead_submitted", "submitted"), ("decode_ahead_loaded", "loaded"), ("decode_ahead_hits", "hits"),
             ("decode_ahead_skipped", "skipped"), ("released_behind", "released"))


class SequentialReadahead:
    """`chunks_of` maps a range of what is read to its chunks: the image's files (inode numbers,
    the default) or a blob's uncompressed view (blob indexes, `RafsImage.blob_chunks`).
    Counters: `submitted` loads, how many `loaded` without error, and `hits`: chunks a later
    read found loaded, or being loaded, ahead (tracked only for `track_hits`: a chunk lookup
    per read while any is outstanding). `release_behind`: the chunks a sequential reader of
    something at least that big (0: anything) has passed leave the in-memory chunk cache
    (`released`, see `BlobDevice.release`); None: never. Chunks under `min_chunk` bytes are not
    loaded ahead (small files' chunks, past a big file in a view: quick to decode when asked
    for, and the hand-off would cost more than it saves)."""

    def __init__(self, image: RafsImage, device: BlobDevice, chunks: int = 2, threads: int = 2, *,
                 chunks_of: ChunksOf | None = None, track_hits: bool = False,
                 release_behind: int | None = None, min_chunk: int = 0) -> None:
        self.image = image
        self.device = device
        self.chunks = chunks
        self.threads = threads
        self.chunks_of: ChunksOf = chunks_of or image.chunks
        self.track_hits = track_hits
        self.release_behind = release_behind
        self.min_chunk = min_chunk
        self.released = 0
        self.skipped = 0  # loads dropped: the reader had passed the chunk before the pool got to it
        self.submitted = 0
        self.loaded = 0
        self.hits = 0
        self._last_end: dict[int, int] = {}
        self._inflight: set[tuple[int, int]] = set()
        # submitted ahead and not read since (track_hits): per key, chunk -> its [start, end) there
        self._ahead: dict[int, dict[tuple[int, int], tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def after_read(self, ino: int, offset: int, end: int, file_size: int) -> None:
        """Note a served read of [offset, end) of `ino`; start loading the following chunks
        when the reader is sequential and has just entered a new chunk."""
        if self._ahead and ino in self._ahead:
            self._count_hits(ino, offset, end)
        prev = self._last_end.get(ino)
        if len(self._last_end) >= _MAX_TRACKED:
            self._last_end.clear()
        self._last_end[ino] = end
        cs = self.image.chunk_size
        if prev is None or cs <= 0 or end >= file_size:
            return
        slack = max(_MIN_SLACK, 2 * (end - offset))
        if not -slack <= offset - prev <= slack:
            return
        if (end - 1) // cs == (prev - 1) // cs:
            return  # still inside the chunk whose successors were already asked for
        if self.release_behind is not None and file_size >= self.release_behind:
            self._release_behind(ino, offset - slack - cs)
        start = ((end - 1) // cs + 1) * cs
        todo: list[ChunkInfo] = []
        try:
            # (a view goes on past a big file's end with small files' chunks: one decoded chunk
            # record says so, not the hundreds in the window)
            if self.min_chunk and not any(c.uncompressed_size >= self.min_chunk for c in self.chunks_of(ino, start, 1)):
                return
            chunks = self.chunks_of(ino, start, self.chunks * cs)[: self.chunks + 1]
        except Exception:  # the reader itself will meet (and report) a broken chunk table
            return
        with self._lock:
            for c in chunks:
                key = (c.blob_index, c.compressed_offset)
                if c.uncompressed_size < self.min_chunk:
                    continue
                # no thread hand-off for a hit, nor a pool thread parked on another reader's load
                if key not in self._inflight and not self.device.holds(c) and not self.device.loading(c):
                    self._inflight.add(key)
                    todo.append(c)
                    if self.track_hits:
                        if len(self._ahead) >= _MAX_TRACKED:
                            self._ahead.clear()
                        self._ahead.setdefault(ino, {})[key] = (c.file_offset, c.file_offset + c.uncompressed_size)
            if todo and self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rafs-readahead")
            pool = self._pool
        for c in todo:
            assert pool is not None
            self.submitted += 1
            pool.submit(self._load, c, ino)

    def _release_behind(self, key: int, at: int) -> None:
        """Release the chunk holding position `at` (a chunk is at most `cs` long, so it ends
        before the slack window of READs that may still arrive out of order)."""
        if at < 0:
            return
        try:
            chunks = self.chunks_of(key, at, 1)
        except Exception:
            return
        n = sum(self.device.release(c) for c in chunks)
        if n:
            with self._lock:
                self.released += n

    def _count_hits(self, key: int, offset: int, end: int) -> None:
        """The chunks loaded ahead that [offset, end) of `key` reads are hits; those far
        behind it will not be read (by this reader) any more."""
        with self._lock:
            ahead = self._ahead.get(key)
            if not ahead:
                return
            for k, (lo, hi) in list(ahead.items()):
                if lo < end and hi > offset:
                    del ahead[k]
                    self.hits += 1
                elif hi <= offset - 4 * _MIN_SLACK:
                    del ahead[k]
            if not ahead:
                del self._ahead[key]

    def _load(self, c: ChunkInfo, ino: int) -> None:
        key = (c.blob_index, c.compressed_offset)
        # (`file_offset` is the chunk's place in what `ino` names: a file, or a blob's view)
        passed = c.file_offset + c.uncompressed_size <= self._last_end.get(ino, 0)
        ok = False
        try:
            if not passed:  # else the reader got there first, and loaded it itself
                self.device.load_chunk(c)
                ok = True
        except Exception as e:  # logged by the device; the reader gets EIO when it arrives
            log.debug("readahead of chunk at %d failed: %s", c.compressed_offset, e)
        finally:
            with self._lock:
                self._inflight.discard(key)
                self.loaded += ok
                self.skipped += passed
                if not ok and ino in self._ahead:
                    self._ahead[ino].pop(key, None)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {key: getattr(self, attr) for key, attr in _COUNTERS}

    @staticmethod
    def idle_snapshot() -> dict[str, int]:
        """The counters of a reader with no decode-ahead (the same keys, all 0)."""
        return dict.fromkeys((key for key, _attr in _COUNTERS), 0)

    def close(self) -> None:
        """Stop the pool (pending loads are dropped); a later read starts a new one."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
