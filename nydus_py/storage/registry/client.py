"""An asyncio client of one OCI registry repository, as the pieces compose it: `RegistryHttp`
(pools, proxy, auth, tokens through `TokenRefresher`), `BlobReader` (lazy ranged reads with one
deadline each) and `ImageTransfer` (manifests, whole blobs, uploads for the image tools).

Callers use the operations bound here; create, use and close it inside one event loop."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from .auth import AuthState
from .config import RegistryConfig
from .errors import Counters, PermanentError, TransientError
from .http import RegistryHttp
from .reader import BlobReader
from .transfer import MANIFEST_TYPES, ImageTransfer


class RegistryClient:
    def __init__(self, cfg: RegistryConfig, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` times the token lifecycle (ages, backoffs, renewals); tests pass a manual one."""
        self.http = RegistryHttp(cfg, rng, clock)
        self.reader = BlobReader(self.http)
        self.transfer = ImageTransfer(self.http)
        self.start = self.http.start
        self.close = self.http.close
        self.read_blob = self.reader.read_blob
        self.blob_size = self.reader.blob_size
        self.blob_exists = self.transfer.blob_exists
        self.push_blob = self.transfer.push_blob
        self.push_blob_file = self.transfer.push_blob_file
        self.mount_blob = self.transfer.mount_blob
        self.open_upload = self.transfer.open_upload
        self.patch_upload = self.transfer.patch_upload
        self.close_upload = self.transfer.close_upload
        self.cancel_upload = self.transfer.cancel_upload
        self.push_manifest = self.transfer.push_manifest
        self.get_manifest = self.transfer.get_manifest
        self.has_tags = self.transfer.has_tags
        self.fetch_manifest = self.transfer.fetch_manifest
        self.get_blob = self.transfer.get_blob
        self.download_blob = self.transfer.download_blob
        self.stream_blob = self.transfer.stream_blob

    @property
    def cfg(self) -> RegistryConfig:
        return self.http.cfg

    @property
    def counters(self) -> Counters:
        return self.http.counters

    @property
    def auth(self) -> AuthState:
        return self.http.auth

    @property
    def scheme(self) -> str:
        """"https", or "http" after the sticky fallback."""
        return self.http.scheme


__all__ = ["MANIFEST_TYPES", "Counters", "PermanentError", "RegistryClient", "TransientError"]
