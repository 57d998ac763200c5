"""The vhost-user socket loop: accept a front-end, feed its messages to a `Backend`, and serve each
running queue from its own worker thread.

One front-end at a time (the listening socket stays; after a disconnect the next one is
accepted, e.g. a restarted VM). Messages are read as a header, whose recvmsg also carries the
SCM_RIGHTS fds, then the payload. A malformed message drops the connection; everything the
connection owned (workers, mappings, fds) is released before the next accept.

A queue's dispatcher waits on its kick eventfd (a private dup, so the control thread may
replace or close the original at any time) and a stop eventfd, and pops every available chain
for the queue's worker pool; a worker hands the readable bytes to the request handler, and the
queue's `InflightQueue` scatters the reply into the writable buffers, completes the chain on the
used ring and signals the call eventfd when the driver wants it (out of order, one at a time).

Stopping a queue (GET_VRING_BASE, a memory or kick change, a disconnect) waits up to
`stop_grace` for requests in flight, since the front-end waits for our answer meanwhile; what
is still stuck then (a stalled registry) is abandoned: its reply is dropped unwritten, because
the front-end may reuse that memory as soon as it has our answer. GET_VRING_BASE reports the
index past it, so a paused-and-resumed guest never gets an answer to it (we offer no inflight
tracking); a stall shorter than the grace loses nothing.
"""

import contextlib
import errno
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from ...fuse.iovec import WouldBlock
from . import messages as M
from .backend import Backend, Vring
from .inflight import Abandoned, InflightQueue
from .messages import Message, VhostUserError
from .virtqueue import Chain, RingError

log = logging.getLogger(__name__)

Buffers = Sequence[bytes | bytearray | memoryview]  # (as inflight.Buffers)
# request bytes, room in the writable part -> reply buffers (None: complete with 0 bytes)
RequestHandler = Callable[[memoryview, int], Buffers | None]
# whether a popped chain may block (goes to the pool) or is quick (answered by the dispatcher)
Offload = Callable[[Chain], bool]
# A handler that may write its reply into the chain itself: (request bytes, the chain, the guard
# to write its buffers in, nowait) -> the bytes it wrote, or reply buffers as RequestHandler
# (None: 0 bytes). With nowait it raises WouldBlock rather than wait on I/O: the dispatcher tries
# that first for a request bound for the pool, and hands it over only then.
IntoHandler = Callable[[memoryview, Chain, AbstractContextManager[object], bool], Buffers | int | None]
# Whether a request that would wait (its nowait try raised WouldBlock) waits on a local disk at
# most (a READ of a local blob file out of the host's page cache): the dispatcher then answers it
# itself, as fusedev's reading worker does, instead of handing it over.
WaitsLocally = Callable[[memoryview], bool]
STOP_TIMEOUT = 30.0
# How long stopping a queue (GET_VRING_BASE, a memory change) waits for requests in flight; the
# front-end waits for our answer meanwhile, so this is short next to a stalled registry.
STOP_GRACE = 5.0
DEFAULT_WORKERS = 4
SPARE_IDLE = 2.0  # a spare worker idle this long retires
SPARE_AFTER_MS = 20  # a request waits this long behind busy workers before a spare starts
POLL_INTERVAL_MS = 1  # queues without a kick fd (VRING_NOFD) are polled this often


class QueueWorker:
    """Serves one running vring until stopped: a dispatcher thread pops chains and `workers`
    pool threads answer them, so a request waiting on the network does not hold up the cached
    ones behind it (replies complete out of order; `InflightQueue` keeps the ring consistent).
    When a request waits and every pool thread has been busy for SPARE_AFTER_MS, a spare
    thread starts (up to `max_workers`); it retires after `SPARE_IDLE` seconds without work:
    stalled fetches never hold all workers, and bursts of quick requests start none.
    `offload(chain)` False marks a request that never waits on I/O (FUSE metadata): the
    dispatcher answers it itself, saving the hand-off (as fusedev's leader does). With one worker the dispatcher answers requests itself (no hand-off, no spares).
    With an `into` handler, replies may be written into the chain directly, and a request bound
    for the pool is first tried on the dispatcher with nowait (a READ of cached data): only one
    that would wait is handed over (`inline_nowait` counts the others), unless `waits_locally`
    says it waits on a local disk at most: the dispatcher then answers it with a blocking read
    (`inline_blocking`), which costs less than the hand-off (a pool thread's wake-up, the GIL
    passed twice) and keeps the order of a sequential reader's READs. A request that may wait on
    the network (a remote backend, a blob cache fetch) still goes to the pool."""

    def __init__(self, vring: Vring, handler: RequestHandler, name: str, *, workers: int = 1,
                 stop_grace: float = STOP_GRACE, max_workers: int = 0, offload: Offload | None = None,
                 into: IntoHandler | None = None, on_idle: Callable[[], object] | None = None,
                 waits_locally: WaitsLocally | None = None) -> None:
        assert vring.queue is not None
        self.offload = offload
        self.on_idle = on_idle  # run by the dispatcher each time it has emptied the ring
        self.into = into
        self.waits_locally = waits_locally
        self.inline = 0  # requests the dispatcher answered itself while it has a pool
        self.inline_nowait = 0  # of the pool-bound ones, answered by the dispatcher without waiting
        self.inline_blocking = 0  # of the pool-bound ones, answered by the dispatcher waiting on a local disk
        self.handed_over = 0  # requests handed to the pool
        self.vring = vring
        self.handler = handler
        self.name = name
        self.stop_grace = stop_grace
        self.ring = InflightQueue(vring.queue, vring.signal, index=vring.index)
        self.kick = os.dup(vring.kick) if vring.kick is not None else None
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.poller = select.epoll(2)  # the dispatcher's wait on kick and stop_fd (see _run)
        self.handler_errors = 0
        self.abandoned = 0
        self._stopped = False
        self._exited = False
        self._fd_lock = threading.Lock()
        self.jobs: queue.SimpleQueue[Chain | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.pool = [threading.Thread(target=self._work, name=f"{name}-w{i}", daemon=True)
                     for i in range(workers)] if workers > 1 else []
        self.workers = len(self.pool)
        self.max_workers = max(self.workers, max_workers or 4 * self.workers)
        self._pool_lock = threading.Lock()
        self._threads = self.workers  # pool threads alive (spares included)
        self._idle = self.workers  # pool threads not serving a request
        self._queued = 0  # requests handed over and not yet taken
        self._last_take = time.monotonic()  # when a pool thread last took a request
        self.spares_started = 0

    @property
    def served(self) -> int:
        return self.ring.completed

    @property
    def failed(self) -> int:
        return self.ring.failed + self.handler_errors

    def start(self) -> None:
        for t in self.pool:
            t.start()
        self.thread.start()

    def stop(self) -> None:
        """Stop popping, give requests in flight `stop_grace` seconds to finish, then abandon
        the rest (their replies are dropped unwritten). Returns with nothing more written to
        the ring or the guest's buffers, as GET_VRING_BASE needs."""
        if self._stopped:
            return
        deadline = time.monotonic() + self.stop_grace
        self.ring.stop_popping()  # what the driver offers from now on stays in its ring
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join(self.stop_grace)
        with self._fd_lock:  # the private fds are closed by whichever of us finishes last
            self._stopped = True
            if self._exited or not self.thread.is_alive():
                self._exited = True
                self._close_fds()
        idle = self.ring.wait_idle(max(0.0, deadline - time.monotonic()))
        self.abandoned = self.ring.stop()
        if not idle:
            log.error("queue %d: %d requests still in flight after %.1f s; abandoning them (their replies "
                      "will be dropped)", self.vring.index, self.abandoned, self.stop_grace)
        with self._pool_lock:
            threads = self._threads
        for _ in range(threads):
            self.jobs.put(None)  # each pool thread exits after the request it is on

    def _run(self) -> None:
        # The kick is watched edge-triggered and never read: every write of the front-end
        # (each one a wake-up of the eventfd's waiters) reports it once more, so a kick costs
        # one epoll_wait and no read(2) (its counter only grows: 2^64 kicks to overflow).
        poller = self.poller
        poller.register(self.stop_fd, select.EPOLLIN)
        if self.kick is not None:
            poller.register(self.kick, select.EPOLLIN | select.EPOLLET)
        idle_timeout = -1.0 if self.kick is not None else POLL_INTERVAL_MS / 1000
        stop_fd = self.stop_fd
        try:
            while True:
                if not self._drain():
                    return
                # requests waiting for a busy pool: look again soon, to start a spare
                waiting = bool(self.pool) and self._queued > self._idle
                try:
                    ready = poller.poll(SPARE_AFTER_MS / 1000 if waiting else idle_timeout)
                except InterruptedError:
                    continue
                if waiting:
                    self._maybe_spare()
                for fd, _ in ready:
                    if fd == stop_fd:
                        return
        except Exception:
            log.exception("queue %d: worker failed", self.vring.index)
        finally:
            with self._fd_lock:
                self._exited = True
                if self._stopped:  # stop() gave up waiting for us: the fds are ours to close
                    self._close_fds()

    def _close_fds(self) -> None:
        self.poller.close()
        for fd in (self.kick, self.stop_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _drain(self) -> bool:
        """Dispatch everything available, then run `on_idle`; False if the ring is broken or
        stopped."""
        try:
            return self._dispatch_available()
        finally:
            if self.on_idle is not None:
                try:
                    self.on_idle()
                except Exception:
                    log.exception("queue %d: the idle hook failed", self.vring.index)

    def _dispatch_available(self) -> bool:
        ring = self.ring
        while True:
            try:
                # when empty: avail_event published, then a syscall-free re-check (the GIL
                # switch and the store order on x86 make it a full barrier for this purpose)
                chain = ring.pop_or_arm()
                if chain is None:
                    return ring.popping
            except RingError as e:
                log.error("queue %d: %s; the queue stops", self.vring.index, e)
                return False
            if self.pool and (self.offload is None or self.offload(chain)):
                if self.into is not None:
                    req = memoryview(chain.read_all())
                    if self._serve(chain, nowait=True, req=req):
                        continue
                    if self._waits_locally(req):
                        self.inline_blocking += 1
                        self._serve(chain, req=req)
                        continue
                self._hand_over(chain)
            else:
                if self.pool:
                    self.inline += 1
                self._serve(chain)

    def _waits_locally(self, req: memoryview) -> bool:
        """`waits_locally(req)`; False (hand over: the cautious answer) when unset or it fails."""
        if self.waits_locally is None:
            return False
        try:
            return self.waits_locally(req)
        except Exception:
            log.exception("queue %d: waits_locally failed; handing the request over", self.vring.index)
            return False

    def _hand_over(self, chain: Chain) -> None:
        with self._pool_lock:
            self._queued += 1
            self.handed_over += 1
        self.jobs.put(chain)
        self._maybe_spare()

    def _maybe_spare(self) -> None:
        """Start a spare when a request waits and every pool thread has been on its request for
        SPARE_AFTER_MS or more (likely waiting on I/O, not about to be free)."""
        with self._pool_lock:
            spare = (self._queued > self._idle and self._threads < self.max_workers
                     and time.monotonic() - self._last_take >= SPARE_AFTER_MS / 1000)
            if spare:
                self._threads += 1
                self._idle += 1  # (about to take a request)
                self.spares_started += 1
        if spare:
            t = threading.Thread(target=self._work, args=(True,), name=f"{self.name}-spare", daemon=True)
            log.debug("queue %d: all workers busy; started a spare", self.vring.index)
            t.start()

    def _work(self, spare: bool = False) -> None:
        """A pool thread; counted idle (in `_idle`) whenever it is not serving a request."""
        while True:
            try:
                chain = self.jobs.get(timeout=SPARE_IDLE) if spare else self.jobs.get()
            except queue.Empty:
                with self._pool_lock:
                    if self._queued < self._idle:  # (a request may be on its way to us)
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            with self._pool_lock:
                self._idle -= 1
                if chain is None:
                    self._threads -= 1
                    return
                self._queued -= 1
                self._last_take = time.monotonic()
            if self.ring.stopped:
                self.ring.complete(chain, None)  # counted as dropped; the handler is not run
            else:
                try:
                    self._serve(chain)
                except Exception:
                    log.exception("queue %d: pool worker failed on chain %d", self.vring.index, chain.head)
            with self._pool_lock:
                self._idle += 1

    def _serve(self, chain: Chain, nowait: bool = False, req: memoryview | None = None) -> bool:
        """Answer `chain` (whose request bytes are `req` when the caller has them) and complete
        it; False (nothing written, not completed) when `nowait` and the handler would wait."""
        reply: Buffers | int | None
        try:
            if self.into is not None:
                if req is None:
                    req = memoryview(chain.read_all())
                reply = self.into(req, chain, self.ring.guard(chain), nowait)
            else:
                reply = self.handler(memoryview(chain.read_all()), chain.writable_size())
        except WouldBlock:
            if nowait:
                return False
            log.error("queue %d: the request handler would block on chain %d though allowed to", self.vring.index,
                      chain.head)
            with self.ring.lock:
                self.handler_errors += 1
            reply = None
        except Abandoned as e:
            log.warning("%s; its reply is dropped", e)
            reply = None
        except Exception:
            log.exception("queue %d: request handler failed on chain %d", self.vring.index, chain.head)
            with self.ring.lock:
                self.handler_errors += 1
            reply = None
        if nowait:
            self.inline_nowait += 1  # (before the driver can see the reply)
        if isinstance(reply, int):
            self.ring.complete_written(chain, reply)
        else:
            self.ring.complete(chain, reply)
        return True


class VhostUserServer:
    """Listen on `path` and serve front-ends one after another with `handler` behind every queue.

    `backend_factory` builds a fresh Backend per connection; `on_disconnect` runs after a
    connection's state is released (e.g. to reset the FUSE session for the next guest).
    """

    def __init__(self, path: str, handler: RequestHandler, *,
                 backend_factory: Callable[[], Backend] = Backend,
                 on_disconnect: Callable[[], None] | None = None,
                 queue_workers: int | Callable[[int], int] = 1, stop_grace: float = STOP_GRACE,
                 max_workers: int = 0, offload: Offload | None = None, into: IntoHandler | None = None,
                 on_idle: Callable[[], object] | None = None, waits_locally: WaitsLocally | None = None) -> None:
        """`queue_workers`: pool threads per running queue (or a function of the queue index);
        `max_workers`: with spares, at most this many per queue (0: 4 x queue_workers);
        `offload`: which requests go to the pool (None: all); `into`: the handler used instead
        of `handler`, which may write replies into the chain and answer without waiting;
        `on_idle`: run by a queue's dispatcher whenever it has emptied its ring;
        `waits_locally`: which requests that would wait the dispatcher answers itself anyway."""
        self.on_idle = on_idle
        self.waits_locally = waits_locally
        self.path = path
        self.offload = offload
        self.into = into
        self.queue_workers = queue_workers
        self.max_workers = max_workers
        self.stop_grace = stop_grace
        self.handler = handler
        self.backend_factory = backend_factory
        self.on_disconnect = on_disconnect
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.backend: Backend | None = None
        self.workers: dict[int, QueueWorker] = {}
        self.connections = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def bind(self) -> None:
        """Unlink any stale socket file and listen (as nydusd does with --sock)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.bind(self.path)
        s.listen(1)
        self.listener = s

    def start(self) -> "VhostUserServer":
        """Bind (if needed) and serve in a background thread."""
        if self.listener is None:
            self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="vhost-user", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        if self.listener is None:
            self.bind()
        assert self.listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                raise
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self.conn = conn
            self.connections += 1
            log.info("vhost-user front-end connected (connection %d)", self.connections)
            try:
                self._serve_connection(conn)
            finally:
                self._release()

    def stop(self) -> None:
        """Stop accepting, drop the current front-end and its workers; idempotent."""
        self._stopping.set()
        with self._lock:
            for s in (self.conn, self.listener):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
            if self.listener is not None:
                self.listener.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- one connection --------------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket) -> None:
        backend = self.backend_factory()
        backend.on_start = self._start_worker
        backend.on_stop = self._stop_worker
        self.backend = backend
        while True:
            try:
                msg = _recv_message(conn)
            except VhostUserError as e:
                log.error("vhost-user: %s; dropping the connection", e)
                return
            except OSError as e:
                if not self._stopping.is_set():
                    log.error("vhost-user: receive failed: %s; dropping the connection", e)
                return
            if msg is None:
                log.info("vhost-user front-end disconnected")
                return
            log.debug("vhost-user <- %s flags=%#x size=%d fds=%d", msg.name(), msg.flags, len(msg.payload),
                      len(msg.fds))
            try:
                reply = backend.handle(msg)
            except VhostUserError as e:
                log.error("vhost-user: %s; dropping the connection", e)
                return
            if reply is not None:
                try:
                    conn.sendall(reply)
                except OSError as e:
                    log.error("vhost-user: reply to %s failed: %s", msg.name(), e)
                    return

    def _release(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()
        for w in list(self.workers.values()):
            w.stop()
        self.workers.clear()
        with self._lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        if self.on_disconnect is not None:
            try:
                self.on_disconnect()
            except Exception:
                log.exception("on_disconnect failed")

    def _start_worker(self, vring: Vring) -> None:
        self._stop_worker(vring)
        n = self.queue_workers(vring.index) if callable(self.queue_workers) else self.queue_workers
        w = QueueWorker(vring, self.handler, f"vhost-user-q{vring.index}", workers=max(1, n),
                        stop_grace=self.stop_grace, max_workers=self.max_workers, offload=self.offload,
                        into=self.into, on_idle=self.on_idle, waits_locally=self.waits_locally)
        self.workers[vring.index] = w
        w.start()
        log.debug("queue %d started (size %d)", vring.index, vring.num)

    def _stop_worker(self, vring: Vring) -> None:
        w = self.workers.pop(vring.index, None)
        if w is not None:
            w.stop()
            vq = w.ring.vq
            log.debug("queue %d stopped after %d requests (%d failed, %d abandoned; short tables: %d decoded, %d "
                      "reused)", vring.index, w.served, w.failed, w.abandoned, vq.tables_decoded, vq.tables_reused)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv_message(conn: socket.socket) -> Message | None:
    """One message, or None on a clean EOF between messages."""
    data, fds, flags, _ = socket.recv_fds(conn, M.HEADER_SIZE, M.MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    try:
        if flags & socket.MSG_CTRUNC:
            raise VhostUserError(f"more than {M.MAX_FDS} fds in one message")
        if len(data) < M.HEADER_SIZE:
            rest = _recv_exact(conn, M.HEADER_SIZE - len(data))
            if rest is None:
                raise VhostUserError("connection closed inside a message header")
            data += rest
        request, mflags, size = M.decode_header(data)
        payload = _recv_exact(conn, size) if size else b""
        if payload is None:
            raise VhostUserError(f"connection closed inside the payload of {M.request_name(request)}")
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return Message(request, mflags, payload, list(fds))
