"""The `registry` backend as a synchronous BlobSource for FUSE worker threads.

One asyncio event loop runs in a daemon thread and owns the RegistryClient; callers submit
coroutines with run_coroutine_threadsafe and wait with a timeout a little past the read deadline,
so even a wedged loop cannot hang a reader: it gets OSError(EIO).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from ...rafs.model import BlobInfo
from .auth import decode_basic
from .client import Counters, RegistryClient
from .config import RegistryConfig

T = TypeVar("T")
GRACE = 2.0  # seconds past the client's own deadline before the caller stops waiting


class RegistryBackend:
    def __init__(self, cfg: RegistryConfig, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` is the token lifecycle's (see RegistryClient)."""
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="registry-io", daemon=True)
        self._thread.start()
        self.client = RegistryClient(cfg, clock=clock)
        self._closed = False
        self.hung_reads = 0
        self._call(self.client.start(), 30.0)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def counters(self) -> Counters:
        return self.client.counters

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        if self._closed:
            coro.close()
            raise OSError(errno.EIO, "registry backend is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            self.hung_reads += 1
            raise OSError(errno.EIO, f"registry request did not finish within {timeout:.1f}s") from None

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        """BlobSource: bytes [offset, offset+size) of `blob`; OSError(EIO) on failure."""
        return self._call(self.client.read_blob(blob.blob_id, offset, size), self.cfg.deadline + GRACE)

    def read_prefetch(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        """Like `read`, on the prefetch connection pool and with fewer retries."""
        return self._call(self.client.read_blob(blob.blob_id, offset, size, prefetch=True),
                          self.cfg.deadline + GRACE)

    def read_stream(self, blob: BlobInfo, offset: int, size: int) -> Iterator[bytes]:
        """Bytes [offset, offset+size) of `blob` in pieces as they arrive, on the prefetch
        connections (adaptive fetching's large sequential reads). OSError(EIO) when the stream
        breaks or stalls, possibly after some pieces; closing the iterator early drops the
        connection."""
        if self._closed:
            raise OSError(errno.EIO, "registry backend is closed")
        pieces: queue.SimpleQueue[bytes | BaseException | None] = queue.SimpleQueue()

        async def run() -> None:
            try:
                await self.client.reader.stream_blob(blob.blob_id, offset, size, pieces.put)
                pieces.put(None)
            except BaseException as e:  # cancelled too: the consumer is told, never left waiting
                pieces.put(e if isinstance(e, OSError) else OSError(errno.EIO, f"stream stopped: {e!r}"))
                if not isinstance(e, Exception):
                    raise

        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        idle = (self.cfg.timeout if self.cfg.timeout > 0 else self.cfg.deadline) + GRACE
        try:
            while True:
                try:
                    item = pieces.get(timeout=idle)
                except queue.Empty:
                    self.hung_reads += 1
                    raise OSError(errno.EIO, f"stream of blob {blob.blob_id} stalled for {idle:.1f}s") from None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            fut.cancel()

    def blob_size(self, blob_id: str) -> int:
        return self._call(self.client.blob_size(blob_id), self.cfg.deadline + GRACE)

    def push_blob(self, data: bytes, digest: str | None = None, chunk_size: int = 0) -> str:
        return self._call(self.client.push_blob(data, digest, chunk_size), 600.0)

    def push_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        return self._call(self.client.push_manifest(reference, body, media_type), 120.0)

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        return self._call(self.client.get_manifest(reference), 120.0)

    def get_blob(self, digest: str) -> bytes:
        return self._call(self.client.get_blob(digest), 600.0)

    def set_registry_auth(self, auth: str) -> None:
        """New basic credentials (base64 `user:pass`) at run time, from `PUT /api/v1/config`
        registry_auth: later token requests use them and a Basic header in use is replaced.
        ValueError when `auth` is not base64 of `user:pass`."""
        decode_basic(auth)
        state = self.client.auth

        def apply() -> None:  # on the loop that owns the auth state
            state.basic = auth
            if state.header is not None and state.header.startswith("Basic "):
                state._set(f"Basic {auth}")

        self.loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self._call(self.client.close(), 10.0)
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> RegistryBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
