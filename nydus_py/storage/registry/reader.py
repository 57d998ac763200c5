"""Lazy blob reads: `GET /v2/<repo>/blobs/sha256:<id>` with one `Range`.

The answer must be exactly the asked bytes: a 206 whose Content-Range matches, or a whole-blob 200
that is sliced (counted, since pull-through caches do it). Anything short, long or mislabelled is
an error that is retried, never data. Each read has one deadline, retries included; when it passes
or retries run out the caller gets OSError(EIO). Redirects (6.4) are followed by hand without the
Authorization header, and the target is cached per blob.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar
from urllib.parse import urljoin

import aiohttp

from .errors import PermanentError, TransientError, backoff, describe
from .http import RegistryHttp

log = logging.getLogger(__name__)

PREFETCH_RETRIES = 1
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_SKIP_PIECE = 1 << 20
STREAM_PIECE = 256 << 10  # bytes handed on at a time by a stream
T = TypeVar("T")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of `bytes a-b/N`; None when absent or malformed."""
    if not value:
        return None
    m = _CONTENT_RANGE.match(value)
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first:
        return None
    return first, last, total


class BlobReader:
    def __init__(self, http: RegistryHttp) -> None:
        self.http = http
        self.redirects: dict[str, str] = {}  # blob id -> redirect target that served it

    async def read_blob(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        """Exactly bytes [offset, offset+size) of the blob, or OSError(EIO) within the deadline."""
        if size <= 0:
            return b""
        if offset < 0 or size > 1 << 31:
            raise OSError(errno.EINVAL, f"blob {blob_id}: impossible read of {size} bytes at {offset}")
        self.http.counters.reads += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.http.cfg.deadline
        retries = min(PREFETCH_RETRIES, self.http.cfg.retries) if prefetch else self.http.cfg.retries
        attempt = 0
        last: BaseException | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            budget = min(self.http.cfg.timeout, remaining) if self.http.cfg.timeout > 0 else remaining
            try:
                async with asyncio.timeout(budget):
                    data: bytes = await self._attempt(blob_id, offset, size, prefetch)
                self.http.counters.read_bytes += len(data)
                return data
            except PermanentError as e:
                last = e
                break
            except TimeoutError as e:
                self.http.counters.timeouts += 1
                last = e
            except TransientError as e:
                last = e
            except (aiohttp.ClientError, OSError) as e:
                self.http.counters.network_errors += 1
                last = e
            attempt += 1
            if attempt > retries:
                break
            delay = backoff(attempt, self.http.rng)
            if loop.time() + delay >= deadline:
                break
            self.http.counters.retries += 1
            log.info("blob %s [%d+%d]: attempt %d failed (%s); retrying in %.2fs", blob_id, offset, size, attempt,
                     describe(last), delay)
            await asyncio.sleep(delay)
        self.http.counters.read_errors += 1
        msg = f"blob {blob_id} range {offset}+{size}: {describe(last)} (after {attempt} attempt(s))"
        log.error("%s", msg)
        raise OSError(errno.EIO, msg)

    async def stream_blob(self, blob_id: str, offset: int, size: int, sink: Callable[[bytes], None]) -> None:
        """Bytes [offset, offset+size) of the blob handed to `sink` in pieces as they arrive (a
        large sequential read whose first chunks are used before the last arrive). One attempt on
        the prefetch connections, no retries: a stream that breaks is the caller's to fall back
        from. Every wait (headers, each piece) has the per-request timeout; OSError(EIO) on any
        failure, after some pieces may already have been handed on."""
        if size <= 0:
            return
        if offset < 0:
            raise OSError(errno.EINVAL, f"blob {blob_id}: impossible stream of {size} bytes at {offset}")
        self.http.counters.reads += 1
        idle = self.http.cfg.timeout if self.http.cfg.timeout > 0 else self.http.cfg.deadline
        try:
            async with asyncio.timeout(idle) as tm:
                await self._attempt(blob_id, offset, size, True, partial(self._stream_body, sink=sink, tm=tm,
                                                                           idle=idle))
        except (PermanentError, TransientError, TimeoutError, aiohttp.ClientError, OSError) as e:
            if isinstance(e, TimeoutError):
                self.http.counters.timeouts += 1
            elif isinstance(e, (aiohttp.ClientError, OSError)):
                self.http.counters.network_errors += 1
            self.http.counters.read_errors += 1
            raise OSError(errno.EIO, f"blob {blob_id} stream {offset}+{size}: {describe(e)}") from None

    async def _stream_body(self, resp: aiohttp.ClientResponse, offset: int, size: int, *,
                           sink: Callable[[bytes], None], tm: asyncio.Timeout, idle: float) -> None:
        if resp.status != 206:  # a whole-blob 200 (sliced) or an error: as a plain read
            sink(await self._body(resp, offset, size))
            return
        cr = parse_content_range(resp.headers.get("Content-Range"))
        cl = resp.content_length
        if cr is None or cr[0] != offset or cr[1] != offset + size - 1 or (cl is not None and cl != size):
            self.http.counters.bad_content_range += 1
            resp.close()
            raise TransientError(f"206 with Content-Range {resp.headers.get('Content-Range')!r} and "
                                 f"{cl} bytes, asked bytes {offset}-{offset + size - 1}")
        loop = asyncio.get_running_loop()
        left = size
        while left > 0:
            tm.reschedule(loop.time() + idle)
            piece = await resp.content.read(min(left, STREAM_PIECE))
            if not piece:
                self.http.counters.short_bodies += 1
                resp.close()
                raise TransientError(f"stream ended after {size - left} of {size} bytes")
            self.http.counters.body_bytes += len(piece)
            self.http.counters.read_bytes += len(piece)
            left -= len(piece)
            sink(piece)

    async def _attempt(self, blob_id: str, offset: int, size: int, prefetch: bool,
                       body: Callable[[aiohttp.ClientResponse, int, int], Awaitable[T]] | None = None) -> T:
        """One GET of the range (following a redirect); `body` turns the response into the
        result (default: the exact bytes)."""
        take: Callable[[aiohttp.ClientResponse, int, int], Awaitable[T]] = body or self._body  # type: ignore[assignment]
        rng = {"Range": f"bytes={offset}-{offset + size - 1}"}
        cached = self.redirects.get(blob_id)
        if cached is not None:
            self.http.counters.redirect_cache_hits += 1
            resp = await self.http.send("GET", cached, rng, prefetch=prefetch)
            try:
                if resp.status in (401, 403):
                    self.redirects.pop(blob_id, None)
                    self.http.counters.redirect_cache_drops += 1
                    log.info("blob %s: cached redirect answered %d; asking the registry again", blob_id, resp.status)
                else:
                    return await take(resp, offset, size)
            finally:
                resp.release()
        url = self.http.blob_url(blob_id)
        resp = await self.http.request("GET", url, rng, prefetch=prefetch)
        try:
            if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                target = self.http.rewrite_redirect(urljoin(url, resp.headers["Location"]))
                resp.release()
                self.http.counters.redirects += 1
                r2 = await self.http.send("GET", target, rng, prefetch=prefetch)
                try:
                    data = await take(r2, offset, size)
                finally:
                    r2.release()
                self.redirects[blob_id] = target
                return data
            return await take(resp, offset, size)
        finally:
            resp.release()

    async def _body(self, resp: aiohttp.ClientResponse, offset: int, size: int) -> bytes:
        """The asked bytes from a 206 or 200 response; TransientError/PermanentError otherwise."""
        st = resp.status
        if st == 206:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != offset or cr[1] != offset + size - 1:
                self.http.counters.bad_content_range += 1
                resp.close()
                raise TransientError(f"206 with Content-Range {resp.headers.get('Content-Range')!r}, "
                                     f"asked bytes {offset}-{offset + size - 1}")
            return await self._read_exact(resp, size)
        if st == 200:
            self.http.counters.ok_200_for_206 += 1
            cl = resp.content_length
            if cl is not None and cl < offset + size:
                self.http.counters.short_bodies += 1
                resp.close()
                raise TransientError(f"200 with {cl} bytes cannot hold bytes {offset}-{offset + size - 1}")
            skip = offset
            while skip > 0:
                piece = await resp.content.read(min(skip, _SKIP_PIECE))
                if not piece:
                    self.http.counters.short_bodies += 1
                    resp.close()
                    raise TransientError("whole-blob 200 ended before the asked range")
                self.http.counters.body_bytes += len(piece)
                skip -= len(piece)
            try:
                data = await resp.content.readexactly(size)
            except asyncio.IncompleteReadError as e:
                self.http.counters.short_bodies += 1
                resp.close()
                raise TransientError(f"whole-blob 200 ended {size - len(e.partial)} bytes early") from None
            self.http.counters.body_bytes += size
            resp.close()  # the rest of the blob is not wanted: drop the connection
            return data
        if st in REDIRECT_STATUSES:
            raise TransientError(f"HTTP {st} without a usable Location")
        if st in (404, 410):
            raise PermanentError(f"HTTP {st}: blob not found")
        if st == 416:
            raise PermanentError("HTTP 416: range not satisfiable (read past the blob end)")
        if st in (401, 403):
            raise PermanentError(f"HTTP {st}: access denied")
        if st in (408, 425, 429) or st >= 500:
            raise TransientError(f"HTTP {st}")
        raise PermanentError(f"unexpected HTTP {st}")

    async def _read_exact(self, resp: aiohttp.ClientResponse, size: int) -> bytes:
        cl = resp.content_length
        if cl is not None and cl != size:
            if cl < size:
                self.http.counters.short_bodies += 1
            else:
                self.http.counters.oversized_bodies += 1
            resp.close()
            raise TransientError(f"body of {cl} bytes for a {size}-byte range")
        try:
            data = await resp.content.readexactly(size)
        except asyncio.IncompleteReadError as e:
            self.http.counters.short_bodies += 1
            resp.close()
            raise TransientError(f"body ended after {len(e.partial)} of {size} bytes") from None
        except aiohttp.ClientPayloadError as e:
            self.http.counters.short_bodies += 1
            resp.close()
            raise TransientError(f"broken body: {e}") from None
        self.http.counters.body_bytes += size
        if cl is None and await resp.content.read(1):
            self.http.counters.oversized_bodies += 1
            resp.close()
            raise TransientError(f"body longer than the {size}-byte range")
        return data

    async def blob_size(self, blob_id: str) -> int:
        """Blob size from HEAD (Content-Length); OSError(EIO/ENOENT) when it cannot be had."""
        url = self.http.blob_url(blob_id)
        try:
            async with asyncio.timeout(self.http.cfg.deadline):
                resp = await self.http.request("HEAD", url, {})
                try:
                    if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                        target = self.http.rewrite_redirect(urljoin(url, resp.headers["Location"]))
                        resp.release()
                        resp = await self.http.send("HEAD", target, {})
                    if resp.status == 404:
                        raise OSError(errno.ENOENT, f"blob {blob_id} not found")
                    if resp.status != 200 or resp.content_length is None:
                        raise OSError(errno.EIO, f"HEAD blob {blob_id}: HTTP {resp.status}")
                    return int(resp.content_length)
                finally:
                    resp.release()
        except (TransientError, PermanentError, aiohttp.ClientError, TimeoutError) as e:
            raise OSError(errno.EIO, f"HEAD blob {blob_id}: {describe(e)}") from None
