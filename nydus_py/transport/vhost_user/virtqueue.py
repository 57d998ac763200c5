"""Split virtqueues over mapped guest memory (virtio 1.x §2.7), sans-IO.

`GuestMemory` translates guest-physical addresses (descriptors) and frontend virtual addresses
(ring locations) into memoryviews of the mapped regions, refusing anything that is not wholly
inside one region. `Virtqueue` pops descriptor chains (direct and indirect, with loop and
size limits), completes them on the used ring and decides whether the driver wants an
interrupt (EVENT_IDX or NO_INTERRUPT). A bad chain raises `DescriptorError` for that request
only; a bad ring (avail index jumping ahead by more than the queue size, a head out of range)
raises `RingError`, after which the queue stops.

Guest memory is shared with a running guest: every value read from it is untrusted and may change
between two reads, so each descriptor is read exactly once and checked before use.
"""

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, islice
from operator import add, ne

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
# the rings' u16/u32 fields are accessed as native memoryview items (see Virtqueue.__init__)
if sys.byteorder != "little":
    raise ImportError("the virtqueue code reads virtio's little-endian rings as native integers")
# An indirect table can't be longer than this many descriptors (Linux allocates at most one per
# scatterlist entry of a request; 1 MiB of 4 KiB pages plus headers is ~260).
MAX_INDIRECT = 4096
# Total bytes one chain may describe in each direction (a 1 MiB FUSE WRITE/READ plus headers).
MAX_CHAIN_BYTES = 64 << 20
# Indirect tables this long or longer are decoded in whole-table steps (`Virtqueue._linear`);
# for shorter ones (metadata requests: 4 descriptors) the entry-by-entry walk is quicker.
LINEAR_MIN = 16
# A linear table's readable head of at most this many descriptors is decoded one by one
# (`Virtqueue._head`): cheaper than the whole-table steps for a READ's 2
FEW = 4
# the flags and next fields of a linear indirect table (`Virtqueue._linear`), to compare against
_NEXTS = list(range(1, MAX_INDIRECT + 1))
_READABLE = [DESC_F_NEXT] * MAX_INDIRECT
_WRITABLE = [DESC_F_NEXT | DESC_F_WRITE] * MAX_INDIRECT
# Short indirect tables (a metadata request's 3-6 descriptors) decoded lately, remembered per
# queue with their views (`Virtqueue._tables`): a driver sending one request at a time gets
# its request and argument buffers back from its allocator each time (Linux: the same fuse_req
# and argument buffer for every OPEN, RELEASE, GETATTR...), so the same table comes again.
TABLES_KEPT = 16


class VirtqueueError(ValueError):
    """Base class: something in guest memory is not what the virtio spec allows."""


class DescriptorError(VirtqueueError):
    """One chain is unusable (out-of-memory address, loop, bad flags): that request fails."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(f"chain {head}: {message}")
        self.head = head


class RingError(VirtqueueError):
    """The ring itself is corrupt: the queue can't go on."""


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    view: memoryview  # `size` bytes of the mapping, starting at the region's mmap_offset


class GuestMemory:
    """An immutable set of mapped regions. A new memory table builds a new object; workers that
    still hold the old one keep its mappings alive until they let go (no unmap under a reader)."""

    def __init__(self, regions: Sequence[Region] = ()) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self._by_uva = sorted(regions, key=lambda r: r.uva)
        # the region of the last descriptor: a READ's 256 page descriptors are mostly in one
        self._hit: Region | None = None

    @staticmethod
    def _find(regions: list[Region], addr: int, length: int, uva: bool) -> memoryview | None:
        for r in regions:
            base = r.uva if uva else r.gpa
            if base <= addr < base + r.size:
                off = addr - base
                if length > r.size - off:
                    return None
                return r.view[off : off + length]
        return None

    def region(self, addr: int) -> Region | None:
        """The region holding guest-physical `addr`, or None."""
        r = self._hit
        if r is not None and 0 <= addr - r.gpa < r.size:
            return r
        for r in self.regions:
            if 0 <= addr - r.gpa < r.size:
                self._hit = r
                return r
        return None

    def gpa(self, addr: int, length: int) -> memoryview | None:
        """`length` bytes at guest-physical `addr`, or None when not wholly inside one region."""
        if length == 0:
            return memoryview(b"")
        r = self._hit
        if r is not None:
            off = addr - r.gpa
            if off >= 0 and off + length <= r.size:
                return r.view[off : off + length]
        for r in self.regions:
            if r.gpa <= addr < r.gpa + r.size:
                self._hit = r
                off = addr - r.gpa
                return r.view[off : off + length] if length <= r.size - off else None
        return None

    def uva(self, addr: int, length: int) -> memoryview | None:
        """`length` bytes at frontend virtual address `addr` (ring addresses), or None."""
        return self._find(self._by_uva, addr, length, True)

    def total(self) -> int:
        return sum(r.size for r in self.regions)


@dataclass(slots=True)
class Chain:
    """A popped request: the readable then writable buffers (views into guest memory)."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    wsize: int = -1  # total writable bytes (computed on demand)

    def read_all(self) -> bytes:
        r = self.readable
        return bytes(r[0]) if len(r) == 1 else b"".join(r)

    def writable_size(self) -> int:
        if self.wsize < 0:
            self.wsize = sum(len(v) for v in self.writable)
        return self.wsize

    def write(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Scatter `parts` across the writable buffers; returns the bytes written (all of
        them, or raises ValueError before writing anything if they don't fit)."""
        if len(parts) == 1:  # the common case: one reply buffer (a header, or a header and its arguments)
            src = parts[0]
            total = len(src)
            w = self.writable
            if w and total <= len(w[0]):
                w[0][:total] = src
                return total
            if total > self.writable_size():
                raise ValueError(f"reply of {total} bytes does not fit {self.writable_size()} writable bytes")
            # (a reply with arguments: Linux gives the out header and each argument a buffer)
            m = memoryview(src)
            if m.format != "B":
                m = m.cast("B")
            off = 0
            for buf in w:
                n = len(buf)
                if total - off <= n:
                    buf[: total - off] = m[off:]
                    break
                buf[:] = m[off : off + n]
                off += n
            return total
        total = sum(len(p) for p in parts)
        if total > self.writable_size():
            raise ValueError(f"reply of {total} bytes does not fit {self.writable_size()} writable bytes")
        bufs = iter(self.writable)
        dst = next(bufs, None)
        doff = 0
        for p in parts:
            src = memoryview(p).cast("B")
            soff = 0
            while soff < len(src):
                while dst is not None and doff >= len(dst):
                    dst = next(bufs, None)
                    doff = 0
                assert dst is not None  # guaranteed by the size check
                n = min(len(src) - soff, len(dst) - doff)
                dst[doff : doff + n] = src[soff : soff + n]
                soff += n
                doff += n
        return total


class Virtqueue:
    """The device side of one split virtqueue."""

    def __init__(self, memory: GuestMemory, num: int, desc: int, avail: int, used: int, *,
                 last_avail: int = 0, indirect: bool = False, event_idx: bool = False,
                 max_chain_bytes: int = MAX_CHAIN_BYTES) -> None:
        """`desc`/`avail`/`used` are frontend virtual addresses (as SET_VRING_ADDR sends them)."""
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.memory = memory
        self.num = num
        self.indirect = indirect
        self.event_idx = event_idx
        self.max_chain_bytes = max_chain_bytes
        d = memory.uva(desc, num * DESC_SIZE)
        a = memory.uva(avail, 6 + 2 * num)
        u = memory.uva(used, 6 + 8 * num)
        if d is None or a is None or u is None:
            which = [n for n, v in (("descriptor table", d), ("avail ring", a), ("used ring", u)) if v is None]
            raise RingError(f"{', '.join(which)} not inside guest memory")
        self.desc, self.avail, self.used = d, a, u
        # The ring fields as u16/u32 items: an item is read or stored with one load or store of
        # its size (memoryview items go through memcpy of the type), never through other values
        # on the way. struct's pack_into clears the bytes before it writes them: a driver
        # polling the used index could see 0 in between (Linux: a stale used element taken for
        # a reply, or the queue marked broken).
        self._avail16 = a.cast("H")  # flags, idx, ring[num], used_event
        self._used16 = u.cast("H")  # flags, idx, ..., avail_event at 2 + 4 * num
        self._used32 = u[: 4 + 8 * num].cast("I")  # ring[i] = (id at 1 + 2i, len at 2 + 2i)
        self.last_avail = last_avail & 0xFFFF
        # avail entries past last_avail known from the last read of the avail index: popped
        # without reading it again (the index is ours to move: nothing else sets last_avail)
        self._ahead = 0
        self.used_idx = self._used16[1]
        self._signalled_used = self.used_idx  # used idx at the last interrupt
        self._signalled_valid = False
        self.linear_min = LINEAR_MIN
        # (writable descriptors of the last linear indirect table, their views, their bytes,
        # the number of readable descriptors before them)
        self._memo: tuple[bytes, list[memoryview], int, int] | None = None
        # short indirect tables -> (readable views, writable views, writable bytes), at most
        # TABLES_KEPT: a pure function of the bytes and this queue's memory table, as `_memo`
        self._tables: dict[bytes, tuple[list[memoryview], list[memoryview], int]] = {}
        self.tables_decoded = 0  # short tables walked and kept
        self.tables_reused = 0  # short tables found kept

    # -- avail side ------------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self._avail16[1]

    def pending(self) -> int:
        """How many chains the driver has made available that we have not popped."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.num:
            raise RingError(f"avail index {self.avail_idx()} is {n} ahead of {self.last_avail} (queue size {self.num})")
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None. DescriptorError: that chain is bad (it has been
        consumed; complete it with `push(e.head, 0)`)."""
        head = self.pop_head()
        return None if head is None else self.walk(head)

    def pop_head(self) -> int | None:
        """Consume the next avail entry and return its head (not yet walked), or None; lets a
        caller refuse a head it already has in flight before reading its descriptors. The avail
        index is read again only once the entries up to its last value are consumed."""
        if not self._ahead:
            idx = self.avail_idx()
            n = (idx - self.last_avail) & 0xFFFF
            if n > self.num:
                raise RingError(f"avail index {idx} is {n} ahead of {self.last_avail} (queue size {self.num})")
            if not n:
                return None
            self._ahead = n
        self._ahead -= 1
        head = self._avail16[2 + self.last_avail % self.num]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.num:
            raise RingError(f"avail ring names descriptor {head} of {self.num}")
        return head

    def set_avail_event(self) -> None:
        """With EVENT_IDX: ask to be kicked once the driver makes the entry after
        `last_avail` available."""
        if self.event_idx:
            self._used16[2 + 4 * self.num] = self.last_avail

    def rearm(self) -> bool:
        """`set_avail_event`, then whether anything is pending (`pending`, which raises
        RingError): what a dispatcher that found the ring empty does."""
        self.set_avail_event()
        return self.pending() > 0

    def walk(self, head: int) -> Chain:
        """The chain starting at descriptor `head` (DescriptorError if it is bad)."""
        mem = self.memory
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table = self.desc
        entries: list[tuple[int, int, int, int]] | None = None  # an indirect table, decoded once
        size = self.num
        idx = head
        seen = 0
        rbytes = wbytes = 0
        limit = self.max_chain_bytes
        hit = mem._hit  # the region of the previous buffer (a READ's pages are mostly in one)
        key: bytes | None = None  # a short indirect table that is the whole chain (to remember)
        while True:
            seen += 1
            if seen > size:
                raise DescriptorError(head, "descriptor chain loops or is longer than its table")
            if entries is None:
                addr, length, flags, nxt = DESC.unpack_from(table, idx * DESC_SIZE)
            else:
                addr, length, flags, nxt = entries[idx]
            if flags & DESC_F_INDIRECT:
                if entries is not None:
                    raise DescriptorError(head, "nested indirect descriptor")
                if not self.indirect:
                    raise DescriptorError(head, "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
                if flags & DESC_F_NEXT:
                    raise DescriptorError(head, "indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise DescriptorError(head, f"indirect table of {length} bytes")
                t = mem.gpa(addr, length)
                if t is None:
                    raise DescriptorError(head, f"indirect table {addr:#x}+{length:#x} outside guest memory")
                # decoded from one copy: the guest can't change the table under us while we walk it
                raw = bytes(t)
                if seen == 1:  # the chain is this table
                    if length >= self.linear_min * DESC_SIZE:
                        chain = self._linear(head, raw)
                        if chain is not None:
                            return chain
                    else:
                        known = self._tables.get(raw)
                        if known is not None:  # decoded before, byte for byte: the same views
                            self.tables_reused += 1
                            return Chain(head, list(known[0]), list(known[1]), known[2])
                        key = raw
                entries = list(DESC.iter_unpack(raw))
                size = length // DESC_SIZE
                idx = 0
                seen = 0
                continue
            if hit is not None and addr - hit.gpa >= 0 and addr - hit.gpa + length <= hit.size:
                off = addr - hit.gpa
                buf: memoryview | None = hit.view[off : off + length]
            else:
                buf = mem.gpa(addr, length)
                if buf is None:
                    raise DescriptorError(head, f"buffer {addr:#x}+{length:#x} outside guest memory")
                hit = mem._hit
            if flags & DESC_F_WRITE:
                wbytes += length
                if wbytes > limit:
                    raise DescriptorError(head, f"more than {limit} writable bytes")
                if length:
                    writable.append(buf)  # type: ignore[arg-type]
            else:
                if writable:
                    raise DescriptorError(head, "readable descriptor after a writable one")
                rbytes += length
                if rbytes > limit:
                    raise DescriptorError(head, f"more than {limit} readable bytes")
                if length:
                    readable.append(buf)  # type: ignore[arg-type]
            if not flags & DESC_F_NEXT:
                if key is not None:
                    tables = self._tables
                    if len(tables) >= TABLES_KEPT:
                        tables.clear()  # (a driver's few tables come back at once; cheaper than LRU upkeep)
                    tables[key] = (readable, writable, wbytes)
                    self.tables_decoded += 1
                    return Chain(head, list(readable), list(writable), wbytes)
                return Chain(head, readable, writable, wbytes)
            if nxt >= size:
                raise DescriptorError(head, f"next descriptor {nxt} out of a table of {size}")
            idx = nxt

    def _linear(self, head: int, raw: bytes) -> Chain | None:
        """The chain of an indirect table laid out as drivers do (Linux always): entry i's next
        is i+1, readable entries then writable ones, none empty, each half inside one region
        and within the byte limit. Decoded in whole-table steps (memoryview casts, C-level
        compares) instead of one Python step per descriptor; buffers adjacent in guest memory
        become one view. None when the table is anything else: `walk` then decodes it entry
        by entry (and reports what is wrong with it).

        The writable half of the last table is remembered with its views: a reader that
        reuses its buffer (dd, fio and databases with O_DIRECT) sends the same 256 page
        descriptors every time, and a table equal byte for byte decodes to the same views (a
        pure function of the bytes and this queue's memory table). A table whose tail is the
        remembered one byte for byte has only its readable head checked (two entries for a
        READ, not all 259)."""
        n = len(raw) // DESC_SIZE
        memo = self._memo
        if memo is not None:
            tail, kept, kept_bytes, r = memo
            cut = r * DESC_SIZE
            if len(raw) == cut + len(tail) and raw[cut:] == tail:
                readable: list[memoryview] | None = self._head(raw, r) if r else []
                if readable is None:
                    return None
                return Chain(head, readable, list(kept), kept_bytes)
        m = memoryview(raw)
        h = m.cast("H")
        flags = h[6::8].tolist()
        last = flags.pop()
        if h[7::8].tolist()[:-1] != _NEXTS[: n - 1]:
            return None
        r = flags.count(DESC_F_NEXT)  # readable entries before the last
        if flags[:r] != _READABLE[:r] or flags[r:] != _WRITABLE[: n - 1 - r]:
            return None
        if last == 0:
            if r != n - 1:
                return None  # a readable descriptor after a writable one
            r = n
        elif last != DESC_F_WRITE:
            return None
        readable = []
        writable: list[memoryview] = []
        wbytes = 0
        if r < n:
            got = self._buffers(m[r * DESC_SIZE :])
            if got is None:
                return None
            writable, wbytes = got
            self._memo = (raw[r * DESC_SIZE :], writable, wbytes, r)
        if r:
            head_bufs = self._head(raw, r, checked=True)
            if head_bufs is None:
                return None
            readable = head_bufs
        return Chain(head, readable, list(writable), wbytes)

    def _head(self, raw: bytes, r: int, checked: bool = False) -> list[memoryview] | None:
        """Views of the buffers of the first `r` descriptors of `raw`, which must be readable
        and each chained to the next (unless `checked`: the caller did); None when they are
        not, or one is empty, outside guest memory, or they are over the byte limit. A
        request's few (a READ's 2) are decoded one by one: quicker than the whole-table steps
        of `_buffers`, used for more."""
        if r > FEW:
            h = memoryview(raw)[: r * DESC_SIZE].cast("H")
            if not checked and (h[6::8].tolist() != _READABLE[:r] or h[7::8].tolist() != _NEXTS[:r]):
                return None
            got = self._buffers(memoryview(raw)[: r * DESC_SIZE])
            return None if got is None else got[0]
        gpa = self.memory.gpa
        out: list[memoryview] = []
        total = 0
        start = end = -1  # the run of buffers adjacent in guest memory that out[-1] views
        for i in range(r):
            addr, length, flags, nxt = DESC.unpack_from(raw, i * DESC_SIZE)
            if not length or not checked and (flags != DESC_F_NEXT or nxt != i + 1):
                return None
            total += length
            if addr == end:  # adjacent to the previous one: one view (as `_buffers` does)
                v = gpa(start, end + length - start)
                if v is not None:
                    out[-1] = v
                    end += length
                    continue
            v = gpa(addr, length)
            if v is None:
                return None
            out.append(v)
            start, end = addr, addr + length
        return out if total <= self.max_chain_bytes else None

    def _buffers(self, part: memoryview) -> tuple[list[memoryview], int] | None:
        """Views of the buffers of descriptors `part` (validated flags and order) and their
        total bytes; None when one is empty, outside the region of the first, or the total is
        over the limit."""
        lens = part.cast("I")[2::4].tolist()
        if 0 in lens:
            return None
        total = sum(lens)
        if total > self.max_chain_bytes:
            return None
        addrs = part.cast("Q")[0::2].tolist()
        ends = list(map(add, addrs, lens))
        region = self.memory.region(min(addrs))
        if region is None or max(ends) > region.gpa + region.size:
            return None
        n = len(lens)
        # runs of buffers adjacent in guest memory, one view each
        starts = [0, *compress(range(1, n), map(ne, ends, islice(addrs, 1, None)))]
        if len(starts) < n:
            stops = [s - 1 for s in islice(starts, 1, None)]
            stops.append(n - 1)
            addrs = list(map(addrs.__getitem__, starts))
            ends = list(map(ends.__getitem__, stops))
        base = region.gpa
        v = region.view
        return [v[a - base : e - base] for a, e in zip(addrs, ends, strict=True)], total

    # -- used side -------------------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Return chain `head` to the driver with `length` bytes written. The element is stored
        before the index that publishes it (x86 keeps stores in order; the GIL and the
        mmap'd buffer give no reordering of their own)."""
        slot = 2 * (self.used_idx % self.num)
        elems = self._used32
        elems[1 + slot] = head
        elems[2 + slot] = length
        self.used_idx = idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = idx  # (one store: see __init__)

    def push_notify(self, head: int, length: int) -> bool:
        """`push`, then `needs_notify`: what every completion does."""
        self.push(head, length)
        return self.needs_notify()

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        new = self.used_idx
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not self.event_idx:
            return not self._avail16[0] & AVAIL_F_NO_INTERRUPT and new != old
        used_event = self._avail16[2 + self.num]
        if not valid:
            return True
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
