"""A tiny read-only FUSE filesystem with one regular file per blob: the blob's uncompressed view.

This is what the kernel EROFS driver reads as its devices (`device=` per blob) when an image is
served with `--fs-driver erofs`: metadata never leaves the kernel, and only EROFS page-cache
misses on file data reach Python, as READs of `<mount>/<blob id>`. They are served by the same
`BlobDevice` chunk machinery as the FUSE driver (blob cache, lazy, digest-checked): a chunk that
cannot be had is EIO, never zeros or wrong bytes. A range that failed moments ago is served
from the cache alone, EIO at once for what is not there (`failed_reads`): the kernel asks again
for the page the reader wanted right after a failed readahead, and one read(2) must not wait two
backend deadlines; a readahead spans neighbouring files, whose chunks may well have arrived.

Views of remote blobs are opened with FOPEN_DIRECT_IO: a view has no page cache of its own, so a
READ is exactly what EROFS asked for (its readahead stops at the end of the file being read) and
data is not cached twice. With the view's own page cache, readahead on the view ramped up to 1 MiB windows
that ran across neighbouring files: reading a startup set fetched 2.35x the bytes it read (5.7x
in bench_lazy_registry), where it now fetches about what it reads.

Passthrough: when the transport lends its backing registry (`backing`) and the kernel agrees
to FUSE passthrough, opening the view of a blob that is complete in the blob cache (every chunk
cached, the map's stamp and the data file's length checked: `BlobCacheManager.complete_data`)
answers FOPEN_PASSTHROUGH on the cache's data file, which has exactly the view's layout: the
kernel then reads it itself and no READ of that view reaches us. The blob stays pinned in the
cache (never evicted) until the last such open is released. Any other open is served by READs
(each such fallback is logged and counted). While a view is open one way, further opens of it
go the same way (the kernel refuses to mix them). `ErofsServe` does not ask for this: Linux
refuses EROFS devices on a passthrough FUSE mount (a stacked filesystem), so it hands EROFS the
cache's data file itself instead (`cache_devices`).

Decode-ahead (`readahead_chunks`, on for local blobs): once a view is read sequentially, its
next chunks are loaded (read and decompressed) by a small pool while the current READ is
answered (`readahead.SequentialReadahead` over the blob's chunk table). EROFS reads a big file
in 1 MiB READs that straddle two chunks; without it each READ waited for the chunk its
predecessor was still decoding, so a file was decoded one chunk after another on one thread.
Not for remote blobs: what follows in a blob is mostly other files, and there a chunk read ahead
is a network fetch that the bytes-fetched bound of lazy start-up would pay for.

Inodes: 1 is the root directory, 2 + i is blob i (blob-table order).
"""

import errno
import logging
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..fuse.abi import FOpenFlags, InitFlags
from ..fuse.api import (
    DEFAULT_WANT,
    BackingFiles,
    Entry,
    Filesystem,
    FuseAttr,
    FuseError,
    Opened,
    OpenResult,
    StatFs,
)
from ..rafs.errors import FormatError
from ..rafs.layout_v6 import EROFS_BLOCK_SIZE
from ..rafs.model import BlobInfo, RafsImage
from ..storage.cache import BlobCacheManager, CompleteData
from ..storage.device import BlobDevice
from .failed_reads import RecentFailures
from .readahead import SequentialReadahead

log = logging.getLogger(__name__)

ROOT = 1
FIRST_BLOB = 2
TIMEOUT = 86400.0 * 365  # the set of blobs never changes while mounted


def view_size(blob: BlobInfo, blocks: int = 0) -> int:
    """Size of a blob's view file: its uncompressed size, at least the device slot's blocks."""
    return max(blob.uncompressed_size, blocks * EROFS_BLOCK_SIZE)


class BlobViewStats:
    """What kernel reads through the views cost: READs, bytes served, failures."""

    def __init__(self) -> None:
        self.reads = 0
        self.read_bytes = 0
        self.read_errors = 0
        self.fast_failures = 0  # answered EIO from the memory of a failure moments ago
        self.opens = 0
        self.passthrough_negotiated = False
        self.passthrough_opens = 0  # opens answered with FOPEN_PASSTHROUGH (reads never reach us)
        self.passthrough_fallbacks = 0  # opens served by READs although passthrough was wanted
        self.passthrough_errors = 0  # of those, because something failed (not merely incomplete)
        self.passthrough_files = 0  # views open with passthrough right now
        self._lock = threading.Lock()

    def count(self, nbytes: int, failed: bool = False, fast: bool = False) -> None:
        with self._lock:
            self.reads += 1
            self.read_bytes += nbytes
            self.read_errors += failed
            self.fast_failures += fast

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"kernel_reads": self.reads, "kernel_read_bytes": self.read_bytes,
                    "kernel_read_errors": self.read_errors, "kernel_fast_failures": self.fast_failures,
                    "view_opens": self.opens, "passthrough_negotiated": self.passthrough_negotiated,
                    "passthrough_opens": self.passthrough_opens,
                    "passthrough_fallbacks": self.passthrough_fallbacks,
                    "passthrough_errors": self.passthrough_errors, "passthrough_files": self.passthrough_files}


@dataclass
class _ViewOpen:
    """The open files of one view: how many, and their passthrough backing (0: READs)."""

    count: int = 0
    backing_id: int = 0
    data: CompleteData | None = None



class BlobViewFilesystem(Filesystem):
    """`local`: the blobs are on local disk (a `localfs` backend), where a neighbour fetched along
    costs a pread, not a network transfer: views then keep a page cache of their own
    (KEEP_CACHE), whose readahead serves many small files with one READ. Remote blobs get
    FOPEN_DIRECT_IO (see the module docstring). `readahead_chunks`: how many chunks a sequential
    reader gets decoded ahead (0: none; None: 4 for local blobs, else none)."""

    def __init__(self, image: RafsImage, device: BlobDevice, *, local: bool = False,
                 readahead_chunks: int | None = None) -> None:
        self.image = image
        self.device = device
        self.local = local
        self.blobs = list(image.blobs)
        slots = getattr(image, "devices", None) or []
        self.sizes = [view_size(b, slots[i].blocks if i < len(slots) else 0) for i, b in enumerate(self.blobs)]
        self.names = {b.blob_id.encode(): FIRST_BLOB + i for i, b in enumerate(self.blobs)}
        self.stats = BlobViewStats()
        self.failures = RecentFailures()
        if readahead_chunks is None:
            readahead_chunks = 4 if local else 0
        chunks_of = getattr(image, "blob_chunks", None)
        self.readahead = (SequentialReadahead(image, device, readahead_chunks, chunks_of=chunks_of, track_hits=True,
                                              release_behind=0, min_chunk=image.chunk_size // 2)
                          if readahead_chunks > 0 and callable(chunks_of) else None)
        # Set by the transport before mounting: passthrough is then asked for at INIT.
        self.backing: BackingFiles | None = None
        self._passthrough = False  # negotiated
        self._views: dict[int, _ViewOpen] = {}
        self._views_lock = threading.Lock()

    def init(self, capable: InitFlags) -> InitFlags:
        return DEFAULT_WANT | InitFlags.PASSTHROUGH if self.backing is not None else DEFAULT_WANT

    def negotiated(self, flags: InitFlags) -> None:
        self._passthrough = bool(flags & InitFlags.PASSTHROUGH)
        with self.stats._lock:
            self.stats.passthrough_negotiated = self._passthrough
        if self.backing is not None and not self._passthrough:
            log.warning("blob views: the kernel did not agree to FUSE passthrough; every view is read "
                        "through FUSE READs")

    def paths(self, mountpoint: str) -> list[str]:
        """The device file of every blob, in blob-table order."""
        return [f"{mountpoint}/{b.blob_id}" for b in self.blobs]

    def _blob(self, ino: int) -> int:
        i = ino - FIRST_BLOB
        if not 0 <= i < len(self.blobs):
            raise FuseError(errno.ENOENT)
        return i

    def _attr(self, ino: int) -> FuseAttr:
        if ino == ROOT:
            return FuseAttr(ino=ROOT, mode=stat.S_IFDIR | 0o500, nlink=2, blksize=EROFS_BLOCK_SIZE)
        size = self.sizes[self._blob(ino)]
        return FuseAttr(ino=ino, size=size, blocks=(size + 511) // 512, mode=stat.S_IFREG | 0o400, nlink=1,
                        blksize=EROFS_BLOCK_SIZE)

    def lookup(self, parent: int, name: bytes) -> Entry:
        if parent != ROOT:
            raise FuseError(errno.ENOTDIR)
        if name in (b".", b".."):
            return Entry(ROOT, 0, self._attr(ROOT), TIMEOUT, TIMEOUT)
        ino = self.names.get(name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        return Entry(ino, 0, self._attr(ino), TIMEOUT, TIMEOUT)

    def getattr(self, ino: int) -> tuple[FuseAttr, float]:
        return self._attr(ino), TIMEOUT

    def readlink(self, ino: int) -> bytes:
        raise FuseError(errno.EINVAL)

    def open(self, ino: int, flags: int) -> OpenResult:
        if ino == ROOT:
            raise FuseError(errno.EISDIR)
        i = self._blob(ino)
        with self._views_lock:
            view = self._views.get(ino)
            if view is None:
                view = self._views[ino] = self._first_open(i)
            elif self.backing is not None and not view.backing_id:
                self._fallback(i, "the view is already open on the READ path", error=False)
            view.count += 1
            with self.stats._lock:
                self.stats.opens += 1
                if view.backing_id:
                    self.stats.passthrough_opens += 1
                    self.stats.passthrough_files += 1
            if view.backing_id:
                return Opened(0, FOpenFlags.PASSTHROUGH, view.backing_id)
        return 0, FOpenFlags.KEEP_CACHE if self.local else FOpenFlags.DIRECT_IO

    def _first_open(self, i: int) -> _ViewOpen:
        """(views lock held) Passthrough on the cache's data file when the blob is complete."""
        if self.backing is None:
            return _ViewOpen()
        if not self._passthrough:
            self._fallback(i, "passthrough was not negotiated with the kernel", error=False)
            return _ViewOpen()
        cache = getattr(self.device, "_chunked", None)
        if not isinstance(cache, BlobCacheManager):
            self._fallback(i, "no blob cache to pass through to", error=False)
            return _ViewOpen()
        try:
            got = cache.complete_data(self.blobs[i])
        except (FormatError, OSError) as e:
            self._fallback(i, f"checking the cache failed: {e}", error=True)
            return _ViewOpen()
        if isinstance(got, str):
            self._fallback(i, got, error=False)
            return _ViewOpen()
        try:
            backing_id = self.backing.backing_open(got.fd)
        except OSError as e:
            got.release()
            self._fallback(i, f"FUSE_DEV_IOC_BACKING_OPEN of {got.path} failed: {e}", error=True)
            return _ViewOpen()
        log.info("blob view %s: passthrough to %s (backing id %d)", self.blobs[i].blob_id, got.path, backing_id)
        return _ViewOpen(0, backing_id, got)

    def _fallback(self, i: int, why: str, *, error: bool) -> None:
        with self.stats._lock:
            self.stats.passthrough_fallbacks += 1
            self.stats.passthrough_errors += error
        log.log(logging.WARNING if error else logging.INFO, "blob view %s: no passthrough, served by FUSE "
                "READs: %s", self.blobs[i].blob_id, why)

    def release(self, ino: int, fh: int) -> None:
        with self._views_lock:
            view = self._views.get(ino)
            if view is None:
                return
            view.count -= 1
            if view.backing_id:
                with self.stats._lock:
                    self.stats.passthrough_files -= 1
            if view.count > 0:
                return
            del self._views[ino]
        self._drop(view)

    def _drop(self, view: _ViewOpen) -> None:
        """The last open of a view is gone: unregister its backing, unpin its blob."""
        if view.backing_id and self.backing is not None:
            try:
                self.backing.backing_close(view.backing_id)
            except OSError as e:
                log.warning("closing passthrough backing id %d: %s", view.backing_id, e)
        if view.data is not None:
            view.data.release()

    def release_all(self) -> None:
        """The connection is gone (unmounted, aborted): views it left open are released now,
        their blobs unpinned. Idempotent."""
        with self._views_lock:
            views, self._views = list(self._views.values()), {}
        with self.stats._lock:
            self.stats.passthrough_files = 0
        for view in views:
            self._drop(view)

    def destroy(self) -> None:
        self.release_all()
        self.close()

    def close(self) -> None:
        """Stop the decode-ahead pool (a later read starts a new one)."""
        if self.readahead is not None:
            self.readahead.close()

    def snapshot(self) -> dict[str, Any]:
        """The views' counters, with decode-ahead's."""
        out = self.stats.snapshot()
        ra = self.readahead
        out.update(ra.snapshot() if ra is not None else SequentialReadahead.idle_snapshot())
        return out

    def readdir(self, ino: int, fh: int, offset: int) -> Iterator[tuple[bytes, int, int, int]]:
        if ino != ROOT:
            raise FuseError(errno.ENOTDIR)
        entries = [(b".", ROOT, stat.S_IFDIR), (b"..", ROOT, stat.S_IFDIR)]
        entries += [(b.blob_id.encode(), FIRST_BLOB + i, stat.S_IFREG) for i, b in enumerate(self.blobs)]
        for k in range(offset, len(entries)):
            name, child, typ = entries[k]
            yield name, child, typ, k + 1

    def statfs(self, ino: int) -> StatFs:
        blocks = sum(self.sizes) // EROFS_BLOCK_SIZE
        return StatFs(blocks=blocks, files=len(self.blobs) + 1, bsize=EROFS_BLOCK_SIZE, frsize=EROFS_BLOCK_SIZE)

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes | memoryview:
        i = self._blob(ino)
        end = min(self.sizes[i], offset + size)
        if self.failures.covers(ino, offset, end):
            # The kernel's follow-up READ after a failed readahead: served when its chunks are
            # cached (a readahead spans files, the failed chunk may be a neighbour's), else EIO
            # at once rather than a second backend deadline.
            try:
                data = self.device.read_blob(i, offset, size, self.sizes[i], cached_only=True)
            except (FormatError, OSError):
                self.stats.count(0, failed=True, fast=True)
                log.info("blob view %s [%d, +%d): this range failed moments ago and is not cached; EIO at once",
                         self.blobs[i].blob_id, offset, size)
                raise FuseError(errno.EIO) from None
            self.stats.count(len(data))
            return data
        try:
            data = self.device.read_blob(i, offset, size, self.sizes[i])
        except (FormatError, OSError) as e:
            self.stats.count(0, failed=True)
            self.failures.failed(ino, offset, end)
            log.error("blob view %s [%d, +%d): %s", self.blobs[i].blob_id, offset, size, e)
            raise FuseError(errno.EIO) from None
        self.stats.count(len(data))
        if self.readahead is not None and data:
            self.readahead.after_read(i, offset, offset + len(data), self.sizes[i])
        return data
