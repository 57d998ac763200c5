"""Run `nydusd-py` with the race of issue 16 item 3 won by the attacker, every time.

`python -m tests.reliability.swap_hook <nydusd-py args>` starts the daemon with os.open wrapped:
right before the daemon's first os.open() of $NYDUS_TEST_SWAP_SOURCE, the FIFO at
$NYDUS_TEST_SWAP_FIFO is renamed over it, as an attacker who swaps the source between the
daemon's checks and its open would do. The test sees the swap happen when the FIFO's own path
disappears. A daemon that opens without O_NONBLOCK then blocks in open(2).
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
from typing import Any

_real_open = os.open


def install(source: str, fifo: str) -> None:
    lock = threading.Lock()
    done = False

    def open_hook(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        nonlocal done
        p = os.fsdecode(path)
        target = p == source if dir_fd is None else p == os.path.basename(source)
        if target and not done:
            with lock:
                if not done:
                    os.rename(fifo, source)
                    done = True
                    print(f"swap_hook: {fifo} renamed over {source} before open", file=sys.stderr, flush=True)
        return _real_open(path, flags, mode, dir_fd=dir_fd)

    os.open = open_hook  # type: ignore[assignment]


if __name__ == "__main__":
    install(os.environ["NYDUS_TEST_SWAP_SOURCE"], os.environ["NYDUS_TEST_SWAP_FIFO"])
    runpy.run_module("nydus_py.cli.daemon", run_name="__main__", alter_sys=True)
