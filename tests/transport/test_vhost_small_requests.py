"""The per-request path of small virtio-fs requests (issue 15, `cat` of many small files): what it
no longer does, and that the driver still gets every reply and every interrupt it asked for.

* the dispatcher watches the kick eventfd edge-triggered and never reads it;
* the avail index is read once per batch of entries, not once per entry;
* going idle pops and arms (EVENT_IDX avail_event) in one critical section;
* completions wake the idle condition only when a thread waits on it.
Driven over plain buffers and by the Python front-end, no QEMU."""

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.fuse.protocol import FuseSession
from nydus_py.transport.vhost_user import virtiofs_server
from nydus_py.transport.vhost_user.inflight import InflightQueue
from nydus_py.transport.vhost_user.server import VhostUserServer
from nydus_py.transport.vhost_user.virtqueue import Chain, RingError, Virtqueue

from ..fuse.kernel import LOOKUP
from ..fuse.memfs import MemFS
from ..waiting import wait_until
from . import vhost_frontend as F
from .test_vhost_user import fuse_req, init
from .test_virtqueue import AVAIL, DATA, DESC, GPA, NUM, USED, desc, make, offer

OUT = [16, 128]  # out header + fuse_entry_out


def chains(buf: bytearray, n: int) -> None:
    """`n` one-descriptor chains (heads 0..n-1), all offered at once."""
    for i in range(n):
        desc(buf, DESC, i, GPA + DATA + 0x100 * i, 8, 2)
        struct.pack_into("<H", buf, AVAIL + 4 + 2 * i, i)
    struct.pack_into("<H", buf, AVAIL + 2, n)


def test_the_avail_index_is_read_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    buf, q = make()
    chains(buf, 3)
    reads = []
    real = Virtqueue.avail_idx
    monkeypatch.setattr(Virtqueue, "avail_idx", lambda self: reads.append(1) or real(self))
    assert [q.pop_head() for _ in range(4)] == [0, 1, 2, None]
    assert len(reads) == 2  # the batch of 3, then the look that finds nothing more
    offer(buf, 5, idx=4)  # more arrives: seen by the next read
    assert q.pop_head() == 5 and len(reads) == 3


def test_a_batch_read_at_once_still_refuses_a_ring_that_jumps() -> None:
    buf, q = make()
    chains(buf, 2)
    assert q.pop_head() == 0
    struct.pack_into("<H", buf, AVAIL + 2, 2 + NUM + 1)  # the driver corrupts its index
    assert q.pop_head() == 1  # (the entry the first read announced)
    with pytest.raises(RingError):
        q.pop_head()


@pytest.mark.parametrize("event_idx", [False, True])
def test_pop_or_arm_asks_for_a_kick_when_the_ring_is_empty(event_idx: bool) -> None:
    buf, q = make(event_idx=event_idx)
    ring = InflightQueue(q, lambda: None)
    chains(buf, 2)
    got = [ring.pop_or_arm() for _ in range(3)]
    assert [c.head if c is not None else None for c in got] == [0, 1, None]
    avail_event = struct.unpack_from("<H", buf, USED + 4 + 8 * NUM)[0]
    assert avail_event == (2 if event_idx else 0)  # kick me once entry 2 is made available
    ring.stop_popping()
    offer(buf, 4, idx=3)
    assert ring.pop_or_arm() is None and q.last_avail == 2  # a stopping queue consumes nothing more


class CountingCondition(threading.Condition):
    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self.notified = 0

    def notify_all(self) -> None:
        self.notified += 1
        super().notify_all()


def test_completions_wake_the_idle_condition_only_for_a_waiter() -> None:
    buf, q = make()
    ring = InflightQueue(q, lambda: None)
    ring._idle = cond = CountingCondition(ring.lock)  # type: ignore[assignment]
    chains(buf, 3)
    a, b, c = (ring.pop() for _ in range(3))
    assert a is not None and b is not None and c is not None
    ring.complete(a, [b"x"])
    assert ring.complete_written(b, 0)
    assert cond.notified == 0  # nobody waits: no pure-Python notify_all per request
    done = threading.Event()
    waiter = threading.Thread(target=lambda: ring.wait_idle(30) and done.set(), daemon=True)
    waiter.start()
    wait_until(lambda: ring._waiters == 1, what="the waiter to wait")
    ring.complete(c, None)
    wait_until(done.is_set, what="wait_idle to return once the last chain completed")
    assert cond.notified == 1
    waiter.join(10)


def test_one_reply_buffer_scatters_over_the_header_and_argument_descriptors() -> None:
    buf = bytearray(256)
    v = memoryview(buf)
    c = Chain(0, [], [v[0:16], v[64:192]])
    reply = bytes(range(144))
    assert c.write([reply]) == 144
    assert bytes(buf[0:16]) + bytes(buf[64:192]) == reply and bytes(buf[16:64]) == bytes(48)
    with pytest.raises(ValueError):
        Chain(0, [], [v[0:16], v[64:192]]).write([bytes(145)])
    assert bytes(buf[0:16]) + bytes(buf[64:192]) == reply  # nothing written by the refused one
    assert Chain(0, [], [v[200:216]]).write([memoryview(b"abc")]) == 3 and bytes(buf[200:203]) == b"abc"


# -- through the socket ----------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VhostUserServer, F.Frontend]]:
    srv = virtiofs_server(FuseSession(MemFS()), str(tmp_path / "vfs.sock"), workers=2).start()
    fe = F.Frontend(str(tmp_path / "vfs.sock"))
    try:
        fe.setup(nqueues=2, num=64, features=F.F_VERSION_1 | F.F_PROTOCOL | F.F_INDIRECT | F.F_EVENT_IDX)
        yield srv, fe
    finally:
        fe.close()
        srv.stop()


def ask(fe: F.Frontend, unique: int, *, want_interrupt: bool = True) -> tuple[int, bytes]:
    """One LOOKUP of /hello on the request queue; with EVENT_IDX the driver's used_event asks for
    an interrupt for it (`want_interrupt`) or for one far away."""
    q = fe.queues[1]
    struct.pack_into("<H", fe.mem, q.avail + 4 + 2 * q.num, q.last_used if want_interrupt else q.last_used - 2)
    return fe.request(1, [fuse_req(LOOKUP, 1, b"hello\0", unique)], OUT)


def kicks_unread(fd: int) -> int:
    """The kick eventfd's counter (read here, so it is 0 afterwards), 0 if nothing is there."""
    if not F.readable(fd, 0):
        return 0
    return os.eventfd_read(fd)


def test_the_dispatcher_serves_every_kick_without_reading_the_eventfd(
        served: tuple[VhostUserServer, F.Frontend]) -> None:
    _srv, fe = served
    init(fe)
    kicks_unread(fe.queues[1].kick)
    for unique in range(10, 20):  # one at a time: each one waits on its kick alone
        n, out = ask(fe, unique)
        assert n == 144 and struct.unpack_from("<iQ", out, 4) == (0, unique)
    # every kick is still in the counter: an edge-triggered watch needs no read(2) per kick
    assert kicks_unread(fe.queues[1].kick) == 10


def test_event_idx_signals_when_the_driver_asks_and_not_when_it_does_not(
        served: tuple[VhostUserServer, F.Frontend]) -> None:
    _srv, fe = served
    init(fe)
    q = fe.queues[1]
    ask(fe, 30)  # (the queue's first interrupt is always sent)
    kicks_unread(q.call)
    for unique, want in ((31, False), (32, True), (33, False), (34, True)):
        used_event = q.last_used if want else (q.last_used - 2) & 0xFFFF
        struct.pack_into("<H", fe.mem, q.avail + 4 + 2 * q.num, used_event)
        q.add([fuse_req(LOOKUP, 1, b"hello\0", unique)], OUT, indirect=True)
        q.do_kick()
        if want:  # the interrupt comes, and the reply with it
            assert F.readable(q.call, 10), f"no interrupt for request {unique}"
        else:  # the reply is in the used ring ...
            wait_until(lambda: q.used_idx() != q.last_used, what=f"the reply to request {unique}")
        head, n = q.wait_used()
        q.free.append(head)
        assert n == 144
        if not want:  # ... and no interrupt came with it (the signal would precede nothing else)
            assert not F.readable(q.call, 0.2), f"an interrupt nobody asked for ({unique})"
        kicks_unread(q.call)
