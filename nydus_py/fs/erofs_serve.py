"""Serving an image with the kernel's EROFS driver (`fs_driver: erofs`).

Two mounts per image: the blob views (`blob_view.BlobViewFilesystem`) over our own small FUSE
mount in a private directory (0700, under /run/nydus-py or the temp dir), and the bootstrap as a
file-backed EROFS mount at the target whose devices are those view files. Metadata is answered
by the kernel from the bootstrap; file data misses become FUSE READs of the views, served lazily
from the blob cache and backend. A blob already complete in the blob cache at mount is given to
EROFS as the cache's data file itself, with no FUSE in between (`cache_devices`); when every
blob is, the views are not mounted at all.

`close()` undoes everything in reverse: the EROFS mount, the FUSE mount and its worker threads
and fds, the private directory. When the EROFS mount is busy (a process still has a file open or
its cwd there) it is detached lazily: the views keep serving it for `busy_grace` seconds, then
their FUSE connection is aborted, so later reads of uncached data there are EIO (never zeros),
and nothing of ours is left behind.

Failover and hot upgrade: the views' FUSE connection is handed to the supervisor with the
daemon's state (`handover_state`, `view_fd`), and the EROFS mount stays in the kernel. A daemon
that takes over `adopt`s both from the saved state (same bootstrap, same blob table, checked),
without mounting anything, and `resume`s serving the old connection when it starts; reads in the
gap wait in the kernel's queue (or fail with EIO when the dead daemon had them in hand on a
channel that died with it), never zeros. `close()` after that cleans up as usual.
"""

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from ..fuse.protocol import FuseSession
from ..rafs.model import RafsImage
from ..storage.device import BlobDevice
from ..transport.erofs_mount import check_image, mount_erofs, umount_erofs
from ..transport.fusedev import FuseDevSession
from ..transport.mount import (
    abort_connection,
    abort_detached_connection,
    connection_of,
    fuse_umount,
    is_mountpoint,
    real_mountpoint,
)
from .blob_view import BlobViewFilesystem
from .cache_devices import CacheDevices

log = logging.getLogger(__name__)

VIEW_FSNAME = "nydus-blobview"

# What a successor does with the requests its predecessor had read but not answered, given the
# views' fd and FUSE connection id (the daemon's --failover-policy).
Replay = Callable[[int, int], None]


class ErofsGone(OSError):
    """A mount of the saved state is no longer there (unmounted during the gap): nothing to adopt."""


def private_base() -> str:
    """Where blob-view mounts live: /run/nydus-py when we may write there, else the temp dir."""
    base = "/run/nydus-py"
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError as e:
        log.info("cannot use %s for blob views (%s); using %s", base, e, tempfile.gettempdir())
    return tempfile.gettempdir()


class ErofsServe:
    """One image served by the kernel EROFS driver at `target`, data through our blob views."""

    def __init__(self, image: RafsImage, device: BlobDevice, bootstrap: str, target: str, *,
                 threads: int = 4, base_dir: str | None = None, busy_grace: float = 2.0,
                 local_blobs: bool = False) -> None:
        check_image(image)  # ErofsImageError before anything is mounted
        self.image = image
        self.device = device
        self.bootstrap = os.path.abspath(bootstrap)
        self.target = real_mountpoint(target)
        self.fs = BlobViewFilesystem(image, device, local=local_blobs)
        self.direct = CacheDevices(device, self.fs.blobs)
        self.threads = threads
        self.base_dir = base_dir
        self.view_dir = ""
        self.session: FuseDevSession | None = None
        self.mounted = False
        self.lazy_detaches = 0
        self.aborts = 0
        self.busy_grace = busy_grace
        self.conn = -1  # the views' FUSE connection id (/sys/fs/fuse/connections/<id>)
        self.fuse: FuseSession | None = None
        self.handed_over = False  # in the state last sent to a supervisor: left mounted at a hand-over exit
        self._adopted_fd = -1  # the views' fd taken over, until resume() serves it
        self._direct: list[bool] = []  # per blob: EROFS reads its cache data file (no view)
        self.adopted = False  # the mounts are a predecessor's, taken over

    def start(self) -> None:
        """Mount the views (when the image has blobs), then EROFS at the target."""
        if is_mountpoint(self.target):
            raise OSError(errno.EBUSY, f"{self.target} is already a mountpoint")
        if not os.path.isdir(self.target):
            raise OSError(errno.ENOTDIR, f"mountpoint {self.target} is not a directory")
        try:
            direct = self.direct.claim()  # blobs complete in the cache: EROFS reads their files
            self._direct = [d is not None for d in direct]
            if not all(direct):
                self.view_dir = tempfile.mkdtemp(prefix="blobview-", dir=self.base_dir or private_base())
                self.fuse = FuseSession(self.fs)
                self.session = FuseDevSession(self.fuse.handle_vectored, self.view_dir, threads=self.threads,
                                              fsname=VIEW_FSNAME, allow_other=True)
                self.session.mount()
                st = os.stat(self.view_dir)  # (answered by our workers: INIT is through)
                self.conn = os.major(st.st_dev) << 20 | os.minor(st.st_dev)
            views = self.fs.paths(self.view_dir) if self.view_dir else []
            devices = [d or views[i] for i, d in enumerate(direct)]
            mount_erofs(self.bootstrap, devices, self.target)
            self.mounted = True
        except BaseException:
            self.close()
            raise
        log.info("serving %s at %s with the kernel EROFS driver (%d blobs read from the cache directly, "
                 "%d through blob views at %s)", self.bootstrap, self.target, self.direct.direct,
                 len(self.fs.blobs) - self.direct.direct, self.view_dir or "-")

    def close(self) -> None:
        """Unmount EROFS, then the views; release threads, fds and the private directory."""
        detached = False
        if self.mounted:
            self.mounted = False
            try:
                detached = umount_erofs(self.target)
                self.lazy_detaches += detached
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    log.error("umount EROFS at %s: %s", self.target, e)
        s, self.session = self.session, None
        if s is not None:
            try:
                s.unmount()  # busy only when a detached EROFS still holds a view open: lazily
            except OSError as e:
                log.error("unmount blob views at %s: %s", self.view_dir, e)
            # A detached EROFS still reads the views until its last user goes; past the grace
            # the connection is aborted (its readers get EIO) so that the workers end now.
            if detached and not s.wait(self.busy_grace) and self.conn >= 0:
                log.warning("%s is still in use %.0f s after umount; aborting its blob views (reads of "
                            "data not in the page cache there now fail with EIO)", self.target, self.busy_grace)
                self.aborts += abort_detached_connection(self.conn)
            s.close()
        if self._adopted_fd >= 0:  # taken over, never served
            os.close(self._adopted_fd)
            self._adopted_fd = -1
        if self.view_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.view_dir)
            self.view_dir = ""
        self.direct.release()
        self.fs.close()  # the decode-ahead pool

    # -- failover / hot upgrade ------------------------------------------------------------------
    @property
    def view_fd(self) -> int:
        """The views' /dev/fuse fd to hand over (-1: an image without blobs has no views)."""
        if self._adopted_fd >= 0:
            return self._adopted_fd
        return self.session.fd if self.session is not None else -1

    def _blob_table(self) -> list[list[Any]]:
        return [[b.blob_id, size] for b, size in zip(self.fs.blobs, self.fs.sizes, strict=True)]

    def handover_state(self) -> dict[str, Any]:
        """What a successor needs besides the mount command: where the mounts are, the blob
        table the EROFS mount was made with, and what the views' FUSE INIT negotiated."""
        return {"target": self.target, "view_dir": self.view_dir, "bootstrap": self.bootstrap,
                "blobs": self._blob_table(), "fuse": self.fuse.export_state() if self.fuse is not None else None,
                "direct": self._direct}

    def adopt(self, saved: dict[str, Any], fd: int) -> None:
        """Take over a predecessor's EROFS mount and views (`saved`: its `handover_state`) with
        the views' `fd` (ours from now on, also on failure); nothing is mounted, nothing served
        until `resume`. ErofsGone (after cleaning up what is left) when the EROFS mount is gone;
        ValueError when the bootstrap no longer has the blob table the kernel mounted with: its
        view connection is aborted then (EIO, never the wrong blob's bytes)."""
        view_dir = str(saved.get("view_dir") or "")
        # blobs the predecessor gave EROFS as cache files need no view (a state without the key
        # predates cache devices: every blob had one)
        direct = [bool(d) for d in saved.get("direct") or [False] * len(self.fs.blobs)]
        try:
            if not is_mountpoint(self.target):
                raise ErofsGone(errno.ENOENT, f"{self.target} is no longer mounted; its blob views are dropped")
            if len(direct) != len(self.fs.blobs):
                raise ValueError(f"{self.bootstrap}: the saved state has {len(direct)} blobs, the image "
                                 f"{len(self.fs.blobs)}")
            if bool(view_dir) != (not all(direct)) or (view_dir and connection_of(real_mountpoint(view_dir)) < 0):
                raise ErofsGone(errno.ENOENT, f"the blob views of {self.target} ({view_dir or '-'}) are gone; "
                                "unmounting the EROFS mount")
            if saved.get("blobs") != self._blob_table():
                raise ValueError(f"{self.bootstrap}: the blob table differs from the one {self.target} was mounted "
                                 "with; its blob views are aborted (reads there fail with EIO)")
        except BaseException as e:
            self._drop_adopted(view_dir, fd, abort=isinstance(e, ValueError), erofs_too=not isinstance(e, ErofsGone)
                               or is_mountpoint(self.target))
            raise
        self.view_dir = view_dir
        self.mounted = self.adopted = True
        self._direct = direct
        self._pin_direct(direct)
        if view_dir:
            self.conn = connection_of(real_mountpoint(view_dir))
            self.fuse = FuseSession(self.fs)
            self.fuse.restore_state(saved.get("fuse") or {})
            self.session = FuseDevSession(self.fuse.handle_vectored, view_dir, threads=self.threads,
                                          fsname=VIEW_FSNAME, allow_other=True)
            self._adopted_fd = fd
        elif fd >= 0:
            os.close(fd)
        log.info("took over %s at %s (%d blob views at %s)", self.bootstrap, self.target, len(self.fs.blobs),
                 view_dir or "-")

    def _pin_direct(self, direct: list[bool]) -> None:
        """Pin again the cache files the kernel reads directly, so eviction spares them. A blob
        no longer complete here is logged: the kernel keeps reading the file it opened (an
        unlinked file stays readable), only its space comes back late."""
        if not any(direct):
            return
        now = self.direct.claim()
        for blob, was, path in zip(self.fs.blobs, direct, now, strict=True):
            if was and path is None:
                log.warning("blob %s: EROFS at %s reads its cache file, which is no longer complete in this "
                            "cache; not pinned", blob.blob_id, self.target)

    def _drop_adopted(self, view_dir: str, fd: int, *, abort: bool, erofs_too: bool) -> None:
        """What is left of mounts that cannot be adopted goes (lazily): no reader may wait forever."""
        if abort and view_dir:
            conn = connection_of(real_mountpoint(view_dir))
            if conn >= 0:
                self.aborts += abort_connection(conn)
        if erofs_too and is_mountpoint(self.target):
            with contextlib.suppress(OSError):
                umount_erofs(self.target)
        if view_dir and is_mountpoint(view_dir):
            with contextlib.suppress(OSError):
                fuse_umount(view_dir, lazy=True)
        if fd >= 0:
            os.close(fd)
        if view_dir:
            with contextlib.suppress(OSError):
                os.rmdir(view_dir)

    def resume(self, replay: Replay | None = None) -> None:
        """Serve the adopted views again: first `replay` (the failover policy: ask the kernel to
        send again what the predecessor had read but not answered), then the workers."""
        fd, self._adopted_fd = self._adopted_fd, -1
        if fd < 0 or self.session is None:
            return
        if replay is not None:
            try:
                replay(fd, self.conn)
            except Exception:
                log.exception("failover policy on the blob views of %s failed", self.target)
        self.session.attach(fd)
        log.info("serving the blob views of %s again at %s", self.target, self.view_dir)

    def release(self) -> None:
        """Forget the mounts without touching them (a failed takeover: they stay for another)."""
        if self._adopted_fd >= 0:
            os.close(self._adopted_fd)
            self._adopted_fd = -1
        self.mounted = False
        self.session = None
        self.view_dir = ""

    def snapshot(self) -> dict[str, Any]:
        """Metrics: kernel reads through the views, and whether it is mounted."""
        out = self.fs.snapshot()
        out.update(self.direct.snapshot())
        out.update({"fs_driver": "erofs", "mountpoint": self.target, "view_dir": self.view_dir,
                    "mounted": self.mounted, "lazy_detaches": self.lazy_detaches, "aborts": self.aborts,
                    "device_bytes_read": self.device.bytes_read, "device_read_errors": self.device.read_errors})
        return out
