"""Giving freed memory back to the OS between layers.

A conversion allocates and frees ~1 MiB buffers in a dozen threads (downloads, inflating,
chunk workers, the blob writer); glibc keeps what each thread's arena freed, so the peak RSS
grows with fragmentation, not with what is in use. `malloc_trim(0)` after each layer returns
the free pages of every arena (a few ms). Where the C library has no `malloc_trim` (musl), that
is logged once and counted, and memory is left to the allocator.

`tune_malloc` (`nydusify-py`, before any thread starts): glibc gives each new thread an arena
of its own while there are fewer than 8 per core, and each keeps its own free pieces (514 MiB
image on a busy machine: peak RSS 80-88 MiB, with one arena per core 68-77; on a quieter one
73-76 -> 70-75). Fewer arenas alone trim their tops more often, and the next buffers are fresh
pages again (page faults 50k -> 80k, +0.1-0.2 s of CPU); with ~1 MiB buffers kept on the heaps
and 8 MiB of free top kept, 39-50k (the daemon does the same: `daemon.heap`). Setting any of
these turns glibc's dynamic mmap threshold off: a trim threshold alone sent every buffer over
128 KiB to mmap (560k faults, +1.2 s). Environment settings win.
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


_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 << 20  # chunk-sized buffers (<= 1 MiB here) come from the heaps, not from mmap
TRIM_THRESHOLD = 8 << 20  # free heap top kept for the next buffers (malloc_trim still returns it)
_ENV = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def set_malloc(settings: tuple[tuple[int, int], ...], env: tuple[str, ...], what: str) -> bool:
    """mallopt each (parameter, value) of `settings`; False (logged) when the environment sets
    any of `env` or glibc's malloc tunables (those win: setting one turns glibc's own adjustments
    off, so all are left alone then), the C library has no mallopt (musl), or glibc refuses one."""
    given = [k for k in env if k in os.environ]
    if given or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        log.info("%s left as the environment sets them (%s)", what, ", ".join(given) or "GLIBC_TUNABLES")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:
        log.info("mallopt is not available (%s): malloc keeps its defaults", e)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    for param, value in settings:
        if mallopt(param, value) != 1:
            log.warning("mallopt refused parameter %d = %d: malloc keeps its default there", param, value)
            return False
    return True


def tune_malloc(arenas: int | None = None) -> bool:
    """For the threads started from now on: at most `arenas` malloc arenas (default: one per
    core, at least 2), buffers up to `MMAP_THRESHOLD` from the heaps and `TRIM_THRESHOLD` of
    free heap top kept (see the module docstring); False (logged) where `set_malloc` says."""
    n = arenas if arenas is not None else max(2, min(8, os.cpu_count() or 1))
    settings = ((_M_ARENA_MAX, n), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return set_malloc(settings, _ENV, "malloc parameters")
