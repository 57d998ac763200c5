"""aiohttp without the system CA store read at its import.

aiohttp makes two TLS client contexts when `aiohttp.connector` is imported, and each reads the
system CA bundle: about 40 ms of CPU, a sixth of `nydusd-py fuse --image` from exec to mount,
spent even when the registry is plain HTTP (loopback) and no TLS is ever used. `import_aiohttp`
imports it with the contexts' CA loading put off; `load_system_cas` does it, once, and `Connector`
(the TCPConnector every registry session uses) calls it before its first TLS handshake, so a
verified connection sees the same store as before.

Only the importing thread's contexts are put off, and only while aiohttp is imported. When
aiohttp was imported before (the API server, a test), or this aiohttp no longer picks its context
in `TCPConnector._get_ssl_context`, the CAs are loaded at once (logged and counted in
`eager_loads`): slower, never a context without CAs.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_deferred: list[Callable[[], None]] = []  # loads still owed, one per context made at import
stats = {"deferred": 0, "loaded": 0, "eager_loads": 0}


@contextlib.contextmanager
def _cas_put_off() -> Iterator[None]:
    """While active, contexts made by this thread record their CA loading instead of doing it."""
    me = threading.get_ident()
    cls = ssl.SSLContext
    real_default_certs = cls.load_default_certs
    real_verify_paths = cls.set_default_verify_paths

    def load_default_certs(self: ssl.SSLContext, purpose: Any = ssl.Purpose.SERVER_AUTH) -> None:
        if threading.get_ident() != me:
            return real_default_certs(self, purpose)
        _deferred.append(lambda: real_default_certs(self, purpose))
        return None

    def set_default_verify_paths(self: ssl.SSLContext) -> None:
        if threading.get_ident() != me:
            return real_verify_paths(self)
        _deferred.append(lambda: real_verify_paths(self))
        return None

    cls.load_default_certs = load_default_certs  # type: ignore[method-assign]
    cls.set_default_verify_paths = set_default_verify_paths  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.load_default_certs = real_default_certs  # type: ignore[method-assign]
        cls.set_default_verify_paths = real_verify_paths  # type: ignore[method-assign]


def import_aiohttp() -> None:
    """Import aiohttp (if nobody has) with its default contexts' CA loading put off."""
    with _lock:
        if "aiohttp" in sys.modules:
            return
        with _cas_put_off():
            import aiohttp.connector
        stats["deferred"] += len(_deferred)
        if not callable(getattr(aiohttp.connector.TCPConnector, "_get_ssl_context", None)):
            stats["eager_loads"] += 1
            log.warning("aiohttp %s has no TCPConnector._get_ssl_context: loading the system CAs now",
                        getattr(aiohttp, "__version__", "?"))
            _load_locked()


def _load_locked() -> None:
    t0 = time.perf_counter()
    n = len(_deferred)
    while _deferred:
        _deferred.pop()()
    if n:
        stats["loaded"] += n
        log.debug("loaded the system CAs into %d default TLS contexts in %.0f ms", n, (time.perf_counter() - t0) * 1e3)


def load_system_cas() -> None:
    """Load what `import_aiohttp` put off (once; later calls return at once)."""
    if not _deferred:
        return
    with _lock:
        _load_locked()


import_aiohttp()

import aiohttp  # noqa: E402  (imported above, with the CA loading put off)


class Connector(aiohttp.TCPConnector):
    """A TCPConnector whose verified TLS connections get aiohttp's default contexts with their
    CAs. An unverified one (`skip_verify`: `nydusify --*-insecure`, which also tries HTTPS before
    falling back to HTTP) never reads the store: it would not look at it."""

    def _get_ssl_context(self, req: Any) -> Any:
        ctx = super()._get_ssl_context(req)
        if isinstance(ctx, ssl.SSLContext) and ctx.verify_mode != ssl.CERT_NONE:
            load_system_cas()
        return ctx
