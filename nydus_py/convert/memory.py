"""Giving freed memory back to the OS between layers.

A conversion allocates and frees ~1 MiB buffers in a dozen threads (downloads, inflating,
chunk workers, the blob writer); glibc keeps what each thread's arena freed, so the peak RSS
grows with fragmentation, not with what is in use. `malloc_trim(0)` after each layer returns
the free pages of every arena (a few ms). Where the C library has no `malloc_trim` (musl), that
is logged once and counted, and memory is left to the allocator.
"""

import ctypes
import logging
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
