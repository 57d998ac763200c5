"""Giving freed memory back to the OS between layers.

A conversion allocates and frees ~1 MiB buffers in a dozen threads (downloads, inflating,
chunk workers, the blob writer); glibc keeps what each thread's arena freed, so the peak RSS
grows with fragmentation, not with what is in use. `malloc_trim(0)` after each layer returns
the free pages of every arena (a few ms). Where the C library has no `malloc_trim` (musl), that
is logged once and counted, and memory is left to the allocator.

`limit_malloc_arenas`: glibc gives each new thread an arena of its own while there are fewer
than 8 per core, and each keeps its own free pieces. A conversion's dozen threads so held
12-15 MiB more at its peak (514 MiB image: 85-89 -> 71-77 MiB with one arena per core) for the
same CPU. Called before the threads start (`nydusify-py`); environment settings win.
"""

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

trims = 0  # calls that returned memory
unavailable = 0  # calls made where malloc_trim does not exist

_trim: Callable[[int], int] | None = None
_looked = False


def _find() -> Callable[[int], int] | None:
    global _looked, _trim
    if not _looked:
        _looked = True
        try:  # the symbols the process has already (no ldconfig run to find the C library)
            trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError) as e:
            log.info("malloc_trim is not available (%s): freed memory stays with the allocator", e)
        else:
            trim.argtypes = [ctypes.c_size_t]
            trim.restype = ctypes.c_int
            _trim = trim
    return _trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS; True when malloc_trim ran. (The daemon's
    `daemon.heap.trim_heap` calls this too.)"""
    global trims, unavailable
    trim = _find()
    if trim is None:
        unavailable += 1
        return False
    trim(0)
    trims += 1
    return True


_M_ARENA_MAX = -8  # glibc <malloc.h>


def limit_malloc_arenas(count: int | None = None) -> bool:
    """At most `count` malloc arenas (default: one per core, at least 2) for the threads started
    from now on; False (logged) when the environment sets it (MALLOC_ARENA_MAX, GLIBC_TUNABLES)
    or the C library has no mallopt (musl)."""
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        log.info("malloc arenas left as the environment sets them")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:
        log.info("mallopt is not available (%s): one malloc arena per thread", e)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    n = count if count is not None else max(2, min(8, os.cpu_count() or 1))
    if mallopt(_M_ARENA_MAX, n) != 1:
        log.warning("mallopt refused M_ARENA_MAX=%d: one malloc arena per thread", n)
        return False
    return True
