"""A hostile vhost-user front-end: malformed messages, bad descriptors, disconnects mid-request.
The backend must log, drop the request or the connection, leak no fds, and serve the next one."""

import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.fuse.api import Entry
from nydus_py.fuse.protocol import FuseSession
from nydus_py.transport.vhost_user import virtiofs_server
from nydus_py.transport.vhost_user.server import VhostUserServer

from ..fuse.kernel import LOOKUP
from ..fuse.memfs import MemFS
from ..waiting import wait_event, wait_until
from . import vhost_frontend as F
from .test_vhost_user import fuse_call, fuse_req, init
from .vhost_frontend import GPA_BASE, Frontend


class SlowFS(MemFS):
    """lookup of "slow" stays inside until the test releases it (a request in flight when the
    front-end goes away)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def lookup(self, parent: int, name: bytes) -> Entry:
        if name == b"slow":
            self.entered.set()
            assert self.release.wait(30), "the test never released the slow lookup"
            name = b"hello"
        return super().lookup(parent, name)


@pytest.fixture
def fs() -> Iterator[SlowFS]:
    f = SlowFS()
    yield f
    f.release.set()


@pytest.fixture
def server(tmp_path: Path, fs: SlowFS) -> Iterator[tuple[VhostUserServer, str]]:
    sock = str(tmp_path / "vfs.sock")
    srv = virtiofs_server(FuseSession(fs), sock).start()
    yield srv, sock
    srv.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def served_after(sock: str) -> None:
    """A well-behaved front-end gets full service."""
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        err, _, _ = fuse_call(fe, LOOKUP, 1, b"hello\0", 4, [16, 128])
        assert err == 0
    finally:
        fe.close()


@pytest.mark.parametrize(
    "raw, what",
    [
        (struct.pack("<III", 1, 0x2, 0), "version"),  # version 2
        (struct.pack("<III", 1, 0x5, 0), "a reply"),  # a reply flag from the front-end
        (struct.pack("<III", F.SET_VRING_NUM, 1, 1 << 20), "exceeds"),  # a huge payload
        (struct.pack("<III", F.SET_VRING_NUM, 1, 4) + b"\0" * 4, "expected 8"),  # wrong size
        (struct.pack("<III", F.SET_MEM_TABLE, 1, 8) + struct.pack("<II", 0, 0), "0 regions"),
        (struct.pack("<III", F.SET_VRING_KICK, 1, 8) + struct.pack("<Q", 1), "expected one fd"),
        (struct.pack("<III", F.SET_VRING_CALL, 1, 8) + struct.pack("<Q", 0x1001), "reserved bits"),
        (struct.pack("<III", F.SET_VRING_ENABLE, 1, 8) + struct.pack("<II", 0, 7), "value 7"),
        (struct.pack("<II", 1, 1), "inside a message header"),  # a truncated header, then EOF
        (struct.pack("<III", F.SET_FEATURES, 1, 8) + b"\0\0", "inside the payload"),  # EOF mid-payload
    ],
)
def test_malformed_message_drops_connection(server: tuple[VhostUserServer, str], raw: bytes, what: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    srv, sock = server
    fe = Frontend(sock)
    with caplog.at_level(logging.ERROR):
        fe.send_raw(raw)
        if what.startswith("inside"):
            fe.sock.shutdown(socket.SHUT_WR)
        assert fe.is_closed(5)
    fe.close()
    assert what in caplog.text
    served_after(sock)


def test_bad_fds_are_closed_not_leaked(server: tuple[VhostUserServer, str], caplog: pytest.LogCaptureFixture) -> None:
    _, sock = server
    before = open_fds()
    fe = Frontend(sock)
    fe.negotiate()
    with caplog.at_level(logging.ERROR):
        # two fds for a one-region table: protocol error, both closed by the backend
        r, w = os.pipe()
        fe.send(F.SET_MEM_TABLE, fe.mem_table_payload(), [r, w])
        os.close(r)
        os.close(w)
        assert fe.is_closed(5)
    fe.close()
    fe = Frontend(sock)
    fe.negotiate()
    with caplog.at_level(logging.ERROR):
        # a region larger than its memfd (would SIGBUS on touch) and an unmappable fd: refused
        big = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA_BASE, fe.mem_size * 2, F.UVA_BASE, 0)
        assert fe.acked(F.SET_MEM_TABLE, big, [fe.memfd]) != 0
        r, w = os.pipe()
        assert fe.acked(F.SET_MEM_TABLE, fe.mem_table_payload(), [r]) != 0
        os.close(r)
        os.close(w)
        # ring addresses outside guest memory: the ring does not start
        assert fe.acked(F.SET_MEM_TABLE, fe.mem_table_payload(), [fe.memfd]) == 0
        fe.send(F.SET_VRING_NUM, struct.pack("<II", 1, 64))
        assert fe.acked(F.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x2000, 0x3000, 0)) == 0
        kick = os.eventfd(0)
        assert fe.acked(F.SET_VRING_KICK, struct.pack("<Q", 1), [kick]) != 0
        os.close(kick)
    fe.close()
    assert "larger" in caplog.text or "bytes of a" in caplog.text
    assert "not inside guest memory" in caplog.text
    served_after(sock)
    wait_until(lambda: open_fds() <= before + 1, what=lambda: f"fds back to {before} + 1, have {open_fds()}")


def test_bad_descriptors_fail_only_their_request(server: tuple[VhostUserServer, str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    _, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        hostile = [
            [(0x10, 40, 0)],  # below guest memory
            [(GPA_BASE + fe.mem_size - 8, 40, 0)],  # runs off its end
            [(GPA_BASE + 0x20000, 0xFFFF_FFFF, 0)],  # absurd length
            [(1 << 63, 16, 2)],  # a writable buffer in nowhere
        ]
        with caplog.at_level(logging.ERROR):
            for raw in hostile:
                head, _ = q.add([], [], raw=raw)
                q.do_kick()
                assert q.wait_used() == (head, 0)
                q.free.append(head)
            # a FUSE request too short for a header: completed with nothing written
            length, _ = fe.request(1, [b"\x01" * 20], [16])
            assert length == 0
            # a header whose len claims more than the chain carries: EIO
            req = bytearray(fuse_req(LOOKUP, 1, b"hello\0", 40))
            struct.pack_into("<I", req, 0, 4096)
            length, data = fe.request(1, [bytes(req)], [16, 128])
            assert length == 16 and struct.unpack_from("<i", data, 4)[0] == -errno.EIO
        assert caplog.text.count("outside guest memory") == 4
        # the queue still serves normal requests
        err, _, _ = fuse_call(fe, LOOKUP, 1, b"sub\0", 60, [16, 128])
        assert err == 0
    finally:
        fe.close()


def test_corrupt_avail_ring_stops_the_queue_not_the_daemon(server: tuple[VhostUserServer, str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        q = fe.queues[1]
        with caplog.at_level(logging.ERROR):
            struct.pack_into("<H", fe.mem, q.avail + 2, (q.avail_idx + q.num + 5) & 0xFFFF)
            q.do_kick()
            wait_until(lambda: "the queue stops" in caplog.text, what="the worker to stop the queue")
    finally:
        fe.close()
    served_after(sock)


def test_disconnect_mid_request(server: tuple[VhostUserServer, str], fs: SlowFS,
                                caplog: pytest.LogCaptureFixture) -> None:
    srv, sock = server
    fe = Frontend(sock)
    fe.setup()
    init(fe)
    q = fe.queues[1]
    q.add([fuse_req(LOOKUP, 1, b"slow\0", 8)], [16, 128])
    q.do_kick()
    wait_event(fs.entered, what="the slow lookup to be inside the filesystem")
    with caplog.at_level(logging.INFO, logger="nydus_py.transport.vhost_user.server"):
        fe.close()  # gone while the request is being served (its memory stays mapped until done)
        wait_until(lambda: "front-end disconnected" in caplog.text, what="the backend to see the disconnect")
    assert not fs.release.is_set()
    fs.release.set()  # the request finishes after its front-end left
    served_after(sock)
    assert srv.connections == 2


def test_disconnect_mid_message_with_fds(server: tuple[VhostUserServer, str]) -> None:
    _, sock = server
    fe = Frontend(sock)
    fe.negotiate()
    payload = fe.mem_table_payload()
    head = struct.pack("<III", F.SET_MEM_TABLE, 1, len(payload))
    socket.send_fds(fe.sock, [head + payload[:10]], [fe.memfd])
    fe.sock.shutdown(socket.SHUT_WR)
    assert fe.is_closed(5)
    fe.close()
    served_after(sock)


def test_second_frontend_waits_for_the_first(server: tuple[VhostUserServer, str]) -> None:
    """One front-end at a time: a second connection is served once the first leaves."""
    _, sock = server
    first = Frontend(sock)
    first.setup()
    init(first)
    second = Frontend(sock)
    second.sock.settimeout(0.5)
    second.send(F.GET_FEATURES)
    with pytest.raises(TimeoutError):
        second.recv_reply(F.GET_FEATURES)
    first.close()
    second.sock.settimeout(5)
    assert struct.unpack("<Q", second.recv_reply(F.GET_FEATURES))[0] & F.F_VERSION_1
    second.close()
