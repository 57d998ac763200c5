"""virtio-fs on top of the vhost-user server: FUSE requests from guest descriptor chains.

Each chain's readable half is one FUSE request (fuse_in_header + args + WRITE data); the reply
goes into the writable half: a READ's data straight from the filesystem (preadv into guest
memory for passthrough, one copy from the decoded chunk for RAFS), anything else scattered from
the reply's buffers. A READ whose data is at hand (page cache, chunk caches) is answered by the
queue's dispatcher without the pool hand-off, and so is one that would wait on a local disk at most
(RAFS over local blob files). The same `FuseSession` as /dev/fuse answers it. Differences from
/dev/fuse handled here: FORGET/BATCH_FORGET chains are completed with 0 bytes, a reply bigger
than the guest's writable room becomes EIO (never a partial write), and a disconnect resets the
session so the next guest starts with INIT.
"""

import errno
import logging
import struct
from contextlib import AbstractContextManager

from ...fuse.abi import OUT_HEADER
from ...fuse.protocol import FuseProtocolError, FuseSession
from .backend import Backend
from .server import (
    DEFAULT_WORKERS,
    STOP_GRACE,
    Buffers,
    IntoHandler,
    RequestHandler,
    VhostUserServer,
    WaitsLocally,
)
from .virtqueue import Chain

log = logging.getLogger(__name__)

_UNIQUE = struct.Struct("<Q")
_OPCODE = struct.Struct("<I")
_OP_FORGET = 2
_OP_READ = 15
_FORGET_LEN = 48  # fuse_in_header + fuse_forget_in (what `FuseSession.defer_forget` takes)
# hiprio + request queues; Linux (up to 6.x) uses one request queue
DEFAULT_REQUEST_QUEUES = 1
HIPRIO_QUEUE = 0
# Requests that may wait on I/O (blob fetches for RAFS, disk writes and syncs for passthrough):
# READ, WRITE, FSYNC, FSYNCDIR, FALLOCATE, COPY_FILE_RANGE; the same set fusedev hands off.
# Everything else (metadata from the bootstrap or a stat) is answered by the queue's dispatcher.
OFFLOAD_OPCODES = frozenset({15, 16, 20, 30, 43, 47})


def fuse_offload(chain: Chain) -> bool:
    """Whether `chain` goes to the worker pool: a blocking opcode, or a header we can't read
    from its first buffer (a routing hint only: the request is parsed again later)."""
    r = chain.readable
    if not r or len(r[0]) < 8:
        return True
    return _OPCODE.unpack_from(r[0], 4)[0] in OFFLOAD_OPCODES


def fuse_request_handler(session: FuseSession) -> RequestHandler:
    """A server RequestHandler answering FUSE requests with `session`."""

    def handle(req: memoryview, room: int) -> Buffers | None:
        try:
            reply = session.handle_vectored(req)
        except FuseProtocolError as e:
            log.error("virtio-fs: %s", e)
            return None
        return None if reply is None else _fit(req, reply, room)

    return handle


def _fit(req: memoryview, reply: Buffers, room: int) -> Buffers | None:
    """`reply`, or EIO when it is bigger than the guest's `room` (never a partial write)."""
    size = len(reply[0]) if len(reply) == 1 else sum(len(b) for b in reply)
    if size <= room:
        return reply
    unique = _UNIQUE.unpack_from(req, 8)[0]
    log.error("virtio-fs: a %d-byte reply to request %d does not fit the guest's %d bytes", size, unique, room)
    if room < OUT_HEADER.size:
        return None
    return [OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, unique)]


def fuse_into_handler(session: FuseSession) -> IntoHandler:
    """A server IntoHandler answering FUSE requests with `session`: a READ's data goes straight
    into the chain's writable buffers (`FuseSession.handle_into`), and may be answered without
    waiting (`nowait`) when it is at hand; any other reply is returned as buffers, as
    `fuse_request_handler` does (EIO for one bigger than the guest's room)."""
    def handle(req: memoryview, chain: Chain, guard: AbstractContextManager[object], nowait: bool) -> Buffers | int | None:
        if len(req) == _FORGET_LEN and _OPCODE.unpack_from(req, 4)[0] == _OP_FORGET and session.defer_forget(req):
            return None  # applied with the others by the dispatcher's idle hook (flush_forgets)
        try:
            r = session.handle_into(req, chain.writable, guard, nowait, chain.writable_size())
        except FuseProtocolError as e:
            log.error("virtio-fs: %s", e)
            return None
        if isinstance(r, int) or r is None:
            return r
        return _fit(req, r, chain.writable_size())

    return handle


def fuse_waits_locally(session: FuseSession) -> WaitsLocally:
    """A server WaitsLocally: a READ whose filesystem waits on a local disk at most
    (`FuseSession.read_waits` False: RAFS over a local backend without a blob cache, or a
    range whose chunks are all ready in the blob cache's local files)."""
    def waits_locally(req: memoryview) -> bool:
        return len(req) >= 8 and _OPCODE.unpack_from(req, 4)[0] == _OP_READ and not session.read_waits(req)

    return waits_locally


def virtiofs_server(session: FuseSession, sock: str, *, request_queues: int = DEFAULT_REQUEST_QUEUES,
                    queue_size: int = 1024, workers: int = DEFAULT_WORKERS,
                    stop_grace: float = STOP_GRACE, max_workers: int = 0) -> VhostUserServer:
    """A (not yet started) vhost-user-fs server for `session` on unix socket `sock`.

    `request_queues` is how many request queues we offer (the front-end may use fewer); each
    running request queue gets `workers` threads (and spares up to `max_workers`, default 4 x
    workers, while all of them are busy) for the requests that may wait on I/O, and answers the
    others in its dispatcher; the hiprio queue (FORGET, INTERRUPT) has one thread."""
    if not 1 <= request_queues <= 255:
        raise ValueError("request_queues must be 1..255")

    def backend() -> Backend:
        return Backend(1 + request_queues, max_queue_size=max(queue_size, 1024))

    def queue_workers(index: int) -> int:
        return 1 if index == HIPRIO_QUEUE else workers

    return VhostUserServer(sock, fuse_request_handler(session), backend_factory=backend,
                           on_disconnect=session.reset, queue_workers=queue_workers, stop_grace=stop_grace,
                           max_workers=max_workers, offload=fuse_offload, into=fuse_into_handler(session),
                           on_idle=session.flush_forgets, waits_locally=fuse_waits_locally(session))
