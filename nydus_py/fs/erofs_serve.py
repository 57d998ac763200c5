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
"""

import contextlib
import errno
import logging
import os
import tempfile
from typing import Any

from ..fuse.protocol import FuseSession
from ..rafs.model import RafsImage
from ..storage.device import BlobDevice
from ..transport.erofs_mount import check_image, mount_erofs, umount_erofs
from ..transport.fusedev import FuseDevSession
from ..transport.mount import abort_connection, is_mountpoint, real_mountpoint
from .blob_view import BlobViewFilesystem
from .cache_devices import CacheDevices

log = logging.getLogger(__name__)

VIEW_FSNAME = "nydus-blobview"
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
                 threads: int = 4, base_dir: str | None = None, busy_grace: float = 2.0) -> None:
        check_image(image)  # ErofsImageError before anything is mounted
        self.image = image
        self.device = device
        self.bootstrap = os.path.abspath(bootstrap)
        self.target = real_mountpoint(target)
        self.fs = BlobViewFilesystem(image, device)
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

    def start(self) -> None:
        """Mount the views (when the image has blobs), then EROFS at the target."""
        if is_mountpoint(self.target):
            raise OSError(errno.EBUSY, f"{self.target} is already a mountpoint")
        if not os.path.isdir(self.target):
            raise OSError(errno.ENOTDIR, f"mountpoint {self.target} is not a directory")
        try:
            direct = self.direct.claim()  # blobs complete in the cache: EROFS reads their files
            if not all(direct):
                self.view_dir = tempfile.mkdtemp(prefix="blobview-", dir=self.base_dir or private_base())
                fuse = FuseSession(self.fs)
                self.session = FuseDevSession(fuse.handle_vectored, self.view_dir, threads=self.threads,
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
                self.aborts += abort_connection(self.conn)
            s.close()
        if self.view_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.view_dir)
            self.view_dir = ""
        self.direct.release()

    def snapshot(self) -> dict[str, Any]:
        """Metrics: kernel reads through the views, and whether it is mounted."""
        out = self.fs.stats.snapshot()
        out.update(self.direct.snapshot())
        out.update({"fs_driver": "erofs", "mountpoint": self.target, "view_dir": self.view_dir,
                    "mounted": self.mounted, "lazy_detaches": self.lazy_detaches, "aborts": self.aborts,
                    "device_bytes_read": self.device.bytes_read, "device_read_errors": self.device.read_errors})
        return out
