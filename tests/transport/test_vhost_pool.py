"""Queue worker pools: a request stuck in the filesystem (a stalled chunk fetch) does not hold up
the others on its queue, replies come back out of order with the used ring consistent, and a
hostile front-end (descriptors reused in flight, a queue stopped mid-request) gets no double
return and no write after the stop. Driven by the Python front-end, no QEMU."""

import errno
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.fuse.protocol import FuseSession
from nydus_py.transport.vhost_user import virtiofs_server
from nydus_py.transport.vhost_user.server import QueueWorker, VhostUserServer

from ..conftest import REPO
from ..fuse.kernel import LOOKUP, READ
from ..fuse.memfs import MemFS
from ..waiting import wait_event, wait_until
from . import vhost_frontend as F
from .test_vhost_hostile import served_after
from .test_vhost_user import fuse_req, init
from .vhost_frontend import DriverQueue, Frontend
from .virtio_rig import stop_pid

OUT = [16, 128]  # out header + fuse_entry_out
GATE = 1 << 20
HELLO = b"hello world\n"


class GateFS(MemFS):
    """A READ of /hello at offset GATE + N waits until the test opens gate N (a chunk fetch
    stalled on the registry), then answers as a read at offset 0 would."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = {i: threading.Event() for i in range(16)}
        self.entered = {i: threading.Event() for i in range(16)}

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        if offset >= GATE:
            n = offset - GATE
            self.entered[n].set()
            assert self.gates[n].wait(30), f"the test never opened gate {n}"
            offset = 0
        return super().read(ino, fh, offset, size)

    def open_all(self) -> None:
        for g in self.gates.values():
            g.set()


@pytest.fixture
def fs() -> Iterator[GateFS]:
    f = GateFS()
    yield f
    f.open_all()


def start(tmp_path: Path, fs: GateFS, **kw: object) -> tuple[VhostUserServer, str]:
    sock = str(tmp_path / "vfs.sock")
    return virtiofs_server(FuseSession(fs), sock, **kw).start(), sock  # type: ignore[arg-type]


@pytest.fixture
def server(tmp_path: Path, fs: GateFS) -> Iterator[tuple[VhostUserServer, str]]:
    srv, sock = start(tmp_path, fs, workers=4, stop_grace=0.5)
    yield srv, sock
    fs.open_all()
    srv.stop()


def submit(q: DriverQueue, name: bytes, unique: int) -> tuple[int, int]:
    """A chain on `q` (not kicked): b"gateN" a READ that waits for gate N, b"read" a READ
    answered at once (a cached read), b"hello" a LOOKUP (metadata, answered by the queue's
    dispatcher). Returns (head, offset of its reply buffer)."""
    if name == b"hello":
        req = fuse_req(LOOKUP, 1, name + b"\0", unique)
        head, offs = q.add([req[:40], req[40:]], OUT)
        return head, offs[0]
    offset = GATE + int(name[4:]) if name.startswith(b"gate") else 0
    req = fuse_req(READ, 2, struct.pack("<QQIIQII", 102, offset, 4096, 0, 0, 0, 0), unique)
    head, offs = q.add([req[:40], req[40:]], [16, 4096])
    return head, offs[0]


def check_reply(fe: Frontend, off: int, length: int, unique: int) -> None:
    """The reply at `off` answers request `unique` in `length` bytes: hello's entry or data."""
    olen, error, uniq = struct.unpack_from("<IiQ", fe.mem, off)
    assert (uniq, error, olen) == (unique, 0, length)
    if length == 16 + len(HELLO):  # a READ (its data follows in the next buffer)
        data_off = (off + 16 + 15) & ~15
        assert bytes(fe.mem[data_off : data_off + len(HELLO)]) == HELLO
    else:
        assert struct.unpack_from("<Q", fe.mem, off + 16)[0] == 2  # the nodeid of hello


def collect(q: DriverQueue, n: int) -> list[tuple[int, int]]:
    return [q.wait_used() for _ in range(n)]


def worker(srv: VhostUserServer, index: int) -> QueueWorker:
    return wait_until(lambda: srv.workers.get(index), what=f"queue {index} to run")


def test_blocked_request_does_not_hold_up_its_queue(server: tuple[VhostUserServer, str], fs: GateFS) -> None:
    _, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        slow, slow_off = submit(q, b"gate0", 100)
        q.do_kick()
        wait_event(fs.entered[0], what="the stalled read to be inside the filesystem")
        fast = {submit(q, b"read" if i % 2 else b"hello", 200 + i): 200 + i for i in range(12)}
        q.do_kick()
        done = collect(q, len(fast))  # all of them while the slow one still waits
        assert sorted(h for h, _ in done) == sorted(h for h, _ in fast)
        for (head, off), unique in fast.items():
            check_reply(fe, off, dict(done)[head], unique)
        assert not fs.gates[0].is_set()
        fs.gates[0].set()
        head, length = q.wait_used()
        assert head == slow
        check_reply(fe, slow_off, length, 100)
        assert q.used_idx() == 1 + len(fast) + 1  # INIT, the fast ones, the slow one: once each
    finally:
        fe.close()


def test_out_of_order_completion_keeps_the_used_ring_consistent(tmp_path: Path, fs: GateFS) -> None:
    srv, sock = start(tmp_path, fs, workers=8)
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        gated = [(submit(q, f"gate{i}".encode(), 300 + i), 300 + i) for i in range(6)]
        q.do_kick()
        for i in range(6):
            wait_event(fs.entered[i], what=f"read {i} to be inside the filesystem")
        order = []
        for i in reversed(range(6)):  # answered last-in first-out
            fs.gates[i].set()
            head, length = q.wait_used()
            order.append(head)
            (h, off), unique = gated[i]
            assert head == h
            check_reply(fe, off, length, unique)
        assert order == [h for (h, _), _ in reversed(gated)]
        # the ring holds each element once, in completion order, and the driver's free list is whole again
        used = [struct.unpack_from("<II", fe.mem, q.used + 4 + 8 * (s % q.num))[0] for s in range(1, 7)]
        assert used == order and q.used_idx() == 7
        w = worker(srv, 1)
        assert (w.ring.completed, w.ring.dropped, w.ring.duplicates, len(w.ring.inflight)) == (7, 0, 0, 0)
    finally:
        fe.close()
        fs.open_all()
        srv.stop()


def test_two_request_queues_each_with_a_pool(tmp_path: Path, fs: GateFS) -> None:
    srv, sock = start(tmp_path, fs, request_queues=2, workers=2)
    fe = Frontend(sock)
    try:
        fe.setup(nqueues=3)
        assert fe.call_u64(F.GET_QUEUE_NUM) == 3
        init(fe)
        q1, q2 = fe.queues[1], fe.queues[2]
        s1, _ = submit(q1, b"gate1", 10)
        s2, _ = submit(q2, b"gate2", 11)
        q1.do_kick()
        q2.do_kick()
        wait_event(fs.entered[1], what="queue 1's stalled read")
        wait_event(fs.entered[2], what="queue 2's stalled read")
        for q, base in ((q1, 20), (q2, 40)):
            fast = {submit(q, b"read" if i % 2 else b"hello", base + i): base + i for i in range(4)}
            q.do_kick()
            done = dict(collect(q, 4))
            assert sorted(done) == sorted(h for h, _ in fast)
            for (head, off), unique in fast.items():
                check_reply(fe, off, done[head], unique)
        fs.gates[2].set()
        assert q2.wait_used()[0] == s2
        fs.gates[1].set()
        assert q1.wait_used()[0] == s1
        assert (q1.used_idx(), q2.used_idx()) == (1 + 4 + 1, 4 + 1)
        assert set(srv.workers) == {0, 1, 2}
        assert [len(srv.workers[i].pool) for i in range(3)] == [0, 2, 2]  # hiprio: served inline
    finally:
        fe.close()
        fs.open_all()
        srv.stop()


def test_descriptor_reused_while_in_flight_is_returned_once(server: tuple[VhostUserServer, str], fs: GateFS) -> None:
    srv, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        slow, slow_off = submit(q, b"gate3", 50)
        q.do_kick()
        wait_event(fs.entered[3], what="the stalled read to be inside the filesystem")
        q.publish(slow)  # the driver offers the in-flight chain again
        h1, off1 = submit(q, b"hello", 51)
        q.do_kick()
        head, length = q.wait_used()
        assert head == h1
        check_reply(fe, off1, length, 51)
        assert worker(srv, 1).ring.duplicates == 1
        fs.gates[3].set()
        head, length = q.wait_used()
        assert head == slow
        check_reply(fe, slow_off, length, 50)
        h2, off2 = submit(q, b"hello", 52)
        q.do_kick()
        assert q.wait_used()[0] == h2
        check_reply(fe, off2, 144, 52)
        # INIT, h1, the slow chain (once), h2: nothing for the second offer
        used = [struct.unpack_from("<I", fe.mem, q.used + 4 + 8 * (s % q.num))[0] for s in range(1, 4)]
        assert used == [h1, slow, h2] and q.used_idx() == 4
    finally:
        fe.close()


def test_queue_stopped_mid_request_never_writes_after_the_stop(server: tuple[VhostUserServer, str],
                                                               fs: GateFS) -> None:
    srv, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        slow, slow_off = submit(q, b"gate4", 60)
        q.do_kick()
        wait_event(fs.entered[4], what="the stalled read to be inside the filesystem")
        w = worker(srv, 1)
        # GET_VRING_BASE answers (after the grace) with the index past the in-flight chain
        base = fe.call(F.GET_VRING_BASE, struct.pack("<II", 1, 0))
        assert struct.unpack("<II", base) == (1, 2)
        assert w.abandoned == 1 and 1 not in srv.workers
        # the front-end owns the buffers again: it reuses them; the late reply must not land there
        fe.mem[slow_off : slow_off + 144] = b"\x5a" * 144
        fs.gates[4].set()
        wait_until(lambda: w.ring.dropped == 1, what="the late reply to be dropped")
        assert bytes(fe.mem[slow_off : slow_off + 144]) == b"\x5a" * 144
        assert q.used_idx() == 1
        # the backend stays up: the queue restarts with a new kick fd and serves again
        old, q.kick = q.kick, os.eventfd(0, os.EFD_CLOEXEC)
        os.close(old)
        fe.send(F.SET_VRING_BASE, struct.pack("<II", 1, 2))
        fe.send(F.SET_VRING_KICK, struct.pack("<Q", 1), [q.kick])
        h, off = submit(q, b"hello", 61)
        q.do_kick()
        assert q.wait_used() == (h, 144)
        check_reply(fe, off, 144, 61)
        assert q.used_idx() == 2  # the abandoned chain never came back
    finally:
        fe.close()
    served_after(sock)


def test_daemon_offers_the_configured_queues(tmp_path: Path) -> None:
    """`nydusd-py virtiofs --virtio-queues 2 --virtio-workers 3`: three queues offered, both
    request queues served (an empty share answers INIT and LOOKUP)."""
    sock = str(tmp_path / "vfs.sock")
    logf = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock,
                             "--virtio-queues", "2", "--virtio-workers", "3", "--log-file", str(logf)],
                            cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: "serving virtio-fs" in (logf.read_text() if logf.exists() else "") or proc.poll() is not None,
                   what="the daemon to serve")
        assert proc.poll() is None, logf.read_text()
        assert "2 request queue(s), 3 workers each" in logf.read_text()
        fe = Frontend(sock)
        try:
            fe.setup(nqueues=3)
            assert fe.call_u64(F.GET_QUEUE_NUM) == 3
            init(fe)
            for qi in (1, 2):
                req = fuse_req(LOOKUP, 1, b"nothing-here\0", 70 + qi)
                length, data = fe.request(qi, [req], OUT)
                assert struct.unpack_from("<IiQ", data) == (16, -errno.ENOENT, 70 + qi)
        finally:
            fe.close()
    finally:
        stop_pid(proc)


def test_stop_drops_queued_requests_unserved(tmp_path: Path, fs: GateFS) -> None:
    """Both workers stuck (no spares allowed) and a third request waiting for one: a stop abandons all three; the
    waiting one is never handed to the filesystem, the stuck ones' late replies are dropped."""
    srv, sock = start(tmp_path, fs, workers=2, max_workers=2, stop_grace=0.2)
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        for i in (5, 6):
            submit(q, f"gate{i}".encode(), 80 + i)
        q.do_kick()
        wait_event(fs.entered[5], what="read 5 inside the filesystem")
        wait_event(fs.entered[6], what="read 6 inside the filesystem")
        submit(q, b"gate7", 87)
        q.do_kick()
        w = worker(srv, 1)
        wait_until(lambda: len(w.ring.inflight) == 3, what="the third request to be popped")
        # metadata is answered by the dispatcher itself, even with the pool full
        h, off = submit(q, b"hello", 88)
        q.do_kick()
        assert q.wait_used() == (h, 144)
        check_reply(fe, off, 144, 88)
        assert w.inline == 2 and len(w.ring.inflight) == 3  # INIT and this LOOKUP
        base = fe.call(F.GET_VRING_BASE, struct.pack("<II", 1, 0))
        assert struct.unpack("<II", base) == (1, 5) and w.abandoned == 3
        fs.gates[5].set()
        fs.gates[6].set()
        wait_until(lambda: w.ring.dropped == 3, what="all three replies to be dropped")
        assert not fs.entered[7].is_set() and q.used_idx() == 2
        wait_until(lambda: not any(t.is_alive() for t in w.pool), what="the pool threads to exit")
    finally:
        fe.close()
        fs.open_all()
        srv.stop()


def test_disconnect_with_a_stuck_request_serves_the_next_frontend(server: tuple[VhostUserServer, str],
                                                                  fs: GateFS) -> None:
    srv, sock = server
    fe = Frontend(sock)
    fe.setup()
    init(fe)
    q = fe.queues[1]
    submit(q, b"gate8", 90)
    q.do_kick()
    wait_event(fs.entered[8], what="the read to be inside the filesystem")
    w = worker(srv, 1)
    fe.close()  # gone; its request stays stuck past the grace
    served_after(sock)  # the next front-end does not wait for it
    assert w.abandoned == 1 and srv.connections == 2
    fs.gates[8].set()
    wait_until(lambda: w.ring.dropped == 1, what="the late reply to be dropped")
    served_after(sock)


def test_spare_workers_when_all_are_stuck(tmp_path: Path, fs: GateFS) -> None:
    """More stalled requests than workers: spares start, so cached requests still complete;
    the spares retire once the stall is over."""
    srv, sock = start(tmp_path, fs, workers=2, max_workers=6)
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        stuck = [submit(q, f"gate{i}".encode(), 400 + i)[0] for i in range(4)]
        q.do_kick()
        for i in range(4):
            wait_event(fs.entered[i], what=f"stalled read {i} inside the filesystem")
        fast = {submit(q, b"read", 500 + i): 500 + i for i in range(6)}
        q.do_kick()
        done = dict(collect(q, len(fast)))
        assert sorted(done) == sorted(h for h, _ in fast)
        for (head, off), unique in fast.items():
            check_reply(fe, off, done[head], unique)
        w = worker(srv, 1)
        assert w.spares_started >= 2 and w._threads <= 6
        fs.open_all()
        assert sorted(h for h, _ in collect(q, 4)) == sorted(stuck)
        wait_until(lambda: w._threads == 2, what=lambda: f"spares to retire ({w._threads} threads)")
        assert w._queued == 0 and w._idle == 2
        assert len(w.ring.inflight) == 0 and q.used_idx() == 1 + 6 + 4
    finally:
        fe.close()
        fs.open_all()
        srv.stop()


def test_memory_table_change_mid_request(server: tuple[VhostUserServer, str], fs: GateFS) -> None:
    """SET_MEM_TABLE while a request is stuck: the queue restarts on the new table after the
    grace, the stuck chain is abandoned (its late reply lands nowhere), new requests are served."""
    srv, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        slow, slow_off = submit(q, b"gate9", 95)
        q.do_kick()
        wait_event(fs.entered[9], what="the read to be inside the filesystem")
        old = worker(srv, 1)
        assert fe.acked(F.SET_MEM_TABLE, fe.mem_table_payload(), [fe.memfd]) == 0
        new = worker(srv, 1)
        assert new is not old and old.abandoned == 1
        fs.gates[9].set()
        wait_until(lambda: old.ring.dropped == 1, what="the late reply to be dropped")
        assert bytes(fe.mem[slow_off : slow_off + 16]) == b"\xee" * 16 and q.used_idx() == 1
        h, off = submit(q, b"hello", 96)
        q.do_kick()
        assert q.wait_used() == (h, 144)
        check_reply(fe, off, 144, 96)
    finally:
        fe.close()
