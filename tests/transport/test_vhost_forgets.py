"""FORGETs from a virtio-fs guest are taken off the hiprio ring one chain each, and applied
together in one `batch_forget` once the ring is empty (`FuseSession.defer_forget` /
`flush_forgets`, run by the queue's idle hook): a guest's drop_caches sends thousands."""

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.fuse.protocol import FuseSession
from nydus_py.transport.vhost_user import virtiofs_server

from ..fuse.kernel import LOOKUP
from ..fuse.memfs import MemFS
from ..waiting import wait_until
from .test_vhost_user import INIT_ARGS, fuse_call, fuse_req, init
from .vhost_frontend import Frontend

FORGET = 2


class Recording(MemFS):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []
        self.lock = threading.Lock()

    def forget(self, ino: int, nlookup: int) -> None:
        with self.lock:
            self.calls.append(("forget", [(ino, nlookup)]))

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        with self.lock:
            self.calls.append(("batch", list(items)))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Recording, Frontend]]:
    fs = Recording()
    sock = str(tmp_path / "vfs.sock")
    srv = virtiofs_server(FuseSession(fs), sock).start()
    fe = Frontend(sock)
    fe.setup()
    init(fe)
    yield fs, fe
    fe.close()
    srv.stop()


def test_a_burst_of_forgets_is_one_batch_forget(rig: tuple[Recording, Frontend]) -> None:
    fs, fe = rig
    q = fe.queues[0]
    items = [(100 + i, 1 + i % 3) for i in range(50)]
    for i, (ino, n) in enumerate(items):  # all on the ring before the one kick
        q.add([fuse_req(FORGET, ino, struct.pack("<Q", n), 1000 + i)], [])
    q.do_kick()
    for _ in items:
        assert q.wait_used()[1] == 0  # completed, no reply
    wait_until(lambda: bool(fs.calls), 5, "the deferred forgets applied")
    assert fs.calls == [("batch", items)]


def test_a_lookup_after_a_forget_keeps_its_count(rig: tuple[Recording, Frontend]) -> None:
    """Each FORGET is applied before the hiprio dispatcher sleeps again; requests on the request
    queue meanwhile are answered as usual."""
    fs, fe = rig
    length, _ = fe.request(0, [fuse_req(FORGET, 7, struct.pack("<Q", 2), 20)], [])
    assert length == 0
    wait_until(lambda: fs.calls == [("batch", [(7, 2)])], 5, "the forget applied")
    err, _, _ = fuse_call(fe, LOOKUP, 1, b"hello\0", 21, [16, 128])
    assert err == 0
    length, _ = fe.request(0, [fuse_req(FORGET, 8, struct.pack("<Q", 1), 22)], [])
    wait_until(lambda: len(fs.calls) == 2, 5, "the second forget applied")
    assert fs.calls[1] == ("batch", [(8, 1)])


def test_defer_forget_takes_only_well_formed_forgets_after_init() -> None:
    fs = Recording()
    s = FuseSession(fs)
    forget = fuse_req(FORGET, 5, struct.pack("<Q", 3), 9)
    assert not s.defer_forget(forget)  # before INIT: the session's own path answers it
    s.handle(fuse_req(26, 0, INIT_ARGS, 1))
    assert not s.defer_forget(forget[:-1])  # short
    assert not s.defer_forget(fuse_req(FORGET, 5, struct.pack("<QQ", 3, 0), 9))  # length off
    assert not s.defer_forget(fuse_req(LOOKUP, 1, b"x\0", 9))
    assert s.flush_forgets() == 0 and fs.calls == []
    assert s.defer_forget(forget) and s.defer_forget(fuse_req(FORGET, 6, struct.pack("<Q", 1), 10))
    assert fs.calls == []  # not yet
    assert s.flush_forgets() == 2 and fs.calls == [("batch", [(5, 3), (6, 1)])]
    assert s.defer_forget(forget)
    s.reset()  # the connection went away: its inodes with it
    assert s.flush_forgets() == 0 and len(fs.calls) == 1
