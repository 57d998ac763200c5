"""The vhost-user back-end state machine over decoded messages (no sockets, no threads).

`Backend.handle(msg)` applies one front-end request and returns the reply bytes to send (or
None). The transport serves running queues through two synchronous callbacks: `on_start(vring)`
once a ring is ready, `on_stop(vring)` before anything it uses changes (stop, kick swap, memory
change); `on_stop` must return only once that queue's worker is idle, so e.g. GET_VRING_BASE
answers the final index. Memory regions are mapped through an injectable `mapper` (mmap by
default) so tests can hand in plain buffers.

Policy choices (see VIRTIOFS-NOTES.md §4):
* A ring runs from SET_VRING_KICK (with addresses and memory known) until GET_VRING_BASE or
  RESET_OWNER; SET_VRING_ENABLE is recorded but advisory (some QEMUs never send it).
* Requests that fail semantically (unknown queue, unmapped ring) are answered with a failure
  ack when REPLY_ACK asked for one, and logged; malformed messages raise VhostUserError and
  the transport drops the connection.
* Dirty logging (LOG_ALL, LOG_SHMFD) is never offered: SET_LOG_BASE/SET_LOG_FD are refused.
"""

import contextlib
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable

from . import messages as M
from .messages import Feature, Message, ProtocolFeature, Request, VhostUserError
from .virtqueue import GuestMemory, Region, RingError, Virtqueue

log = logging.getLogger(__name__)

DEFAULT_FEATURES = Feature.VERSION_1 | Feature.PROTOCOL_FEATURES | Feature.INDIRECT_DESC | Feature.EVENT_IDX
DEFAULT_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS)
MAX_MEM_SLOTS = 32
VIRTIO_FS_TAG_SIZE = 36

Mapper = Callable[[int, int], "mmap.mmap | bytearray"]


def mmap_mapper(fd: int, length: int) -> mmap.mmap:
    """Map `length` bytes of `fd` from offset 0, shared and read-write (as the spec asks).

    A region reaching past the end of its file would map fine and then kill us with SIGBUS on
    first touch, so the file must be at least that long now. (A front-end that shrinks it
    later can still do that; QEMU never does, and virtiofsd has the same exposure.)"""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < length:
        raise ValueError(f"region needs {length} bytes of a {st.st_size}-byte file")
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class Vring:
    """Per-queue configuration as the front-end sets it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.base = 0
        self.addr: M.VringAddr | None = None
        self.kick: int | None = None
        self.kick_set = False  # SET_VRING_KICK seen (fd or polling)
        self.err: int | None = None
        self.enabled = False
        self.started = False
        self.queue: Virtqueue | None = None
        self._call: int | None = None
        self.call_lock = threading.Lock()

    def set_call(self, fd: int | None) -> None:
        # Under the lock: a worker signalling at the same moment never writes to a closed (and
        # perhaps reused) fd number.
        with self.call_lock:
            old, self._call = self._call, fd
        if old is not None:
            _close(old)

    def signal(self) -> None:
        with self.call_lock:
            if self._call is not None:
                try:
                    os.eventfd_write(self._call, 1)
                except OSError as e:
                    log.warning("queue %d: call eventfd write failed: %s", self.index, e)

    def close(self) -> None:
        self.set_call(None)
        for fd in (self.kick, self.err):
            if fd is not None:
                _close(fd)
        self.kick = self.err = None
        self.kick_set = False


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Backend:
    """One front-end connection's device state."""

    def __init__(self, num_queues: int = 2, *, features: int = DEFAULT_FEATURES,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES, max_queue_size: int = 1024,
                 tag: str | None = None, mapper: Mapper = mmap_mapper) -> None:
        if not 1 <= num_queues <= 256:
            raise ValueError("num_queues must be 1..256")
        self.num_queues = num_queues
        self.offered = int(features) | Feature.PROTOCOL_FEATURES | Feature.VERSION_1
        self.offered_protocol = int(protocol_features)
        if tag is not None:
            self.offered_protocol |= ProtocolFeature.CONFIG
        self.tag = tag
        self.max_queue_size = max_queue_size
        self.mapper = mapper
        self.acked = 0
        self.acked_protocol = 0
        self.owner = False
        self.memory = GuestMemory()
        self._slots: list[tuple[M.MemRegion, Region, object]] = []  # (region, mapped, mapping)
        self.vrings = [Vring(i) for i in range(num_queues)]
        self.on_start: Callable[[Vring], None] = _noop
        self.on_stop: Callable[[Vring], None] = _noop
        self._consumed: set[int] = set()
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.RESET_DEVICE: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_LOG_BASE: self._refuse_log,
            Request.SET_LOG_FD: self._refuse_log,
        }

    # -- public ----------------------------------------------------------------------------
    def handle(self, msg: Message) -> bytes | None:
        """Apply one request; the reply to send (if any). Fds in `msg` are consumed: those the
        state keeps are taken, all others are closed here."""
        fn = self._handlers.get(msg.request)
        self._consumed = set()
        try:
            if fn is None:
                raise _Refused(f"unsupported request {msg.name()}")
            reply = fn(msg)
            ok = True
        except _Refused as e:
            log.error("vhost-user %s refused: %s", msg.name(), e)
            reply = None
            ok = False
        finally:
            for fd in msg.fds:
                if fd not in self._consumed:
                    _close(fd)
            self._consumed = set()
        if reply is not None:
            return reply
        if msg.request in M.REPLYING:
            # a request whose reply is part of the protocol gets one even on failure
            return M.encode_u64_reply(msg.request, 0 if ok else 1)
        if msg.need_reply and self.acked_protocol & ProtocolFeature.REPLY_ACK:
            return M.encode_u64_reply(msg.request, 0 if ok else 1)
        return None

    def event_idx(self) -> bool:
        return bool(self.acked & Feature.EVENT_IDX)

    def indirect(self) -> bool:
        return bool(self.acked & Feature.INDIRECT_DESC)

    def close(self) -> None:
        """The connection is gone: stop every queue and release fds and mappings."""
        for vr in self.vrings:
            self._stop(vr)
            vr.close()
            vr.queue = None
        slots, self._slots = self._slots, []
        self.memory = GuestMemory()
        # unmap now rather than whenever the cycle collector gets to us (each mapping holds a
        # dup of the guest's memfd); a mapping a stuck worker still reads stays until it lets go
        for _, region, mapping in slots:
            with contextlib.suppress(BufferError):
                region.view.release()
                close = getattr(mapping, "close", None)
                if close is not None:
                    close()

    # -- helpers ---------------------------------------------------------------------------
    def _take(self, fd: int) -> int:
        self._consumed.add(fd)
        return fd

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < self.num_queues:
            raise _Refused(f"queue index {index} out of 0..{self.num_queues - 1}")
        return self.vrings[index]

    def _build(self, vr: Vring) -> Virtqueue:
        assert vr.addr is not None
        last = vr.queue.last_avail if vr.queue is not None else vr.base
        return Virtqueue(self.memory, vr.num, vr.addr.desc, vr.addr.avail, vr.addr.used,
                         last_avail=last, indirect=self.indirect(), event_idx=self.event_idx())

    def _maybe_start(self, vr: Vring) -> None:
        if vr.started or not vr.kick_set or vr.addr is None or vr.num == 0:
            return
        try:
            vr.queue = self._build(vr)
        except RingError as e:
            raise _Refused(f"queue {vr.index}: {e}") from None
        vr.started = True
        self.on_start(vr)

    def _stop(self, vr: Vring) -> None:
        """Stop serving `vr` (returns once its worker is idle); its Virtqueue keeps the index."""
        if vr.started:
            vr.started = False
            self.on_stop(vr)

    # -- features --------------------------------------------------------------------------
    def _get_features(self, msg: Message) -> bytes:
        return M.encode_u64_reply(msg.request, self.offered)

    def _set_features(self, msg: Message) -> None:
        value = M.decode_u64(msg)
        if value & ~self.offered:
            raise _Refused(f"features {value:#x} include bits not offered ({self.offered:#x})")
        running = [vr for vr in self.vrings if vr.started]
        for vr in running:
            self._stop(vr)
        self.acked = value
        for vr in running:
            self._maybe_start(vr)

    def _get_protocol_features(self, msg: Message) -> bytes:
        return M.encode_u64_reply(msg.request, self.offered_protocol)

    def _set_protocol_features(self, msg: Message) -> None:
        value = M.decode_u64(msg)
        if value & ~self.offered_protocol:
            raise _Refused(f"protocol features {value:#x} include bits not offered")
        self.acked_protocol = value

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        for vr in self.vrings:
            self._stop(vr)
            vr.close()
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self.acked = 0
        self.owner = False

    def _get_queue_num(self, msg: Message) -> bytes:
        return M.encode_u64_reply(msg.request, self.num_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return M.encode_u64_reply(msg.request, MAX_MEM_SLOTS)

    def _refuse_log(self, msg: Message) -> None:
        raise _Refused("dirty logging (migration) is not supported")

    def _set_backend_req_fd(self, msg: Message) -> None:
        # Not offered (no DAX, no notifications); accept and close the channel.
        return None

    # -- config space ----------------------------------------------------------------------
    def _config_space(self) -> bytes:
        tag = (self.tag or "").encode()[:VIRTIO_FS_TAG_SIZE]
        return tag.ljust(VIRTIO_FS_TAG_SIZE, b"\0") + (self.num_queues - 1).to_bytes(4, "little")

    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = M.decode_config(msg)
        if self.tag is None:
            raise _Refused("no config space offered")
        space = self._config_space()
        data = space[offset : offset + size].ljust(size, b"\0")
        return M.encode_reply(msg.request, M.CONFIG_HEAD.pack(offset, size, flags) + data)

    def _set_config(self, msg: Message) -> None:
        M.decode_config(msg)
        raise _Refused("the virtio-fs config space is read-only")

    # -- memory ----------------------------------------------------------------------------
    def _map(self, region: M.MemRegion, fd: int) -> tuple[Region, object]:
        try:
            mapping = self.mapper(fd, region.mmap_offset + region.memory_size)
        except (OSError, ValueError, OverflowError) as e:
            raise _Refused(f"cannot map region gpa {region.guest_phys_addr:#x}: {e}") from None
        view = memoryview(mapping)[region.mmap_offset : region.mmap_offset + region.memory_size]
        if len(view) != region.memory_size:
            raise _Refused("mapping shorter than the region")
        return Region(region.guest_phys_addr, region.memory_size, region.userspace_addr, view), mapping

    def _publish_memory(self, slots: list[tuple[M.MemRegion, Region, object]]) -> None:
        """Swap the memory table with running queues stopped around it (their rings are
        translated again; one that no longer maps stays stopped)."""
        running = [vr for vr in self.vrings if vr.started]
        for vr in running:
            self._stop(vr)
        self._slots = slots
        self.memory = GuestMemory([r for _, r, _ in slots])
        for vr in running:
            try:
                self._maybe_start(vr)
            except _Refused as e:
                log.error("queue %d no longer mapped after a memory change: %s", vr.index, e)

    @staticmethod
    def _check_overlap(slots: list[M.MemRegion]) -> None:
        spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in slots)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise _Refused("memory regions overlap")

    def _set_mem_table(self, msg: Message) -> None:
        pairs = M.decode_mem_table(msg)
        self._check_overlap([r for r, _ in pairs])
        slots = []
        for region, fd in pairs:
            mapped, mapping = self._map(region, fd)
            slots.append((region, mapped, mapping))
        self._publish_memory(slots)

    def _add_mem_reg(self, msg: Message) -> None:
        region, fd = M.decode_mem_region(msg)
        assert fd is not None
        if len(self._slots) >= MAX_MEM_SLOTS:
            raise _Refused(f"more than {MAX_MEM_SLOTS} memory regions")
        self._check_overlap([r for r, _, _ in self._slots] + [region])
        mapped, mapping = self._map(region, fd)
        self._publish_memory([*self._slots, (region, mapped, mapping)])

    def _rem_mem_reg(self, msg: Message) -> None:
        region, _ = M.decode_mem_region(msg)
        keep = [s for s in self._slots if not (s[0].guest_phys_addr == region.guest_phys_addr
                                                and s[0].memory_size == region.memory_size
                                                and s[0].userspace_addr == region.userspace_addr)]
        if len(keep) == len(self._slots):
            raise _Refused(f"no region at gpa {region.guest_phys_addr:#x} to remove")
        self._publish_memory(keep)

    # -- vrings ----------------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> None:
        index, num = M.decode_vring_state(msg)
        vr = self._vring(index)
        if not 0 < num <= self.max_queue_size or num & (num - 1):
            raise _Refused(f"queue {index}: size {num} (power of two up to {self.max_queue_size})")
        if vr.started:
            raise _Refused(f"queue {index}: size change while running")
        vr.num = num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = M.decode_vring_addr(msg)
        vr = self._vring(addr.index)
        if addr.flags & 1:
            raise _Refused("dirty logging of used rings is not supported")
        if vr.started:
            raise _Refused(f"queue {addr.index}: address change while running")
        vr.addr = addr
        self._maybe_start(vr)

    def _set_vring_base(self, msg: Message) -> None:
        index, base = M.decode_vring_state(msg)
        vr = self._vring(index)
        if vr.started:
            raise _Refused(f"queue {index}: base change while running")
        vr.base = base & 0xFFFF
        vr.queue = None

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = M.decode_vring_state(msg)
        vr = self._vring(index)
        self._stop(vr)
        base = vr.queue.last_avail if vr.queue is not None else vr.base
        vr.base = base
        vr.queue = None
        # the kick fd belongs to the stopped ring; a restart sends a new one
        if vr.kick is not None:
            _close(vr.kick)
        vr.kick = None
        vr.kick_set = False
        return M.encode_reply(msg.request, M.VRING_STATE.pack(index, base))

    def _set_vring_kick(self, msg: Message) -> None:
        index, fd = M.decode_vring_fd(msg)
        vr = self._vring(index)
        # a new kick fd for a running ring: stop and restart it around the swap
        self._stop(vr)
        if vr.kick is not None:
            _close(vr.kick)
        vr.kick = self._take(fd) if fd is not None else None
        vr.kick_set = True
        self._maybe_start(vr)

    def _set_vring_call(self, msg: Message) -> None:
        index, fd = M.decode_vring_fd(msg)
        vr = self._vring(index)
        vr.set_call(self._take(fd) if fd is not None else None)

    def _set_vring_err(self, msg: Message) -> None:
        index, fd = M.decode_vring_fd(msg)
        vr = self._vring(index)
        if vr.err is not None:
            _close(vr.err)
        vr.err = self._take(fd) if fd is not None else None

    def _set_vring_enable(self, msg: Message) -> None:
        index, enable = M.decode_vring_state(msg)
        if enable > 1:
            raise VhostUserError(f"SET_VRING_ENABLE: value {enable}")
        self._vring(index).enabled = bool(enable)


def _noop(vr: Vring) -> None:
    return None


class _Refused(Exception):
    """A well-formed request we can't honour (answered with a failure ack)."""


__all__ = ["DEFAULT_FEATURES", "DEFAULT_PROTOCOL_FEATURES", "Backend", "Vring",
           "VhostUserError", "mmap_mapper"]
