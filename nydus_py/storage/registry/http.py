"""One registry repository over HTTP: connection pools, the forward proxy and its health, the
sticky HTTPS->HTTP fallback, and requests authenticated the nydusd way (NYDUSD-CONTRACT.md 6.3,
6.7): anonymous first, the sans-IO `AuthState` decides what a 401 leads to, tokens from
`TokenRefresher`. The lazy reader (`reader.py`) and the image transfers (`transfer.py`) send
through it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .auth import AuthState, Fail, Fetch, Retry, parse_www_authenticate
from .config import RegistryConfig
from .errors import Counters, PermanentError, TransientError
from .lazy_cas import Connector
from .tokens import TokenRefresher

log = logging.getLogger(__name__)

USER_AGENT = "nydusd/1.0.0"
# seconds a request waits for the first request of its client (which learns the authentication)
# before it goes ahead on its own: long enough for a token round trip, short beside a stall
FIRST_WAIT = 2.0

# A request body: bytes, or a factory of a fresh stream of pieces (called once per send, so a
# body streamed from a file can be sent again after a 401, a proxy failure or the HTTP fallback).
BodyFactory = Callable[[], AsyncIterator[bytes]]
Body = bytes | BodyFactory | None


def _payload(data: Body) -> bytes | AsyncIterator[bytes] | None:
    return data() if callable(data) else data


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_files: tuple[tuple[str, int], ...]) -> ssl.SSLContext:
    """One verifying context per set of CA files (and their mtimes, so an edited file is read
    again): loading the system store costs ~70 ms, paid once per process instead of once per
    client (a conversion with a build cache and a chunk dictionary opens four)."""
    ctx = ssl.create_default_context()
    for path, _ in ca_files:
        ctx.load_verify_locations(cafile=path)
    return ctx


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1  # load_verify_locations reports it


class RegistryHttp:
    """Create, use and close it inside one event loop."""

    def __init__(self, cfg: RegistryConfig, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self.rng = rng or random.Random()
        self.auth = AuthState(cfg.auth, cfg.registry_token, cfg.repo, clock=clock, rng=self.rng)
        self.tokens = TokenRefresher(cfg, self.auth, self.counters)
        self.scheme = cfg.scheme
        self.proxy_healthy = True
        self._proxy_down_until = 0.0
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._first_started = False
        self._first_done: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def _ssl(self) -> ssl.SSLContext | bool:
        """False: no verification; True: aiohttp's verified default context, which gets the
        system CAs before the first TLS handshake (`lazy_cas`; a context of our own would load
        them again, ~25-50 ms of start-up); with `ca_cert_files`, a context of our own with them
        added."""
        if self.cfg.skip_verify:
            return False
        if not self.cfg.ca_cert_files:
            return True
        return _ssl_context(tuple((p, _mtime(p)) for p in self.cfg.ca_cert_files))

    async def start(self) -> None:
        """Open the connection pools (on-demand and prefetch apart, so prefetch never holds a
        connection an on-demand read is waiting for) and start the background tasks."""
        sslctx = self._ssl()
        for name in ("demand", "prefetch", "token"):
            conn = Connector(limit=self.cfg.max_connections, ssl=sslctx, enable_cleanup_closed=True)
            self._sessions[name] = aiohttp.ClientSession(
                connector=conn, auto_decompress=False, headers={"User-Agent": USER_AGENT, **dict(self.cfg.headers)},
                timeout=aiohttp.ClientTimeout(total=None), trust_env=False,
            )
            # aiohttp quietly resends an idempotent request once after a reset; our own retry
            # loop does that with backoff, a deadline and counting, so switch the hidden one off
            if hasattr(self._sessions[name], "_retry_connection"):
                self._sessions[name]._retry_connection = False
        self._first_done = asyncio.Event()
        self._tasks.append(self.tokens.start(self._sessions["token"]))
        if self.cfg.proxy.url and self.cfg.proxy.ping_url:
            self._tasks.append(asyncio.create_task(self._proxy_check_loop()))

    async def close(self) -> None:
        self._closed = True
        self.tokens.closed = True
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

    def rewrite_redirect(self, location: str) -> str:
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
    async def send(self, method: str, url: str, headers: Mapping[str, str], *, prefetch: bool = False,
                    data: Body = None, proxied: bool = True) -> aiohttp.ClientResponse:
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
                resp = await session.request(method, target, headers=hdrs, data=_payload(data), proxy=self.cfg.proxy.url,
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
            resp = await session.request(method, url, headers=hdrs, data=_payload(data), allow_redirects=False)
        except (aiohttp.ClientSSLError, aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
            if self._maybe_plain_http(url, e) or self._origin_url(url) != url:
                return await self.send(method, "http://" + url[len("https://"):], headers, prefetch=prefetch,
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

    async def request(self, method: str, url: str, headers: Mapping[str, str], *,
                      prefetch: bool = False, data: Body = None) -> aiohttp.ClientResponse:
        """`_send` plus authentication. The first request of a client goes alone so one of them,
        not a burst, learns how the registry wants to be authenticated; the others wait for its
        answer at most FIRST_WAIT seconds, so a first request that stalls (a slow range, a held
        connection) does not hold every other read of the mount up to its deadline."""
        assert self._first_done is not None
        if not self._first_done.is_set():
            if not self._first_started:
                self._first_started = True
                try:
                    return await self._auth_chain(method, url, headers, prefetch, data)
                finally:
                    self._first_done.set()
            try:
                await asyncio.wait_for(self._first_done.wait(), FIRST_WAIT)
            except TimeoutError:
                self.counters.first_request_waits_cut += 1
                if self.counters.first_request_waits_cut == 1:
                    log.warning("registry %s: the first request has no answer after %.0f s; the others go "
                                "ahead without waiting for it to learn the authentication", self.cfg.host,
                                FIRST_WAIT)
        return await self._auth_chain(method, url, headers, prefetch, data)

    async def _auth_chain(self, method: str, url: str, headers: Mapping[str, str], prefetch: bool,
                          data: Body) -> aiohttp.ClientResponse:
        tried, gen = self.auth.current()
        cur = tried
        for _ in range(6):
            hdrs = dict(headers)
            if cur:
                hdrs["Authorization"] = cur
            resp = await self.send(method, url, hdrs, prefetch=prefetch, data=data)
            if resp.status != 401:
                # the registry took the header (a 404 is an authenticated answer too)
                if resp.status != 403 and cur != self.auth.header:
                    self.auth.confirm(cur)
                return resp
            self.counters.unauthorized += 1
            challenges = [c for v in resp.headers.getall("WWW-Authenticate", []) for c in parse_www_authenticate(v)]
            resp.release()
            serial = self.tokens.serial
            d = self.auth.on_unauthorized(challenges, tried, gen, stripped=cur is None and tried is not None)
            if isinstance(d, Retry):
                cur = d.header
                if d.header is not None:
                    tried, gen = d.header, self.auth.generation
                continue
            if isinstance(d, Fetch):
                cur = await self.tokens.obtain(d.request, serial)
                tried, gen = cur, self.auth.generation
                continue
            assert isinstance(d, Fail)
            if d.retryable:
                raise TransientError(f"authentication: {d.reason}")
            raise PermanentError(f"authentication: {d.reason}")
        raise TransientError("authentication did not settle after several 401 answers")
