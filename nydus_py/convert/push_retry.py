"""nydusify's `--push-retry-count` / `--push-retry-delay`: an upload that fails the way a busy
registry or gateway fails (502/503/504, a refused or cut connection, a timeout) is tried again
after a fixed delay, up to `count` attempts in all; a refusal (any other status: a bad digest, a
denied scope) fails at once. As upstream (`utils.WithRetry`), a count or delay of zero or less
means the defaults, 3 attempts and 5 s.

Upstream retries the whole push of an image; here each blob upload, mount and manifest PUT is
retried on its own, so one failed blob does not send the others again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..config.goformat import parse_go_duration
from ..storage.registry.transfer import HttpStatusError

log = logging.getLogger(__name__)

DEFAULT_COUNT = 3
DEFAULT_DELAY = 5.0
RETRY_STATUSES = frozenset((502, 503, 504))

T = TypeVar("T")


@dataclass(frozen=True)
class PushRetry:
    count: int = DEFAULT_COUNT  # attempts in all
    delay: float = DEFAULT_DELAY  # seconds between attempts

    @classmethod
    def from_flags(cls, count: int, delay: str) -> PushRetry:
        seconds = parse_go_duration(delay)
        return cls(count if count > 0 else DEFAULT_COUNT, seconds if seconds > 0 else DEFAULT_DELAY)


def retryable(e: BaseException) -> bool:
    """A failure a later attempt may not see: a gateway status, or the connection itself."""
    if isinstance(e, HttpStatusError):
        return e.status in RETRY_STATUSES
    return isinstance(e, (OSError, TimeoutError))


@dataclass
class RetryStats:
    retried: int = 0  # attempts made again after a retryable failure


async def with_retry(op: Callable[[], Awaitable[T]], what: str, policy: PushRetry, stats: RetryStats) -> T:
    for attempt in range(1, policy.count + 1):
        try:
            return await op()
        except Exception as e:
            if attempt >= policy.count or not retryable(e):
                raise
            stats.retried += 1
            log.warning("%s failed (attempt %d of %d): %s; retrying in %gs", what, attempt, policy.count, e,
                        policy.delay)
            await asyncio.sleep(policy.delay)
    raise AssertionError("unreachable: count >= 1")


PUSH_OPS = ("push_blob", "push_blob_file", "mount_blob", "push_manifest")


def retry_pushes(client: Any, policy: PushRetry, stats: RetryStats) -> None:
    """Rebind `client`'s upload operations (a `RegistryClient` binds them as attributes) to
    retrying ones; reads keep the client's own per-request retries."""
    for name in PUSH_OPS:
        op = getattr(client, name)

        def retrying(*args: Any, _op: Any = op, _name: str = name, **kwargs: Any) -> Awaitable[Any]:
            return with_retry(lambda: _op(*args, **kwargs), f"{_name} {_describe(args)}", policy, stats)

        setattr(client, name, retrying)


def _describe(args: tuple[Any, ...]) -> str:
    """The digest or reference an upload is about, for the log line."""
    for a in args:
        if isinstance(a, str):
            return a
    return ""


def chunked_pushes(client: Any, chunk: int) -> None:
    """nydusify's --push-chunk-size: `client`'s blob-file uploads go up as PATCH requests of
    `chunk` bytes (0: one streamed PUT, the default)."""
    if chunk <= 0:
        return
    op = client.push_blob_file

    def chunked(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        return op(*args, chunk=chunk, **kwargs)

    client.push_blob_file = chunked
