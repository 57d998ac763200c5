"""Bearer tokens for one registry repository: one fetch at a time (a caller that waited for
another's fetch uses its token), POST then GET per realm, and proactive renewal in the background
at the time and jitter `AuthState` decides. It sends straight to the token server (never through
the forward proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from .auth import AuthError, AuthState, TokenRequest, parse_token_response
from .config import RegistryConfig
from .errors import Counters, TransientError

log = logging.getLogger(__name__)


class TokenRefresher:
    def __init__(self, cfg: RegistryConfig, auth: AuthState, counters: Counters) -> None:
        self.cfg = cfg
        self.auth = auth
        self.counters = counters
        self.serial = 0  # bumped by every new token: a 401 seen before it may retry with the new one
        self.closed = False
        self._session: aiohttp.ClientSession | None = None
        self._lock: asyncio.Lock | None = None
        self._event: asyncio.Event | None = None

    def start(self, session: aiohttp.ClientSession) -> asyncio.Task[None]:
        """Bind to the running loop and start renewing; the caller owns (and cancels) the task."""
        self._session = session
        self._lock = asyncio.Lock()
        self._event = asyncio.Event()
        return asyncio.create_task(self._run())

    async def obtain(self, request: TokenRequest, serial: int) -> str:
        """One token fetch at a time; a caller that waited for another's fetch uses its token."""
        assert self._lock is not None
        async with self._lock:
            tok = self.auth.token
            if self.serial != serial and tok is not None:
                return f"Bearer {tok.value}"
            try:
                token, ttl = await self._fetch(request)
            except (TimeoutError, AuthError, aiohttp.ClientError, OSError) as e:
                self.auth.token_failed()
                self.counters.token_failures += 1
                log.warning("token fetch from %s failed: %s", request.realm, e)
                raise TransientError(f"token fetch from {request.realm}: {e}") from e
            header = self.auth.token_received(request, token, ttl)
            self.serial += 1
            self.counters.token_fetches += 1
            assert self._event is not None
            self._event.set()
            return header

    async def _fetch(self, request: TokenRequest | None) -> tuple[str, float]:
        """POST the OAuth2 form, falling back to GET (remembered per realm), bypassing the proxy."""
        session = self._session
        assert session is not None
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

    async def _run(self) -> None:
        """Renew the bearer token before it expires (time and jitter from AuthState)."""
        assert self._event is not None and self._lock is not None
        while not self.closed:
            at = self.auth.next_refresh()
            self._event.clear()
            wait = None if at is None else max(0.0, at - self.auth.clock())
            if wait is None or wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._event.wait(), timeout=wait)
                continue
            request = self.auth.refresh_request()
            if request is None:
                continue
            async with self._lock:
                try:
                    token, ttl = await self._fetch(request)
                except (TimeoutError, AuthError, aiohttp.ClientError, OSError) as e:
                    self.auth.refresh_failed()
                    self.counters.token_failures += 1
                    log.warning("token renewal failed: %s", e)
                    continue
                self.auth.refresh_succeeded(request, token, ttl)
                self.serial += 1
                self.counters.token_refreshes += 1
                self.counters.token_fetches += 1
