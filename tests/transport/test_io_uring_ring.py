"""The thin io_uring: SQE/CQE/params encodings and ring index math as pure functions, and a
NOP round trip through a real ring (wrapping its counters)."""

import os
import struct
import threading
from collections.abc import Iterator

import pytest

from nydus_py.transport.io_uring import (
    CQE,
    IORING_OP_NOP,
    IORING_OP_URING_CMD,
    IORING_SETUP_SQE128,
    PARAMS,
    SYS_IO_URING_ENTER,
    Params,
    Ring,
    cq_ready,
    decode_cqe,
    decode_sqe,
    encode_params,
    encode_sqe,
    encode_uring_cmd,
    probe,
    ring_slot,
    sq_free,
)
from tests.waiting import wait_until


@pytest.fixture
def ring() -> Iterator[Ring]:
    """A real 4-entry ring (skipped where this kernel has no usable io_uring), closed after."""
    why = probe()
    if why is not None:
        pytest.skip(f"io_uring unavailable: {why}")
    r = Ring(4)
    try:
        yield r
    finally:
        r.close()


def test_struct_sizes_match_the_uapi() -> None:
    assert PARAMS.size == 120  # sizeof(struct io_uring_params)
    assert CQE.size == 16
    assert len(encode_sqe(IORING_OP_NOP, -1)) == 128
    assert len(encode_sqe(IORING_OP_NOP, -1, size=64)) == 64


def test_uring_cmd_sqe_layout() -> None:
    sqe = encode_uring_cmd(7, 2, b"\xaa" * 24, user_data=0xDEADBEEF, addr=0x7F0000001000, length=2)
    assert sqe[0] == IORING_OP_URING_CMD == 46
    assert struct.unpack_from("<i", sqe, 4)[0] == 7  # fd
    assert struct.unpack_from("<I", sqe, 8)[0] == 2  # cmd_op: the low half of `off`
    assert struct.unpack_from("<Q", sqe, 16)[0] == 0x7F0000001000  # addr: the iovec array
    assert struct.unpack_from("<I", sqe, 24)[0] == 2  # len: two iovecs
    assert struct.unpack_from("<Q", sqe, 32)[0] == 0xDEADBEEF  # user_data
    assert sqe[48:72] == b"\xaa" * 24 and sqe[72:] == bytes(56)  # the command area from byte 48
    d = decode_sqe(sqe)
    assert (d["opcode"], d["fd"], d["cmd_op"], d["len"], d["user_data"]) == (46, 7, 2, 2, 0xDEADBEEF)
    with pytest.raises(ValueError):
        encode_sqe(IORING_OP_URING_CMD, 0, cmd=bytes(81))


def test_cqe_decoding() -> None:
    buf = bytes(16) + struct.pack("<QiI", 5, -107, 3)
    assert decode_cqe(buf, 16) == (5, -107, 3)


def test_params_encoding_and_offsets() -> None:
    raw = encode_params(IORING_SETUP_SQE128)
    assert len(raw) == 120 and struct.unpack_from("<I", raw, 8)[0] == IORING_SETUP_SQE128
    vals = [8, 16, IORING_SETUP_SQE128, 0, 0, 1, 0, 0, 0, 0,
            0, 4, 8, 12, 16, 20, 64, 0, 0,
            100, 104, 108, 112, 116, 128, 120, 0, 0]
    p = Params(PARAMS.pack(*vals))
    assert (p.sq_entries, p.cq_entries, p.features) == (8, 16, 1)
    assert (p.sq_off.tail, p.sq_off.array, p.cq_off.head, p.cq_off.cqes) == (4, 64, 100, 128)
    assert p.sq_ring_size == 64 + 8 * 4
    assert p.cq_ring_size == 128 + 16 * 16


def test_ring_math_wraps_u32_counters() -> None:
    assert sq_free(0, 0, 8) == 8
    assert sq_free(3, 8, 8) == 3
    assert sq_free(0xFFFF_FFFE, 2, 8) == 4  # tail wrapped past head
    assert cq_ready(10, 10) == 0
    assert cq_ready(0xFFFF_FFFF, 3) == 4
    assert ring_slot(0xFFFF_FFFF, 7) == 7
    assert ring_slot(8, 7) == 0


def test_nop_round_trip_through_a_real_ring(ring: Ring) -> None:
    r = ring
    assert r.sqe_size == 128 and r.params.sq_entries == 4
    seen = []
    for i in range(11):  # more than the ring holds: slots are reused
        r.push(encode_sqe(IORING_OP_NOP, -1, user_data=1000 + i))
        if r.pending == 3 or i == 10:
            n = r.pending
            assert r.enter(n) == n
            seen += [(ud, res) for ud, res, _ in r.reap()]
    assert seen == [(1000 + i, 0) for i in range(11)]
    for _ in range(4):
        r.push(encode_sqe(IORING_OP_NOP, -1))
    with pytest.raises(OSError):  # the SQ is full until enter() hands it over
        r.push(encode_sqe(IORING_OP_NOP, -1))
    r.enter(4)
    assert len(list(r.reap())) == 4


def test_prepared_slots_are_submitted_again_with_one_field_changed(ring: Ring) -> None:
    """A ring entry's COMMIT_AND_FETCH stays prepared in its SQE slot: `set_u64` changes one
    field (here a NOP's user_data, at byte 32) and `submit_slot` queues that slot again, as
    often as wanted, in any order of slots; push() still works beside them."""
    r = ring
    for slot in range(3):
        r.prepare(slot, encode_sqe(IORING_OP_NOP, -1, user_data=slot))
    seen = []
    for k in range(10):  # more submissions than the SQ holds: ring slots wrap, SQE slots stay
        slot = (2, 0, 1)[k % 3]
        r.set_u64(slot, 32, 1000 + k)
        r.submit_slot(slot)
        if r.pending == 3 or k == 9:
            n = r.pending
            assert r.enter(n) == n
            seen += [ud for ud, res, _ in r.reap() if res == 0]
    assert seen == [1000 + k for k in range(10)]
    r.push(encode_sqe(IORING_OP_NOP, -1, user_data=77))  # (into the ring slot's own SQE slot)
    r.enter(1)
    assert [ud for ud, _, _ in r.reap()] == [77]
    with pytest.raises(ValueError):
        r.prepare(4, encode_sqe(IORING_OP_NOP, -1))  # outside the SQE array


def test_the_ring_loop_calls_submit_wait_and_reap_like_enter_and_reap(ring: Ring) -> None:
    """What the FUSE ring thread uses: `resubmit` (set_u64 + submit_slot in one call), the bound
    `submit_and_wait` (submits exactly what is queued, then waits for one completion: asking
    the kernel to submit more than is queued would make it skip the wait) and `reap_results`
    (flat user_data, res pairs), over more rounds than the rings hold, one or several
    completions per round."""
    r = ring
    for slot in range(4):
        r.prepare(slot, encode_sqe(IORING_OP_NOP, -1, user_data=slot))
    wait = r.submit_and_wait()
    seen: list[int] = []
    for k in range(40):
        batch = 1 + k % 3  # 1, 2 or 3 SQEs queued per round
        for slot in range(batch):
            r.resubmit(slot, 32, 1000 * k + slot)
        assert r.pending == batch
        assert wait() == batch
        assert r.pending == 0
        got: list[int] = []
        while len(got) < 2 * batch:  # (NOPs complete at submission: all are there)
            got += r.reap_results()
        seen += got
    want = [v for k in range(40) for slot in range(1 + k % 3) for v in (1000 * k + slot, 0)]
    assert seen == want
    assert r.reap_results() == []
    for slot in range(4):  # the SQ is full until the kernel takes it
        r.resubmit(slot, 32, slot)
    with pytest.raises(OSError):
        r.resubmit(1, 32, 8)  # (and slot 1, queued, is left as it was)
    assert wait() == 4
    assert r.reap_results() == [0, 0, 1, 0, 2, 0, 3, 0]


def test_submit_and_wait_waits_for_a_completion(ring: Ring) -> None:
    """The bound call really sleeps in the kernel until something completes (here a poll of an
    eventfd, written only once this thread is seen blocked in io_uring_enter), and returns with
    that completion ready to reap."""
    r = ring
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    me = threading.get_native_id()

    def blocked_in_enter() -> bool:
        with open(f"/proc/self/task/{me}/syscall") as f:
            return f.read().split(" ", 1)[0] == str(SYS_IO_URING_ENTER)

    def write_once_blocked() -> None:
        try:
            wait_until(blocked_in_enter, 10, "the ring thread to sleep in io_uring_enter")
        finally:
            os.eventfd_write(efd, 1)  # (also on a timeout: the wait below must end)

    writer = threading.Thread(target=write_once_blocked)
    try:
        r.prepare(0, encode_sqe(6, efd, op_flags=0x1, user_data=99))  # IORING_OP_POLL_ADD, POLLIN
        r.resubmit(0, 32, 99)
        writer.start()
        assert r.submit_and_wait()() == 1
        assert r.reap_results() == [99, 0x1]  # (the poll's result: the events that fired)
    finally:
        writer.join()
        os.close(efd)
