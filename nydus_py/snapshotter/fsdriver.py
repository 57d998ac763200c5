"""Which driver serves the snapshotter's images: `[daemon] fs_driver` in its config.

`fusedev` (the shared daemon's FUSE filesystem, images under `ROOT/mnt/<sid>`), `erofs` (the
kernel's EROFS driver at a host path `ROOT/erofs/<sid>`, data lazily through the daemon), or
`auto`: `erofs` where this host can make file-backed EROFS mounts (probed once at start-up),
else `fusedev`. The choice and its reason are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..transport.erofs_mount import probe_file_backed

log = logging.getLogger(__name__)

FS_DRIVERS = ("fusedev", "erofs", "auto")


def resolve_fs_driver(requested: str, probe: Callable[[], str | None] = probe_file_backed) -> str:
    """`fusedev` or `erofs` for the configured `requested` driver; `auto` calls `probe` (None
    when file-backed EROFS mounts work here, else the reason) once."""
    if requested not in FS_DRIVERS:
        raise ValueError(f"fs_driver must be one of {', '.join(FS_DRIVERS)}, got {requested!r}")
    if requested != "auto":
        log.info("fs_driver %s (configured)", requested)
        return requested
    why_not = probe()
    if why_not is None:
        log.info("fs_driver auto: erofs (this kernel makes file-backed EROFS mounts and we have CAP_SYS_ADMIN)")
        return "erofs"
    log.warning("fs_driver auto: fusedev, since the kernel EROFS driver cannot be used here: %s", why_not)
    return "fusedev"
