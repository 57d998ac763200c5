"""What the registry modules share: the two failure kinds, the client's counters, retry timing."""

from __future__ import annotations

import random
from typing import Any

BACKOFF_BASE = 0.1
BACKOFF_MAX = 2.0


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
        self.first_request_waits_cut = 0  # requests that stopped waiting for a stalled first one

    def status(self, code: int) -> None:
        self.errors_by_status[code] = self.errors_by_status.get(code, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["errors_by_status"] = dict(self.errors_by_status)
        return out


def backoff(attempt: int, rng: random.Random) -> float:
    """Delay before retry `attempt` (1-based): doubling from BACKOFF_BASE, capped, jittered."""
    return min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)


def describe(e: BaseException | None) -> str:
    if e is None:
        return "deadline passed"
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
