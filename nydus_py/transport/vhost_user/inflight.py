"""One virtqueue shared by a popping thread and several completing workers (no threads of its own).

Worker pools complete requests out of order, which the virtio spec allows; what must hold is
the ring's consistency. `InflightQueue` keeps it in one place, under one lock per queue:

* avail-side: only `pop` consumes avail entries, and a head that is still in flight is refused
  (a driver reusing a descriptor before it came back gets no second used element for it);
* used-side: `complete` writes the reply into the chain's buffers, pushes the used element and
  decides on (and sends) the interrupt in one critical section, and only for a head it handed
  out and has not yet returned, so every chain comes back exactly once with its own id;
* `stop` ends the queue: completions that arrive later are dropped (counted, logged) without
  touching guest memory, which the front-end may free or reuse once GET_VRING_BASE is answered.
* a handler that writes its reply into the chain's buffers itself (a READ preadv'd into guest
  memory) does so inside `guard(chain)`: refused (`Abandoned`) once the queue stopped or the
  chain is no longer in flight, and `stop` waits for the writes in progress (short: a copy or a
  local read, never a fetch) before it returns; `complete_written` then returns the chain.

The signal callable (the call eventfd) is injected, so tests drive this over plain buffers.
"""

import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence

from .virtqueue import Chain, DescriptorError, Virtqueue

log = logging.getLogger(__name__)

Buffers = Sequence[bytes | bytearray | memoryview]


# how long stop() waits for a write into guest memory in progress (a local preadv, a copy)
WRITER_GRACE = 10.0


class Abandoned(OSError):
    """The chain's buffers may no longer be written: its queue stopped (the front-end may reuse
    the memory), or the chain is no longer in flight."""


class _WriteGuard:
    """`with ring.guard(chain):` the span in which a handler writes into `chain`'s buffers."""

    __slots__ = ("ring", "chain")

    def __init__(self, ring: "InflightQueue", chain: Chain) -> None:
        self.ring = ring
        self.chain = chain

    def __enter__(self) -> "_WriteGuard":
        ring = self.ring
        chain = self.chain
        with ring.lock:
            if ring.stopped or ring.inflight.get(chain.head) is not chain:
                raise Abandoned(errno.ESHUTDOWN, f"queue {ring.index}: chain {chain.head} may no longer be written "
                                f"({'the queue stopped' if ring.stopped else 'not in flight'})")
            ring.writers += 1
        return self

    def __exit__(self, *exc: object) -> None:
        ring = self.ring
        with ring.lock:
            ring.writers -= 1
            if ring._waiters and not ring.writers:
                ring._idle.notify_all()


class InflightQueue:
    """A Virtqueue with its in-flight chains, safe for one popper and many completers."""

    def __init__(self, vq: Virtqueue, signal: Callable[[], None], *, index: int = 0) -> None:
        self.vq = vq
        self.signal = signal
        self.index = index
        self.lock = threading.Lock()
        self._idle = threading.Condition(self.lock)
        self.inflight: dict[int, Chain] = {}
        self.stopped = False
        self.popping = True  # False once stop_popping or stop was called
        self.completed = 0
        self.failed = 0  # completed with 0 bytes: bad chain, handler error, reply too big
        self.duplicates = 0  # heads the driver offered again while in flight (not served)
        self.dropped = 0  # completions after stop (not written, not pushed)
        self.writers = 0  # handlers writing into a chain's buffers right now (see guard)
        self._waiters = 0  # threads waiting on `_idle` (completions notify only when there are)

    def pop(self) -> Chain | None:
        """The next available chain (now in flight), or None when there is none or the queue
        stopped. A bad chain is completed here with 0 bytes and skipped. RingError propagates:
        the ring itself is broken."""
        with self.lock:
            return self._pop() if self.popping else None

    def _pop(self) -> Chain | None:
        """(under the lock, popping) pop()."""
        while True:
            head = self.vq.pop_head()
            if head is None:
                return None
            if head in self.inflight:
                self.duplicates += 1
                log.error("queue %d: the driver offered descriptor %d again while it is in flight; "
                          "ignoring the second offer", self.index, head)
                continue
            try:
                chain = self.vq.walk(head)
            except DescriptorError as e:
                log.error("queue %d: %s; completing it with an empty reply", self.index, e)
                self.failed += 1
                self._push(head, 0)
                continue
            self.inflight[head] = chain
            return chain

    def arm(self) -> bool:
        """Nothing left to pop: ask for a kick (EVENT_IDX) and say whether more arrived
        meanwhile (the caller then pops again). RingError propagates."""
        with self.lock:
            if not self.popping:
                return False
            self.vq.set_avail_event()
            return self.vq.pending() > 0

    def pop_or_arm(self) -> Chain | None:
        """pop(), and once nothing is left, arm() in the same critical section (a dispatcher
        going idle after each request takes the lock once, not twice): None when the ring is
        empty with the kick asked for, or the queue stopped (`popping`). RingError propagates."""
        with self.lock:
            while self.popping:
                chain = self._pop()
                if chain is not None:
                    return chain
                if not self.vq.rearm():
                    return None
            return None

    def complete(self, chain: Chain, reply: Buffers | None) -> bool:
        """Write `reply` into `chain` and return it to the driver; False (nothing written) if
        the queue stopped meanwhile or the chain is not in flight. A reply that does not fit
        completes the chain with 0 bytes."""
        with self.lock:
            if not self._replyable(chain):
                return False
            head = chain.head
            length = 0
            if reply:
                try:
                    length = chain.write(reply)
                except ValueError as e:
                    log.error("queue %d: %s", self.index, e)
                    self.failed += 1
            del self.inflight[head]
            self.completed += 1  # (counted before the driver can see it)
            self._push(head, length)
            if self._waiters and not self.inflight:
                self._idle.notify_all()
            return True

    def _replyable(self, chain: Chain) -> bool:
        """(under the lock) Whether `chain` may still be completed; a reply that may not is
        dropped here, logged and counted."""
        if self.stopped or self.inflight.get(chain.head) is not chain:
            self.dropped += 1
            log.warning("queue %d: dropping the reply to chain %d (the queue %s)", self.index, chain.head,
                        "stopped" if self.stopped else "does not have it in flight")
            return False
        return True

    def guard(self, chain: Chain) -> _WriteGuard:
        """The context in which a handler may write into `chain`'s buffers itself."""
        return _WriteGuard(self, chain)

    def complete_written(self, chain: Chain, length: int) -> bool:
        """Return `chain` to the driver with `length` bytes its handler wrote (inside `guard`);
        False (nothing pushed) if the queue stopped meanwhile or the chain is not in flight."""
        with self.lock:
            if not self._replyable(chain):
                return False
            if not 0 <= length <= chain.writable_size():
                log.error("queue %d: a handler says it wrote %d bytes into %d writable bytes; completing chain %d "
                          "with 0", self.index, length, chain.writable_size(), chain.head)
                self.failed += 1
                length = 0
            del self.inflight[chain.head]
            self.completed += 1
            self._push(chain.head, length)
            if self._waiters and not self.inflight:
                self._idle.notify_all()
            return True

    def _push(self, head: int, length: int) -> None:
        if self.vq.push_notify(head, length):
            self.signal()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if something still is after `timeout`."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wait(left)
            return True

    def stop_popping(self) -> None:
        """Consume no more avail entries (chains in flight still complete): the first step of
        a stop, so that what the driver offers meanwhile stays in its ring for a restart."""
        with self.lock:
            self.popping = False

    def stop(self) -> int:
        """Stop the queue; the number of chains abandoned in flight (their late replies are
        dropped). Idempotent."""
        with self.lock:
            self.stopped = True
            self.popping = False
            n = len(self.inflight)
            self.inflight.clear()
            self._idle.notify_all()
            # a write into guest memory already under way finishes before the front-end gets
            # our answer (new ones are refused now)
            deadline = time.monotonic() + WRITER_GRACE
            while self.writers:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("queue %d: %d writes into guest memory still running after %.0f s", self.index,
                              self.writers, WRITER_GRACE)
                    break
                self._wait(left)
            return n

    def _wait(self, timeout: float) -> None:
        """(under the lock) Wait on `_idle`, counted so that completions know to notify."""
        self._waiters += 1
        try:
            self._idle.wait(timeout)
        finally:
            self._waiters -= 1

    def last_avail(self) -> int:
        with self.lock:
            return self.vq.last_avail
