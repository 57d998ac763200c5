"""The /dev/fuse transport: worker threads move whole requests between the kernel and a handler.

Each worker owns a channel (the mount's fd for the first, a FUSE_DEV_IOC_CLONE'd fd for the
others) and one reusable request buffer. One worker at a time reads (leader/follower, see
`_serve`): metadata requests are answered by the reading thread itself, READs hand the reader
role to the next worker first.
The handler is sans-IO: bytes in, reply bytes (or buffers to gather, or None) out. Blocking read(2)/write(2) release the
GIL, and so do the decompressors and hashes the handler calls, so threads overlap where it counts.
"""

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable

from ..fuse.abi import BACKING_ID, BACKING_MAP, FUSE_DEV_IOC_BACKING_CLOSE, FUSE_DEV_IOC_BACKING_OPEN
from ..fuse.protocol import Then
from .mount import (
    abort_detached_connection,
    connection_of,
    fuse_mount,
    fuse_umount,
    is_mountpoint,
    real_mountpoint,
    set_readahead_kb,
)

log = logging.getLogger(__name__)

FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
FUSE_MIN_READ_BUFFER = 8192
HEADER_ROOM = 4096  # fuse_in_header + the largest op header in front of WRITE data
STOP_GRACE = 2.0  # seconds a lazily detached, still busy mount is served after stop()
FUSE_INIT = 26
FUSE_READ = 15
# Requests that may block on I/O (blob fetches for RAFS; disk writes and syncs for a writable
# passthrough filesystem): the reading thread hands the reader role on before handling them.
# READ, WRITE, FSYNC, FSYNCDIR, FALLOCATE, COPY_FILE_RANGE.
_HANDOFF_OPCODES = frozenset({FUSE_READ, 16, 20, 30, 43, 47})

# A READ the filesystem says does not wait (read_waits) is answered by the reading thread when it
# asks for at most this much (a small file, a random read); larger ones (sequential readahead
# windows) are still handed on, so that the chunks of concurrent windows decode in parallel.
KEEP_READ_MAX = 128 << 10
_READ_SIZE = struct.Struct("<I")  # fuse_read_in.size, after in_header (40) + fh + offset
_READ_SIZE_END = 60

# Busy-polling after a reply (see PollWindow): the longest window, in microseconds. A stream of
# requests (a stat loop, a cold `find`) comes back within a few tens of microseconds of each
# reply; a thread blocked in read(2) instead is woken through the scheduler, and in a VM whose
# idle vCPUs halt that wake-up is an IPI through the host (50 us and more here).
DEFAULT_POLL_US = 100
_POLL_START_NS = 10_000  # the first window once requests come close together
# A sched_yield() that took longer than this let another task run on this CPU meanwhile.
_YIELD_BUSY_NS = 5_000  # (a sched_yield with nothing else to run takes under 1 us here)
# Such a yield is a busy CPU only when the other task kept the CPU for longer than this: a task
# that runs whole time slices (a CPU hog: another process), where spinning only delays whoever
# needs the CPU, the client included. A shorter turn (a kernel thread such as rcu_preempt or a
# kworker, another thread of the daemon, or the client itself, woken on this CPU by the reply)
# says nothing about load; polling goes on (counted: poll_lent). On a quiet VM such short turns
# came about every 20 ms and used to stop polling for POLL_COOLDOWN requests each time.
_YIELD_HOG_NS = 100_000
POLL_COOLDOWN = 64  # requests read without polling after a spin met a busy CPU
# After this many requests in a row found waiting at the first poll (several clients keep the
# queue full), requests are read without polling until a read sleeps (took over _QUEUED_NS).
QUEUED_STREAK = 64
_QUEUED_NS = 8_000
# Every RUNQ_EVERY requests a polling worker reads how long it has waited, runnable, for a CPU
# and how often it was switched in (/proc/thread-self/schedstat): more than RUNQ_BUSY_NS per
# request, in waits of more than RUNQ_SLICE_NS each on average, means the CPUs are busy (other
# processes' time slices), where a spinning thread competes as a CPU hog instead of being woken
# ahead of them as a sleeper, and no halted vCPU is there to save a wake-up of: no polling for
# RUNQ_COOLDOWN requests. Short waits are the client's turns (woken on this CPU by a reply, it
# runs before the worker reads its next request: no IPI either way) and kernel threads.
RUNQ_EVERY = 32
RUNQ_BUSY_NS = 5_000
RUNQ_SLICE_NS = _YIELD_HOG_NS
RUNQ_COOLDOWN = 1024
# Polling only once this many requests in a row were answered by the reading thread: where
# handed-off READs come every few requests (cat of small files from a registry), the next
# request comes only after the READ's worker replies, later than polling pays for; a spinning
# thread then only takes the CPU that worker and the client need (measured, with local READs
# still handed off: cold small files slower with polling, find and stat loops faster).
POLL_AFTER_METADATA = 8


class PollWindow:
    """How long a worker polls /dev/fuse after a reply before it blocks in read(2) (sans-IO).

    The guest haltpoll governor's rule, in user space: when the window ran out before the
    request came, it grows (doubling, from `start_ns` up to `limit_ns`) if the request came
    within `limit_ns` of the reply (a longer window would have caught it), and shrinks (halving,
    to 0 below `start_ns`) if it came later: an idle daemon spins at most one window after its
    last request and then sleeps in read(2); a stream whose requests come further apart than
    `limit_ns` settles at no polling at all."""

    __slots__ = ("limit_ns", "start_ns", "window_ns", "cooldown", "queued", "_runq_last", "_switches_last",
                 "_polled_last")

    def __init__(self, limit_ns: int, start_ns: int = _POLL_START_NS) -> None:
        self.limit_ns = max(0, limit_ns)
        self.start_ns = min(start_ns, self.limit_ns)
        self.window_ns = 0
        self.cooldown = 0  # requests to go before the window may open again (contended)
        self.queued = 0  # requests in a row found waiting at the first poll (QUEUED_STREAK)
        self._runq_last = -1
        self._switches_last = 0
        self._polled_last = 0

    def contended(self) -> None:  # (also ends a streak of queued requests)
        """The spin gave the CPU to another task: the CPU is not idle (another process, or the
        client itself shares this CPU, when a woken thread costs no IPI anyway). No polling
        for the next `cooldown` requests."""
        self.window_ns = 0
        self.cooldown = POLL_COOLDOWN
        self.queued = 0

    def lent(self, ns: int) -> bool:
        """A sched_yield took `ns` (over _YIELD_BUSY_NS): another task ran on this CPU. True (and
        contended) when it held the CPU for a time slice (_YIELD_HOG_NS); a short turn is no
        sign of load, and polling goes on."""
        if ns <= _YIELD_HOG_NS:
            return False
        self.contended()
        return True

    def runq(self, total_ns: int, switches: int, polled: int) -> bool:
        """The thread's run-queue wait so far (ns), how often it was switched in so far, and how
        many requests it has read by polling so far, sampled every RUNQ_EVERY requests; True
        when the CPUs were found busy (no polling for RUNQ_COOLDOWN requests). Judged only over
        samples where every request was polled for (a thread that slept waits in the run queue
        too while a halted vCPU wakes up, which is the very wait polling saves), and only by
        waits of time-slice length (RUNQ_SLICE_NS on average): the client's turns on this CPU
        and kernel threads wait it for a few microseconds each, other processes' slices for
        much longer."""
        last, self._runq_last = self._runq_last, total_ns
        switches_last, self._switches_last = self._switches_last, switches
        polled_last, self._polled_last = self._polled_last, polled
        wait = total_ns - last
        if last < 0 or polled - polled_last < RUNQ_EVERY or wait <= RUNQ_EVERY * RUNQ_BUSY_NS:
            return False
        if wait <= RUNQ_SLICE_NS * max(1, switches - switches_last):
            return False
        self.window_ns = 0
        self.cooldown = max(self.cooldown, RUNQ_COOLDOWN)
        return True

    def blocked(self, waited_ns: int) -> None:
        """A request came `waited_ns` after the reply, its window (if any) having run out."""
        if self.limit_ns == 0:
            return
        if self.cooldown:
            self.cooldown -= 1
            return
        if waited_ns <= self.limit_ns:
            self.window_ns = min(self.limit_ns, max(self.start_ns, self.window_ns * 2))
        else:
            w = self.window_ns // 2
            self.window_ns = w if w >= self.start_ns else 0


class PollStats:
    """One worker's counters (the worker is their only writer; readers sum them)."""

    __slots__ = ("reads", "kept", "hits", "misses", "queued", "yielded", "lent", "busy", "spin_ns")

    def __init__(self) -> None:
        self.reads = 0  # requests read by this worker
        self.kept = 0  # READs it answered itself, no hand-off (read_waits said they do not wait)
        self.hits = 0  # of them, found by polling (no sleep in read(2))
        self.misses = 0  # windows that ran out with nothing to read (or were cut short: yielded)
        self.queued = 0  # requests read straight off a full queue (QUEUED_STREAK), no poll()
        self.yielded = 0  # spins stopped because another task took the CPU meanwhile (a time slice)
        self.lent = 0  # yields that let another task run for a short turn; polling went on
        self.busy = 0  # times the run-queue wait said the CPUs are busy (polling paused)
        self.spin_ns = 0  # time spent polling


# Reply bytes, or a list of buffers written with one writev (FuseSession.handle_vectored), or
# None for requests the kernel expects no answer to.
Handler = Callable[[memoryview], bytes | list[bytes | bytearray | memoryview] | None]


class FuseDevSession:
    """Serve one mountpoint with `threads` workers until unmounted (by us or anyone else)."""

    def __init__(self, handler: Handler, mountpoint: str, *, threads: int = 4, max_write: int = 1 << 20,
                 fsname: str = "rafs", allow_other: bool = True, readahead_kb: int = 1024,
                 leader_follower: bool = True, max_threads: int = 0, poll_us: int = DEFAULT_POLL_US,
                 read_waits: Callable[[memoryview], bool] | None = None, busy_check: bool = True) -> None:
        if not 1 <= threads <= 1024:
            raise ValueError("thread count must be 1..1024")
        self.handler = handler
        self.mountpoint = real_mountpoint(mountpoint)
        self.threads = threads
        # Spare workers: when every worker is inside a request that may block (a READ waiting on
        # the registry), one more is started so that someone always reads /dev/fuse: metadata
        # answered from the bootstrap never queues behind data, and concurrent READs do not
        # queue behind each other's deadlines. Spares retire when idle again.
        self.max_threads = max(threads, max_threads or min(1024, max(64, 4 * threads)))
        self._blocked = 0  # workers inside a hand-off request
        self.spares_started = 0
        self.spare_failures = 0
        self.aborts = 0  # connections aborted by stop() after their grace
        self.bufsize = max(FUSE_MIN_READ_BUFFER, max_write + HEADER_ROOM)
        self.fsname = fsname
        self.allow_other = allow_other
        self.readahead_kb = readahead_kb
        self._ra_pending = False
        # called by the worker that wrote the INIT reply, once the kernel has processed it
        # (the io_uring transport registers its queues from there)
        self.on_init: Callable[[], None] | None = None
        self.fd = -1
        self._workers: list[threading.Thread] = []
        self._fds: list[int] = []
        self._backings: set[int] = set()  # passthrough backing ids registered and not closed
        self._stopped = threading.Event()
        self._running = 0
        self._lock = threading.Lock()
        # held by the one worker allowed to read /dev/fuse (None: every worker reads)
        self._reader = threading.Lock() if leader_follower and threads > 1 else None
        self.poll_ns = max(0, poll_us) * 1000
        # stop polling when the CPU is busy (a long sched_yield, RUNQ_*); off only in tests of
        # the polling itself, which must not depend on how loaded the machine is
        self.busy_check = busy_check
        # READs the handler says do not wait on slow I/O (local blobs) are answered by the
        # reading thread, like metadata: no hand-off (None: every READ is handed on)
        self.read_waits = read_waits
        self._poll_stats: list[PollStats] = []  # one per running worker
        self._poll_done = PollStats()  # the counts of workers that have ended (spares retire)
        self._since_handoff = 0  # requests read since the last hand-off one (READ, WRITE, ...)

    def poll_metrics(self) -> dict[str, int]:
        """Busy-polling counters summed over the workers (the metrics API shows them)."""
        with self._lock:
            stats = [*self._poll_stats, self._poll_done]
        return {"poll_us": self.poll_ns // 1000, "requests": sum(p.reads for p in stats),
                "reads_kept": sum(p.kept for p in stats),
                "poll_hits": sum(p.hits for p in stats), "poll_misses": sum(p.misses for p in stats),
                "poll_queued": sum(p.queued for p in stats),
                "poll_yielded": sum(p.yielded for p in stats), "poll_lent": sum(p.lent for p in stats),
                "poll_cpu_busy": sum(p.busy for p in stats),
                "poll_spin_us": sum(p.spin_ns for p in stats) // 1000}

    # -- lifecycle -------------------------------------------------------------------------------
    def mount(self) -> None:
        self.fd = fuse_mount(self.mountpoint, fsname=self.fsname, allow_other=self.allow_other)
        self._ra_pending = self.readahead_kb > 0
        self._start_workers(self.fd)

    def _after_init(self) -> None:
        """The kernel caps a FUSE mount's readahead at its bdi default (128 KiB) whatever the
        INIT reply offers, and sets it while handling that reply; raising read_ahead_kb right
        after (root only) lets sequential reads arrive as READs of up to max_pages (1 MiB):
        an eighth of the requests for the same bytes."""
        self._ra_pending = False
        if set_readahead_kb(self.mountpoint, self.readahead_kb):
            log.debug("%s: read_ahead_kb = %d", self.mountpoint, self.readahead_kb)

    def attach(self, fd: int) -> None:
        """Serve an already-mounted connection (failover / hot upgrade hand the fd over)."""
        self.fd = fd
        self._start_workers(fd)

    def _start_workers(self, fd: int) -> None:
        self._fds = [fd] + [self._clone(fd) for _ in range(self.threads - 1)]
        self._stopped.clear()
        self._running = len(self._fds)
        for i, chan in enumerate(self._fds):
            t = threading.Thread(target=self._serve, args=(chan,), name=f"fuse-worker-{i}", daemon=True)
            self._workers.append(t)
            t.start()

    def _start_spare(self, fd: int) -> None:
        """A worker beyond `threads` (counted in `_running` by the caller) on a channel of its own."""
        try:
            chan = self._clone(fd)
        except OSError as e:
            with self._lock:
                self._running -= 1
                self.spare_failures += 1
            log.warning("no spare FUSE worker (clone of /dev/fuse failed: %s); requests may queue", e)
            return
        t = threading.Thread(target=self._serve, args=(chan, True), name=f"fuse-spare-{chan}", daemon=True)
        with self._lock:
            self.spares_started += 1
            self._fds.append(chan)
            self._workers.append(t)
        log.debug("all %d FUSE workers are blocked; started a spare", self._running - 1)
        t.start()

    def _count_blocking(self) -> bool:
        """A worker is about to handle a request that may block: counted; True when it must
        start a spare (`_start_spare`, already counted in `_running`) to keep one worker free."""
        with self._lock:
            self._blocked += 1
            spare = (self._blocked >= self._running and self._running < self.max_threads
                     and not self._stopped.is_set())
            if spare:
                self._running += 1
        return spare

    def _leave_blocking(self, spare: bool) -> bool:
        """Done with a blocking request; True when this spare worker should retire (another
        worker is free to read)."""
        with self._lock:
            self._blocked -= 1
            if spare and self._running - self._blocked > 1:
                self._running -= 1
                return True
        return False

    def _retire(self, fd: int) -> None:
        with self._lock:
            if fd in self._fds:
                self._fds.remove(fd)
            self._workers = [t for t in self._workers if t is not threading.current_thread()]
        with contextlib.suppress(OSError):
            os.close(fd)

    # -- passthrough ---------------------------------------------------------------------------
    def backing_open(self, fd: int) -> int:
        """FUSE_DEV_IOC_BACKING_OPEN: register open file `fd` for passthrough opens; its id.
        OSError when the kernel refuses (EPERM: passthrough not negotiated or no CAP_SYS_ADMIN;
        ELOOP: the file lives on a filesystem stacked too deep)."""
        if self.fd < 0:
            raise OSError(errno.EBADF, "the FUSE session is not mounted")
        backing_id = fcntl.ioctl(self.fd, FUSE_DEV_IOC_BACKING_OPEN, bytearray(BACKING_MAP.pack(fd, 0, 0)), True)
        with self._lock:
            self._backings.add(backing_id)
        return backing_id

    def backing_close(self, backing_id: int) -> None:
        """FUSE_DEV_IOC_BACKING_CLOSE; files opened through it keep their backing file."""
        with self._lock:
            if backing_id not in self._backings:
                return
            self._backings.discard(backing_id)
            fd = self.fd
        if fd >= 0:
            fcntl.ioctl(fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(BACKING_ID.pack(backing_id)), True)

    def _close_backings(self) -> None:
        """At the end of the session: ids nobody closed (the kernel would drop them with the
        connection anyway; closing them here keeps the count of open ones honest)."""
        with self._lock:
            left = sorted(self._backings)
        for backing_id in left:
            try:
                self.backing_close(backing_id)
            except OSError as e:
                log.info("closing passthrough backing id %d at session end: %s", backing_id, e)

    @property
    def backings_open(self) -> int:
        with self._lock:
            return len(self._backings)

    @staticmethod
    def _clone(fd: int) -> int:
        clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(clone, FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
        except OSError:
            os.close(clone)
            raise
        return clone

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every worker has finished; True when the session is over."""
        return self._stopped.wait(timeout)

    def unmount(self, lazy: bool = False) -> None:
        """Unmount (idempotent); workers then see ENODEV and exit."""
        with self._lock:
            if is_mountpoint(self.mountpoint):
                try:
                    fuse_umount(self.mountpoint, lazy=lazy)
                except OSError as e:
                    if e.errno != errno.EBUSY or lazy:
                        raise
                    log.warning("%s busy, detaching lazily", self.mountpoint)
                    fuse_umount(self.mountpoint, lazy=True)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Transport.stop: detach the mount lazily, then close. Files still open on it are served
        for `grace` seconds; past that the connection is aborted (their reads fail: ENOTCONN)
        so that the daemon ends now instead of when the last of them is closed."""
        conn = connection_of(self.mountpoint)  # (from mountinfo, before the detach)
        try:
            self.unmount(lazy=True)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                log.error("unmount %s: %s", self.mountpoint, e)
        if self._workers and not self.wait(grace) and conn >= 0:
            log.warning("%s is still in use %.1f s after its lazy umount; aborting the FUSE connection",
                        self.mountpoint, grace)
            self.aborts += abort_detached_connection(conn)
        self.close()

    def close(self) -> None:
        """Unmount, wait for the workers and release every channel fd."""
        self.unmount()
        for t in self._workers:
            t.join(timeout=10)
        self._close_backings()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._workers = []
        self.fd = -1

    def _poll_read(self, fd: int, buf: mmap.mmap, poller: select.poll, window: PollWindow, stats: PollStats,
                   clock: Callable[[], int], runq_fd: int) -> int:
        """read(2) one request, after polling for it for the worker's window: a request found
        so is read without the thread ever sleeping (no wake-up to pay). Not while another
        worker is inside a READ (or another hand-off request): its client waits for that reply
        before it sends more, and a spinning thread would only take CPU (and the GIL) from it;
        nor right after hand-offs (POLL_AFTER_METADATA). The spin yields the CPU between polls, so
        that a client woken on this CPU runs at once."""
        if runq_fd >= 0 and stats.reads % RUNQ_EVERY == 0:
            try:
                fields = os.pread(runq_fd, 128, 0).split()
                total, switches = int(fields[1]), int(fields[2])
            except (OSError, ValueError, IndexError):
                total = switches = -1
            if total >= 0 and window.runq(total, switches, stats.hits + stats.misses + stats.queued):
                stats.busy += 1
        if window.queued >= QUEUED_STREAK:
            # Requests have been waiting every time (several clients): a poll() first would
            # only add a syscall to each; read right away, and poll again once a read slept.
            t0 = clock()
            n = os.readv(fd, [buf])
            waited = clock() - t0
            if waited > _QUEUED_NS:
                window.queued = 0
                window.blocked(waited)
            else:
                stats.queued += 1
            return n
        w = window.window_ns
        if w and not self._blocked and self._since_handoff >= POLL_AFTER_METADATA:
            busy_check = self.busy_check
            t0 = now = clock()
            end = t0 + w
            poll = poller.poll
            yld = os.sched_yield
            found = False
            while not (found := bool(poll(0))):
                now = clock()
                if now >= end:
                    break
                yld()
                if busy_check and (lent := clock() - now) > _YIELD_BUSY_NS:
                    # Another task ran on this CPU meanwhile. A time slice of it: the CPU is
                    # wanted (another process), and spinning on a busy CPU only delays whoever
                    # needs it: one more look (the client may just have sent), then no polling
                    # for a while. A short turn (a kernel thread, the client woken here by our
                    # reply): go on polling.
                    if window.lent(lent):
                        found = bool(poll(0))
                        stats.yielded += 1
                        break
                    stats.lent += 1
            if found:
                window.queued = window.queued + 1 if now == t0 else 0  # there at the first look
                stats.hits += 1
                stats.spin_ns += clock() - t0
                return os.readv(fd, [buf])
            window.queued = 0
            stats.misses += 1
            stats.spin_ns += now - t0
        else:
            t0 = clock()
        n = os.readv(fd, [buf])
        window.blocked(clock() - t0)  # the whole wait, the spin included
        return n

    # -- the loop --------------------------------------------------------------------------------
    # Leader/follower: only the thread holding `_reader` reads /dev/fuse. It answers metadata
    # requests itself and keeps reading, so a stream of small requests never bounces between
    # threads (with blocking reads on every worker the kernel wakes them in turn, and each wake-up
    # is a GIL hand-over: about three context switches and 2-3x the round trip). Before a READ,
    # which may wait for a fetch and a decompression, it passes the reader role on, so other
    # requests keep flowing and READs still run in parallel.
    def _serve(self, fd: int, spare: bool = False) -> None:
        # An anonymous mapping, not a bytearray: pages become resident only as large requests
        # touch them, so idle workers cost no memory (a bytearray is zero-filled up front).
        buf = mmap.mmap(-1, self.bufsize)
        view = memoryview(buf)
        handler = self.handler
        read_waits = self.read_waits
        reader = self._reader
        leader = False
        retired = False
        stats = PollStats()
        with self._lock:
            self._poll_stats.append(stats)
        window = PollWindow(self.poll_ns)
        poller: select.poll | None = None
        runq_fd = -1
        if self.poll_ns:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            try:  # this thread's scheduler statistics (kernels without schedstats: no gating)
                if self.busy_check:
                    runq_fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                log.info("no /proc/thread-self/schedstat (%s): polling is not paused on busy CPUs", e)
        clock = time.monotonic_ns
        try:
            while not retired:
                if reader is not None and not leader:
                    reader.acquire()
                    leader = True
                try:
                    if poller is None:
                        n = os.readv(fd, [buf])
                    else:
                        n = self._poll_read(fd, buf, poller, window, stats, clock, runq_fd)
                    stats.reads += 1
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    if e.errno in (errno.ENODEV, errno.EBADF):
                        return  # unmounted or connection aborted: the session is over
                    raise
                if n == 0:
                    return
                blocking = buf[4] in _HANDOFF_OPCODES and buf[5] == 0
                if (blocking and read_waits is not None and buf[4] == FUSE_READ and n >= _READ_SIZE_END
                        and _READ_SIZE.unpack_from(buf, 56)[0] <= KEEP_READ_MAX and not read_waits(view[:n])):
                    blocking = False
                    stats.kept += 1
                self._since_handoff = 0 if blocking else self._since_handoff + 1
                if blocking:
                    # counted before the reader role goes: the next reader sees it and does
                    # not spin while this request is handled
                    if self._count_blocking():
                        self._start_spare(fd)
                    if leader:
                        leader = False
                        reader.release()  # type: ignore[union-attr]
                try:
                    reply = handler(view[:n])
                except ValueError as e:  # FuseProtocolError: a fragment with no header to answer
                    log.error("FUSE worker on fd %d: dropping request: %s", fd, e)
                    continue
                finally:
                    if blocking:
                        retired = self._leave_blocking(spare)
                if reply is None:
                    continue
                try:
                    if isinstance(reply, list):
                        os.writev(fd, reply)  # header + data without joining them first
                        head = reply[0]
                    else:
                        os.write(fd, reply)
                        head = reply
                    if type(head) is Then:
                        head.after()  # (while the requester wakes up)
                    if buf[4] == FUSE_INIT and buf[5] == 0:
                        if self._ra_pending:
                            self._after_init()
                        if self.on_init is not None:
                            self.on_init()
                except OSError as e:
                    # ENOENT: the request was interrupted and the kernel forgot it.
                    if e.errno == errno.ENOENT:
                        continue
                    if e.errno in (errno.ENODEV, errno.EBADF):
                        return
                    raise
        except Exception:
            log.exception("FUSE worker on fd %d failed", fd)
        finally:
            if leader:
                reader.release()  # type: ignore[union-attr]  # the next worker meets ENODEV too
            # No explicit buf.close(): a request slice may still be referenced (BufferError);
            # the mapping goes away with its last reference. Nothing here may raise before the
            # count below, or the session would never end.
            with contextlib.suppress(BufferError):
                view.release()
            if runq_fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(runq_fd)
            with self._lock:
                done = self._poll_done
                done.reads += stats.reads
                done.hits += stats.hits
                done.misses += stats.misses
                done.yielded += stats.yielded
                done.lent += stats.lent
                done.busy += stats.busy
                done.queued += stats.queued
                done.kept += stats.kept
                done.spin_ns += stats.spin_ns
                self._poll_stats.remove(stats)
            if retired:  # a spare no longer needed: already uncounted, its channel closes
                self._retire(fd)
            else:
                # A count, not is_alive(): two workers ending together would each still see the
                # other alive, and nobody would signal the end of the session.
                with self._lock:
                    self._running -= 1
                    if self._running == 0:
                        self._stopped.set()
