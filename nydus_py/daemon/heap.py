"""Giving the start-up's garbage back to the system once the daemon serves.

Start-up allocates far more than a serving daemon keeps: config parsing, bootstrap validation and,
where modules are not byte-compiled (PYTHONDONTWRITEBYTECODE, an editable install), the compiler's
work for every module. Python frees it, but glibc keeps the freed pages in its heaps; malloc_trim(0)
returns the free pages of every arena to the kernel (4.4 MiB of an idle daemon without .pyc
files, ~0.3 MiB with them). Without glibc (musl) there is nothing to call and nothing is done.
"""

import gc

from ..convert.memory import release_free_memory


def trim_heap() -> bool:
    """Collect cycles, then return free heap pages to the kernel; False when libc cannot
    (logged once and counted by `convert.memory`)."""
    gc.collect()
    return release_free_memory()
