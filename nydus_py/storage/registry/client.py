"""An asyncio OCI registry client for lazy blob reads (and the pushes the tests and tools need).

Reads are `GET /v2/<repo>/blobs/sha256:<id>` with one `Range`; the answer must be exactly the
asked bytes: a 206 whose Content-Range matches, or a whole-blob 200 that is sliced (counted, since
pull-through caches do it). Anything short, long or mislabelled is an error that is retried, never
data. Each read has a deadline; when retries run out the caller gets OSError(EIO).

Auth follows nydusd (NYDUSD-CONTRACT.md 6.3): anonymous first, the sans-IO `AuthState` decides
what a 401 leads to, one token fetch at a time, proactive renewal in the background. Redirects
(6.4) are followed by hand without the Authorization header, and the target is cached per blob.
A forward proxy (6.7) is used while healthy, with fallback to the origin when allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp

from .auth import (
    AuthError,
    AuthState,
    Fail,
    Fetch,
    Retry,
    TokenRequest,
    parse_token_response,
    parse_www_authenticate,
)
from .config import RegistryConfig

log = logging.getLogger(__name__)

USER_AGENT = "nydusd/1.0.0"
BACKOFF_BASE = 0.1
BACKOFF_MAX = 2.0
PREFETCH_RETRIES = 1
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_SKIP_PIECE = 1 << 20
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


class TransientError(Exception):
    """This attempt failed in a way another attempt may not (5xx, reset, stall, bad body)."""


class PermanentError(Exception):
    """Retrying cannot help (404, 416, credentials refused)."""


class Counters:
    """What the backend did, as plain numbers a metrics endpoint can read at any time."""

    def __init__(self) -> None:
        self.reads = 0  # blob range reads asked of the client
        self.read_errors = 0  # reads that ended in EIO
        self.read_bytes = 0  # bytes handed back to callers
        self.requests = 0  # HTTP requests sent (registry, redirect targets, token server)
        self.body_bytes = 0  # body bytes received, including what a 200-for-206 made us skip
        self.errors_by_status: dict[int, int] = {}
        self.network_errors = 0  # resets, refused connections, broken bodies
        self.timeouts = 0
        self.short_bodies = 0
        self.oversized_bodies = 0
        self.bad_content_range = 0
        self.ok_200_for_206 = 0
        self.retries = 0
        self.unauthorized = 0  # 401 answers (each one handled inside the same read)
        self.token_fetches = 0
        self.token_failures = 0
        self.token_refreshes = 0
        self.redirects = 0
        self.redirect_cache_hits = 0
        self.redirect_cache_drops = 0
        self.fallbacks = 0  # requests sent to the origin because the proxy was down or failing
        self.proxy_failures = 0
        self.proxy_recoveries = 0
        self.https_to_http = 0

    def status(self, code: int) -> None:
        self.errors_by_status[code] = self.errors_by_status.get(code, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["errors_by_status"] = dict(self.errors_by_status)
        return out


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


class RegistryClient:
    """Talks to one registry repository. Create, use and close it inside one event loop."""

    def __init__(self, cfg: RegistryConfig, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` times the token lifecycle (ages, backoffs, renewals); tests pass a manual one."""
        self.cfg = cfg
        self.counters = Counters()
        self.rng = rng or random.Random()
        self.auth = AuthState(cfg.auth, cfg.registry_token, cfg.repo, clock=clock, rng=self.rng)
        self.scheme = cfg.scheme
        self.redirects: dict[str, str] = {}
        self.proxy_healthy = True
        self._proxy_down_until = 0.0
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._token_lock: asyncio.Lock | None = None
        self._first_lock: asyncio.Lock | None = None
        self._first_done = False
        self._token_serial = 0
        self._token_event: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def _ssl(self) -> ssl.SSLContext | bool:
        if self.cfg.skip_verify:
            return False
        ctx = ssl.create_default_context()
        for path in self.cfg.ca_cert_files:
            ctx.load_verify_locations(cafile=path)
        return ctx

    async def start(self) -> None:
        """Open the connection pools (on-demand and prefetch apart, so prefetch never holds a
        connection an on-demand read is waiting for) and start the background tasks."""
        sslctx = self._ssl()
        for name in ("demand", "prefetch", "token"):
            conn = aiohttp.TCPConnector(limit=self.cfg.max_connections, ssl=sslctx, enable_cleanup_closed=True)
            self._sessions[name] = aiohttp.ClientSession(
                connector=conn, auto_decompress=False, headers={"User-Agent": USER_AGENT, **dict(self.cfg.headers)},
                timeout=aiohttp.ClientTimeout(total=None), trust_env=False,
            )
            # aiohttp quietly resends an idempotent request once after a reset; our own retry
            # loop does that with backoff, a deadline and counting, so switch the hidden one off
            if hasattr(self._sessions[name], "_retry_connection"):
                self._sessions[name]._retry_connection = False
        self._token_lock = asyncio.Lock()
        self._first_lock = asyncio.Lock()
        self._token_event = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._refresh_loop()))
        if self.cfg.proxy.url and self.cfg.proxy.ping_url:
            self._tasks.append(asyncio.create_task(self._proxy_check_loop()))

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()

    # -- URLs -----------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.cfg.host}/v2/{self.cfg.repo}/{path}"

    def blob_url(self, blob_id: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", blob_id):
            raise PermanentError(f"invalid blob id {blob_id!r}")
        return self.url(f"blobs/sha256:{blob_id}")

    def _rewrite_redirect(self, location: str) -> str:
        parts = urlsplit(location)
        scheme = self.cfg.blob_url_scheme or parts.scheme
        netloc = self.cfg.blob_redirected_host or parts.netloc
        return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))

    # -- proxy ----------------------------------------------------------------------------------
    def _use_proxy(self) -> bool:
        if not self.cfg.proxy.url:
            return False
        if self.proxy_healthy:
            return True
        if not self.cfg.proxy.ping_url and asyncio.get_running_loop().time() >= self._proxy_down_until:
            self._proxy_up("retry interval passed")
            return True
        return False

    def _proxy_up(self, why: str) -> None:
        if not self.proxy_healthy:
            self.proxy_healthy = True
            self.counters.proxy_recoveries += 1
            log.warning("proxy %s is back (%s); sending requests through it again", self.cfg.proxy.url, why)

    def _proxy_down(self, why: str) -> None:
        self.counters.proxy_failures += 1
        if self.proxy_healthy:
            log.warning("proxy %s failed (%s)%s", self.cfg.proxy.url, why,
                        "; falling back to the origin" if self.cfg.proxy.fallback else "")
        self.proxy_healthy = False
        self._proxy_down_until = asyncio.get_running_loop().time() + self.cfg.proxy.check_interval

    async def _proxy_check_loop(self) -> None:
        p = self.cfg.proxy
        timeout = aiohttp.ClientTimeout(total=max(0.2, self.cfg.connect_timeout or 5.0))
        while not self._closed:
            await asyncio.sleep(p.check_interval)
            try:
                async with self._sessions["token"].get(p.ping_url, timeout=timeout) as r:
                    ok = r.status < 500
            except (TimeoutError, aiohttp.ClientError, OSError):
                ok = False
            if ok:
                self._proxy_up("health check passed")
            elif self.proxy_healthy:
                self._proxy_down("health check failed")

    # -- sending --------------------------------------------------------------------------------
    async def _send(self, method: str, url: str, headers: Mapping[str, str], *, prefetch: bool = False,
                    data: bytes | None = None, proxied: bool = True) -> aiohttp.ClientResponse:
        """One HTTP exchange (headers only; the caller reads and releases the body).

        Goes through the proxy while it is healthy; a proxy that fails or answers >= 500 is marked
        down and, with `fallback`, the request goes to the origin (counted and logged).
        """
        url = self._origin_url(url)
        session = self._sessions["prefetch" if prefetch else "demand"]
        hdrs = dict(headers)
        if self.cfg.proxy.url:
            hdrs.setdefault("X-Dragonfly-Priority", "3" if prefetch else "6")
        if proxied and self.cfg.proxy.url and not self._use_proxy():
            if not self.cfg.proxy.fallback:
                self.counters.network_errors += 1
                raise TransientError(f"proxy {self.cfg.proxy.url} is down and fallback is off")
            self.counters.fallbacks += 1
            log.debug("proxy down: %s %s goes to the origin", method, url)
        elif proxied and self.cfg.proxy.url:
            target = url
            if self.cfg.proxy.use_http and target.startswith("https://"):
                target = "http://" + target[len("https://"):]
            try:
                self.counters.requests += 1
                resp = await session.request(method, target, headers=hdrs, data=data, proxy=self.cfg.proxy.url,
                                             allow_redirects=False)
            except (aiohttp.ClientError, OSError) as e:
                self._proxy_down(f"{type(e).__name__}: {e}")
                if not self.cfg.proxy.fallback:
                    self.counters.network_errors += 1
                    raise TransientError(f"proxy {self.cfg.proxy.url}: {e}") from e
            else:
                if resp.status < 500:
                    return self._count(resp)
                self.counters.status(resp.status)
                self._proxy_down(f"HTTP {resp.status}")
                if not self.cfg.proxy.fallback:
                    return resp
                resp.release()
            self.counters.fallbacks += 1
        try:
            self.counters.requests += 1
            resp = await session.request(method, url, headers=hdrs, data=data, allow_redirects=False)
        except (aiohttp.ClientSSLError, aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
            if self._maybe_plain_http(url, e) or self._origin_url(url) != url:
                return await self._send(method, "http://" + url[len("https://"):], headers, prefetch=prefetch,
                                        data=data, proxied=proxied)
            raise
        return self._count(resp)

    def _count(self, resp: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
        if resp.status >= 400:
            self.counters.status(resp.status)
        return resp

    def _origin_url(self, url: str) -> str:
        """After the sticky HTTPS->HTTP switch, every registry URL built earlier (by requests that
        were queued or are retrying after a 401) goes to plain HTTP too; redirect targets on other
        hosts keep their scheme."""
        prefix = f"https://{self.cfg.host}/"
        if self.scheme == "http" and url.startswith(prefix):
            return "http://" + url[len("https://"):]
        return url

    def _maybe_plain_http(self, url: str, e: Exception) -> bool:
        """nydusd's sticky HTTPS->HTTP fallback: only with skip_verify and a TLS-looking failure."""
        if not (self.cfg.skip_verify and url.startswith("https://") and self.scheme == "https"):
            return False
        text = str(e).lower()
        if not any(k in text for k in ("wrong version number", "connection refused", "ssl")):
            return False
        log.warning("https to %s failed (%s); using plain http from now on", self.cfg.host, e)
        self.scheme = "http"
        self.counters.https_to_http += 1
        return True

    async def _registry_request(self, method: str, url: str, headers: Mapping[str, str], *,
                                prefetch: bool = False, data: bytes | None = None) -> aiohttp.ClientResponse:
        """`_send` plus authentication. The first request of a client runs alone so one of them,
        not a burst, learns how the registry wants to be authenticated."""
        assert self._first_lock is not None
        if not self._first_done:
            async with self._first_lock:
                if not self._first_done:
                    try:
                        return await self._auth_chain(method, url, headers, prefetch, data)
                    finally:
                        self._first_done = True
        return await self._auth_chain(method, url, headers, prefetch, data)

    async def _auth_chain(self, method: str, url: str, headers: Mapping[str, str], prefetch: bool,
                          data: bytes | None) -> aiohttp.ClientResponse:
        tried, gen = self.auth.current()
        cur = tried
        for _ in range(6):
            hdrs = dict(headers)
            if cur:
                hdrs["Authorization"] = cur
            resp = await self._send(method, url, hdrs, prefetch=prefetch, data=data)
            if resp.status != 401:
                # the registry took the header (a 404 is an authenticated answer too)
                if resp.status != 403 and cur != self.auth.header:
                    self.auth.confirm(cur)
                return resp
            self.counters.unauthorized += 1
            challenges = [c for v in resp.headers.getall("WWW-Authenticate", []) for c in parse_www_authenticate(v)]
            resp.release()
            serial = self._token_serial
            d = self.auth.on_unauthorized(challenges, tried, gen, stripped=cur is None and tried is not None)
            if isinstance(d, Retry):
                cur = d.header
                if d.header is not None:
                    tried, gen = d.header, self.auth.generation
                continue
            if isinstance(d, Fetch):
                cur = await self._obtain_token(d.request, serial)
                tried, gen = cur, self.auth.generation
                continue
            assert isinstance(d, Fail)
            if d.retryable:
                raise TransientError(f"authentication: {d.reason}")
            raise PermanentError(f"authentication: {d.reason}")
        raise TransientError("authentication did not settle after several 401 answers")

    # -- tokens ---------------------------------------------------------------------------------
    async def _obtain_token(self, request: TokenRequest, serial: int) -> str:
        """One token fetch at a time; a caller that waited for another's fetch uses its token."""
        assert self._token_lock is not None
        async with self._token_lock:
            tok = self.auth.token
            if self._token_serial != serial and tok is not None:
                return f"Bearer {tok.value}"
            try:
                token, ttl = await self._fetch_token(request)
            except (TimeoutError, AuthError, aiohttp.ClientError, OSError) as e:
                self.auth.token_failed()
                self.counters.token_failures += 1
                log.warning("token fetch from %s failed: %s", request.realm, e)
                raise TransientError(f"token fetch from {request.realm}: {e}") from e
            header = self.auth.token_received(request, token, ttl)
            self._token_serial += 1
            self.counters.token_fetches += 1
            assert self._token_event is not None
            self._token_event.set()
            return header

    async def _fetch_token(self, request: TokenRequest | None) -> tuple[str, float]:
        """POST the OAuth2 form, falling back to GET (remembered per realm), bypassing the proxy."""
        session = self._sessions["token"]
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout or None, connect=self.cfg.connect_timeout or None)
        last = "no attempt"
        while request is not None:
            try:
                self.counters.requests += 1
                if request.method == "POST":
                    r = await session.post(request.realm, data=request.form(), headers=request.headers(),
                                           timeout=timeout, allow_redirects=True)
                else:
                    r = await session.get(request.realm, params=request.form(), headers=request.headers(),
                                          timeout=timeout, allow_redirects=True)
                async with r:
                    body = await r.content.read(1 << 20)
                    if r.status == 200:
                        return parse_token_response(body, asyncio.get_running_loop().time())
                    last = f"HTTP {r.status}"
                    if r.status in (401, 403) and request.method == "GET":
                        raise AuthError(f"token server refused the credentials ({last})")
            except AuthError as e:
                if request.method == "GET":
                    raise
                last = str(e)
            request = self.auth.token_method_failed(request)
        raise AuthError(f"token server: {last}")

    async def _refresh_loop(self) -> None:
        """Renew the bearer token before it expires (time and jitter from AuthState)."""
        assert self._token_event is not None and self._token_lock is not None
        while not self._closed:
            at = self.auth.next_refresh()
            self._token_event.clear()
            wait = None if at is None else max(0.0, at - self.auth.clock())
            if wait is None or wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._token_event.wait(), timeout=wait)
                continue
            request = self.auth.refresh_request()
            if request is None:
                continue
            async with self._token_lock:
                try:
                    token, ttl = await self._fetch_token(request)
                except (TimeoutError, AuthError, aiohttp.ClientError, OSError) as e:
                    self.auth.refresh_failed()
                    self.counters.token_failures += 1
                    log.warning("token renewal failed: %s", e)
                    continue
                self.auth.refresh_succeeded(request, token, ttl)
                self._token_serial += 1
                self.counters.token_refreshes += 1
                self.counters.token_fetches += 1

    # -- blob reads -----------------------------------------------------------------------------
    async def read_blob(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        """Exactly bytes [offset, offset+size) of the blob, or OSError(EIO) within the deadline."""
        if size <= 0:
            return b""
        if offset < 0 or size > 1 << 31:
            raise OSError(errno.EINVAL, f"blob {blob_id}: impossible read of {size} bytes at {offset}")
        self.counters.reads += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.deadline
        retries = min(PREFETCH_RETRIES, self.cfg.retries) if prefetch else self.cfg.retries
        attempt = 0
        last: BaseException | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            budget = min(self.cfg.timeout, remaining) if self.cfg.timeout > 0 else remaining
            try:
                async with asyncio.timeout(budget):
                    data = await self._attempt(blob_id, offset, size, prefetch)
                self.counters.read_bytes += len(data)
                return data
            except PermanentError as e:
                last = e
                break
            except TimeoutError as e:
                self.counters.timeouts += 1
                last = e
            except TransientError as e:
                last = e
            except (aiohttp.ClientError, OSError) as e:
                self.counters.network_errors += 1
                last = e
            attempt += 1
            if attempt > retries:
                break
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1)) * self.rng.uniform(0.5, 1.0)
            if loop.time() + delay >= deadline:
                break
            self.counters.retries += 1
            log.info("blob %s [%d+%d]: attempt %d failed (%s); retrying in %.2fs", blob_id, offset, size, attempt,
                     _describe(last), delay)
            await asyncio.sleep(delay)
        self.counters.read_errors += 1
        msg = f"blob {blob_id} range {offset}+{size}: {_describe(last)} (after {attempt} attempt(s))"
        log.error("%s", msg)
        raise OSError(errno.EIO, msg)

    async def _attempt(self, blob_id: str, offset: int, size: int, prefetch: bool) -> bytes:
        rng = {"Range": f"bytes={offset}-{offset + size - 1}"}
        cached = self.redirects.get(blob_id)
        if cached is not None:
            self.counters.redirect_cache_hits += 1
            resp = await self._send("GET", cached, rng, prefetch=prefetch)
            try:
                if resp.status in (401, 403):
                    self.redirects.pop(blob_id, None)
                    self.counters.redirect_cache_drops += 1
                    log.info("blob %s: cached redirect answered %d; asking the registry again", blob_id, resp.status)
                else:
                    return await self._body(resp, offset, size)
            finally:
                resp.release()
        url = self.blob_url(blob_id)
        resp = await self._registry_request("GET", url, rng, prefetch=prefetch)
        try:
            if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                target = self._rewrite_redirect(urljoin(url, resp.headers["Location"]))
                resp.release()
                self.counters.redirects += 1
                r2 = await self._send("GET", target, rng, prefetch=prefetch)
                try:
                    data = await self._body(r2, offset, size)
                finally:
                    r2.release()
                self.redirects[blob_id] = target
                return data
            return await self._body(resp, offset, size)
        finally:
            resp.release()

    async def _body(self, resp: aiohttp.ClientResponse, offset: int, size: int) -> bytes:
        """The asked bytes from a 206 or 200 response; TransientError/PermanentError otherwise."""
        st = resp.status
        if st == 206:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != offset or cr[1] != offset + size - 1:
                self.counters.bad_content_range += 1
                resp.close()
                raise TransientError(f"206 with Content-Range {resp.headers.get('Content-Range')!r}, "
                                     f"asked bytes {offset}-{offset + size - 1}")
            return await self._read_exact(resp, size)
        if st == 200:
            self.counters.ok_200_for_206 += 1
            cl = resp.content_length
            if cl is not None and cl < offset + size:
                self.counters.short_bodies += 1
                resp.close()
                raise TransientError(f"200 with {cl} bytes cannot hold bytes {offset}-{offset + size - 1}")
            skip = offset
            while skip > 0:
                piece = await resp.content.read(min(skip, _SKIP_PIECE))
                if not piece:
                    self.counters.short_bodies += 1
                    resp.close()
                    raise TransientError("whole-blob 200 ended before the asked range")
                self.counters.body_bytes += len(piece)
                skip -= len(piece)
            try:
                data = await resp.content.readexactly(size)
            except asyncio.IncompleteReadError as e:
                self.counters.short_bodies += 1
                resp.close()
                raise TransientError(f"whole-blob 200 ended {size - len(e.partial)} bytes early") from None
            self.counters.body_bytes += size
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
                self.counters.short_bodies += 1
            else:
                self.counters.oversized_bodies += 1
            resp.close()
            raise TransientError(f"body of {cl} bytes for a {size}-byte range")
        try:
            data = await resp.content.readexactly(size)
        except asyncio.IncompleteReadError as e:
            self.counters.short_bodies += 1
            resp.close()
            raise TransientError(f"body ended after {len(e.partial)} of {size} bytes") from None
        except aiohttp.ClientPayloadError as e:
            self.counters.short_bodies += 1
            resp.close()
            raise TransientError(f"broken body: {e}") from None
        self.counters.body_bytes += size
        if cl is None and await resp.content.read(1):
            self.counters.oversized_bodies += 1
            resp.close()
            raise TransientError(f"body longer than the {size}-byte range")
        return data

    async def blob_size(self, blob_id: str) -> int:
        """Blob size from HEAD (Content-Length); OSError(EIO/ENOENT) when it cannot be had."""
        url = self.blob_url(blob_id)
        try:
            async with asyncio.timeout(self.cfg.deadline):
                resp = await self._registry_request("HEAD", url, {})
                try:
                    if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                        target = self._rewrite_redirect(urljoin(url, resp.headers["Location"]))
                        resp.release()
                        resp = await self._send("HEAD", target, {})
                    if resp.status == 404:
                        raise OSError(errno.ENOENT, f"blob {blob_id} not found")
                    if resp.status != 200 or resp.content_length is None:
                        raise OSError(errno.EIO, f"HEAD blob {blob_id}: HTTP {resp.status}")
                    return int(resp.content_length)
                finally:
                    resp.release()
        except (TransientError, PermanentError, aiohttp.ClientError, TimeoutError) as e:
            raise OSError(errno.EIO, f"HEAD blob {blob_id}: {_describe(e)}") from None

    # -- push and manifests (used by tests and image tools) -------------------------------------
    async def _checked(self, method: str, url: str, headers: Mapping[str, str], data: bytes | None,
                       ok: tuple[int, ...]) -> tuple[int, Mapping[str, str], bytes]:
        try:
            async with asyncio.timeout(max(60.0, self.cfg.deadline)):
                resp = await self._registry_request(method, url, headers, data=data)
                try:
                    body = await resp.read()
                    if resp.status not in ok:
                        raise OSError(errno.EIO, f"{method} {url}: HTTP {resp.status} {body[:200]!r}")
                    return resp.status, resp.headers, body
                finally:
                    resp.release()
        except (TransientError, PermanentError, aiohttp.ClientError, TimeoutError) as e:
            raise OSError(errno.EIO, f"{method} {url}: {_describe(e)}") from None

    async def blob_exists(self, digest: str) -> bool:
        st, _h, _b = await self._checked("HEAD", self.url(f"blobs/{digest}"), {}, None, (200, 404))
        return st == 200

    async def push_blob(self, data: bytes, digest: str | None = None, chunk_size: int = 0) -> str:
        """Upload `data` (monolithic PUT, or PATCH pieces of `chunk_size` then PUT); returns its
        digest. A blob already present is not uploaded again."""
        computed = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != computed:
            raise ValueError(f"push_blob: data hashes to {computed}, not {digest}")
        if await self.blob_exists(computed):
            return computed
        _st, h, _b = await self._checked("POST", self.url("blobs/uploads/"), {}, None, (202,))
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

    def _upload_url(self, headers: Mapping[str, str]) -> str:
        loc = headers.get("Location")
        if not loc:
            raise OSError(errno.EIO, "upload answer without Location")
        return urljoin(f"{self.scheme}://{self.cfg.host}/", loc)

    async def push_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        _st, h, _b = await self._checked("PUT", self.url(f"manifests/{reference}"), {"Content-Type": media_type},
                                         body, (201,))
        return h.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    async def get_manifest(self, reference: str) -> tuple[bytes, str]:
        _st, h, body = await self._checked("GET", self.url(f"manifests/{reference}"),
                                           {"Accept": ", ".join(MANIFEST_TYPES)}, None, (200,))
        return body, h.get("Content-Type", "")

    async def get_blob(self, digest: str) -> bytes:
        """A whole (small) blob, e.g. a config or bootstrap layer, following redirects."""
        url = self.url(f"blobs/{digest}")
        st, h, body = await self._checked("GET", url, {}, None, (200, *REDIRECT_STATUSES))
        if st in REDIRECT_STATUSES:
            resp = await self._send("GET", self._rewrite_redirect(urljoin(url, h["Location"])), {})
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
        st, h, body = await self._checked("GET", self.url(f"manifests/{reference}"), {"Accept": ", ".join(accept)},
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
        url = self.url(f"blobs/{digest}")
        attempt = 0
        while True:
            h = hashlib.sha256()
            got = 0
            out.seek(0)
            out.truncate()
            try:
                async with asyncio.timeout(max(60.0, self.cfg.deadline)):  # until the headers are in
                    resp = await self._registry_request("GET", url, {})
                    if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                        target = self._rewrite_redirect(urljoin(url, resp.headers["Location"]))
                        resp.release()
                        self.counters.redirects += 1
                        resp = await self._send("GET", target, {})
                try:
                    if resp.status in (404, 410):
                        raise OSError(errno.ENOENT, f"blob {digest} not found in {self.cfg.host}/{self.cfg.repo}")
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
                        h.update(data)
                        out.write(data)
                        got += len(data)
                        self.counters.body_bytes += len(data)
                        if progress is not None:
                            progress(len(data))
                    if limit is not None and got > limit:
                        resp.close()
                finally:
                    resp.release()
                out.flush()
                return h.hexdigest(), got
            except PermanentError as e:
                raise OSError(errno.EIO, f"GET blob {digest}: {_describe(e)}") from None
            except (TransientError, aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                if progress is not None and got:
                    progress(-got)
                attempt += 1
                if attempt > self.cfg.retries:
                    raise OSError(errno.EIO, f"GET blob {digest}: {_describe(e)} (after {attempt} attempts)") from None
                self.counters.retries += 1
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1)) * self.rng.uniform(0.5, 1.0)
                log.info("blob %s: download attempt %d failed (%s); retrying in %.2fs", digest, attempt,
                         _describe(e), delay)
                await asyncio.sleep(delay)

    async def push_blob_file(self, path: str, digest: str, *, piece: int = 8 << 20,
                             progress: Callable[[int], None] | None = None) -> bool:
        """Upload the file at `path` as blob `digest` unless the registry already has it (HEAD);
        True when it was uploaded. Sent as one PUT when it fits in `piece` bytes, else as PATCH
        pieces then a PUT, so memory use is one piece. The file must hash to `digest` (the
        registry checks; a mismatch is its 400)."""
        if await self.blob_exists(digest):
            return False
        _st, h, _b = await self._checked("POST", self.url("blobs/uploads/"), {}, None, (202,))
        location = self._upload_url(h)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            body = b""
            if size <= piece:
                body = f.read()
            else:
                pos = 0
                while pos < size:
                    data = f.read(min(piece, size - pos))
                    if not data:
                        raise OSError(errno.EIO, f"{path}: file shrank while uploading")
                    hdrs = {"Content-Type": "application/octet-stream",
                            "Content-Range": f"{pos}-{pos + len(data) - 1}"}
                    _st, h, _b = await self._checked("PATCH", location, hdrs, data, (202,))
                    location = self._upload_url(h)
                    pos += len(data)
                    if progress is not None:
                        progress(len(data))
        sep = "&" if "?" in location else "?"
        await self._checked("PUT", f"{location}{sep}digest={digest}", {"Content-Type": "application/octet-stream"},
                            body, (201,))
        if progress is not None and body:
            progress(len(body))
        return True


def _describe(e: BaseException | None) -> str:
    if e is None:
        return "deadline passed"
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
