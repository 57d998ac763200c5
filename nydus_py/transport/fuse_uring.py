"""FUSE over io_uring (kernel 6.14+): requests arrive in registered ring entries instead of
read(2) on /dev/fuse, and a reply is committed together with the fetch of the next request
(FUSE_IO_URING_CMD_COMMIT_AND_FETCH), one io_uring_enter for a whole batch.

The INIT handshake still goes over /dev/fuse, and so do FORGET, INTERRUPT and notifications,
so a `FuseDevSession` serves the mount as usual; after the INIT reply that negotiated
FUSE_OVER_IO_URING, `workers` ring threads per queue register `depth` entries each. The kernel
has one queue per possible CPU and routes a request to the queue of the CPU its caller runs on;
it holds every request back until all queues have an entry, then switches to the ring for good.

A ring thread never waits on anything slower than a local disk: requests that may (a READ that
`read_waits` says may wait on a fetch, writes, syncs) are handed to a small pool of threads
(`max_workers` for the session), which write the reply into the entry and wake the ring thread
through an eventfd polled in its ring; the ring thread sends the commit. So one thread with
several entries serves a queue: concurrent requests from one CPU are answered in one batch per
io_uring_enter, without thread switches, and metadata never queues behind a fetch (as long as
the queue has entries left: `depth` is sized above the pool).

Fallbacks (logged, counted in `stats`): io_uring unusable in this process, the module
parameter fuse.enable_uring is N (the kernel then does not offer FUSE_OVER_IO_URING), or a
queue fails to set up. Requests then keep flowing through the /dev/fuse workers. We never
flip /sys/module/fuse/parameters/enable_uring ourselves: it is host-wide policy (every later
FUSE mount is offered the ring), so it stays the administrator's decision.
"""

import collections
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Protocol

from ..fuse.abi import IN_HEADER, InitFlags
from ..fuse.uring import (
    CMD_COMMIT_AND_FETCH,
    CMD_REGISTER,
    ENT_IN_OUT_OFFSET,
    REQ_HEADER_SIZE,
    REQUEST_ROOM,
    encode_cmd_req,
    max_payload_size,
    place_error,
    place_reply,
    request_in_place,
)
from .fusedev import (
    _HANDOFF_OPCODES,
    _READ_SIZE,
    _READ_SIZE_END,
    DEFAULT_POLL_US,
    FUSE_READ,
    KEEP_READ_MAX,
    FuseDevSession,
    Handler,
)
from .io_uring import SQE_HEAD, Ring, encode_sqe, encode_uring_cmd, mmap_address, probe

log = logging.getLogger(__name__)

ENABLE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"
DEFAULT_WORKERS = 1  # ring threads per queue
DEFAULT_MAX_WORKERS = 16  # threads answering requests that may block, for the whole session
DEFAULT_DEPTH = DEFAULT_MAX_WORKERS + 4  # entries per ring thread: handed-off requests hold theirs
JOIN_TIMEOUT = 10.0
# what the kernel sends over /dev/fuse even when the ring serves the rest: INIT, FORGET,
# INTERRUPT, BATCH_FORGET
_DEV_ALWAYS = frozenset({26, 2, 36, 42})
_COMMIT_ID_OFFSET = SQE_HEAD.size + 8  # fuse_uring_cmd_req.commit_id in the SQE's command area
_ENT_COMMIT_ID_Q = (ENT_IN_OUT_OFFSET + 8) >> 3  # fuse_uring_ent_in_out.commit_id, as a u64 index
ReadWaits = Callable[[memoryview], bool]
_WAKE = 1 << 32  # user_data of the eventfd poll (entries are 0..depth-1)
IORING_OP_POLL_ADD = 6
_POLLIN = 0x1
# CQE results that mean "the connection is going away", not a failure
_TEARDOWN = frozenset({-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ECANCELED})


class UringSession(Protocol):
    """What the transport needs of a `FuseSession`."""

    max_write: int
    max_pages: int
    transport_flags: int
    flags: InitFlags

    def handle_vectored(self, req: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview] | None:
        """The reply to one request as buffers to write in order (None: no reply)."""


def possible_cpus(text: str) -> int:
    """How many queues the kernel makes: num_possible_cpus(), from a cpu list like '0-3,5'."""
    n = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def read_possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        return possible_cpus(f.read())


def enable_uring_param(path: str = ENABLE_URING_PARAM) -> str | None:
    """None when the fuse module offers io_uring to new connections, else why not."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError as e:
        return f"{path}: {e.strerror} (this kernel has no FUSE over io_uring)"
    if value not in ("Y", "1"):
        return f"{path} is {value} (set it to Y to allow FUSE over io_uring)"
    return None


class UringStats:
    """Counters for the metrics API."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requested = True
        self.active = False  # INIT negotiated the ring and every queue registered its entries
        self.fallbacks = 0
        self.fallback_reason = ""
        self.queues = 0
        self.entries = 0
        self.ring_requests = 0  # requests that arrived in ring entries (the sum of queue_requests)
        self.dev_requests = 0  # requests read from /dev/fuse, but for INIT, FORGET and INTERRUPT
        self.worker_requests: list[int] = []  # per ring thread (each the only writer of its slot)
        self.worker_qid: list[int] = []  # the queue of each ring thread
        # per ring thread: READs it answered itself (read_waits said they wait on nothing slower
        # than a local disk), and requests it handed to the pool (they may wait)
        self.worker_kept: list[int] = []
        self.worker_handed: list[int] = []
        self.pool_threads = 0  # threads of the hand-off pool started so far
        self.register_failures = 0
        self.commit_failures = 0
        self.entry_errors = 0  # entries that could not be decoded or answered (EIO committed)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int | str | bool | list[int]]:
        with self.lock:
            out = {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items() if k != "lock"}
            per, qids = list(self.worker_requests), list(self.worker_qid)
        queue_requests = [0] * max(self.queues, max(qids, default=-1) + 1)  # per queue (the caller's CPU)
        for n, q in zip(per, qids, strict=True):
            queue_requests[q] += n
        out["queue_requests"] = queue_requests
        out["ring_requests"] = sum(per)
        out["reads_kept"] = sum(out.pop("worker_kept"))
        out["handed_off"] = sum(out.pop("worker_handed"))
        return out


class _Entry:
    """One ring entry: its two registered buffers and the iovec array that points at them. The
    payload mapping starts with REQUEST_ROOM bytes of ours before the registered payload
    buffer: a request is joined there in place (`request_in_place`), its payload not copied."""

    def __init__(self, index: int, payload_size: int) -> None:
        self.index = index
        self.hdr = mmap.mmap(-1, mmap.PAGESIZE)
        # pages become resident as requests and replies touch them
        self.payload = mmap.mmap(-1, REQUEST_ROOM + payload_size)
        hdr_addr, self._hdr_anchor = mmap_address(self.hdr)
        pay_addr, self._pay_anchor = mmap_address(self.payload)
        self.iov = (ctypes.c_uint64 * 4)(hdr_addr, REQ_HEADER_SIZE, pay_addr + REQUEST_ROOM, payload_size)
        self.hdr_view = memoryview(self.hdr)[:REQ_HEADER_SIZE]
        self.hdr64 = self.hdr_view.cast("Q")  # (the commit id, one item read per request)
        self.buf = memoryview(self.payload)
        self.pay_view = self.buf[REQUEST_ROOM:]
        self.armed = False  # its SQE slot holds its COMMIT_AND_FETCH (after the first request)

    def close(self) -> None:
        for v in (self.hdr64, self.hdr_view, self.pay_view, self.buf):
            v.release()
        del self._hdr_anchor, self._pay_anchor
        for m in (self.hdr, self.payload):
            with contextlib.suppress(BufferError):
                m.close()


class _Pool:
    """Daemon threads for requests that may block, started as needed up to `limit` and kept
    (idle ones wait on the task queue). Every task runs: a task queued at the limit waits for
    a thread, its ring entry meanwhile held (`DEFAULT_DEPTH` leaves entries for the rest)."""

    def __init__(self, limit: int, stats: UringStats) -> None:
        self.limit = max(1, limit)
        self.stats = stats
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1  # (that thread takes it)
                start = False
            else:
                start = len(self._threads) < self.limit
                if start:
                    t = threading.Thread(target=self._work, name=f"fuse-uring-io-{len(self._threads)}", daemon=True)
                    self._threads.append(t)
        self._tasks.put(task)
        if start:
            self.stats.add("pool_threads")
            t.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except BaseException:  # (a task reports its own errors; this is a last resort)
                log.exception("FUSE io_uring hand-off task failed")
            with self._lock:
                self._idle += 1

    def close(self, timeout: float) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
            self._idle = 0
        for _ in threads:
            self._tasks.put(None)
        for t in threads:
            t.join(timeout)
            if t.is_alive():
                log.error("a FUSE io_uring hand-off thread is still busy after the unmount")


class _Queue:
    """One ring thread of a kernel queue: its own ring and `depth` entries, which only it
    touches (the kernel completes a command in the task that submitted it). Entry i owns SQE
    slot i of the ring, where its COMMIT_AND_FETCH stays prepared: a commit writes the commit
    id and queues the slot, and every commit of a batch of completions goes to the kernel with
    the one io_uring_enter that also waits for the next. A request that may block (a READ that
    `read_waits` says may wait, writes, syncs) is handed to the pool with its entry; the pool
    thread writes the reply into the entry and wakes this thread through `efd` (slot `depth`
    keeps a poll of it armed), which commits it. A READ of at most KEEP_READ_MAX that waits on
    nothing slower than a local disk is answered here ("kept", counted); larger ones (readahead
    windows) go to the pool too, so that concurrent windows decode in parallel."""

    def __init__(self, qid: int, fd: int, depth: int, payload_size: int, handler: Handler,
                 stats: UringStats, pool: _Pool | None = None, slot: int = 0,
                 read_waits: ReadWaits | None = None) -> None:
        self.qid = qid
        self.slot = slot  # this thread's index in stats.worker_requests
        self.fd = fd
        self.depth = depth
        self.handler = handler
        self.read_waits = read_waits
        self.stats = stats
        self.pool = pool
        self.ring = Ring(depth + 1)  # (+1: the eventfd poll's slot)
        try:
            self.entries = [_Entry(i, payload_size) for i in range(depth)]
            self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self.ring.close()
            raise
        # entries answered by the pool, to commit: (entry, commit id; None: retire the entry)
        self.done: collections.deque[tuple[_Entry, int | None]] = collections.deque()
        self.wake_armed = False
        self.thread = threading.Thread(target=self._run, name=f"fuse-uring-{qid}.{slot}", daemon=True)
        self.registered = threading.Event()  # every REGISTER was passed to the kernel

    def _sqe(self, e: _Entry, cmd_op: int, commit_id: int = 0) -> bytes:
        if cmd_op == CMD_REGISTER:
            return encode_uring_cmd(self.fd, cmd_op, encode_cmd_req(self.qid), user_data=e.index,
                                    addr=ctypes.addressof(e.iov), length=2)
        return encode_uring_cmd(self.fd, cmd_op, encode_cmd_req(self.qid, commit_id), user_data=e.index)

    def _commit(self, e: _Entry, commit_id: int) -> None:
        """Queue COMMIT_AND_FETCH of `e` (sent by the loop's next io_uring_enter)."""
        if not e.armed:  # (its slot held the REGISTER, done with once a request came)
            self.ring.prepare(e.index, self._sqe(e, CMD_COMMIT_AND_FETCH))
            e.armed = True
        self.ring.resubmit(e.index, _COMMIT_ID_OFFSET, commit_id)

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(0, {self.qid})  # serve the queue on the CPU whose requests it gets
        outstanding = 0  # entries the kernel or the pool still holds for us
        ring = self.ring
        try:
            for e in self.entries:
                ring.prepare(e.index, self._sqe(e, CMD_REGISTER))
                ring.submit_slot(e.index)
            if self.pool is not None:
                ring.prepare(self.depth, encode_sqe(IORING_OP_POLL_ADD, self.efd, op_flags=_POLLIN, user_data=_WAKE))
                ring.submit_slot(self.depth)
                self.wake_armed = True
            ring.enter(0)
            outstanding = len(self.entries)
            self.registered.set()
            entries = self.entries
            serve = self._serve
            wait = ring.submit_and_wait()  # (io_uring_enter with its arguments bound once)
            reap = ring.reap_results
            while outstanding:
                if wait() < 0:  # the commits queued since the last call go with it
                    ring.check_enter()  # (raises unless interrupted)
                cq = reap()
                k, n = 0, len(cq)
                while k < n:
                    user_data, res = cq[k], cq[k + 1]
                    k += 2
                    if user_data == _WAKE:
                        outstanding -= self._woken(res)
                        continue
                    e = entries[user_data]
                    if res < 0:
                        outstanding -= 1
                        self._failed(e, res)
                    elif not serve(e):
                        outstanding -= 1
        except Exception:
            log.exception("FUSE io_uring queue %d failed", self.qid)
        finally:
            self.registered.set()
            self._close()

    def _woken(self, res: int) -> int:
        """The eventfd poll fired: commit what the pool answered, re-arm; entries retired."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.efd)  # (before draining: a later answer fires the next poll)
        retired = 0
        done = self.done
        while done:
            e, commit_id = done.popleft()
            if commit_id is None:
                retired += 1
            else:
                self._commit(e, commit_id)
        if res < 0:  # the poll itself failed: no more hand-offs from this queue
            self.wake_armed = False
            log.error("FUSE io_uring queue %d: eventfd poll failed: %s; requests that may block are answered "
                      "by the ring thread itself", self.qid, os.strerror(-res))
        else:
            self.ring.submit_slot(self.depth)
        return retired

    def _failed(self, e: _Entry, res: int) -> None:
        if res in _TEARDOWN:
            return
        if e.hdr_view[0:4] == b"\0\0\0\0":  # never carried a request: its REGISTER failed
            self.stats.add("register_failures")
            log.error("FUSE io_uring queue %d: REGISTER failed: %s (the kernel serves /dev/fuse instead)",
                      self.qid, os.strerror(-res))
        else:
            self.stats.add("commit_failures")
            log.error("FUSE io_uring queue %d: COMMIT_AND_FETCH failed: %s", self.qid, os.strerror(-res))

    def _serve(self, e: _Entry) -> bool:
        """Answer the request in `e` and queue its commit, or hand it to the pool; False when
        the entry is out of the game."""
        stats = self.stats
        stats.worker_requests[self.slot] += 1  # (this thread is the only writer of its slot)
        commit_id = e.hdr64[_ENT_COMMIT_ID_Q]
        try:
            req = request_in_place(e.hdr_view, e.buf)
            opcode = req[4] if req[5] == 0 else -1  # (opcodes are < 256; the rest is no READ)
            if opcode in _HANDOFF_OPCODES:
                if (opcode == FUSE_READ and self.read_waits is not None and len(req) >= _READ_SIZE_END
                        and _READ_SIZE.unpack_from(req, 56)[0] <= KEEP_READ_MAX and not self.read_waits(req)):
                    stats.worker_kept[self.slot] += 1
                elif self.wake_armed:
                    stats.worker_handed[self.slot] += 1
                    self.pool.submit(partial(self._answer, e, commit_id, bytes(req)))  # type: ignore[union-attr]
                    return True
            reply = self.handler(req)
            if reply is None:  # nothing to commit: the entry is not re-armed
                log.warning("FUSE io_uring queue %d: opcode %d wants no reply; entry %d retired", self.qid,
                            IN_HEADER.unpack_from(e.hdr_view)[1], e.index)
                return False
            place_reply(reply, e.hdr_view, e.pay_view)
        except ValueError as ex:  # RingEntryError, FuseProtocolError
            self.stats.add("entry_errors")
            log.error("FUSE io_uring queue %d: answering EIO: %s", self.qid, ex)
            place_error(e.hdr_view, commit_id, -errno.EIO)
        if e.armed:
            self.ring.resubmit(e.index, _COMMIT_ID_OFFSET, commit_id)
        else:
            self._commit(e, commit_id)
        return True

    def _answer(self, e: _Entry, commit_id: int, req: bytes) -> None:
        """(a pool thread) Answer a handed-off request into its entry, then wake the ring thread."""
        cid: int | None = commit_id
        try:
            reply = self.handler(memoryview(req))
            if reply is None:
                log.warning("FUSE io_uring queue %d: opcode %d wants no reply; entry %d retired", self.qid,
                            IN_HEADER.unpack_from(req)[1], e.index)
                cid = None
            else:
                place_reply(reply, e.hdr_view, e.pay_view)
        except Exception as ex:  # RingEntryError, FuseProtocolError; never commit a stale entry
            self.stats.add("entry_errors")
            if isinstance(ex, ValueError):
                log.error("FUSE io_uring queue %d: answering EIO: %s", self.qid, ex)
            else:
                log.exception("FUSE io_uring queue %d: answering EIO", self.qid)
            place_error(e.hdr_view, commit_id, -errno.EIO)
        finally:
            self.done.append((e, cid))
            try:
                os.eventfd_write(self.efd, 1)
            except OSError as ex:  # (the queue ended meanwhile: nothing left to commit to)
                log.debug("FUSE io_uring queue %d: waking the ring thread: %s", self.qid, ex)

    def _close(self) -> None:
        for e in self.entries:
            e.close()
        self.ring.close()
        with contextlib.suppress(OSError):
            os.close(self.efd)


class FuseUringSession:
    """Transport: serve a mountpoint with io_uring queues beside the /dev/fuse workers."""

    def __init__(self, session: UringSession, mountpoint: str, *, threads: int = 2, depth: int = DEFAULT_DEPTH,
                 fsname: str = "rafs", allow_other: bool = True, readahead_kb: int = 1024,
                 enable_param: str = ENABLE_URING_PARAM, queues: int = 0, workers: int = DEFAULT_WORKERS,
                 max_workers: int = DEFAULT_MAX_WORKERS, poll_us: int = DEFAULT_POLL_US,
                 read_waits: ReadWaits | None = None) -> None:
        if not 1 <= depth <= 64 or not 1 <= workers <= 64:
            raise ValueError("io_uring queue depth and workers per queue must be 1..64")
        self.session = session
        self.depth = depth  # entries per ring thread
        # Ring threads per queue, each with its own ring and `depth` entries (the kernel hands a
        # request to the most recently committed free entry of its queue).
        self.workers = workers
        # Threads that answer requests that may block (READs waiting on the registry, writes),
        # started as needed: the ring threads hand such requests over and go on, so metadata
        # never queues behind data while the queue has free entries.
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._payload = 0
        self._pool: _Pool | None = None
        self.enable_param = enable_param
        self.nr_queues = queues or read_possible_cpus()
        self.stats = UringStats()
        # READs that wait on nothing slower than a local disk (None: every READ may wait):
        # ring threads answer them without counting as blocked, /dev/fuse workers without a
        # hand-off (FuseDevSession, which also busy-polls after replies: `poll_us`)
        self.read_waits = read_waits
        self.dev = FuseDevSession(self._dev_handle, mountpoint, threads=threads, max_write=session.max_write,
                                  fsname=fsname, allow_other=allow_other, readahead_kb=readahead_kb,
                                  poll_us=poll_us, read_waits=read_waits)
        self.mountpoint = self.dev.mountpoint
        self.queues: list[_Queue] = []
        self.on_fallback: Callable[[str], None] | None = None

    def _dev_handle(self, req: memoryview) -> list[bytes | bytearray | memoryview] | None:
        """/dev/fuse requests: counted, so that a ring that serves nothing shows."""
        if IN_HEADER.unpack_from(req)[1] not in _DEV_ALWAYS:
            self.stats.add("dev_requests")
        return self.session.handle_vectored(req)

    @property
    def fd(self) -> int:
        return self.dev.fd

    def fallback(self, reason: str) -> None:
        """Serve through /dev/fuse reads: logged and counted."""
        with self.stats.lock:
            self.stats.fallbacks += 1
            self.stats.fallback_reason = reason
        log.warning("FUSE io_uring not used for %s: %s; serving /dev/fuse reads", self.mountpoint, reason)
        if self.on_fallback is not None:
            self.on_fallback(reason)

    def mount(self) -> None:
        why = enable_uring_param(self.enable_param) or probe()
        if why is None:
            self.session.transport_flags |= int(InitFlags.OVER_IO_URING)
            self.dev.on_init = self._after_init
        else:
            self.fallback(why)
        self.dev.mount()

    def _after_init(self) -> None:
        """In the worker that wrote the INIT reply: register every queue, or fall back."""
        self.dev.on_init = None
        if not self.session.flags & InitFlags.OVER_IO_URING:
            self.fallback("the kernel did not offer FUSE_OVER_IO_URING at INIT")
            return
        payload = self._payload = max_payload_size(self.session.max_write, self.session.max_pages)
        try:
            for qid in range(self.nr_queues):
                for _ in range(self.workers):
                    self.queues.append(self._new_queue(qid))
        except OSError as e:
            failed = len(self.queues)
            for q in self.queues:
                q._close()
            self.queues = []
            self._abandon_ring(f"setting up queue {failed}: {e}")
            return
        with self.stats.lock:
            self.stats.queues = self.nr_queues
            self.stats.entries = len(self.queues) * self.depth
        for q in self.queues:
            q.thread.start()
        for q in self.queues:
            q.registered.wait(JOIN_TIMEOUT)
        with self.stats.lock:
            self.stats.active = self.stats.register_failures == 0
        if self.stats.register_failures:
            self.fallback(f"{self.stats.register_failures} REGISTER commands failed")
        log.info("FUSE io_uring: %d queues x %d threads x %d entries of %d KiB on %s (up to %d threads for "
                 "requests that may block)", self.nr_queues, self.workers, self.depth, payload >> 10,
                 self.mountpoint, self.max_workers)

    def _new_queue(self, qid: int) -> _Queue:
        """A ring thread for queue `qid` (not started), with its slot in the request counters."""
        with self.stats.lock:
            slot = len(self.stats.worker_requests)
            self.stats.worker_requests.append(0)
            self.stats.worker_kept.append(0)
            self.stats.worker_handed.append(0)
            self.stats.worker_qid.append(qid)
        if self._pool is None:
            self._pool = _Pool(self.max_workers, self.stats)
        return _Queue(qid, self.dev.fd, self.depth, self._payload, self.session.handle_vectored, self.stats,
                      self._pool, slot=slot, read_waits=self.read_waits)

    def _abandon_ring(self, reason: str) -> None:
        """INIT negotiated the ring, so the kernel holds every request until all queues are
        registered; a REGISTER it rejects (here: a malformed one) makes it give up the ring
        and serve /dev/fuse."""
        try:
            ring = Ring(2)
            try:
                ring.push(encode_uring_cmd(self.dev.fd, CMD_REGISTER, encode_cmd_req(0), user_data=0, length=0))
                ring.enter(1)
                res = [r for _, r, _ in ring.reap()]
            finally:
                ring.close()
            log.info("FUSE io_uring: malformed REGISTER answered %s; the kernel falls back to /dev/fuse", res)
        except OSError as e:
            log.error("FUSE io_uring: could not make the kernel drop the ring (%s); requests may hang", e)
        self.fallback(reason)

    # -- Transport --------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        if not self.dev.wait(timeout):
            return False
        with self._lock:
            queues = list(self.queues)
        for q in queues:
            q.thread.join(timeout)
            if q.thread.is_alive():
                return False
        return True

    def unmount(self, lazy: bool = False) -> None:
        self.dev.unmount(lazy=lazy)

    def stop(self) -> None:
        self.dev.stop()
        self._join()

    def close(self) -> None:
        self.dev.close()
        self._join()

    def _join(self) -> None:
        """After the unmount: the ring threads end once the pool has answered what they handed
        it (its commits fail, the connection being gone), then the pool's threads go."""
        with self._lock:
            queues = list(self.queues)
        for q in queues:
            if q.thread.ident is not None:
                q.thread.join(JOIN_TIMEOUT)
            if q.thread.is_alive():
                log.error("FUSE io_uring queue %d did not end after the unmount", q.qid)
        with self._lock:
            self.queues = [q for q in self.queues if q.thread.is_alive()]
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(JOIN_TIMEOUT)
