"""Run `nydusd-py` so that a test can see what it has imported while it runs.

`python -m tests.cli.modules_hook <nydusd-py args>`: on SIGUSR2 the daemon's main thread writes
the sorted names of `sys.modules` as JSON to $NYDUS_TEST_MODULES_OUT (put in place by a rename,
so a reader never sees half a file). nydusd-py itself handles no SIGUSR2.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys


def install(out: str) -> None:
    def dump(_sig: int, _frame: object) -> None:
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(sys.modules), f)
        os.rename(tmp, out)

    signal.signal(signal.SIGUSR2, dump)


if __name__ == "__main__":
    install(os.environ["NYDUS_TEST_MODULES_OUT"])
    runpy.run_module("nydus_py.cli.daemon", run_name="__main__", alter_sys=True)
