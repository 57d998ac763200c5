"""A thin io_uring: io_uring_setup/io_uring_enter through ctypes and the mmapped SQ/CQ rings.

No maintained Python binding fits: PyPI's `liburing` (Zig-built) has no way to set an SQE's
`addr`/`len` or its 80-byte command area, which FUSE's URING_CMDs need. So this is the
minimum by hand. The encodings (SQE, CQE, io_uring_params) and the ring index math are pure
functions below, unit-tested without a kernel; `Ring` only moves bytes.

Ordering: one thread owns a Ring (submits and reaps). Completions are read after
io_uring_enter(GETEVENTS) returned, and submissions are published before io_uring_enter
reads them, so the syscall orders both; on x86 (TSO) plain stores would do too.
"""

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Callable
from functools import partial
from typing import Literal

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426

IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_OP_NOP = 0
IORING_OP_READ = 22
IORING_OP_URING_CMD = 46

# struct io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features,
# wq_fd, resv[3]; io_sqring_offsets (head, tail, ring_mask, ring_entries, flags, dropped, array,
# resv1, user_addr); io_cqring_offsets (head, tail, ring_mask, ring_entries, overflow, cqes,
# flags, resv1, user_addr)
PARAMS = struct.Struct("<10I8IQ8IQ")
# the first 48 bytes of struct io_uring_sqe: opcode, flags, ioprio, fd, off (cmd_op for
# URING_CMD), addr, len, op flags, user_data, buf_index, personality, file_index; in a 128-byte
# SQE (IORING_SETUP_SQE128) the 80 bytes from offset 48 are the command area.
SQE_HEAD = struct.Struct("<BBHiQQIIQHHi")
SQE_SIZE = 64
SQE128_SIZE = 128
CQE = struct.Struct("<QiI")  # user_data, res, flags
_U32 = struct.Struct("<I")
_MASK32 = 0xFFFF_FFFF

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_ENTER = ctypes.c_long(SYS_IO_URING_ENTER)
_ZERO = ctypes.c_size_t(0)


class SqOffsets:
    __slots__ = ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array")

    def __init__(self, v: tuple[int, ...]) -> None:
        self.head, self.tail, self.ring_mask, self.ring_entries, self.flags, self.dropped, self.array = v[:7]


class CqOffsets:
    __slots__ = ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags")

    def __init__(self, v: tuple[int, ...]) -> None:
        self.head, self.tail, self.ring_mask, self.ring_entries, self.overflow, self.cqes, self.flags = v[:7]


class Params:
    """What io_uring_setup wrote back: ring sizes, features and the offsets inside the mmaps."""

    def __init__(self, raw: bytes | bytearray) -> None:
        v = PARAMS.unpack_from(raw)
        self.sq_entries, self.cq_entries, self.flags, _, _, self.features = v[:6]
        self.sq_off = SqOffsets(v[10:19])
        self.cq_off = CqOffsets(v[19:28])

    @property
    def sq_ring_size(self) -> int:
        return self.sq_off.array + self.sq_entries * 4

    @property
    def cq_ring_size(self) -> int:
        return self.cq_off.cqes + self.cq_entries * CQE.size * (2 if self.flags & IORING_SETUP_CQE32 else 1)


def encode_params(flags: int) -> bytearray:
    """The io_uring_params argument of io_uring_setup (everything but `flags` zero)."""
    buf = bytearray(PARAMS.size)
    _U32.pack_into(buf, 8, flags)
    return buf


def encode_sqe(opcode: int, fd: int, *, off: int = 0, addr: int = 0, length: int = 0, op_flags: int = 0,
               user_data: int = 0, cmd: bytes = b"", size: int = SQE128_SIZE) -> bytes:
    """One SQE of `size` bytes (64, or 128 with SQE128 whose tail is the command area)."""
    if len(cmd) > size - SQE_HEAD.size:
        raise ValueError(f"command area of {len(cmd)} bytes does not fit a {size}-byte SQE")
    head = SQE_HEAD.pack(opcode, 0, 0, fd, off, addr, length, op_flags, user_data, 0, 0, 0)
    return (head + cmd).ljust(size, b"\0")


def encode_uring_cmd(fd: int, cmd_op: int, cmd: bytes, *, user_data: int, addr: int = 0, length: int = 0) -> bytes:
    """IORING_OP_URING_CMD: cmd_op shares the `off` field (its low 32 bits)."""
    return encode_sqe(IORING_OP_URING_CMD, fd, off=cmd_op & _MASK32, addr=addr, length=length,
                      user_data=user_data, cmd=cmd)


def decode_sqe(sqe: bytes | bytearray | memoryview) -> dict[str, int | bytes]:
    """The fields of an encoded SQE (tests and debugging)."""
    (opcode, flags, ioprio, fd, off, addr, length, op_flags, user_data, buf_index, personality,
     file_index) = SQE_HEAD.unpack_from(sqe)
    return {"opcode": opcode, "flags": flags, "fd": fd, "off": off, "cmd_op": off & _MASK32, "addr": addr,
            "len": length, "op_flags": op_flags, "user_data": user_data, "cmd": bytes(sqe[SQE_HEAD.size:])}


def decode_cqe(buf: bytes | bytearray | memoryview | mmap.mmap, offset: int = 0) -> tuple[int, int, int]:
    """(user_data, res, flags) of the CQE at `offset`."""
    user_data, res, flags = CQE.unpack_from(buf, offset)
    return user_data, res, flags


def sq_free(head: int, tail: int, entries: int) -> int:
    """Free SQ slots; head and tail are free-running u32 counters."""
    return entries - ((tail - head) & _MASK32)


def cq_ready(head: int, tail: int) -> int:
    """CQEs waiting to be reaped (u32 counters wrap)."""
    return (tail - head) & _MASK32


def ring_slot(counter: int, mask: int) -> int:
    """The array index a free-running counter refers to (entries are a power of two)."""
    return counter & mask


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _words(buf: mmap.mmap, fmt: Literal["I", "Q"]) -> memoryview:
    """`buf` as an array of `fmt` items (its length rounded down to a whole item)."""
    size = struct.calcsize(fmt)
    return memoryview(buf)[:len(buf) // size * size].cast(fmt)


def _addr(buf: mmap.mmap) -> tuple[int, ctypes.c_char]:
    anchor = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(anchor), anchor


class Ring:
    """One io_uring instance with 128-byte SQEs, owned by one thread."""

    def __init__(self, entries: int, flags: int = IORING_SETUP_SQE128) -> None:
        raw = encode_params(flags)
        c_raw = (ctypes.c_char * len(raw)).from_buffer(raw)
        self.fd = _check(_syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries), c_raw))
        del c_raw
        try:
            self.params = p = Params(raw)
            self.sqe_size = SQE128_SIZE if p.flags & IORING_SETUP_SQE128 else SQE_SIZE
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            if p.features & IORING_FEAT_SINGLE_MMAP:
                size = max(p.sq_ring_size, p.cq_ring_size)
                self._sq = self._cq = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot, offset=IORING_OFF_SQ_RING)
            else:
                self._sq = mmap.mmap(self.fd, p.sq_ring_size, mmap.MAP_SHARED, prot, offset=IORING_OFF_SQ_RING)
                self._cq = mmap.mmap(self.fd, p.cq_ring_size, mmap.MAP_SHARED, prot, offset=IORING_OFF_CQ_RING)
            self._sqes = mmap.mmap(self.fd, p.sq_entries * self.sqe_size, mmap.MAP_SHARED, prot,
                                   offset=IORING_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        self._sq_mask = _U32.unpack_from(self._sq, p.sq_off.ring_mask)[0]
        self._cq_mask = _U32.unpack_from(self._cq, p.cq_off.ring_mask)[0]
        # Typed views of the shared rings: a ring index or a CQE field is one item access, not
        # a struct call (the ring loop touches them for every request). Every offset the
        # kernel gives is aligned to its field's size.
        self._sq32 = _words(self._sq, "I")
        self._cq32 = self._sq32 if self._cq is self._sq else _words(self._cq, "I")
        self._cqi32 = self._cq32.cast("B").cast("i")
        self._cq64 = _words(self._cq, "Q")
        self._sqe64 = _words(self._sqes, "Q")
        self._sq_tail_i = p.sq_off.tail >> 2
        self._sq_head_i = p.sq_off.head >> 2
        self._sq_array_i = p.sq_off.array >> 2
        self._cq_head_i = p.cq_off.head >> 2
        self._cq_tail_i = p.cq_off.tail >> 2
        self._cqes = p.cq_off.cqes
        self._cqe_size = CQE.size * (2 if p.flags & IORING_SETUP_CQE32 else 1)
        # The SQ index array maps ring slots to SQE slots: identity for push(); submit_slot()
        # points a ring slot at a prepared SQE instead.
        for i in range(p.sq_entries):
            self._sq32[self._sq_array_i + i] = i
        self._tail = self._sq32[self._sq_tail_i]
        self._head = self._sq32[self._sq_head_i]  # last seen; reread when full
        self._c_fd = ctypes.c_int(self.fd)
        self._sqe_q = self.sqe_size >> 3  # an SQE's size in u64 items
        self._cqe_q = self._cqe_size >> 3
        self._cqes_q = self._cqes >> 3

    @property
    def pending(self) -> int:
        """SQEs queued and not yet taken by the kernel (it moves the SQ head as it takes them,
        so this needs no bookkeeping of ours)."""
        return (self._tail - self._sq32[self._sq_head_i]) & _MASK32

    def _reserve(self) -> int:
        """The ring slot of the next SQE; OSError(EBUSY) if the SQ is full."""
        if sq_free(self._head, self._tail, self.params.sq_entries) <= 0:  # (the kernel may have moved on)
            self._head = self._sq32[self._sq_head_i]
            if sq_free(self._head, self._tail, self.params.sq_entries) <= 0:
                raise OSError(errno.EBUSY, "io_uring submission queue full")
        return ring_slot(self._tail, self._sq_mask)

    def _publish(self) -> None:
        self._tail = (self._tail + 1) & _MASK32
        self._sq32[self._sq_tail_i] = self._tail

    def push(self, sqe: bytes | bytearray) -> None:
        """Queue one SQE (submitted by the next enter()), written into the SQE slot of its ring
        slot; OSError(EBUSY) if the SQ is full. Not on a ring whose SQE slots hold prepared
        SQEs (`prepare`): it would overwrite them."""
        slot = self._reserve()
        self._sqes[slot * self.sqe_size:(slot + 1) * self.sqe_size] = sqe
        self._sq32[self._sq_array_i + slot] = slot
        self._publish()

    def prepare(self, index: int, sqe: bytes | bytearray) -> None:
        """Write `sqe` into SQE slot `index` (< sq_entries), to be submitted by `submit_slot`
        as often as wanted: a command repeated with one field changed (a ring entry's
        COMMIT_AND_FETCH) costs one `set_u64` and one `submit_slot`, not a 128-byte copy. The
        kernel reads an SQE while io_uring_enter submits it, so a slot may be rewritten once
        that command has completed."""
        if not 0 <= index < self.params.sq_entries:
            raise ValueError(f"SQE slot {index} outside a ring of {self.params.sq_entries}")
        self._sqes[index * self.sqe_size:(index + 1) * self.sqe_size] = sqe

    def set_u64(self, index: int, offset: int, value: int) -> None:
        """Store a u64 at byte `offset` (8-aligned) of the prepared SQE in slot `index`."""
        self._sqe64[(index * self.sqe_size + offset) >> 3] = value

    def submit_slot(self, index: int) -> None:
        """Queue the SQE prepared in slot `index` (submitted by the next enter());
        OSError(EBUSY) if the SQ is full."""
        slot = self._reserve()
        self._sq32[self._sq_array_i + slot] = index
        self._publish()

    def resubmit(self, index: int, offset: int, value: int) -> None:
        """`set_u64(index, offset, value)` and `submit_slot(index)` in one call (a ring entry's
        commit: the ring thread makes one per request)."""
        tail = self._tail
        if (tail - self._head) & _MASK32 >= self.params.sq_entries:
            self._reserve()  # (rereads the head; raises if the SQ is really full)
        self._sqe64[index * self._sqe_q + (offset >> 3)] = value
        self._sq32[self._sq_array_i + (tail & self._sq_mask)] = index
        self._tail = tail = (tail + 1) & _MASK32
        self._sq32[self._sq_tail_i] = tail

    def enter(self, min_complete: int = 0) -> int:
        """Submit what push() queued and wait for `min_complete` completions (GIL released)."""
        flags = IORING_ENTER_GETEVENTS if min_complete else 0
        while True:
            ret = _syscall(_SYS_ENTER, self._c_fd, self.pending, min_complete, flags, None, _ZERO)
            if ret >= 0:
                return ret
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, os.strerror(e))

    def submit_and_wait(self) -> Callable[[], int]:
        """A call that submits everything queued and waits for one completion, for a ring loop:
        io_uring_enter with its arguments bound once but to_submit (it must be exact: the kernel
        skips the wait when it submitted fewer than asked). It returns the syscall's result: -1
        with errno set on failure (`check_enter` raises unless EINTR)."""
        to_submit = ctypes.c_uint(0)
        call = partial(_syscall, _SYS_ENTER, self._c_fd, to_submit, ctypes.c_uint(1),
                       ctypes.c_uint(IORING_ENTER_GETEVENTS), None, _ZERO)
        sq32, head_i = self._sq32, self._sq_head_i

        def wait() -> int:
            to_submit.value = (self._tail - sq32[head_i]) & _MASK32
            return int(call())

        return wait

    @staticmethod
    def check_enter() -> None:
        """After a `submit_and_wait` call returned -1: OSError unless it was interrupted."""
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise OSError(e, os.strerror(e))

    def reap(self) -> list[tuple[int, int, int]]:
        """The completions ready now, (user_data, res, flags) each, and mark them consumed."""
        cq32 = self._cq32
        head = cq32[self._cq_head_i]
        n = cq_ready(head, cq32[self._cq_tail_i])
        if not n:
            return []
        q, i32, mask, base, size = self._cq64, self._cqi32, self._cq_mask, self._cqes_q, self._cqe_q
        out = []
        for k in range(n):
            at = base + ((head + k) & mask) * size  # (in u64 items)
            out.append((q[at], i32[2 * at + 2], cq32[2 * at + 3]))
        cq32[self._cq_head_i] = (head + n) & _MASK32
        return out

    def reap_results(self) -> list[int]:
        """Like `reap`, as a flat [user_data, res, user_data, res, ...] (flags left out): one
        list, no tuple per completion."""
        cq32 = self._cq32
        head = cq32[self._cq_head_i]
        tail = cq32[self._cq_tail_i]
        if head == tail:
            return []
        q, i32, mask, base, size = self._cq64, self._cqi32, self._cq_mask, self._cqes_q, self._cqe_q
        if (tail - head) & _MASK32 == 1:
            at = base + (head & mask) * size
            one = [q[at], i32[2 * at + 2]]
            cq32[self._cq_head_i] = tail  # (after reading: the kernel may reuse the slot from now on)
            return one
        out: list[int] = []
        while head != tail:
            at = base + (head & mask) * size
            out += (q[at], i32[2 * at + 2])
            head = (head + 1) & _MASK32
        cq32[self._cq_head_i] = head
        return out

    def close(self) -> None:
        for v in (self._cqi32, self._cq64, self._sqe64, self._cq32, self._sq32):
            v.release()
        for m in {id(self._sq): self._sq, id(self._cq): self._cq, id(self._sqes): self._sqes}.values():
            m.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def mmap_address(buf: mmap.mmap) -> tuple[int, ctypes.c_char]:
    """The address of an anonymous mapping, plus the anchor that keeps it exported (the kernel
    writes into it; drop the anchor before closing the mapping)."""
    return _addr(buf)


def probe() -> str | None:
    """None when this process can create a ring with 128-byte SQEs, else why not."""
    try:
        Ring(2).close()
    except OSError as e:
        return f"io_uring_setup(SQE128): {os.strerror(e.errno or 0)} (errno {e.errno})"
    return None
