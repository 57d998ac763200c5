"""The vhost-user Backend as a pure state machine: decoded messages in, replies and queue
start/stop callbacks out, memory "mapped" from plain bytearrays (no sockets, no mmap)."""

import struct

import pytest

from nydus_py.transport.vhost_user import messages as M
from nydus_py.transport.vhost_user.backend import Backend, Vring
from nydus_py.transport.vhost_user.messages import Message, Request, VhostUserError

NUM = 16


class Rig:
    def __init__(self, **kw: object) -> None:
        self.buffers: dict[int, bytearray] = {}
        self.backend = Backend(mapper=self.map, **kw)  # type: ignore[arg-type]
        self.events: list[tuple[str, int]] = []
        self.backend.on_start = lambda vr: self.events.append(("start", vr.index))
        self.backend.on_stop = lambda vr: self.events.append(("stop", vr.index))
        self.next_fd = 1000

    def map(self, fd: int, length: int) -> bytearray:
        buf = self.buffers[fd]
        if len(buf) < length:
            raise ValueError("short")
        return buf

    def fd(self, size: int = 0) -> int:
        """A fake fd: a number the backend would close (closing it fails harmlessly)."""
        self.next_fd += 1
        self.buffers[self.next_fd] = bytearray(size)
        return self.next_fd

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None, need_reply: bool = False) -> bytes | None:
        return self.backend.handle(Message(req, 1 | (8 if need_reply else 0), payload, fds or []))

    def u64(self, req: int) -> int:
        reply = self.send(req)
        assert reply is not None
        r, flags, size = M.HEADER.unpack_from(reply)
        assert (r, flags, size) == (req, 5, 8)
        return int(struct.unpack_from("<Q", reply, 12)[0])

    def ack(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        reply = self.send(req, payload, fds, need_reply=True)
        assert reply is not None
        return int(struct.unpack_from("<Q", reply, 12)[0])


def region(gpa: int, size: int, uva: int, off: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, off)


def ready(r: Rig) -> None:
    r.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", M.ProtocolFeature.REPLY_ACK | M.ProtocolFeature.CONFIGURE_MEM_SLOTS))
    r.send(Request.SET_FEATURES, struct.pack("<Q", M.Feature.VERSION_1 | M.Feature.PROTOCOL_FEATURES))


def test_ring_lifecycle_and_base() -> None:
    r = Rig()
    ready(r)
    assert r.ack(Request.ADD_MEM_REG, struct.pack("<Q", 0) + region(0, 0x10000, 0x1000_0000), [r.fd(0x10000)]) == 0
    r.send(Request.SET_VRING_NUM, struct.pack("<II", 1, NUM))
    r.send(Request.SET_VRING_BASE, struct.pack("<II", 1, 7))
    r.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, 0x1000_0000, 0x1000_2000, 0x1000_1000, 0))
    assert r.events == []
    r.send(Request.SET_VRING_KICK, struct.pack("<Q", 1 | M.VRING_NOFD))
    assert r.events == [("start", 1)]
    vr: Vring = r.backend.vrings[1]
    assert vr.queue is not None and vr.queue.last_avail == 7
    vr.queue.last_avail = 9  # as if two requests were served
    # a second region while running: the ring is stopped, re-translated and restarted
    assert r.ack(Request.ADD_MEM_REG, struct.pack("<Q", 0) + region(0x1_0000_0000, 0x1000, 0x2000_0000),
                 [r.fd(0x1000)]) == 0
    assert r.events[1:] == [("stop", 1), ("start", 1)]
    assert r.backend.vrings[1].queue.last_avail == 9  # type: ignore[union-attr]
    reply = r.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert reply is not None and struct.unpack_from("<II", reply, 12) == (1, 9)
    assert r.events[-1] == ("stop", 1)
    # overlapping and missing regions are refused
    assert r.ack(Request.ADD_MEM_REG, struct.pack("<Q", 0) + region(0x8000, 0x10000, 0x3000_0000), [r.fd(0x10000)]) == 1
    assert r.ack(Request.REM_MEM_REG, struct.pack("<Q", 0) + region(0x5000_0000, 0x1000, 0)) == 1
    assert r.ack(Request.REM_MEM_REG, struct.pack("<Q", 0) + region(0x1_0000_0000, 0x1000, 0x2000_0000)) == 0
    assert len(r.backend.memory.regions) == 1


def test_features_config_and_reset() -> None:
    r = Rig(tag="myfs")
    assert r.u64(Request.GET_FEATURES) & M.Feature.VERSION_1
    pf = r.u64(Request.GET_PROTOCOL_FEATURES)
    assert pf & M.ProtocolFeature.CONFIG and pf & M.ProtocolFeature.REPLY_ACK
    # without REPLY_ACK negotiated, NEED_REPLY gets no ack
    assert r.send(Request.SET_FEATURES, struct.pack("<Q", M.Feature.VERSION_1), need_reply=True) is None
    r.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", M.ProtocolFeature.REPLY_ACK))
    assert r.ack(Request.SET_FEATURES, struct.pack("<Q", M.Feature.LOG_ALL)) == 1  # not offered
    reply = r.send(Request.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40))
    assert reply is not None
    assert reply[12 + 12 : 12 + 12 + 36].rstrip(b"\0") == b"myfs"
    assert struct.unpack_from("<I", reply, 12 + 12 + 36)[0] == 1  # num_request_queues
    r.send(Request.SET_OWNER)
    r.send(Request.RESET_OWNER)
    assert not r.backend.owner and r.backend.acked == 0


@pytest.mark.parametrize("payload", [b"", b"\0" * 7, b"\0" * 9])
def test_wrong_sizes_raise(payload: bytes) -> None:
    r = Rig()
    with pytest.raises(VhostUserError):
        r.send(Request.SET_FEATURES, payload)


def test_header_decoding() -> None:
    assert M.decode_header(struct.pack("<III", 1, 1, 0)) == (1, 1, 0)
    for bad in (b"\0" * 11, struct.pack("<III", 1, 0, 0), struct.pack("<III", 1, 5, 0),
                struct.pack("<III", 1, 1, M.MAX_PAYLOAD + 1)):
        with pytest.raises(VhostUserError):
            M.decode_header(bad)
    assert M.request_name(999) == "REQUEST_999"


def test_mem_table_checks() -> None:
    r = Rig()
    ready(r)
    fd = r.fd(0x1000)
    # a region longer than its backing file is refused by the mapper, not mapped
    assert r.ack(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, 0x2000, 0x1000), [fd]) == 1
    # a region that wraps the address space is a protocol error
    with pytest.raises(VhostUserError, match="wraps"):
        r.send(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(2**64 - 0x1000, 0x2000, 0), [r.fd(0x2000)])
    assert r.ack(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, 0x1000, 0x1000), [r.fd(0x1000)]) == 0
    assert r.backend.memory.gpa(0xFF0, 0x10) is not None
