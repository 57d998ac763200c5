"""`BlobWriter(watch=)`: a reader is told of the blob file as it grows (convert uploads a layer's
blob while it is written): the file once, its growth in order up to every byte the finished
blob holds, then its name; a dropped blob (abort, nothing stored) ends with None."""

import hashlib
import io
import os
import threading

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.tree import FileData
from nydus_py.rafs.constants import Compressor

CS = 0x10000


class Recorder:
    """A `BlobWatch` that keeps what it heard, and reads the file back as `opened` asks."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.fd: int | None = None
        self.lock = threading.Lock()

    def opened(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        with self.lock:
            self.events.append(("opened", path))

    def grew(self, size: int) -> None:
        assert self.fd is not None and os.fstat(self.fd).st_size >= size  # the bytes are in the file
        with self.lock:
            self.events.append(("grew", size))

    def closed(self, blob_id: object) -> None:
        with self.lock:
            self.events.append(("closed", blob_id))


def file(data: bytes) -> FileData:
    return FileData(len(data), lambda: io.BytesIO(data))


def opts() -> BuildOptions:
    return BuildOptions(fs_version=6, compressor=Compressor.ZSTD, chunk_size=CS, blob_toc=True)


def test_growth_reaches_the_finished_blob_and_then_its_name(tmp_path):
    watch = Recorder()
    w = BlobWriter(str(tmp_path), opts(), 0, workers=2, durable=False, watch=watch)
    w.add_files([file(os.urandom(40 * CS)), file(b"text " * 50000)])
    info = w.finish()
    assert info is not None and w.path is not None
    kinds = [k for k, _ in watch.events]
    assert kinds[0] == "opened" and kinds[-1] == "closed" and kinds.count("opened") == kinds.count("closed") == 1
    sizes = [v for k, v in watch.events if k == "grew"]
    assert len(sizes) >= 2 and sizes == sorted(sizes)  # announced piece by piece, never backwards
    with open(w.path, "rb") as f:
        data = f.read()
    assert sizes[-1] == len(data) == info.compressed_size  # trailers included
    assert watch.events[-1] == ("closed", info.blob_id) == ("closed", hashlib.sha256(data).hexdigest())
    assert watch.fd is not None and os.pread(watch.fd, len(data) + 1, 0) == data  # the fd outlives the rename
    os.close(watch.fd)


def test_an_aborted_blob_ends_with_none(tmp_path):
    watch = Recorder()
    w = BlobWriter(str(tmp_path), opts(), 0, workers=2, durable=False, watch=watch)
    w.add_files([file(os.urandom(4 * CS))])
    w.abort()
    assert [k for k, _ in watch.events][0] == "opened" and watch.events[-1] == ("closed", None)
    assert watch.fd is not None
    os.close(watch.fd)


def test_a_blob_that_stores_nothing_ends_with_none_and_no_file(tmp_path):
    watch = Recorder()
    w = BlobWriter(str(tmp_path), opts(), 0, workers=2, durable=False, watch=watch)
    w.add_files([file(b"")])
    assert w.finish() is None
    assert watch.events == [("closed", None)]
