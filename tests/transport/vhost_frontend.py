"""A Python vhost-user front-end (a stand-in for QEMU plus a virtio driver) for driving the backend.

It owns "guest memory" (a memfd, mapped here and handed to the backend with SCM_RIGHTS), lays
out split virtqueues in it, and puts descriptor chains on them the way the Linux driver does.
The wire formats are written out from the vhost-user and virtio specs on purpose, independently
of nydus_py.transport.vhost_user, and the front-end can be made to misbehave at every step.
"""

import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE, SET_LOG_BASE = 1, 2, 3, 4, 5, 6
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
SET_BACKEND_REQ_FD, GET_CONFIG = 21, 24
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38

F_INDIRECT, F_EVENT_IDX, F_PROTOCOL, F_VERSION_1 = 1 << 28, 1 << 29, 1 << 30, 1 << 32
PF_MQ, PF_REPLY_ACK, PF_CONFIG, PF_MEM_SLOTS = 1, 1 << 3, 1 << 9, 1 << 15
NEXT, WRITE, INDIRECT = 1, 2, 4

GPA_BASE = 0x4000_0000
UVA_BASE = 0x7F00_0000_0000


def store16(mem: mmap.mmap, off: int, value: int) -> None:
    """One 2-byte store, as a driver publishes a ring index: the backend reads it at any moment,
    and struct's pack_into clears the bytes before it writes them (a backend that read the avail
    index as 0 in between stopped the queue: "avail index 0 is ... ahead")."""
    view = memoryview(mem)
    try:
        view[off : off + 2].cast("H")[0] = value
    finally:
        view.release()


def readable(fd: "int | socket.socket", timeout: float) -> bool:
    """Whether `fd` is readable within `timeout` s. poll, not select: select refuses fds of
    1024 and above, which a long test session reaches."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, int(timeout * 1000))))


class Hangup(Exception):
    """The backend closed the connection."""


@dataclass
class DriverQueue:
    """The driver's view of one split virtqueue living in guest memory."""

    fe: "Frontend"
    index: int
    num: int
    desc: int  # offsets into guest memory
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0
    kick: int = -1
    call: int = -1

    def __post_init__(self) -> None:
        self.free = list(range(self.num))

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        struct.pack_into("<QIHH", self.fe.mem, table + 16 * i, addr, length, flags, nxt)

    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False,
            raw: list[tuple[int, int, int]] | None = None) -> tuple[int, list[int]]:
        """Put one chain on the ring (not kicked). Returns (head, offsets of the writable
        buffers). `raw` gives (gpa, len, flags) descriptors verbatim (hostile tests)."""
        descs: list[tuple[int, int, int]] = []
        w_offs: list[int] = []
        if raw is not None:
            descs = list(raw)
        else:
            for data in readable:
                off = self.fe.alloc(max(len(data), 1))
                self.fe.mem[off : off + len(data)] = data
                descs.append((GPA_BASE + off, len(data), 0))
            for size in writable:
                off = self.fe.alloc(size)
                self.fe.mem[off : off + size] = b"\xee" * size
                w_offs.append(off)
                descs.append((GPA_BASE + off, size, WRITE))
        if indirect:
            table = self.fe.alloc(16 * len(descs))
            for i, (addr, length, flags) in enumerate(descs):
                last = i == len(descs) - 1
                self.write_desc(table, i, addr, length, flags | (0 if last else NEXT), 0 if last else i + 1)
            head = self.free.pop(0)
            self.write_desc(self.desc, head, GPA_BASE + table, 16 * len(descs), INDIRECT, 0)
        else:
            ids = [self.free.pop(0) for _ in descs]
            for k, (i, (addr, length, flags)) in enumerate(zip(ids, descs, strict=True)):
                last = k == len(descs) - 1
                self.write_desc(self.desc, i, addr, length, flags | (0 if last else NEXT), 0 if last else ids[k + 1])
            head = ids[0]
        self.publish(head)
        return head, w_offs

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.fe.mem, self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        store16(self.fe.mem, self.avail + 2, self.avail_idx)

    def do_kick(self) -> None:
        os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.fe.mem, self.used + 2)[0])

    def wait_used(self, timeout: float = 5.0) -> tuple[int, int]:
        """The next used element (id, len); waits on the call eventfd."""
        deadline = time.monotonic() + timeout
        while self.used_idx() == self.last_used:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: no used element within {timeout} s")
            if readable(self.call, min(left, 0.05)):
                os.eventfd_read(self.call)
        slot = self.last_used % self.num
        elem = struct.unpack_from("<II", self.fe.mem, self.used + 4 + 8 * slot)
        self.last_used = (self.last_used + 1) & 0xFFFF
        return int(elem[0]), int(elem[1])

    def recycle(self, head: int, count: int) -> None:
        self.free.extend(range(head, head + count) if count > 1 else [head])


class Frontend:
    """Connects to a backend socket; `mem_size` bytes of guest memory at GPA_BASE."""

    def __init__(self, path: str, mem_size: int = 8 << 20, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, mem_size)
        self.mem = mmap.mmap(self.memfd, mem_size)
        self.mem_size = mem_size
        self.brk = 0x10000  # below: ring space
        self.ring_brk = 0
        self.queues: list[DriverQueue] = []

    def close(self) -> None:
        self.sock.close()
        for q in self.queues:
            for fd in (q.kick, q.call):
                if fd >= 0:
                    os.close(fd)
        self.mem.close()
        os.close(self.memfd)

    # -- memory --------------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        off = (self.brk + 15) & ~15
        if off + size > self.mem_size:
            self.brk = 0x10000  # wrap: tests reuse memory once replies were read
            off = self.brk
        self.brk = off + size
        return off

    def ring_alloc(self, size: int, align: int = 16) -> int:
        off = (self.ring_brk + align - 1) & ~(align - 1)
        self.ring_brk = off + size
        assert self.ring_brk <= 0x10000
        return off

    # -- messages ------------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        flags = 1 | (8 if need_reply else 0)
        self.send_raw(struct.pack("<III", request, flags, len(payload)) + payload, fds)

    def recv_reply(self, request: int) -> bytes:
        head = self._recv(12)
        req, flags, size = struct.unpack("<III", head)
        assert req == request, (req, request)
        assert flags == 0x5, hex(flags)
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Hangup()
            buf += chunk
        return buf

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        self.send(request, payload, fds)
        return self.recv_reply(request)

    def call_u64(self, request: int) -> int:
        return int(struct.unpack("<Q", self.call(request))[0])

    def acked(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Send with NEED_REPLY and return the REPLY_ACK value (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        return int(struct.unpack("<Q", self.recv_reply(request))[0])

    def is_closed(self, timeout: float = 2.0) -> bool:
        if not readable(self.sock, timeout):
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    # -- the usual bring-up --------------------------------------------------------------------
    def mem_table_payload(self) -> bytes:
        return struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA_BASE, self.mem_size, UVA_BASE, 0)

    def negotiate(self, features: int = F_VERSION_1 | F_PROTOCOL | F_INDIRECT,
                  protocol: int = PF_REPLY_ACK | PF_MQ) -> int:
        offered = self.call_u64(GET_FEATURES)
        assert offered & F_VERSION_1 and offered & F_PROTOCOL
        offered_pf = self.call_u64(GET_PROTOCOL_FEATURES)
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol & offered_pf))
        self.send(SET_OWNER)
        self.send(SET_FEATURES, struct.pack("<Q", features & offered))
        return offered

    def setup(self, nqueues: int = 2, num: int = 64, features: int = F_VERSION_1 | F_PROTOCOL | F_INDIRECT,
              protocol: int = PF_REPLY_ACK | PF_MQ, mem_slots: bool = False) -> None:
        self.negotiate(features, protocol)
        if mem_slots:
            region = struct.pack("<QQQQQ", 0, GPA_BASE, self.mem_size, UVA_BASE, 0)
            assert self.acked(ADD_MEM_REG, region, [self.memfd]) == 0
        else:
            assert self.acked(SET_MEM_TABLE, self.mem_table_payload(), [self.memfd]) == 0
        for i in range(nqueues):
            self.add_queue(i, num)

    def add_queue(self, index: int, num: int) -> DriverQueue:
        desc = self.ring_alloc(16 * num, 16)
        avail = self.ring_alloc(6 + 2 * num, 2)
        used = self.ring_alloc(6 + 8 * num, 4)
        q = DriverQueue(self, index, num, desc, avail, used)
        q.kick = os.eventfd(0, os.EFD_CLOEXEC)
        q.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.send(SET_VRING_CALL, struct.pack("<Q", index), [q.call])
        self.send(SET_VRING_NUM, struct.pack("<II", index, num))
        self.send(SET_VRING_BASE, struct.pack("<II", index, 0))
        self.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, UVA_BASE + desc, UVA_BASE + used,
                                              UVA_BASE + avail, 0))
        self.send(SET_VRING_KICK, struct.pack("<Q", index), [q.kick])
        self.send(SET_VRING_ENABLE, struct.pack("<II", index, 1))
        self.queues.append(q)
        return q

    # -- requests ------------------------------------------------------------------------------
    def request(self, qi: int, readable: list[bytes], writable: list[int], *, indirect: bool = False,
                timeout: float = 5.0) -> tuple[int, bytes]:
        """Submit one chain, kick, wait for it; (used len, bytes of the writable part)."""
        q = self.queues[qi]
        head, w_offs = q.add(readable, writable, indirect=indirect)
        q.do_kick()
        got, length = q.wait_used(timeout)
        assert got == head, (got, head)
        q.free.extend(_chain_ids(q, head, indirect, len(readable) + len(writable)))
        out = b"".join(bytes(self.mem[o : o + s]) for o, s in zip(w_offs, writable, strict=True))
        return length, out


def _chain_ids(q: DriverQueue, head: int, indirect: bool, n: int) -> list[int]:
    if indirect:
        return [head]
    ids = [head]
    i = head
    for _ in range(n - 1):
        _, _, flags, nxt = struct.unpack_from("<QIHH", q.fe.mem, q.desc + 16 * i)
        if not flags & NEXT:
            break
        ids.append(nxt)
        i = nxt
    return ids
