"""Output files that appear whole or not at all (bootstraps, cache views, block disks)."""

import contextlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_output(path: str, prefix: str, size: int = 0) -> Iterator[int]:
    """An fd on a temp file beside `path` (pre-sized to `size`, sparse). On a clean exit it is
    fsynced, made 0644 and renamed over `path`; on an error it is removed, so `path` is always
    either what it was or the whole new file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=prefix, suffix=".tmp")
    try:
        if size:
            os.ftruncate(fd, size)
        yield fd
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
