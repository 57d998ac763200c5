"""The `localfs` backend: blobs are files named by blob id in one directory."""

import errno
import logging
import os
import threading

from ..rafs.errors import FormatError
from ..rafs.model import BlobInfo

log = logging.getLogger(__name__)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class LocalBlobDir:
    """Reads blob ranges with pread from `<dir>/<blob_id>`; fds are opened once and shared."""

    local = True  # reads wait on a local disk at most (BlobDevice.local)

    def __init__(self, blob_dir: str, alt_dirs: list[str] | None = None) -> None:
        self.blob_dir = blob_dir
        self.search = [blob_dir, *(alt_dirs or [])]
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.nowait_supported = True  # False once the directory's filesystem refused RWF_NOWAIT

    def path(self, blob_id: str) -> str:
        if not blob_id or "/" in blob_id or blob_id in (".", ".."):
            raise FormatError(f"invalid blob id {blob_id!r}")
        return os.path.join(self.blob_dir, blob_id)

    def _fd(self, blob_id: str) -> int:
        fd = self._fds.get(blob_id)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(blob_id)
            if fd is None:
                self.path(blob_id)
                for d in self.search:
                    try:
                        fd = os.open(os.path.join(d, blob_id), os.O_RDONLY | os.O_CLOEXEC)
                        break
                    except FileNotFoundError:
                        continue
                else:
                    raise FormatError(f"blob {blob_id} not found in {', '.join(self.search)}")
                self._fds[blob_id] = fd
            return fd

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        if not (0 <= offset < 1 << 62 and 0 <= size < 1 << 31):
            raise FormatError(f"blob {blob.blob_id}: impossible read of {size} bytes at offset {offset}")
        fd = self._fd(blob.blob_id)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise FormatError(
                f"blob {blob.blob_id}: read of {size} bytes at {offset} returned {len(data)} (truncated blob?)"
            )
        return data

    def preadv_into(self, blob: BlobInfo, offset: int, bufs: list[memoryview], want: int,
                    nowait: bool = False) -> bool:
        """preadv the stored bytes [offset, +want) of `blob` straight into `bufs` (`want` bytes;
        virtio-fs: guest memory), for chunks stored uncompressed: no copy in Python. False on a
        short read (a cut blob: the caller's decoded-chunk path reports it). `nowait`:
        RWF_NOWAIT, BlockingIOError when the bytes are not all in the page cache."""
        if len(bufs) > _IOV_MAX or not (0 <= offset < 1 << 62 and 0 <= want < 1 << 31):
            return False
        fd = self._fd(blob.blob_id)
        if nowait and self.nowait_supported:
            try:
                n = os.preadv(fd, bufs, offset, os.RWF_NOWAIT)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    raise BlockingIOError(errno.EAGAIN, "not in the page cache") from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.nowait_supported = False
                log.warning("localfs: the blob directory's filesystem refuses RWF_NOWAIT reads (%s); READs of "
                            "it may wait for the disk in a queue's dispatcher", e)
            else:
                if n != want:  # partly in the page cache (or cut: the plain read tells)
                    raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
                return True
        return os.preadv(fd, bufs, offset) == want

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class SingleBlobFile(LocalBlobDir):
    """localfs `blob_file`: every blob id resolves to one fixed file."""

    def __init__(self, path: str) -> None:
        super().__init__(os.path.dirname(path) or ".")
        self.file = path

    def _fd(self, blob_id: str) -> int:
        fd = self._fds.get("")
        if fd is None:
            with self._lock:
                fd = self._fds.get("")
                if fd is None:
                    fd = os.open(self.file, os.O_RDONLY | os.O_CLOEXEC)
                    self._fds[""] = fd
        return fd
