"""Leader/follower workers on a real mount: a stream of metadata requests stays on one thread
(no GIL hand-over per request), READs still run on several threads at once."""

import os
import threading
from pathlib import Path

import pytest

from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.fusedev import FuseDevSession
from tests.conftest import require_device
from tests.fs.mountrig import CHUNK, abort_connection, build

pytestmark = [pytest.mark.slow, pytest.mark.root]

GETATTR, READ = 3, 15


class OverlapSource(LocalBlobDir):
    """Each blob read stays inside until another one is inside too: READs served one at a time
    would never meet (each gives up after `patience` seconds, and `met` stays False)."""

    def __init__(self, path: str, patience: float = 10.0) -> None:
        super().__init__(path)
        self.patience = patience
        self.inside = 0
        self.met = False
        self.gave_up = False
        self.cond = threading.Condition()

    def read(self, blob, offset, size):  # noqa: ANN001, ANN201
        with self.cond:
            self.inside += 1
            if self.inside >= 2:
                self.met = True
                self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.met or self.gave_up, self.patience):
                self.gave_up = True  # the first to give up lets every later read through
            self.inside -= 1
        return super().read(blob, offset, size)


def test_metadata_stays_on_one_thread_reads_spread(tmp_path: Path) -> None:
    require_device("/dev/fuse")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(2 * CHUNK))
    img = build(str(src), str(tmp_path / "img"), views=False)
    image = open_bootstrap(img.boot)
    source = OverlapSource(img.blob_dir)
    fs = RafsFilesystem(image, BlobDevice(image, source, validate=True), attr_timeout=0.0, readahead_chunks=0)
    session = FuseSession(fs)
    seen: dict[int, set[int]] = {GETATTR: set(), READ: set()}
    phase = ["stat"]
    active = [0, 0]  # READs in progress now, most at once
    lock = threading.Lock()

    def handler(req: memoryview):  # noqa: ANN202
        op = req[4]
        if op == READ or (op == GETATTR and phase[0] == "stat"):
            seen[op].add(threading.get_ident())
        if op != READ:
            return session.handle_vectored(req)
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            return session.handle_vectored(req)
        finally:
            with lock:
                active[0] -= 1

    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    mnt.mkdir()
    dev = FuseDevSession(handler, str(mnt), threads=4, max_write=session.max_write)
    dev.mount()
    watchdog = threading.Timer(120, abort_connection, args=(str(mnt),))
    watchdog.start()
    try:
        os.stat(mnt / "f0")
        for _ in range(300):  # attr_timeout 0: every stat is one GETATTR
            os.stat(mnt / "f0")
        phase[0] = "read"
        results: dict[int, bytes] = {}

        def read(i: int) -> None:
            fd = os.open(mnt / f"f{i}", os.O_RDONLY | os.O_DIRECT)
            try:
                results[i] = os.pread(fd, CHUNK, 0)
            finally:
                os.close(fd)

        readers = [threading.Thread(target=read, args=(i,)) for i in range(6)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(60)
        assert all(results[i] == (src / f"f{i}").read_bytes()[:CHUNK] for i in range(6))
    finally:
        dev.close()
        watchdog.cancel()
        fs.close()
        image.close()
        source.close()
    # one reader at a time, and it keeps the role across metadata requests: the 300 GETATTRs
    # are answered by the thread that read them, nearly always the same one
    assert len(seen[GETATTR]) <= 2, len(seen[GETATTR])
    # a READ hands the role on: READs held in the backend meet there, on several threads
    assert source.met and not source.gave_up
    assert len(seen[READ]) >= 2 and active[1] >= 2, (len(seen[READ]), active[1])
