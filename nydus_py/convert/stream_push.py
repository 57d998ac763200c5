"""A layer's blob uploaded while it is written (`BlobStream`), so that its push does not wait
for the layer's build and only the last piece and the PUT remain once the blob is complete.

The build's `BlobWriter` tells a `BlobStream` (its `BlobWatch`) how far the blob file has got;
`BlobStream.run` opens an upload session as soon as the file exists and sends the bytes as they
are written, read back from the file `read` bytes at a time (memory stays at one read piece,
whatever the blob): by default in one PATCH of unknown length (chunked transfer encoding, no
Content-Range: the stream upload `docker push` sends) whose body follows the file to its end; with
`piece` > 0 in PATCHes of `piece` bytes (Content-Range), each sent once that many more bytes are
in the file. Then `PUT ?digest=` completes the session (the registry checks the digest: the pushed
blob is the local one byte for byte).

Why one PATCH by default: docker-registry takes a PATCH piece at a cost (upload state saved and
resumed); the 55 MB blob of the benchmark's rebuild went up in 0.37-0.44 s as 8 MiB pieces, in
0.30-0.32 s as one PUT once complete, and in 0.24-0.34 s as one PATCH that followed the file,
which started ~0.1 s earlier (h46 timelines).

It ends with True (uploaded), False (the target turned out to have that blob already: the
session is cancelled, logged) or None (the blob was dropped: a commit writes it again without
the chunks of a layer below, or it stored nothing). A registry that refuses the first PATCH
raises `StreamRefused`; any other failure raises as it is. The caller then pushes the finished
file whole (`Converter._push_streamed`: HEAD, one PUT, the `push_retry` path), logged and counted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..storage.registry.transfer import HttpStatusError
from .push_retry import RETRY_STATUSES

log = logging.getLogger(__name__)

PATCH_PIECE = 0  # bytes per PATCH; 0: one PATCH that follows the file (see the docstring)
# bytes read from the file and handed to the connection at a time. Streams run beside the builds
# (two at once when a layer streams once those below are done, with a backlog to send), and on
# Python 3.11 each piece is copied again by the transport's writelines, the rest of it into the
# transport's buffer when the socket is full: about 3 pieces held per stream
READ_PIECE = 256 << 10


class StreamRefused(Exception):
    """The registry does not take PATCH uploads (it refused the first one)."""


@dataclass
class Target:
    """What the streams of one target registry learn: once it refused a PATCH, the streams that
    have not sent one yet do not try (`StreamRefused` at once: their blobs go up whole)."""

    refused: bool = False


@dataclass
class StreamStats:
    streamed: int = 0  # blobs uploaded while they were written
    refused: int = 0  # streams the registry refused (PATCH): pushed whole instead
    failed: int = 0  # streams that failed midway: pushed whole instead
    dropped: int = 0  # streams whose blob was written again at its commit: pushed whole instead
    whole: int = 0  # blobs not streamed (a layer below was still being built): pushed once committed
    existed: int = 0  # blobs the target had already, found once streamed


class BlobStream:
    """Follows one blob file as it is written (a `builder.blob_writer.BlobWatch`: its methods
    come from build threads and are handed to `loop`) and uploads it (`run`, in `loop`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str, piece: int = PATCH_PIECE,
                 read: int = READ_PIECE, target: Target | None = None) -> None:
        self.loop = loop
        self.target = target or Target()
        self.label = label
        self.piece = piece
        self.read = read
        self.fd: int | None = None
        self.size = 0  # bytes in the file
        self.done = False  # the blob is complete (or dropped)
        self.blob_id: str | None = None  # its digest's hex, once complete
        self.sent = 0  # bytes the registry took
        self.patches = 0
        self._ended = False  # `run` is over: a late file is closed at once
        self._exists: asyncio.Task[bool] | None = None  # HEAD of the complete blob (one PATCH)
        self._changed = asyncio.Event()

    # -- BlobWatch (build threads) ---------------------------------------------------------------

    def opened(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if not self._post(self._set_fd, fd):
            os.close(fd)

    def grew(self, size: int) -> None:
        self._post(self._set_size, size)

    def closed(self, blob_id: str | None) -> None:
        self._post(self._set_done, blob_id)

    def _post(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the conversion is over
            return False
        return True

    def _set_fd(self, fd: int) -> None:
        if self._ended:
            os.close(fd)
            return
        self.fd = fd
        self._changed.set()

    def _set_size(self, size: int) -> None:
        self.size = size
        if size - self.sent >= max(1, self.piece):
            self._changed.set()

    def _set_done(self, blob_id: str | None) -> None:
        self.done, self.blob_id = True, blob_id
        self._changed.set()

    # -- the upload (event loop) -----------------------------------------------------------------

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    async def run(self, dst: Any) -> bool | None:
        """Upload the blob to `dst` (a `RegistryClient`) as it grows; see the module docstring."""
        location: str | None = None
        exists: asyncio.Task[bool] | None = None
        try:
            await self._until(lambda: self.fd is not None or self.done)
            if self.fd is None:  # no file was made: the layer stored no chunk
                return None
            location = await dst.open_upload()
            if self.piece <= 0:  # one PATCH that follows the file to its end
                try:
                    location = await self._patch(dst, location, None)
                except Exception:
                    if self.done and self.blob_id is None:  # (the body stopped: the blob was dropped)
                        await self._cancel(dst, location)
                        return None
                    raise
                exists = self._exists
            while self.piece > 0:
                await self._until(lambda: self.done or self.size - self.sent >= self.piece)
                if self.done and self.blob_id is None:
                    await self._cancel(dst, location)
                    return None
                if self.done and exists is None:  # asked while the last pieces go
                    exists = asyncio.create_task(dst.blob_exists(f"sha256:{self.blob_id}"))
                end = min(self.size, self.sent + self.piece)
                if end == self.sent:
                    break
                location = await self._patch(dst, location, end)
            if exists is None:
                exists = asyncio.create_task(dst.blob_exists(f"sha256:{self.blob_id}"))
            if await exists:
                log.info("%s: the target had blob sha256:%s already; it was streamed for nothing",
                         self.label, self.blob_id)
                await self._cancel(dst, location)
                return False
            await dst.close_upload(location, f"sha256:{self.blob_id}")
            log.debug("%s: pushed while written, %d bytes in %d PATCHes", self.label, self.sent, self.patches)
            return True
        except BaseException:
            for t in {exists, self._exists} - {None}:
                assert t is not None
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
            if location is not None and not _cancelled():
                await self._cancel(dst, location)
            raise
        finally:
            self._ended = True
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    async def _patch(self, dst: Any, location: str, end: int | None) -> str:
        """PATCH bytes [sent, end), or with `end` None the whole blob as it is written."""
        if self.patches == 0 and self.target.refused:
            raise StreamRefused("the registry refused a PATCH upload before")
        timer: list[asyncio.Timeout] = []
        body = self._follow(dst, timer) if end is None else self._body(self.sent, end, timer)
        try:
            location = await dst.patch_upload(location, self.sent, end, body, timer)
        except HttpStatusError as e:
            if self.patches == 0 and e.status not in RETRY_STATUSES:
                self.target.refused = True
                raise StreamRefused(f"the registry refused a PATCH upload: {e}") from e
            raise
        self.patches += 1
        self.sent = end if end is not None else self.size
        return location

    def _body(self, start: int, end: int, timer: list[asyncio.Timeout]) -> Callable[[], AsyncIterator[bytes]]:
        """Bytes [start, end) of the file, `read` at a time (each moves the request's timeout on)."""
        fd = self.fd
        assert fd is not None

        async def body() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            pos = start
            while pos < end:
                data = os.pread(fd, min(self.read, end - pos), pos)
                if not data:
                    raise OSError(errno.EIO, f"{self.label}: the blob file is shorter than announced")
                pos += len(data)
                if timer:
                    timer[0].reschedule(max(timer[0].when() or 0.0, loop.time() + 60.0))
                yield data

        return body

    def _follow(self, dst: Any, timer: list[asyncio.Timeout]) -> Callable[[], AsyncIterator[bytes]]:
        """The blob's bytes as they are written, `read` at a time, to its end; a dropped blob
        stops the body (an error: the request fails). Once the blob is complete, whether the
        target has it is asked beside the last pieces (`_exists`)."""
        fd = self.fd
        assert fd is not None

        async def body() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            pos = 0
            while True:
                self.sent = pos  # (what the connection took: waits on growth beyond it)
                await self._until(lambda p=pos: self.done or self.size > p)  # type: ignore[misc]
                if timer:
                    timer[0].reschedule(max(timer[0].when() or 0.0, loop.time() + 60.0))
                if self.done and self.blob_id is None:
                    raise OSError(errno.ECANCELED, f"{self.label}: the blob was dropped")
                if self.done and self._exists is None:
                    self._exists = asyncio.create_task(dst.blob_exists(f"sha256:{self.blob_id}"))
                if pos >= self.size:
                    return
                data = os.pread(fd, min(self.read, self.size - pos), pos)
                if not data:
                    raise OSError(errno.EIO, f"{self.label}: the blob file is shorter than announced")
                pos += len(data)
                yield data

        return body

    async def _cancel(self, dst: Any, location: str) -> None:
        try:
            await dst.cancel_upload(location)
        except OSError as e:  # the registry expires the session itself
            log.info("%s: cancelling its upload session failed: %s", self.label, e)


def _cancelled() -> bool:
    """Whether the current task is being cancelled (no more requests then)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

