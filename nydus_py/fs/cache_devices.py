"""EROFS devices straight from the blob cache, for blobs that are complete when an image is mounted.

A blob whose every chunk is in the blob cache (`BlobCacheManager.complete_data`: chunk map all
ready, its stamp still bound to the data file, the file as long as pre-sized) is handed to the
kernel EROFS driver as the cache's data file itself (`device=<work_dir>/<blob>.blob.data`): the
file is the blob's uncompressed view byte for byte, so the kernel reads it without any round trip
through us. Other blobs go through the FUSE blob views as before.

Why not FUSE passthrough on the views (FOPEN_PASSTHROUGH with the data file as backing, which our
FUSE stack can do, see `blob_view`): a FUSE mount that negotiates passthrough is a stacked
filesystem (its s_stack_depth is the max_stack_depth it announced, >= 1), and Linux refuses a
file-backed EROFS device on a stacked filesystem ("file-backed devices cannot be on stacked
fses", fsconfig(create) fails with EINVAL; seen on 6.18). Giving EROFS the data file needs no
FUSE at all, and when every blob is complete the views are not even mounted.

Safety: a blob handed out stays pinned in the cache (never evicted) until the image is unmounted
(`release`). Nothing writes a complete blob's data file again, so the kernel reads exactly what
was verified. Not used with cache digest validation on (every cached read must be checked). A
blob completed after the mount stays on the FUSE path until the image is mounted again: EROFS
opens its devices once, at mount time. An EROFS mount detached lazily while busy keeps reading
its cache files after `release`: if the cache then evicts such a blob, the unlinked file lives
on (same bytes) until the last reader goes; only the space comes back later than accounted.
"""

import logging
import threading
from typing import Any

from ..rafs.errors import FormatError
from ..rafs.model import BlobInfo
from ..storage.cache import BlobCacheManager, CompleteData
from ..storage.device import BlobDevice

log = logging.getLogger(__name__)


class CacheDevices:
    """The blobs of one EROFS mount that are read from the blob cache's data files directly."""

    def __init__(self, device: BlobDevice, blobs: list[BlobInfo]) -> None:
        self.device = device
        self.blobs = blobs
        self._held: list[CompleteData] = []
        self._lock = threading.Lock()
        self.direct = 0  # blobs served from their cache data file (no FUSE)
        self.fallbacks = 0  # blobs served through the FUSE views instead
        self.errors = 0  # of those, because checking the cache failed

    def claim(self) -> list[str | None]:
        """Per blob (blob-table order) its cache data file, pinned until `release`; None for a
        blob that must go through the views (logged and counted with the reason)."""
        out: list[str | None] = []
        cache = getattr(self.device, "_chunked", None)
        if not isinstance(cache, BlobCacheManager):
            if self.blobs:
                log.info("EROFS devices: no blob cache, all %d blobs through the FUSE views", len(self.blobs))
            with self._lock:
                self.fallbacks += len(self.blobs)
            return [None] * len(self.blobs)
        for blob in self.blobs:
            try:
                got = cache.complete_data(blob)
            except (FormatError, OSError) as e:
                self._fallback(blob, f"checking the cache failed: {e}", error=True)
                out.append(None)
                continue
            if isinstance(got, str):
                self._fallback(blob, got, error=False)
                out.append(None)
                continue
            with self._lock:
                self._held.append(got)
                self.direct += 1
            log.info("blob %s is complete in the cache: EROFS reads %s directly", blob.blob_id, got.path)
            out.append(got.path)
        return out

    def _fallback(self, blob: BlobInfo, why: str, *, error: bool) -> None:
        with self._lock:
            self.fallbacks += 1
            self.errors += error
        log.log(logging.WARNING if error else logging.INFO, "blob %s: through the FUSE blob view, not the cache "
                "file: %s", blob.blob_id, why)

    def release(self) -> None:
        """The mount is gone: the blobs may be evicted again (idempotent)."""
        with self._lock:
            held, self._held = self._held, []
        for data in held:
            data.release()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"cache_devices": self.direct, "cache_device_fallbacks": self.fallbacks,
                    "cache_device_errors": self.errors, "cache_devices_pinned": len(self._held)}
