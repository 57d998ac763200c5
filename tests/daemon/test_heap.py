"""The start-up heap (daemon.heap.StartupHeap, issue 12 start-up): no cyclic collection while
the daemon starts, and the one full collection and trim on a thread of their own after it
serves, not on the path of the first requests."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
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


# A chunk-sized working set freed and taken again, as a sequential reader's decoded chunks are:
# the faults of the second round are the fresh pages it got (with glibc's defaults the freed heap
# top went back to the kernel).
_REUSE = r"""
import resource, sys
from nydus_py.daemon.heap import tune_malloc
print(tune_malloc() if sys.argv[1] == "tune" else "-")
held = [b"x" * (1 << 20)]
held.clear()  # (an mmapped chunk freed: glibc's dynamic thresholds rise as they would)
held = [b"x" * (1 << 20) for _ in range(8)]
held.clear()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = [b"x" * (1 << 20) for _ in range(8)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _second_round_faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _REUSE, mode], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0], int(out[1])


def test_decoded_chunk_memory_is_reused_not_faulted_in_again() -> None:
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("no glibc mallopt")
    tuned, faults = _second_round_faults("tune")
    assert tuned == "True"
    assert faults < 256, f"{faults} minor faults taking 8 MiB again (8 MiB is 2048 pages)"
    _, untuned = _second_round_faults("none")
    assert untuned >= 1024  # (the defaults this guards against: what the test is about)


def test_the_environment_wins_over_tune_malloc() -> None:
    tuned, _ = _second_round_faults("tune", {"MALLOC_TRIM_THRESHOLD_": str(128 << 10)})
    assert tuned == "False"
