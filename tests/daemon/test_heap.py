"""The start-up heap (daemon.heap.StartupHeap, issue 12 start-up): no cyclic collection while
the daemon starts, and the one full collection and trim on a thread of their own after it
serves, not on the path of the first requests."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from nydus_py.daemon.heap import StartupHeap
from tests.waiting import wait_until


@pytest.fixture(autouse=True)
def gc_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_start_up_runs_without_collection_then_it_is_given_back_on_its_own_thread() -> None:
    trims: list[str] = []
    heap = StartupHeap(delay=0.0, trim=lambda: trims.append(threading.current_thread().name) is None)
    gc.collect()
    heap.begin()
    assert not gc.isenabled()
    for _ in range(5000):  # start-up garbage in cycles: nothing collects it yet
        Cycle()
    for _ in range(5000):
        Cycle()
    heap.serving(threading.Event())
    wait_until(heap.settled.is_set, 10, "the start-up heap to settle")
    assert gc.isenabled()
    assert heap.collected >= 5000
    assert trims == ["heap-trim"]


def test_nothing_is_collected_before_the_delay_and_an_exit_skips_it() -> None:
    trims: list[bool] = []
    heap = StartupHeap(delay=3600.0, trim=lambda: trims.append(True) is None)
    heap.begin()
    stop = threading.Event()
    heap.serving(stop)
    assert not heap.settled.is_set() and not gc.isenabled()
    stop.set()
    wait_until(heap.settled.is_set, 10, "the start-up heap to settle")
    assert gc.isenabled() and trims == [] and heap.collected == 0


def test_end_restores_the_collector_as_begin_found_it() -> None:
    heap = StartupHeap()
    gc.disable()
    heap.begin()
    heap.end()
    assert not gc.isenabled()
    gc.enable()
    heap.begin()
    heap.end()
    assert gc.isenabled()
