"""The vhost-user-fs backend end to end over its socket, driven by a Python front-end (no QEMU)."""

import errno
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.fuse.protocol import FuseSession
from nydus_py.transport.vhost_user import virtiofs_server
from nydus_py.transport.vhost_user.server import VhostUserServer

from ..fuse.kernel import INIT, LOOKUP, READ
from ..fuse.memfs import MemFS
from ..waiting import wait_until
from . import vhost_frontend as F
from .vhost_frontend import Frontend


def fuse_req(opcode: int, nodeid: int, args: bytes, unique: int) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(args), opcode, unique, nodeid, 0, 0, 1, 0, 0) + args


INIT_ARGS = struct.pack("<IIIII44x", 7, 38, 128 << 10, 0x7BFFFFFB, 0xB)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[VhostUserServer, str]]:
    sock = str(tmp_path / "vfs.sock")
    srv = virtiofs_server(FuseSession(MemFS()), sock).start()
    yield srv, sock
    srv.stop()


def fuse_call(fe: Frontend, opcode: int, nodeid: int, args: bytes, unique: int, out: list[int], *,
              qi: int = 1, indirect: bool = False) -> tuple[int, int, bytes]:
    """(error, used len, payload) of a FUSE request sent as [header, args | out_header, out...]."""
    req = fuse_req(opcode, nodeid, args, unique)
    length, data = fe.request(qi, [req[:40], req[40:]] if args else [req], out, indirect=indirect)
    olen, error, uniq = struct.unpack_from("<IiQ", data)
    assert uniq == unique
    assert olen == length
    return -error, length, data[16:olen]


def init(fe: Frontend) -> None:
    err, _, p = fuse_call(fe, INIT, 0, INIT_ARGS, 2, [16, 64])
    assert err == 0 and struct.unpack_from("<II", p) == (7, 38)


def test_init_lookup_read(server: tuple[VhostUserServer, str]) -> None:
    _, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        err, n, p = fuse_call(fe, LOOKUP, 1, b"hello\0", 4, [16, 128])
        assert err == 0 and n == 16 + 128
        nodeid = struct.unpack_from("<Q", p)[0]
        assert nodeid == 2
        # a READ scattered over several small writable descriptors, through an indirect table
        read_in = struct.pack("<QQIIQII", 102, 0, 4096, 0, 0, 0, 0)
        err, n, p = fuse_call(fe, READ, 2, read_in, 6, [16, 5, 3, 4096], indirect=True)
        assert err == 0 and p == b"hello world\n" and n == 16 + 12
        # direct chain, reply needs more room than the guest gave -> EIO, not a partial write
        err, n, p = fuse_call(fe, LOOKUP, 1, b"hello\0", 8, [16, 64])
        assert err == errno.EIO and n == 16
    finally:
        fe.close()


def test_forget_on_hiprio_is_completed_without_reply(server: tuple[VhostUserServer, str]) -> None:
    _, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        req = fuse_req(2, 2, struct.pack("<Q", 1), 10)  # FORGET
        length, _ = fe.request(0, [req], [])
        assert length == 0
    finally:
        fe.close()


def test_event_idx_and_mem_slots(server: tuple[VhostUserServer, str]) -> None:
    _, sock = server
    fe = Frontend(sock)
    try:
        fe.setup(features=F.F_VERSION_1 | F.F_PROTOCOL | F.F_EVENT_IDX,
                 protocol=F.PF_REPLY_ACK | F.PF_MQ | F.PF_MEM_SLOTS, mem_slots=True)
        init(fe)
        q = fe.queues[1]

        def avail_event() -> int:
            return int(struct.unpack_from("<H", fe.mem, q.used + 4 + 8 * q.num)[0])

        # the backend publishes avail_event = its next avail index after draining (just after
        # completing the last chain, so the driver may see the completion first)
        wait_until(lambda: avail_event() == 1, what=lambda: f"avail_event 1, is {avail_event()}")
        # used_event far ahead: no interrupt wanted, yet the request completes
        struct.pack_into("<H", fe.mem, q.avail + 4 + 2 * q.num, 100)
        head, offs = q.add([fuse_req(LOOKUP, 1, b"hello\0", 4)], [16, 128])
        q.do_kick()
        got, length = q.wait_used()
        assert (got, length) == (head, 144)
        wait_until(lambda: avail_event() == 2, what=lambda: f"avail_event 2, is {avail_event()}")
    finally:
        fe.close()


def test_get_vring_base_and_reconnect(server: tuple[VhostUserServer, str]) -> None:
    srv, sock = server
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        fuse_call(fe, LOOKUP, 1, b"hello\0", 4, [16, 128])
        fe.send(F.SET_VRING_ENABLE, struct.pack("<II", 1, 0))
        base = fe.call(F.GET_VRING_BASE, struct.pack("<II", 1, 0))
        assert struct.unpack("<II", base) == (1, 2)
    finally:
        fe.close()
    # the next front-end (a rebooted VM) is served from scratch
    fe = Frontend(sock)
    try:
        fe.setup()
        init(fe)
        err, _, _ = fuse_call(fe, LOOKUP, 1, b"sub\0", 4, [16, 128])
        assert err == 0
    finally:
        fe.close()
    assert srv.connections == 2


def test_queue_num_slots_and_refusals(server: tuple[VhostUserServer, str], caplog: pytest.LogCaptureFixture) -> None:
    _, sock = server
    fe = Frontend(sock)
    try:
        fe.negotiate()
        assert fe.call_u64(F.GET_QUEUE_NUM) == 2
        assert fe.call_u64(F.GET_MAX_MEM_SLOTS) == 32
        with caplog.at_level(logging.ERROR):
            # dirty logging is refused, a queue index out of range fails its ack
            assert struct.unpack("<Q", fe.call(F.SET_LOG_BASE, struct.pack("<QQ", 4096, 0)))[0] != 0
            assert fe.acked(F.SET_VRING_NUM, struct.pack("<II", 7, 64)) != 0
            assert fe.acked(F.SET_VRING_NUM, struct.pack("<II", 1, 63)) != 0
        assert fe.acked(F.SET_VRING_NUM, struct.pack("<II", 1, 64)) == 0
    finally:
        fe.close()
    assert "queue index 7" in caplog.text
