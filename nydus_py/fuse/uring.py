"""FUSE over io_uring: the ring-entry wire format (uapi 7.42+), sans-IO.

The system's linux/fuse.h (7.38) predates these; they come from the kernel's
include/uapi/linux/fuse.h and fs/fuse/dev_uring.c. Each ring entry is two buffers the daemon
registers once: a 288-byte `fuse_uring_req_header` (fuse_in_header / fuse_out_header, the
per-op header, `fuse_uring_ent_in_out`) and a payload buffer of at least `max_payload_size`.
The kernel splits a request across them; `assemble_request` joins them back into the bytes
`FuseSession.handle*` expects, and `place_reply` splits a reply the other way, so the
protocol code is the same for both transports.
"""

import struct
from collections.abc import Sequence

from .abi import IN_HEADER, OUT_HEADER

IN_OUT_HEADER_SZ = 128  # FUSE_URING_IN_OUT_HEADER_SZ
OP_IN_OUT_SZ = 128  # FUSE_URING_OP_IN_OUT_SZ
OP_IN_OFFSET = IN_OUT_HEADER_SZ
# struct fuse_uring_ent_in_out: flags, commit_id, payload_sz, padding, reserved
ENT_IN_OUT = struct.Struct("<QQIIQ")
ENT_IN_OUT_OFFSET = IN_OUT_HEADER_SZ + OP_IN_OUT_SZ
REQ_HEADER_SIZE = ENT_IN_OUT_OFFSET + ENT_IN_OUT.size  # sizeof(struct fuse_uring_req_header) == 288
# struct fuse_uring_cmd_req (in the SQE's 80-byte command area): flags, commit_id, qid, padding[6]
CMD_REQ = struct.Struct("<QQH6x")
CMD_AREA_SIZE = 80

# enum fuse_uring_cmd (the SQE's cmd_op)
CMD_REGISTER = 1
CMD_COMMIT_AND_FETCH = 2

PAGE_SIZE = 4096
MIN_READ_BUFFER = 8192
_PAYLOAD_SZ = struct.Struct("<I")
_PAYLOAD_SZ_OFFSET = ENT_IN_OUT_OFFSET + 16
# in_header.len and ent_in_out.payload_sz, read with one call
_LENGTHS = struct.Struct(f"<I{_PAYLOAD_SZ_OFFSET - 4}xI")
_OUT_SIZE = OUT_HEADER.size
_U32 = struct.Struct("<I")
_IN_HEADER_SIZE = IN_HEADER.size
_SHORT = 512  # reply bytes copied by slicing; longer ones through a memoryview
# bytes before an entry's payload buffer, where `request_in_place` puts the in_header and the
# op header (40 + up to 128)
REQUEST_ROOM = 256


class RingEntryError(ValueError):
    """A ring entry whose headers do not describe a request that fits (kernel/daemon mismatch)."""


def max_payload_size(max_write: int, max_pages: int) -> int:
    """The smallest payload buffer the kernel accepts at REGISTER (fuse_uring_create:
    max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE))."""
    return max(MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE)


def encode_cmd_req(qid: int, commit_id: int = 0, flags: int = 0) -> bytes:
    """The SQE command area (80 bytes, zero-padded) for REGISTER (commit_id 0) or
    COMMIT_AND_FETCH (commit_id = the request's unique)."""
    if not 0 <= qid < 1 << 16:
        raise ValueError(f"queue id {qid} out of range")
    return CMD_REQ.pack(flags, commit_id, qid).ljust(CMD_AREA_SIZE, b"\0")


def decode_cmd_req(area: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(flags, commit_id, qid) of a command area (for tests and debugging)."""
    flags, commit_id, qid = CMD_REQ.unpack_from(area)
    return flags, commit_id, qid


def entry_commit_id(headers: bytes | bytearray | memoryview) -> int:
    """The commit id the kernel gave this entry's request (its unique)."""
    return int(ENT_IN_OUT.unpack_from(headers, ENT_IN_OUT_OFFSET)[1])


def assemble_request(headers: memoryview, payload: memoryview, out: memoryview) -> memoryview:
    """Join a fetched entry back into one FUSE request (in_header, op header, payload) in `out`.

    The kernel fills `in_out` with the fuse_in_header, `op_in` with in_args[0] (the per-op
    header, empty for ops like LOOKUP) and the payload with the other in_args; in_header.len
    is the total, so the op header's size is what remains after the payload."""
    total, payload_sz = _LENGTHS.unpack_from(headers)
    h = _IN_HEADER_SIZE
    op_sz = total - h - payload_sz
    if not 0 <= op_sz <= OP_IN_OUT_SZ or payload_sz > len(payload) or total > len(out):
        raise RingEntryError(f"ring entry: request length {total}, payload {payload_sz}: does not fit")
    out[:h] = headers[:h]
    if op_sz:
        out[h:h + op_sz] = headers[OP_IN_OFFSET:OP_IN_OFFSET + op_sz]
    if payload_sz:
        out[h + op_sz:total] = payload[:payload_sz]
    return out[:total]


def request_in_place(headers: memoryview, buf: memoryview) -> memoryview:
    """Join a fetched entry into one FUSE request without copying its payload: `buf` is the
    entry's payload mapping, whose first REQUEST_ROOM bytes are ours (the kernel is given the
    rest as the payload buffer). The in_header and op header are copied just before the
    payload, so a LOOKUP's name or a WRITE's data stays where the kernel put it. The same
    checks as `assemble_request`."""
    total, payload_sz = _LENGTHS.unpack_from(headers)
    h = _IN_HEADER_SIZE
    op_sz = total - h - payload_sz
    if not 0 <= op_sz <= OP_IN_OUT_SZ or payload_sz > len(buf) - REQUEST_ROOM:
        raise RingEntryError(f"ring entry: request length {total}, payload {payload_sz}: does not fit")
    start = REQUEST_ROOM - h - op_sz
    buf[start:start + h] = headers[:h]
    if op_sz:
        buf[start + h:REQUEST_ROOM] = headers[OP_IN_OFFSET:OP_IN_OFFSET + op_sz]
    return buf[start:REQUEST_ROOM + payload_sz]


def place_reply(reply: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview],
                headers: memoryview, payload: memoryview) -> int:
    """Split a reply (bytes or gathered buffers, fuse_out_header first) into the entry: the
    out header into `in_out`, the rest into the payload buffer, its size into
    ent_in_out.payload_sz. Returns the payload size. RingEntryError when it does not fit
    (the caller answers EIO instead)."""
    bufs = reply if type(reply) is list else (reply,) if isinstance(reply, bytes | bytearray | memoryview) else reply
    first = bufs[0]
    if type(first) is not bytes:
        first = _bytes_view(first)
    n = len(first) - _OUT_SIZE
    if n < 0:
        raise RingEntryError("reply shorter than fuse_out_header")
    if n > len(payload):
        raise RingEntryError(f"reply payload {n} bytes exceeds the {len(payload)}-byte ring buffer")
    headers[:_OUT_SIZE] = first[:_OUT_SIZE]
    if n:  # (a slice of bytes is a copy: a long one, a READDIRPLUS page, is taken as a view)
        payload[:n] = first[_OUT_SIZE:] if n <= _SHORT else memoryview(first)[_OUT_SIZE:]
    pos = n
    if len(bufs) > 1:
        for b in bufs[1:]:
            part = _bytes_view(b)
            n = len(part)
            if pos + n > len(payload):
                raise RingEntryError(f"reply payload {pos + n} bytes exceeds the {len(payload)}-byte ring buffer")
            payload[pos:pos + n] = part
            pos += n
    _PAYLOAD_SZ.pack_into(headers, _PAYLOAD_SZ_OFFSET, pos)
    return pos


def _bytes_view(b: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """`b` as something whose len() and slices count bytes."""
    if type(b) is bytes or type(b) is bytearray:
        return b
    v = memoryview(b)
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


def place_error(headers: memoryview, unique: int, error: int) -> None:
    """An error-only reply (negative errno) in the entry."""
    OUT_HEADER.pack_into(headers, 0, OUT_HEADER.size, error, unique)
    _PAYLOAD_SZ.pack_into(headers, _PAYLOAD_SZ_OFFSET, 0)
