"""The test helpers that replace sleeps and stopwatches: they return on the event, fail loudly
on the deadline, and count work deterministically."""

import asyncio
import threading

import pytest

from tests.clock import ManualClock
from tests.rafs.budget import OverBudget, call_budget
from tests.waiting import WaitTimeout, async_wait_until, wait_event, wait_for, wait_until


def test_wait_until_returns_the_value_once_true() -> None:
    hits = iter([0, None, "", "done"])
    assert wait_until(lambda: next(hits), what="the fourth poll") == "done"


def test_wait_until_names_what_never_happened() -> None:
    with pytest.raises(WaitTimeout, match=r"timed out after 0.05s waiting for the impossible: 7"):
        wait_until(lambda: False, 0.05, lambda: f"the impossible: {7}")


def test_wait_until_stops_on_the_predicates_error() -> None:
    def dead() -> bool:
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="exited"):
        wait_until(dead, 60)


def test_async_wait_until() -> None:
    polls = [0]

    async def third() -> int:
        polls[0] += 1
        return polls[0] if polls[0] >= 3 else 0

    assert asyncio.run(async_wait_until(third)) == 3


def test_wait_event_and_condition() -> None:
    ev = threading.Event()
    threading.Thread(target=ev.set).start()
    wait_event(ev, what="the setter")
    with pytest.raises(WaitTimeout, match="never set"):
        wait_event(threading.Event(), 0.01, "never set")
    cond, box = threading.Condition(), [0]

    def put() -> None:
        with cond:
            box[0] = 5
            cond.notify_all()

    threading.Thread(target=put).start()
    assert wait_for(cond, lambda: box[0], what="the box") == 5


def test_manual_clock_moves_only_forward_and_only_when_told() -> None:
    c = ManualClock(10.0)
    assert c() == c() == 10.0
    assert c.advance(1.5) == 11.5 == c()
    with pytest.raises(ValueError):
        c.advance(-1)


def test_call_budget_counts_and_stops_runaway_work() -> None:
    with call_budget(1000) as n:
        for i in range(100):
            abs(i)
    assert 100 <= n.calls < 1000
    with pytest.raises(OverBudget), call_budget(1000):
        for i in range(10**9):
            abs(i)


def test_call_budget_sees_a_swallowed_report() -> None:
    with pytest.raises(OverBudget, match="swallowed"), call_budget(50):
        try:
            for i in range(10**6):
                abs(i)
        except Exception:  # noqa: BLE001 - code under test that catches everything
            pass
