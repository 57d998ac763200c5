"""The vhost-user wire format (docs/interop/vhost-user.rst), sans-IO: bytes + fds in, values out.

A message is a 12-byte little-endian header (request, flags, payload size) followed by `size`
payload bytes; file descriptors ride along as SCM_RIGHTS on the same sendmsg. Replies reuse the
request code with flags VERSION|REPLY. Decoders check every size exactly and raise
`VhostUserError` (the transport drops the connection): a frontend that sends a wrong-sized
payload is not one we can keep talking to.
"""

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
# The largest payload any request we accept carries (SET_MEM_TABLE with 8 regions is 264,
# GET/SET_CONFIG at most 12 + 256): anything bigger is a broken or hostile frontend.
MAX_PAYLOAD = 4096
MAX_FDS = 8  # QEMU's VHOST_MEMORY_BASELINE_NREGIONS: never more fds in one message
VRING_NOFD = 0x100  # kick/call/err payload bit: no fd attached (polling)
VRING_IDX_MASK = 0xFF

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (QEMU VAs)
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding
CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags


class Request(IntEnum):
    """Front-end -> back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Requests whose reply is part of the protocol (sent whether or not NEED_REPLY is set).
REPLYING = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE, Request.GET_QUEUE_NUM,
    Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS, Request.GET_INFLIGHT_FD, Request.GET_STATUS,
    Request.SET_LOG_BASE, Request.POSTCOPY_ADVISE,
})


class Feature(IntFlag):
    """Virtio device feature bits a vhost-user-fs backend deals in."""

    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL (migration dirty logging)
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32


class ProtocolFeature(IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class VhostUserError(ValueError):
    """A message that breaks the protocol (bad header, wrong payload size, missing fd)."""


@dataclass
class Message:
    """One decoded request: its payload bytes and the fds that came with it (owned by the
    receiver: whoever consumes an fd closes it, the rest are closed after handling)."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def name(self) -> str:
        return request_name(self.request)


@dataclass(frozen=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"REQUEST_{code}"


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; checks version and the payload bound."""
    if len(data) != HEADER_SIZE:
        raise VhostUserError(f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(f"{request_name(request)}: unsupported version {flags & VERSION_MASK}")
    if flags & FLAG_REPLY:
        raise VhostUserError(f"{request_name(request)}: a reply where a request was expected")
    if size > MAX_PAYLOAD:
        raise VhostUserError(f"{request_name(request)}: payload of {size} bytes exceeds {MAX_PAYLOAD}")
    return request, flags, size


def encode_request(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A front-end message (the tests' fake frontend speaks through this)."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF))


def _exact(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise VhostUserError(f"{msg.name()}: payload of {len(msg.payload)} bytes, expected {size}")


def _at_least(msg: Message, size: int) -> None:
    if len(msg.payload) < size:
        raise VhostUserError(f"{msg.name()}: payload of {len(msg.payload)} bytes, expected at least {size}")


def decode_u64(msg: Message) -> int:
    _exact(msg, U64.size)
    return int(U64.unpack(msg.payload)[0])


def decode_vring_state(msg: Message) -> tuple[int, int]:
    """(index, num) of SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE."""
    _exact(msg, VRING_STATE.size)
    index, num = VRING_STATE.unpack(msg.payload)
    return int(index), int(num)


def decode_vring_addr(msg: Message) -> VringAddr:
    _exact(msg, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(msg.payload))


def decode_vring_fd(msg: Message) -> tuple[int, int | None]:
    """(queue index, fd or None) of SET_VRING_KICK/CALL/ERR: bit 8 says "no fd" (polling)."""
    value = decode_u64(msg)
    if value & ~(VRING_IDX_MASK | VRING_NOFD):
        raise VhostUserError(f"{msg.name()}: reserved bits set in {value:#x}")
    index = value & VRING_IDX_MASK
    if value & VRING_NOFD:
        if msg.fds:
            raise VhostUserError(f"{msg.name()}: NOFD set but {len(msg.fds)} fds attached")
        return index, None
    if len(msg.fds) != 1:
        raise VhostUserError(f"{msg.name()}: expected one fd, got {len(msg.fds)}")
    return index, msg.fds[0]


def _region(buf: bytes, off: int, what: str) -> MemRegion:
    r = MemRegion(*MEM_REGION.unpack_from(buf, off))
    if r.memory_size == 0:
        raise VhostUserError(f"{what}: empty memory region")
    if r.guest_phys_addr + r.memory_size > 1 << 64 or r.userspace_addr + r.memory_size > 1 << 64:
        raise VhostUserError(f"{what}: memory region wraps the address space")
    if r.mmap_offset + r.memory_size > 1 << 63:
        raise VhostUserError(f"{what}: mmap offset out of range")
    return r


def decode_mem_table(msg: Message) -> list[tuple[MemRegion, int]]:
    """SET_MEM_TABLE: the regions, each with its fd (one fd per region, in order)."""
    _at_least(msg, MEM_TABLE_HEAD.size)
    nregions = MEM_TABLE_HEAD.unpack_from(msg.payload)[0]
    if not 0 < nregions <= MAX_FDS:
        raise VhostUserError(f"SET_MEM_TABLE: {nregions} regions (1..{MAX_FDS} allowed)")
    # QEMU always sends room for 8 regions; accept any payload that holds the counted ones
    _at_least(msg, MEM_TABLE_HEAD.size + nregions * MEM_REGION.size)
    if len(msg.fds) != nregions:
        raise VhostUserError(f"SET_MEM_TABLE: {nregions} regions but {len(msg.fds)} fds")
    return [(_region(msg.payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size, "SET_MEM_TABLE"), msg.fds[i])
            for i in range(nregions)]


def decode_mem_region(msg: Message) -> tuple[MemRegion, int | None]:
    """ADD_MEM_REG (one fd) / REM_MEM_REG (fd optional, ignored): u64 padding then one region."""
    _exact(msg, 8 + MEM_REGION.size)
    region = _region(msg.payload, 8, msg.name())
    if msg.request == Request.ADD_MEM_REG:
        if len(msg.fds) != 1:
            raise VhostUserError(f"ADD_MEM_REG: expected one fd, got {len(msg.fds)}")
        return region, msg.fds[0]
    return region, None


def decode_config(msg: Message) -> tuple[int, int, int, bytes]:
    """GET/SET_CONFIG: (offset, size, flags, data)."""
    _at_least(msg, CONFIG_HEAD.size)
    offset, size, flags = CONFIG_HEAD.unpack_from(msg.payload)
    data = msg.payload[CONFIG_HEAD.size :]
    if size > 256 or len(data) != size:
        raise VhostUserError(f"{msg.name()}: config size {size} with {len(data)} data bytes")
    return offset, size, flags, data


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    """The SET_MEM_TABLE payload a frontend sends (fds go separately)."""
    return MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(
        MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions)


def encode_mem_region(region: MemRegion) -> bytes:
    return U64.pack(0) + MEM_REGION.pack(region.guest_phys_addr, region.memory_size, region.userspace_addr,
                                         region.mmap_offset)
