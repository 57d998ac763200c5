"""Waiting in tests: for a condition, with a deadline, never for a fixed time.

A fixed sleep guesses how long another thread or process needs and flakes on a loaded machine;
these helpers return as soon as the condition holds and fail with a message naming what never
happened. Waiting never measures anything: tests assert events, order and counts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

FIRST_PAUSE = 0.001  # polls start fast (threads in this process) and back off
MAX_PAUSE = 0.05  # to this, for subprocesses and servers


class WaitTimeout(AssertionError):
    """The awaited condition did not hold before the deadline."""


def _describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def _timeout(timeout: float, what: str | Callable[[], str]) -> WaitTimeout:
    return WaitTimeout(f"timed out after {timeout:g}s waiting for {_describe(what)}")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0,
               what: str | Callable[[], str] = "a condition") -> T:
    """Poll `predicate` until it returns something true, and return that. An exception from
    `predicate` ends the wait (a process that died is no reason to wait on). `what` (or a
    function giving it, e.g. a log tail) names the condition in the WaitTimeout."""
    deadline = time.monotonic() + timeout
    pause = FIRST_PAUSE
    while True:
        got = predicate()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timeout(timeout, what)
        time.sleep(min(pause, left))  # the poll interval, not an ordering guess
        pause = min(pause * 2, MAX_PAUSE)


async def async_wait_until(predicate: Callable[[], Awaitable[T]], timeout: float = 10.0,
                           what: str | Callable[[], str] = "a condition") -> T:
    """wait_until for an event loop: `predicate` is a coroutine function (an API call)."""
    deadline = time.monotonic() + timeout
    pause = FIRST_PAUSE
    while True:
        got = await predicate()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timeout(timeout, what)
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, MAX_PAUSE)


def wait_event(event: threading.Event, timeout: float = 10.0, what: str | Callable[[], str] = "an event") -> None:
    """Block until `event` is set; WaitTimeout naming `what` when it is not within `timeout`."""
    if not event.wait(timeout):
        raise _timeout(timeout, what)


def wait_for(cond: threading.Condition, predicate: Callable[[], T], timeout: float = 10.0,
             what: str | Callable[[], str] = "a condition") -> T:
    """Condition.wait_for with a deadline that fails loudly; `cond` must be notified whenever
    the state `predicate` reads changes. Call without holding `cond`."""
    with cond:
        got = cond.wait_for(predicate, timeout)
    if not got:
        raise _timeout(timeout, what)
    return got
