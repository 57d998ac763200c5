"""Giving the start-up's garbage back to the system once the daemon serves.

Start-up allocates far more than a serving daemon keeps: config parsing, bootstrap validation and,
where modules are not byte-compiled (PYTHONDONTWRITEBYTECODE, an editable install), the compiler's
work for every module. Python frees it, but glibc keeps the freed pages in its heaps; malloc_trim(0)
returns the free pages of every arena to the kernel (4.4 MiB of an idle daemon without .pyc
files, ~0.3 MiB with them). Without glibc (musl) there is nothing to call and nothing is done.

The start-up runs with the cyclic collector off (`StartupHeap.begin`): importing the registry stack
and the daemon makes ~50k objects, and collecting them generation by generation as they come costs
~10 ms of CPU before the mount for no memory (they live on). One full collection and the trim come
`STARTUP_TRIM_DELAY` after the daemon serves, on a thread of their own, so the first command's
requests do not wait behind them (a full collection holds the GIL ~15 ms).

`tune_malloc`: a cold sequential read decodes a 1 MiB chunk after another, and frees the ones
behind the reader. With glibc's defaults a freed top of heap past 2x the (dynamic) mmap
threshold goes back to the kernel at once, and the next chunk's memory is fresh pages again:
page faults and zeroing, about a third of a 1 MiB zstd decode. The daemon keeps up to
`TRIM_THRESHOLD` of free heap top instead (and takes chunk-sized buffers from the heap, not
from mmap); what an idle mount's requests left is still given back by the idle trimmer's
malloc_trim. Minor faults of four cold 100 MiB reads: 22-37k -> 7-8k (fusedev), 31-57k -> 10k
(EROFS views). Environment settings of glibc's malloc win (MALLOC_*_ / GLIBC_TUNABLES).
"""

import gc
import logging
import threading
import time
from collections.abc import Callable

from ..convert.memory import release_free_memory, set_malloc

log = logging.getLogger(__name__)

STARTUP_TRIM_DELAY = 1.0  # seconds after the daemon serves: the first command's burst comes first
MMAP_THRESHOLD = 4 << 20  # a decoded chunk (<= 1 MiB here; nydus allows up to 16 MiB) comes from the heap
TRIM_THRESHOLD = 16 << 20  # free heap top kept for the next chunks: a reader's window and what is ahead
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Set glibc's malloc thresholds for chunk-sized buffers (see the module docstring); False
    (logged) when the environment sets them or the C library has no mallopt (musl)."""
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return set_malloc(settings, _ENV, "malloc thresholds")


def trim_heap() -> bool:
    """Collect cycles, then return free heap pages to the kernel; False when libc cannot
    (logged once and counted by `convert.memory`)."""
    gc.collect()
    return release_free_memory()


class StartupHeap:
    """The collector off from `begin` (start-up) until `settled`, `delay` seconds after `serving`
    (or at once when `stop` is set first): then it is on again, and one full collection and a
    trim give the start-up's garbage back."""

    def __init__(self, delay: float = STARTUP_TRIM_DELAY, trim: Callable[[], bool] = trim_heap) -> None:
        self.delay = delay
        self.trim = trim
        self.settled = threading.Event()
        self.collected = 0
        self._was_enabled = True

    def begin(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def end(self) -> None:
        """The collector back as `begin` found it (a start-up that never served)."""
        if self._was_enabled:
            gc.enable()

    def serving(self, stop: threading.Event) -> None:
        """Schedule the collection and trim (on the `heap-trim` thread)."""
        threading.Thread(target=self._settle, args=(stop,), name="heap-trim", daemon=True).start()

    def _settle(self, stop: threading.Event) -> None:
        stopping = stop.wait(self.delay)
        t0 = time.perf_counter()
        if self._was_enabled:
            gc.enable()
        if stopping:  # (exiting: nothing to give back for)
            self.settled.set()
            return
        self.collected = gc.collect()
        self.trim()
        log.info("start-up heap settled: %d unreachable objects collected, %.0f ms", self.collected,
                 (time.perf_counter() - t0) * 1e3)
        self.settled.set()
