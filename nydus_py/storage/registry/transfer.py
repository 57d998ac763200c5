"""Whole-object transfers for the image tools (convert, the demo, tests): manifests, small blobs,
streamed blob downloads and chunked uploads. Memory use is one piece, whatever the blob size."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import BinaryIO, Protocol
from urllib.parse import urljoin

import aiohttp

from .errors import PermanentError, TransientError, backoff, describe
from .http import Body, RegistryHttp
from .reader import REDIRECT_STATUSES

log = logging.getLogger(__name__)

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


class HttpStatusError(OSError):
    """A registry answered a transfer with a status it was not expected to give (EIO); `status`
    lets callers tell a gateway hiccup (502-504, worth retrying) from a refusal."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(errno.EIO, message)
        self.status = status


class BlobSink(Protocol):
    """Where `ImageTransfer.stream_blob` puts a blob's bytes."""

    async def restart(self) -> None:
        """Drop what was written: an attempt starts (again) from the blob's first byte."""

    async def write(self, data: bytes) -> None:
        """Take the next piece (the sink may keep `data`; it is not reused)."""


class _FileSink:
    """`download_blob`'s sink: an empty file, hashed as it is written (in the event loop)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    async def restart(self) -> None:
        self.hash = hashlib.sha256()
        self.out.seek(0)
        self.out.truncate()

    async def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.out.write(data)


class ImageTransfer:
    def __init__(self, http: RegistryHttp) -> None:
        self.http = http

    def _request_timeout(self) -> float:
        return max(60.0, self.http.cfg.deadline)

    async def _checked(self, method: str, url: str, headers: Mapping[str, str], data: Body,
                       ok: tuple[int, ...], timer: list[asyncio.Timeout] | None = None,
                       ) -> tuple[int, Mapping[str, str], bytes]:
        """One request whose status must be in `ok`; its body. The request has one timeout; a
        streamed body moves it on as it goes (it finds the timer in `timer`)."""
        try:
            async with asyncio.timeout(self._request_timeout()) as cm:
                if timer is not None:
                    timer.append(cm)
                resp = await self.http.request(method, url, headers, data=data)
                try:
                    body = await resp.read()
                    if resp.status not in ok:
                        raise HttpStatusError(resp.status, f"{method} {url}: HTTP {resp.status} {body[:200]!r}")
                    return resp.status, resp.headers, body
                finally:
                    resp.release()
        except (TransientError, PermanentError, aiohttp.ClientError, TimeoutError) as e:
            raise OSError(errno.EIO, f"{method} {url}: {describe(e)}") from None

    async def blob_exists(self, digest: str) -> bool:
        st, _h, _b = await self._checked("HEAD", self.http.url(f"blobs/{digest}"), {}, None, (200, 404))
        return st == 200

    async def push_blob(self, data: bytes, digest: str | None = None, chunk_size: int = 0) -> str:
        """Upload `data` (monolithic PUT, or PATCH pieces of `chunk_size` then PUT); returns its
        digest. A blob already present is not uploaded again."""
        computed = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != computed:
            raise ValueError(f"push_blob: data hashes to {computed}, not {digest}")
        if await self.blob_exists(computed):
            return computed
        _st, h, _b = await self._checked("POST", self.http.url("blobs/uploads/"), {}, None, (202,))
        location = self._upload_url(h)
        if chunk_size > 0:
            pos = 0
            while pos < len(data):
                piece = data[pos:pos + chunk_size]
                hdrs = {"Content-Type": "application/octet-stream",
                        "Content-Range": f"{pos}-{pos + len(piece) - 1}"}
                _st, h, _b = await self._checked("PATCH", location, hdrs, piece, (202,))
                location = self._upload_url(h)
                pos += len(piece)
            body: bytes = b""
        else:
            body = data
        sep = "&" if "?" in location else "?"
        await self._checked("PUT", f"{location}{sep}digest={computed}",
                            {"Content-Type": "application/octet-stream"}, body, (201,))
        return computed

    async def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount of blob `digest` from `from_repo` of the same registry (no
        bytes sent); True when the registry mounted it. A registry that cannot (it does not have
        the blob there, or does not mount) opens an upload instead, which is cancelled here."""
        url = self.http.url(f"blobs/uploads/?mount={digest}&from={from_repo}")
        st, h, _b = await self._checked("POST", url, {}, None, (201, 202))
        if st == 201:
            return True
        loc = h.get("Location")
        if loc:
            try:
                await self._checked("DELETE", self._upload_url(h), {}, None, (202, 204, 404))
            except OSError as e:  # the registry expires the session itself
                log.info("blob %s: cancelling the upload opened instead of a mount failed: %s", digest, e)
        return False

    # -- an upload session in steps (a blob pushed while it is written) ------------------------

    async def open_upload(self) -> str:
        """POST an upload session; its URL (the next request's target)."""
        _st, h, _b = await self._checked("POST", self.http.url("blobs/uploads/"), {}, None, (202,))
        return self._upload_url(h)

    async def patch_upload(self, location: str, start: int, end: int | None, body: Body,
                           timer: list[asyncio.Timeout] | None = None) -> str:
        """Append bytes [start, end) to the session at `location` (one PATCH of known length), or
        with `end` None a body of unknown length (chunked transfer encoding, no Content-Range: the
        stream upload `docker push` sends); the session's next URL. A registry that takes no
        PATCH answers HttpStatusError."""
        hdrs = {"Content-Type": "application/octet-stream"}
        if end is not None:
            hdrs.update({"Content-Length": str(end - start), "Content-Range": f"{start}-{end - 1}"})
        _st, h, _b = await self._checked("PATCH", location, hdrs, body, (202,), timer)
        return self._upload_url(h)

    async def close_upload(self, location: str, digest: str) -> None:
        """Complete the session as blob `digest` (an empty PUT; the registry checks the digest)."""
        sep = "&" if "?" in location else "?"
        await self._checked("PUT", f"{location}{sep}digest={digest}",
                            {"Content-Type": "application/octet-stream", "Content-Length": "0"}, b"", (201,))

    async def cancel_upload(self, location: str) -> None:
        """DELETE a session that will not complete (a registry expires it anyway)."""
        await self._checked("DELETE", location, {}, None, (202, 204, 404))

    def _upload_url(self, headers: Mapping[str, str]) -> str:
        loc = headers.get("Location")
        if not loc:
            raise OSError(errno.EIO, "upload answer without Location")
        return urljoin(f"{self.http.scheme}://{self.http.cfg.host}/", loc)

    async def push_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        _st, h, _b = await self._checked("PUT", self.http.url(f"manifests/{reference}"), {"Content-Type": media_type},
                                         body, (201,))
        return h.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    async def has_tags(self) -> bool:
        """Whether the repository lists a tag (GET tags/list?n=1; a repository the registry does
        not know has none)."""
        st, _h, body = await self._checked("GET", self.http.url("tags/list?n=1"), {}, None, (200, 404))
        if st == 404:
            return False
        try:
            tags = json.loads(body).get("tags")
        except (ValueError, AttributeError):
            raise OSError(errno.EIO, f"tags/list of {self.http.cfg.repo}: not a JSON object") from None
        return bool(tags)

    async def get_manifest(self, reference: str) -> tuple[bytes, str]:
        _st, h, body = await self._checked("GET", self.http.url(f"manifests/{reference}"),
                                           {"Accept": ", ".join(MANIFEST_TYPES)}, None, (200,))
        return body, h.get("Content-Type", "")

    async def get_blob(self, digest: str) -> bytes:
        """A whole (small) blob, e.g. a config or bootstrap layer, following redirects."""
        url = self.http.url(f"blobs/{digest}")
        st, h, body = await self._checked("GET", url, {}, None, (200, *REDIRECT_STATUSES))
        if st in REDIRECT_STATUSES:
            resp = await self.http.send("GET", self.http.rewrite_redirect(urljoin(url, h["Location"])), {})
            try:
                if resp.status != 200:
                    raise OSError(errno.EIO, f"GET {digest} redirect target: HTTP {resp.status}")
                body = await resp.read()
            finally:
                resp.release()
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise OSError(errno.EIO, f"blob {digest}: content does not match its digest")
        return body

    # -- streaming transfers (image conversion) -------------------------------------------------
    async def fetch_manifest(self, reference: str,
                             accept: tuple[str, ...] = MANIFEST_TYPES) -> tuple[bytes, str, str] | None:
        """(body, Content-Type, Docker-Content-Digest or "") of a manifest; None on 404."""
        st, h, body = await self._checked("GET", self.http.url(f"manifests/{reference}"), {"Accept": ", ".join(accept)},
                                          None, (200, 404))
        if st == 404:
            return None
        return body, h.get("Content-Type", ""), h.get("Docker-Content-Digest", "")

    async def download_blob(self, digest: str, out: BinaryIO, *, limit: int | None = None,
                            progress: Callable[[int], None] | None = None, stall: float = 60.0,
                            piece: int = 1 << 20) -> tuple[str, int]:
        """Stream blob `digest` into the empty file `out`, hashing as it goes; returns (sha256 hex
        of the bytes received, their count). Memory use is one `piece`, whatever the blob size.

        The caller compares the result with the descriptor (a lying registry is its business).
        At most `limit + 1` bytes are taken (so an overlong body is seen without filling the disk).
        Transient failures restart from zero (up to the configured retries; `progress` gets the
        negative count to roll back); a body silent for `stall` seconds is a failure.
        OSError(ENOENT) when the registry does not have the blob, OSError(EIO) otherwise.
        """
        sink = _FileSink(out)
        n = await self.stream_blob(digest, sink, limit=limit, progress=progress, stall=stall, piece=piece)
        out.flush()
        return sink.hash.hexdigest(), n

    async def stream_blob(self, digest: str, sink: BlobSink, *, limit: int | None = None,
                          progress: Callable[[int], None] | None = None, stall: float = 60.0,
                          piece: int = 1 << 20) -> int:
        """`download_blob` into `sink` (awaited per piece, so a sink that hands the bytes to a
        worker thread keeps the event loop free and memory at a few pieces); returns the count
        of bytes received. `sink.restart()` is called before each attempt. Nothing is hashed here."""
        url = self.http.url(f"blobs/{digest}")
        attempt = 0
        while True:
            got = 0
            await sink.restart()
            try:
                async with asyncio.timeout(max(60.0, self.http.cfg.deadline)):  # until the headers are in
                    resp = await self.http.request("GET", url, {})
                    if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                        target = self.http.rewrite_redirect(urljoin(url, resp.headers["Location"]))
                        resp.release()
                        self.http.counters.redirects += 1
                        resp = await self.http.send("GET", target, {})
                try:
                    if resp.status in (404, 410):
                        raise OSError(errno.ENOENT, f"blob {digest} not found in {self.http.cfg.host}/{self.http.cfg.repo}")
                    if resp.status in (401, 403):
                        raise PermanentError(f"HTTP {resp.status}: access denied")
                    if resp.status in (408, 425, 429) or resp.status >= 500:
                        raise TransientError(f"HTTP {resp.status}")
                    if resp.status != 200:
                        raise PermanentError(f"unexpected HTTP {resp.status}")
                    while limit is None or got <= limit:
                        want = piece if limit is None else min(piece, limit + 1 - got)
                        async with asyncio.timeout(stall):
                            data = await resp.content.read(want)
                        if not data:
                            break
                        await sink.write(data)
                        got += len(data)
                        self.http.counters.body_bytes += len(data)
                        if progress is not None:
                            progress(len(data))
                    if limit is not None and got > limit:
                        resp.close()
                finally:
                    resp.release()
                return got
            except PermanentError as e:
                raise OSError(errno.EIO, f"GET blob {digest}: {describe(e)}") from None
            except (TransientError, aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                if progress is not None and got:
                    progress(-got)
                attempt += 1
                if attempt > self.http.cfg.retries:
                    raise OSError(errno.EIO, f"GET blob {digest}: {describe(e)} (after {attempt} attempts)") from None
                self.http.counters.retries += 1
                delay = backoff(attempt, self.http.rng)
                log.info("blob %s: download attempt %d failed (%s); retrying in %.2fs", digest, attempt,
                         describe(e), delay)
                await asyncio.sleep(delay)

    async def push_blob_file(self, path: str, digest: str, *, piece: int = 1 << 20,
                             progress: Callable[[int], None] | None = None, chunk: int = 0) -> bool:
        """Upload the file at `path` as blob `digest` unless the registry already has it (HEAD);
        True when it was uploaded. Sent as one streamed PUT of known length after the POST (the
        registry API's monolithic upload, as containerd pushes), read `piece` bytes at a time, so
        memory use is about one piece; a 2-4x faster upload than PATCH pieces, each of which
        costs the registry a round of upload-state bookkeeping. With `chunk` > 0 (nydusify's
        --push-chunk-size, for registries or proxies that limit a request's size) it goes up as
        PATCH requests of `chunk` bytes, then an empty PUT. The file must hash to `digest` (the
        registry checks; a mismatch is its 400)."""
        if await self.blob_exists(digest):
            return False
        _st, h, _b = await self._checked("POST", self.http.url("blobs/uploads/"), {}, None, (202,))
        location = self._upload_url(h)
        size = os.path.getsize(path)
        sent = [0]  # bytes reported to `progress` (a body sent again after a 401 is not counted twice)
        if chunk > 0:
            for start in range(0, size, chunk):
                end = min(size, start + chunk)
                timer: list[asyncio.Timeout] = []
                hdrs = {"Content-Type": "application/octet-stream", "Content-Length": str(end - start),
                        "Content-Range": f"{start}-{end - 1}"}
                _st, h, _b = await self._checked(
                    "PATCH", location, hdrs, self._file_body(path, start, end, piece, progress, sent, timer),
                    (202,), timer)
                location = self._upload_url(h)
            sep = "&" if "?" in location else "?"
            await self._checked("PUT", f"{location}{sep}digest={digest}",
                                {"Content-Type": "application/octet-stream", "Content-Length": "0"}, b"", (201,))
            return True
        timer = []
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        body = self._file_body(path, 0, size, piece, progress, sent, timer)
        await self._checked("PUT", f"{location}{sep}digest={digest}", headers, body if size else b"", (201,), timer)
        return True

    def _file_body(self, path: str, start: int, end: int, piece: int, progress: Callable[[int], None] | None,
                   sent: list[int], timer: list[asyncio.Timeout]) -> Callable[[], AsyncIterator[bytes]]:
        """A request body of `path`'s bytes [start, end), read `piece` at a time; each piece moves
        the request's timeout (`timer`) on, and `progress` hears of bytes not reported before."""

        async def body() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            pos = start
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while pos < end:
                    data = os.pread(fd, min(piece, end - pos), pos)
                    if not data:
                        raise OSError(errno.EIO, f"{path}: file shrank while uploading")
                    pos += len(data)
                    if progress is not None and pos > sent[0]:
                        progress(pos - sent[0])
                        sent[0] = pos
                    if timer:
                        timer[0].reschedule(loop.time() + self._request_timeout())
                    yield data
            finally:
                os.close(fd)

        return body
