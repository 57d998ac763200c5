"""The FUSE-over-io_uring ring-entry codec: struct layouts from the kernel uapi, requests joined
back from (in_header, op_in, payload), replies split into (out_header, payload)."""

import errno
import mmap

import pytest

from nydus_py.fuse.abi import GETATTR_IN, IN_HEADER, OUT_HEADER, READ_IN, Opcode
from nydus_py.fuse.uring import (
    CMD_AREA_SIZE,
    CMD_REQ,
    ENT_IN_OUT,
    ENT_IN_OUT_OFFSET,
    OP_IN_OFFSET,
    REQ_HEADER_SIZE,
    REQUEST_ROOM,
    RingEntryError,
    assemble_request,
    decode_cmd_req,
    encode_cmd_req,
    entry_commit_id,
    max_payload_size,
    place_error,
    place_reply,
    request_in_place,
)


def test_layouts_match_the_kernel_uapi() -> None:
    # include/uapi/linux/fuse.h: fuse_uring_ent_in_out is 32 bytes, fuse_uring_req_header is
    # in_out[128] + op_in[128] + ent_in_out, fuse_uring_cmd_req is 24 bytes in an 80-byte area
    assert ENT_IN_OUT.size == 32
    assert (OP_IN_OFFSET, ENT_IN_OUT_OFFSET, REQ_HEADER_SIZE) == (128, 256, 288)
    assert CMD_REQ.size == 24
    assert CMD_AREA_SIZE == 80


def test_cmd_req_encoding() -> None:
    area = encode_cmd_req(3, commit_id=0x1122334455667788)
    assert len(area) == 80
    assert area[:8] == bytes(8)  # flags
    assert area[8:16] == (0x1122334455667788).to_bytes(8, "little")
    assert area[16:18] == b"\x03\x00"
    assert area[18:] == bytes(62)
    assert decode_cmd_req(area) == (0, 0x1122334455667788, 3)
    assert decode_cmd_req(encode_cmd_req(1)) == (0, 0, 1)  # REGISTER carries no commit id
    with pytest.raises(ValueError):
        encode_cmd_req(1 << 16)


def test_max_payload_size_is_what_the_kernel_demands() -> None:
    assert max_payload_size(4096, 1) == 8192  # FUSE_MIN_READ_BUFFER
    assert max_payload_size(1 << 20, 32) == 1 << 20
    assert max_payload_size(1 << 17, 256) == 256 * 4096


def _entry(opcode: int, unique: int, op_in: bytes, payload: bytes) -> tuple[memoryview, memoryview]:
    hdr = bytearray(REQ_HEADER_SIZE)
    total = IN_HEADER.size + len(op_in) + len(payload)
    IN_HEADER.pack_into(hdr, 0, total, opcode, unique, 7, 0, 0, 0, 0, 0)
    hdr[OP_IN_OFFSET:OP_IN_OFFSET + len(op_in)] = op_in
    ENT_IN_OUT.pack_into(hdr, ENT_IN_OUT_OFFSET, 0, unique, len(payload), 0, 0)
    pay = bytearray(64 * 1024)
    pay[:len(payload)] = payload
    return memoryview(hdr), memoryview(pay)


def test_assemble_request_with_op_header_and_no_payload() -> None:
    op = READ_IN.pack(5, 4096, 8192, 0, 0, 0, 0)
    hdr, pay = _entry(Opcode.READ, 42, op, b"")
    out = memoryview(bytearray(1 << 16))
    req = assemble_request(hdr, pay, out)
    assert bytes(req) == bytes(hdr[:IN_HEADER.size]) + op
    assert entry_commit_id(hdr) == 42


def test_assemble_request_with_empty_op_header() -> None:
    # LOOKUP: in_args[0] is the zero-sized placeholder, the name travels in the payload
    hdr, pay = _entry(Opcode.LOOKUP, 9, b"", b"name\0")
    req = assemble_request(hdr, pay, memoryview(bytearray(4096)))
    assert bytes(req[IN_HEADER.size:]) == b"name\0"
    assert IN_HEADER.unpack_from(req)[0] == len(req)


def test_assemble_request_with_both() -> None:
    op = GETATTR_IN.pack(0, 0, 0)
    hdr, pay = _entry(Opcode.SETXATTR, 1, op, b"user.x\0value")
    req = assemble_request(hdr, pay, memoryview(bytearray(4096)))
    assert bytes(req[IN_HEADER.size:]) == op + b"user.x\0value"


def test_assemble_request_rejects_inconsistent_lengths() -> None:
    hdr, pay = _entry(Opcode.READ, 1, b"", b"")
    IN_HEADER.pack_into(hdr, 0, IN_HEADER.size + 129, Opcode.READ, 1, 0, 0, 0, 0, 0, 0)  # op header > 128
    with pytest.raises(RingEntryError):
        assemble_request(hdr, pay, memoryview(bytearray(4096)))
    IN_HEADER.pack_into(hdr, 0, IN_HEADER.size - 1, Opcode.READ, 1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(RingEntryError):
        assemble_request(hdr, pay, memoryview(bytearray(4096)))
    hdr, pay = _entry(Opcode.WRITE, 1, b"", b"x" * 5000)
    with pytest.raises(RingEntryError):  # does not fit the scratch buffer
        assemble_request(hdr, pay, memoryview(bytearray(4096)))


def _in_place(hdr: memoryview, pay: memoryview, room: int = 64 * 1024) -> tuple[memoryview, memoryview]:
    """The entry's payload mapping as the transport lays it out: REQUEST_ROOM bytes, then the
    payload buffer the kernel filled."""
    buf = memoryview(bytearray(REQUEST_ROOM + room))
    buf[REQUEST_ROOM:REQUEST_ROOM + min(room, len(pay))] = pay[:room]
    return request_in_place(hdr, buf), buf


@pytest.mark.parametrize("opcode, op_in, payload", [
    (Opcode.READ, READ_IN.pack(5, 4096, 8192, 0, 0, 0, 0), b""),
    (Opcode.LOOKUP, b"", b"name\0"),
    (Opcode.SETXATTR, GETATTR_IN.pack(0, 0, 0), b"user.x\0value"),
    (Opcode.SETXATTR, bytes(range(128)), b"p" * 9000),  # the largest op header
], ids=["read", "lookup", "setxattr", "largest-op-header"])
def test_request_in_place_equals_the_assembled_request(opcode: int, op_in: bytes, payload: bytes) -> None:
    hdr, pay = _entry(opcode, 42, op_in, payload)
    req, buf = _in_place(hdr, pay)
    assert bytes(req) == bytes(assemble_request(hdr, pay, memoryview(bytearray(1 << 16))))
    assert bytes(req) == bytes(hdr[:IN_HEADER.size]) + op_in + payload
    # the payload is the kernel's own bytes, not a copy
    if payload:
        buf[REQUEST_ROOM] ^= 0xFF
        assert req[IN_HEADER.size + len(op_in)] == payload[0] ^ 0xFF


def test_request_in_place_rejects_what_assemble_rejects() -> None:
    hdr, pay = _entry(Opcode.READ, 1, b"", b"")
    IN_HEADER.pack_into(hdr, 0, IN_HEADER.size + 129, Opcode.READ, 1, 0, 0, 0, 0, 0, 0)  # op header > 128
    with pytest.raises(RingEntryError):
        _in_place(hdr, pay)
    IN_HEADER.pack_into(hdr, 0, IN_HEADER.size - 1, Opcode.READ, 1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(RingEntryError):
        _in_place(hdr, pay)
    hdr, pay = _entry(Opcode.WRITE, 1, b"", b"x" * 5000)
    with pytest.raises(RingEntryError):  # a payload size beyond the registered buffer
        _in_place(hdr, pay, room=4096)


def test_place_reply_splits_header_and_gathered_data() -> None:
    hdr = memoryview(bytearray(REQ_HEADER_SIZE))
    pay = memoryview(mmap.mmap(-1, 8192))
    head = OUT_HEADER.pack(16 + 6000, 0, 77)
    data = memoryview(bytes(range(256)) * 24)[:6000]
    assert place_reply([head, data], hdr, pay) == 6000
    assert bytes(hdr[:16]) == head
    assert bytes(pay[:6000]) == bytes(data)
    assert ENT_IN_OUT.unpack_from(hdr, ENT_IN_OUT_OFFSET)[2] == 6000
    # a single joined reply too; the payload size shrinks with it
    assert place_reply(OUT_HEADER.pack(20, 0, 78) + b"abcd", hdr, pay) == 4
    assert bytes(pay[:4]) == b"abcd"
    assert ENT_IN_OUT.unpack_from(hdr, ENT_IN_OUT_OFFSET)[2] == 4


def test_place_reply_too_big_or_too_short() -> None:
    hdr = memoryview(bytearray(REQ_HEADER_SIZE))
    pay = memoryview(bytearray(100))
    with pytest.raises(RingEntryError):
        place_reply([OUT_HEADER.pack(16 + 101, 0, 1), b"x" * 101], hdr, pay)
    with pytest.raises(RingEntryError):
        place_reply(b"short", hdr, pay)


def test_place_error() -> None:
    hdr = memoryview(bytearray(REQ_HEADER_SIZE))
    ENT_IN_OUT.pack_into(hdr, ENT_IN_OUT_OFFSET, 0, 5, 999, 0, 0)
    place_error(hdr, 5, -errno.EIO)
    assert OUT_HEADER.unpack_from(hdr) == (16, -errno.EIO, 5)
    assert ENT_IN_OUT.unpack_from(hdr, ENT_IN_OUT_OFFSET)[2] == 0
