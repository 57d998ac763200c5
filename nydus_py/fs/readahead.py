"""Chunk readahead for sequential readers.

The kernel asks for a file in 128 KiB READs, so a reader walks one 1 MiB chunk eight requests at
a time and, without help, waits for each chunk's fetch + decompression in turn. Once a file is
read sequentially, the next chunks are loaded into the device's chunk cache by a small thread
pool while the current one is being served; the decompressors and pread release the GIL, so
this overlaps on another core. Random readers never trigger it (it would only waste work).
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from ..rafs.model import ChunkInfo, RafsImage
from ..storage.device import BlobDevice

log = logging.getLogger(__name__)

# how far a READ may land from where the previous one ended and still count as sequential:
# the kernel's async readahead requests arrive out of order across worker threads, by about a
# request or two
_MIN_SLACK = 256 << 10
_MAX_TRACKED = 4096


class SequentialReadahead:
    def __init__(self, image: RafsImage, device: BlobDevice, chunks: int = 2, threads: int = 2) -> None:
        self.image = image
        self.device = device
        self.chunks = chunks
        self.threads = threads
        self.submitted = 0
        self._last_end: dict[int, int] = {}
        self._inflight: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def after_read(self, ino: int, offset: int, end: int, file_size: int) -> None:
        """Note a served read of [offset, end) of `ino`; start loading the following chunks
        when the reader is sequential and has just entered a new chunk."""
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
        start = ((end - 1) // cs + 1) * cs
        todo: list[ChunkInfo] = []
        try:
            chunks = self.image.chunks(ino, start, self.chunks * cs)
        except Exception:  # the reader itself will meet (and report) a broken chunk table
            return
        with self._lock:
            for c in chunks:
                key = (c.blob_index, c.compressed_offset)
                if key not in self._inflight and not self.device.holds(c):  # (no thread hand-off for a hit)
                    self._inflight.add(key)
                    todo.append(c)
            if todo and self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rafs-readahead")
            pool = self._pool
        for c in todo:
            assert pool is not None
            self.submitted += 1
            pool.submit(self._load, c)

    def _load(self, c: ChunkInfo) -> None:
        try:
            self.device.load_chunk(c)
        except Exception as e:  # logged by the device; the reader gets EIO when it arrives
            log.debug("readahead of chunk at %d failed: %s", c.compressed_offset, e)
        finally:
            with self._lock:
                self._inflight.discard((c.blob_index, c.compressed_offset))

    def close(self) -> None:
        """Stop the pool (pending loads are dropped); a later read starts a new one."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
