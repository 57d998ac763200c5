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
limited = memory.limit_malloc_arenas(2) if sys.argv[1] == "limit" else None
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
print(json.dumps([limited, open(path).read().count("<heap nr=")]))
"""


@pytest.mark.parametrize("mode", ["limit", "default"])
def test_malloc_arenas_are_limited_for_the_threads_started_after(mode):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", _ARENAS, mode], check=True, capture_output=True, text=True, env=env)
    limited, arenas = json.loads(out.stdout)
    if mode == "limit":
        assert limited is True and arenas <= 2
    else:  # (what the limit is for: the threads took arenas of their own)
        assert arenas > 2


def test_an_arena_limit_from_the_environment_is_left_alone(monkeypatch, caplog):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "3")
    with caplog.at_level(logging.INFO, logger="nydus_py.convert.memory"):
        assert memory.limit_malloc_arenas(2) is False
    assert "malloc arenas left as the environment sets them" in caplog.text


def test_nydusify_limits_the_arenas_before_anything_else(monkeypatch):
    from nydus_py.cli import nydusify

    calls: list[int | None] = []
    monkeypatch.setattr(nydusify, "limit_malloc_arenas", lambda count=None: calls.append(count) or True)
    with pytest.raises(SystemExit):
        nydusify.main(["convert"])  # a usage error: no --source
    assert calls == [None]
