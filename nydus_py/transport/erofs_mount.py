"""File-backed kernel EROFS mounts of a RAFS v6 bootstrap, through the new mount API.

`fsopen("erofs")`, `fsconfig` with `source` = the bootstrap file and one `device` = file path per
blob in blob-table order, `fsmount`, `move_mount`: no loop devices (Linux 6.12+ with
CONFIG_EROFS_FS_BACKED_BY_FILE). Each device file is the blob's uncompressed view; the kernel
reads file data from it at the block addresses the bootstrap's chunk indexes give.

What the kernel cannot serve is refused before anything is mounted, with one error each:
`ErofsImageError` for the image (RAFS v5, v6 chunks not 4 KiB-aligned in the uncompressed
space, zran/batch/encrypted blobs), `ErofsUnavailable` for the host (no erofs driver, no
file-backed mounts, no CAP_SYS_ADMIN, no new mount API).
"""

import ctypes
import ctypes.util
import errno
import logging
import os
import tempfile
from collections.abc import Sequence

from ..rafs.constants import BlobFeatures
from ..rafs.errors import FormatError
from ..rafs.layout_v6 import EROFS_BLOCK_SIZE
from ..rafs.model import RafsImage
from .mount import MNT_DETACH, sys_umount

log = logging.getLogger(__name__)

# syscall numbers of the new mount API: one table for every architecture (424+)
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ErofsUnavailable(OSError):
    """This host cannot make a file-backed EROFS mount (kernel or privileges)."""


class ErofsImageError(ValueError):
    """The image cannot be served by the kernel's EROFS driver."""


def check_image(image: RafsImage) -> None:
    """Refuse what the kernel EROFS driver cannot read: RAFS v5, and v6 whose chunks are not
    4 KiB-aligned in the blob's uncompressed space (the device-side block addresses)."""
    if image.version != 6:
        raise ErofsImageError(
            f"RAFS v{image.version} images cannot be served by the kernel EROFS driver (RAFS v6 only); "
            "use --fs-driver fusedev")
    for b in image.blobs:
        if b.chunk_size % EROFS_BLOCK_SIZE or not b.features & BlobFeatures.ALIGNED:
            raise ErofsImageError(
                f"blob {b.blob_id}: chunks are not 4 KiB-aligned in the uncompressed space "
                f"(chunk size {b.chunk_size:#x}); the kernel EROFS driver cannot serve it, use --fs-driver fusedev")
        special = b.features & (BlobFeatures.ZRAN | BlobFeatures.BATCH | BlobFeatures.ENCRYPTED)
        if special:
            raise ErofsImageError(f"blob {b.blob_id}: {special!r} blobs cannot be served through EROFS")
    check = getattr(image, "check_blob_alignment", None)
    if callable(check):
        try:
            check()
        except FormatError as e:
            raise ErofsImageError(f"{e}; the kernel EROFS driver cannot serve it, use --fs-driver fusedev") from None


def _sys(nr: int, what: str, *args: object) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return int(r)


def _context_log(fsfd: int) -> str:
    """The messages the kernel queued on an fs context fd ("e erofs: ..."), for the error."""
    msgs = []
    for _ in range(16):
        try:
            m = os.read(fsfd, 1024)
        except OSError:
            break
        if not m:
            break
        msgs.append(m.decode(errors="replace").strip())
    return "; ".join(msgs)


def mount_erofs(bootstrap: str, devices: Sequence[str], target: str, *, nosuid: bool = False) -> None:
    """Mount `bootstrap` read-only at `target` with `devices` (blob views, blob-table order)."""
    try:
        fsfd = _sys(SYS_FSOPEN, "fsopen(erofs)", b"erofs", FSOPEN_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise ErofsUnavailable(e.errno, "the kernel has no EROFS driver (CONFIG_EROFS_FS; try modprobe erofs)") from None
        if e.errno == errno.EPERM:
            raise ErofsUnavailable(e.errno, "mounting EROFS needs CAP_SYS_ADMIN") from None
        if e.errno == errno.ENOSYS:
            raise ErofsUnavailable(e.errno, "the kernel has no new mount API (fsopen, Linux 5.2+)") from None
        raise
    try:
        step = "source"
        try:
            _sys(SYS_FSCONFIG, "fsconfig(source)", fsfd, FSCONFIG_SET_STRING, b"source", os.fsencode(bootstrap), 0)
            for i, d in enumerate(devices):
                step = f"device {i}"
                _sys(SYS_FSCONFIG, f"fsconfig(device={d})", fsfd, FSCONFIG_SET_STRING, b"device", os.fsencode(d), 0)
            step = "ro"
            _sys(SYS_FSCONFIG, "fsconfig(ro)", fsfd, FSCONFIG_SET_FLAG, b"ro", None, 0)
            step = "create"
            _sys(SYS_FSCONFIG, "fsconfig(create)", fsfd, FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as e:
            detail = _context_log(fsfd)
            if step in ("source", "create") and e.errno == errno.ENOTBLK:
                raise ErofsUnavailable(e.errno, "the kernel cannot mount EROFS from a regular file "
                                       f"(CONFIG_EROFS_FS_BACKED_BY_FILE, Linux 6.12+): {detail or e}") from None
            if e.errno == errno.EPERM:
                raise ErofsUnavailable(e.errno, "mounting EROFS needs CAP_SYS_ADMIN") from None
            raise OSError(e.errno, f"erofs mount of {bootstrap} ({step}): {e.strerror}"
                          + (f" [{detail}]" if detail else "")) from None
        attrs = MOUNT_ATTR_RDONLY | (MOUNT_ATTR_NOSUID if nosuid else 0)
        mfd = _sys(SYS_FSMOUNT, "fsmount", fsfd, FSMOUNT_CLOEXEC, attrs)
        try:
            _sys(SYS_MOVE_MOUNT, f"move_mount to {target}", mfd, b"", AT_FDCWD, os.fsencode(target),
                 MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mfd)
    finally:
        os.close(fsfd)
    log.info("EROFS mount of %s at %s with %d devices", bootstrap, target, len(devices))


def umount_erofs(target: str) -> bool:
    """Unmount `target`; a busy mount is detached (it goes when its last user closes). Returns
    True when it had to detach."""
    try:
        sys_umount(target)
        return False
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
    log.warning("%s is busy; detaching the EROFS mount lazily", target)
    sys_umount(target, MNT_DETACH)
    return True


def probe_file_backed(scratch_dir: str | None = None) -> str | None:
    """None when this process can make file-backed EROFS mounts, else why not. Cheap and
    mounts nothing: `fsopen("erofs")` (fails without the driver or CAP_SYS_ADMIN), then a
    superblock from a 4 KiB file of zeros: a kernel that reads regular files rejects its
    contents (EINVAL), one that needs a block device says ENOTBLK."""
    try:
        fsfd = _sys(SYS_FSOPEN, "fsopen(erofs)", b"erofs", FSOPEN_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENODEV:
            return "the kernel has no EROFS driver (CONFIG_EROFS_FS)"
        if e.errno == errno.EPERM:
            return "no CAP_SYS_ADMIN"
        if e.errno == errno.ENOSYS:
            return "the kernel has no new mount API (fsopen)"
        return f"fsopen(erofs): {e.strerror}"
    try:
        with tempfile.NamedTemporaryFile(prefix="erofs-probe-", dir=scratch_dir) as f:
            f.write(bytes(EROFS_BLOCK_SIZE))
            f.flush()
            try:
                _sys(SYS_FSCONFIG, "fsconfig(source)", fsfd, FSCONFIG_SET_STRING, b"source", os.fsencode(f.name), 0)
                _sys(SYS_FSCONFIG, "fsconfig(create)", fsfd, FSCONFIG_CMD_CREATE, None, None, 0)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return None  # it opened the file and found no EROFS superblock: file-backed works
                if e.errno == errno.ENOTBLK:
                    return "the kernel cannot mount EROFS from a regular file (CONFIG_EROFS_FS_BACKED_BY_FILE, Linux 6.12+)"
                return f"probe mount: {e.strerror}"
            return "probe mount of a file of zeros succeeded unexpectedly"
    finally:
        os.close(fsfd)
