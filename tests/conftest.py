"""Shared test fixtures: where ../shared is, and skips that name a missing device or tool."""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NYDUS_PY_SHARED", REPO.parent / "shared"))
NYDUS_FIXTURES = SHARED / "fixtures" / "nydus"

# Image mounts without a cache section use the default blob cache (daemon/image_ref.py); in the
# suite (and the daemons it starts, which inherit the environment) it lives in a temp dir, not
# in /var/lib/nydus-py/cache.
os.environ.setdefault("NYDUS_PY_CACHE_DIR", tempfile.mkdtemp(prefix="nydus-py-test-cache-"))


def require_tool(name: str) -> str:
    """Path of tool `name`; skip (naming the missing package) when absent."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        pytest.skip(f"missing tool {name!r} (install the Debian package that provides it)")
    return path


def require_device(path: str) -> None:
    """Skip when a kernel device node is missing; everywhere else the test runs."""
    if not os.path.exists(path):
        pytest.skip(f"missing device {path}")
    if os.geteuid() != 0:
        pytest.skip(f"{path} needs root")


@pytest.fixture(scope="session")
def nydus_fixtures() -> Path:
    if not NYDUS_FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {NYDUS_FIXTURES}; CI keeps ../shared beside the repo")
    return NYDUS_FIXTURES


@pytest.fixture(autouse=True)
def _logging_handlers_restored():
    """A CLI main() run in-process attaches handlers to pytest's captured stderr; left behind,
    they make later threads log to a closed stream ("--- Logging error ---")."""
    loggers = [logging.getLogger(), logging.getLogger("nydus_py")]
    saved = [(lg, list(lg.handlers), lg.level) for lg in loggers]
    yield
    for lg, handlers, level in saved:
        for h in lg.handlers[:]:
            if h not in handlers:
                lg.removeHandler(h)
        lg.setLevel(level)
