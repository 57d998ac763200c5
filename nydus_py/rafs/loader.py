"""Version detection and opening a bootstrap file as an mmap-backed image."""

import mmap
import os
import stat

from .errors import FormatError
from .layout_common import U32
from .layout_v5 import RAFS_V4_VERSION, RAFS_V5_MAGIC, RAFS_V5_VERSION
from .layout_v6 import EROFS_MAGIC, EROFS_SUPER_OFFSET
from .model import RafsImage


def detect_version(buf: bytes | mmap.mmap | memoryview) -> int:
    """5 or 6 from the magic numbers (spec section 1); FormatError otherwise."""
    if len(buf) >= 8:
        magic, version = U32.unpack_from(buf, 0)[0], U32.unpack_from(buf, 4)[0]
        if magic == RAFS_V5_MAGIC and version in (RAFS_V5_VERSION, RAFS_V4_VERSION):
            return 5
    if len(buf) >= EROFS_SUPER_OFFSET + 4 and U32.unpack_from(buf, EROFS_SUPER_OFFSET)[0] == EROFS_MAGIC:
        return 6
    raise FormatError("not a RAFS bootstrap: neither the v5 magic at 0 nor the EROFS magic at 1024")


def open_bootstrap(path: str) -> RafsImage:
    """mmap `path` read-only and return the matching reader.

    Opened without blocking and checked on the open file, not by name: a FIFO or device swapped
    in for the bootstrap is refused at once instead of blocking the caller forever."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: not a regular file")
        size = st.st_size
        if size == 0:
            raise FormatError(f"{path}: empty bootstrap")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        version = detect_version(mm)
        if version == 5:
            from .v5 import V5Image

            return V5Image(mm)
        from .v6 import V6Image

        return V6Image(mm)
    except BaseException:
        mm.close()
        raise


def open_bytes(data: bytes) -> RafsImage:
    """Reader over an in-memory bootstrap (tests, bootstraps extracted from blobs)."""
    version = detect_version(data)
    if version == 5:
        from .v5 import V5Image

        return V5Image(data)
    from .v6 import V6Image

    return V6Image(data)
