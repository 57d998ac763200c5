"""--push-retry-count/--push-retry-delay without a registry: Go durations, which failures are
tried again, how many times, and the counts."""

import asyncio
import errno

import pytest

from nydus_py.convert.push_retry import PushRetry, RetryStats, parse_go_duration, retry_pushes, with_retry
from nydus_py.storage.registry.transfer import HttpStatusError


@pytest.mark.parametrize("text,seconds", [
    ("5s", 5.0), ("0", 0.0), ("1m", 60.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("300ms", 0.3), ("10us", 1e-5),
    ("2µs", 2e-6), ("100ns", 1e-7), ("-1s", -1.0), ("+2m", 120.0), (".5s", 0.5), ("1m0.5s", 60.5)])
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "s", "1 s", "1s2", "--1s", "1.2.3s"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


def test_zero_or_less_means_the_defaults_as_upstream():
    assert PushRetry.from_flags(0, "0") == PushRetry(3, 5.0)
    assert PushRetry.from_flags(-2, "-1s") == PushRetry(3, 5.0)
    assert PushRetry.from_flags(5, "10ms") == PushRetry(5, 0.01)


class Flaky:
    """Fails with each of `errors` in turn, then succeeds; counts calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def run(op: Flaky, count: int = 3) -> tuple[str | BaseException, RetryStats]:
    stats = RetryStats()

    async def go() -> str:
        return await with_retry(op, "push", PushRetry(count, 0.001), stats)

    try:
        return asyncio.run(go()), stats
    except Exception as e:  # noqa: BLE001 - the test looks at which
        return e, stats


@pytest.mark.parametrize("error", [HttpStatusError(503, "HTTP 503"), HttpStatusError(502, "HTTP 502"),
                                   HttpStatusError(504, "HTTP 504"), OSError(errno.EIO, "connection reset"),
                                   TimeoutError()])
def test_gateway_and_connection_failures_are_tried_again(error):
    op = Flaky(error, error)
    got, stats = run(op)
    assert got == "ok" and op.calls == 3 and stats.retried == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 500])
def test_a_refusal_fails_at_once(status):
    op = Flaky(HttpStatusError(status, f"HTTP {status}"))
    got, stats = run(op)
    assert isinstance(got, HttpStatusError) and got.status == status
    assert op.calls == 1 and stats.retried == 0


def test_the_last_failure_is_raised_after_count_attempts():
    op = Flaky(*(HttpStatusError(503, f"attempt {i}") for i in range(5)))
    got, stats = run(op, count=4)
    assert isinstance(got, HttpStatusError) and str(got).endswith("attempt 3")
    assert op.calls == 4 and stats.retried == 3


def test_retry_pushes_wraps_uploads_only():
    class Client:
        def __init__(self) -> None:
            self.flaky = Flaky(HttpStatusError(503, "busy"))

        async def push_blob(self, data: bytes, digest: str) -> str:
            return await self.flaky() + digest

        push_blob_file = mount_blob = push_manifest = push_blob

        async def get_blob(self, digest: str) -> bytes:
            raise HttpStatusError(503, "reads are not retried here")

    c = Client()
    stats = RetryStats()
    retry_pushes(c, PushRetry(2, 0.001), stats)
    assert asyncio.run(c.push_blob(b"x", "sha256:1")) == "oksha256:1"
    assert stats.retried == 1
    with pytest.raises(HttpStatusError):
        asyncio.run(c.get_blob("sha256:1"))
    assert stats.retried == 1


@pytest.mark.parametrize(("text", "size"), [("0MB", 0), ("10MB", 10_000_000), ("16MiB", 16 << 20), ("512k", 512_000),
                                           ("1048576", 1 << 20), ("1.5 KiB", 1536), ("2GB", 2_000_000_000),
                                           ("8mi", 8 << 20), ("1,000B", 1000)])
def test_human_sizes_parse_as_go_humanize_does(text, size):
    from nydus_py.config.goformat import parse_human_bytes

    assert parse_human_bytes(text) == size


@pytest.mark.parametrize("text", ["", "ten", "10XB", "MB", "1..2MB", "-1MB"])
def test_bad_human_sizes_are_refused(text):
    from nydus_py.config.goformat import parse_human_bytes

    with pytest.raises(ValueError):
        parse_human_bytes(text)
