"""The `localfs` backend: blobs are files named by blob id in one directory."""

import os
import threading

from ..rafs.errors import FormatError
from ..rafs.model import BlobInfo


class LocalBlobDir:
    """Reads blob ranges with pread from `<dir>/<blob_id>`; fds are opened once and shared."""

    def __init__(self, blob_dir: str) -> None:
        self.blob_dir = blob_dir
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

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
                try:
                    fd = os.open(self.path(blob_id), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise FormatError(f"blob {blob_id} not found in {self.blob_dir}") from None
                self._fds[blob_id] = fd
            return fd

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        fd = self._fd(blob.blob_id)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise FormatError(
                f"blob {blob.blob_id}: read of {size} bytes at {offset} returned {len(data)} (truncated blob?)"
            )
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
