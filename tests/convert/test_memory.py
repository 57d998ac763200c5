"""release_free_memory: malloc_trim where glibc has it; elsewhere a logged, counted no-op."""

import ctypes
import logging

import pytest

from nydus_py.convert import memory


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(memory, "_looked", False)
    monkeypatch.setattr(memory, "_trim", None)
    return memory


def test_trims_with_glibc(fresh):
    before = fresh.trims
    assert fresh.release_free_memory() is True
    assert fresh.trims == before + 1


def test_without_malloc_trim_it_is_logged_once_and_counted(fresh, monkeypatch, caplog):
    def no_libc(*_a, **_k):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    before = fresh.unavailable
    with caplog.at_level(logging.INFO, logger="nydus_py.convert.memory"):
        assert fresh.release_free_memory() is False
        assert fresh.release_free_memory() is False
    assert fresh.unavailable == before + 2
    assert [r.message for r in caplog.records].count(
        "malloc_trim is not available (no such library): freed memory stays with the allocator") == 1


# Threads that each allocate, then the count of malloc arenas (glibc's malloc_info: one <heap> each).
_ARENAS = """
import ctypes, json, os, sys, tempfile, threading
from nydus_py.convert import memory
limited = memory.tune_malloc(2) if sys.argv[1] == "limit" else None
go = threading.Barrier(8)
def work():
    go.wait()  # all alive at once: each wants an arena of its own
    keep = [bytearray(300 << 10) for _ in range(4)]
    go.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = os.path.join(tempfile.mkdtemp(), "info.xml")
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
class Info(ctypes.Structure):  # mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
big = bytearray(2 << 20)  # a fresh buffer past glibc's first mmap threshold (128 KiB)
mapped = libc.mallinfo2().hblks - before
print(json.dumps([limited, open(path).read().count("<heap nr="), mapped]))
"""


@pytest.mark.parametrize("mode", ["limit", "default"])
def test_malloc_arenas_are_limited_and_buffers_come_from_the_heap(mode):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in (*memory._ENV, "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", _ARENAS, mode], check=True, capture_output=True, text=True, env=env)
    limited, arenas, mapped = json.loads(out.stdout)
    if mode == "limit":  # and chunk-sized buffers come from the heap
        assert limited is True and arenas <= 2 and mapped == 0
    else:  # (what the limit is for: the threads took arenas of their own; the buffer was mmapped)
        assert arenas > 2 and mapped >= 1


@pytest.mark.parametrize("var", ["MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_"])
def test_malloc_parameters_from_the_environment_are_left_alone(monkeypatch, caplog, var):
    for k in memory._ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(var, "3")
    with caplog.at_level(logging.INFO, logger="nydus_py.convert.memory"):
        assert memory.tune_malloc(2) is False
    assert f"malloc parameters left as the environment sets them ({var})" in caplog.text


def test_nydusify_tunes_malloc_before_anything_else(monkeypatch):
    from nydus_py.cli import nydusify

    calls: list[int | None] = []
    monkeypatch.setattr(nydusify, "tune_malloc", lambda arenas=None: calls.append(arenas) or True)
    with pytest.raises(SystemExit):
        nydusify.main(["convert"])  # a usage error: no --source
    assert calls == [None]
