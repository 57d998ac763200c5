"""Split virtqueue parsing over plain buffers: chains, indirect tables, limits, and fuzzed tables
that must only ever produce DescriptorError/RingError (never another exception, never a view
outside guest memory)."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_py.transport.vhost_user.inflight import InflightQueue
from nydus_py.transport.vhost_user.virtqueue import (
    LINEAR_MIN,
    Chain,
    DescriptorError,
    GuestMemory,
    Region,
    RingError,
    Virtqueue,
)

GPA = 0x10000
UVA = 0x7000_0000
SIZE = 0x10000
NUM = 8
DESC, AVAIL, USED = 0x0, 0x100, 0x200  # offsets of the rings in the region
DATA = 0x1000


def make(buf: bytearray | None = None, *, indirect: bool = True, event_idx: bool = False) -> tuple[bytearray, Virtqueue]:
    buf = buf if buf is not None else bytearray(SIZE)
    mem = GuestMemory([Region(GPA, SIZE, UVA, memoryview(buf))])
    q = Virtqueue(mem, NUM, UVA + DESC, UVA + AVAIL, UVA + USED, indirect=indirect, event_idx=event_idx)
    return buf, q


def desc(buf: bytearray, table: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    struct.pack_into("<QIHH", buf, table + 16 * i, addr, length, flags, nxt)


def offer(buf: bytearray, head: int, idx: int = 1) -> None:
    struct.pack_into("<H", buf, AVAIL + 4 + 2 * ((idx - 1) % NUM), head)
    struct.pack_into("<H", buf, AVAIL + 2, idx)


def test_direct_chain_and_used_ring() -> None:
    buf, q = make()
    buf[DATA : DATA + 5] = b"hello"
    desc(buf, DESC, 3, GPA + DATA, 5, 1, 5)
    desc(buf, DESC, 5, GPA + DATA + 0x100, 4, 1 | 2, 6)
    desc(buf, DESC, 6, GPA + DATA + 0x200, 4, 2)
    offer(buf, 3)
    c = q.pop()
    assert isinstance(c, Chain) and c.head == 3 and c.read_all() == b"hello"
    assert c.writable_size() == 8
    assert c.write([b"abc", memoryview(b"defgh")]) == 8
    assert bytes(buf[DATA + 0x100 : DATA + 0x104]) == b"abcd" and bytes(buf[DATA + 0x200 : DATA + 0x204]) == b"efgh"
    with pytest.raises(ValueError):
        c.write([b"x" * 9])
    assert q.pop() is None
    q.push(3, 8)
    assert struct.unpack_from("<HHII", buf, USED) == (0, 1, 3, 8)
    assert q.needs_notify() and not q.needs_notify()  # nothing new since the last interrupt


def test_indirect_table() -> None:
    buf, q = make()
    table = 0x800
    desc(buf, table, 0, GPA + DATA, 3, 1, 1)
    desc(buf, table, 1, GPA + DATA + 0x10, 16, 2)
    desc(buf, DESC, 0, GPA + table, 32, 4)
    offer(buf, 0)
    c = q.pop()
    assert c is not None and len(c.readable) == 1 and c.writable_size() == 16


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda b: desc(b, DESC, 0, GPA + SIZE - 4, 8, 0), "outside guest memory"),
        (lambda b: desc(b, DESC, 0, 0x10, 8, 0), "outside guest memory"),
        (lambda b: desc(b, DESC, 0, 1 << 63, 1 << 31, 0), "outside guest memory"),
        (lambda b: desc(b, DESC, 0, GPA + DATA, 4, 1, 0), "loops"),
        (lambda b: (desc(b, DESC, 0, GPA + DATA, 4, 1, 1), desc(b, DESC, 1, GPA + DATA, 4, 1, 0)), "loops"),
        (lambda b: desc(b, DESC, 0, GPA + DATA, 4, 1, NUM), "out of a table"),
        (lambda b: (desc(b, DESC, 0, GPA + DATA, 4, 2 | 1, 1), desc(b, DESC, 1, GPA + DATA, 4, 0)),
         "readable descriptor after a writable"),
        (lambda b: desc(b, DESC, 0, GPA + 0x800, 24, 4), "indirect table of 24"),
        (lambda b: desc(b, DESC, 0, GPA + 0x800, 0, 4), "indirect table of 0"),
        (lambda b: desc(b, DESC, 0, GPA + SIZE - 16, 32, 4), "indirect table"),
        (lambda b: desc(b, DESC, 0, GPA + 0x800, 16, 4 | 1, 1), "NEXT"),
        (lambda b: (desc(b, DESC, 0, GPA + 0x800, 16, 4), desc(b, 0x800, 0, GPA + 0x900, 16, 4)), "nested"),
        (lambda b: (desc(b, DESC, 0, GPA + 0x800, 32, 4), desc(b, 0x800, 0, GPA + DATA, 4, 1, 1),
                    desc(b, 0x800, 1, GPA + DATA, 4, 1, 0)), "loops"),
    ],
)
def test_bad_chains_fail_that_request_only(setup: object, message: str) -> None:
    buf, q = make()
    setup(buf)  # type: ignore[operator]
    offer(buf, 0)
    with pytest.raises(DescriptorError, match=message) as ei:
        q.pop()
    assert ei.value.head == 0
    q.push(0, 0)
    # the next request is fine
    desc(buf, DESC, 1, GPA + DATA, 4, 0)
    offer(buf, 1, idx=2)
    c = q.pop()
    assert c is not None and c.head == 1


def test_indirect_refused_unless_negotiated() -> None:
    buf, q = make(indirect=False)
    desc(buf, DESC, 0, GPA + 0x800, 16, 4)
    offer(buf, 0)
    with pytest.raises(DescriptorError, match="INDIRECT_DESC"):
        q.pop()


def test_broken_rings() -> None:
    buf, q = make()
    struct.pack_into("<H", buf, AVAIL + 2, NUM + 1)  # more available than the queue holds
    with pytest.raises(RingError):
        q.pop()
    buf, q = make()
    offer(buf, NUM)  # a head out of range
    with pytest.raises(RingError):
        q.pop()
    mem = GuestMemory([Region(GPA, SIZE, UVA, memoryview(bytearray(SIZE)))])
    with pytest.raises(RingError, match="used ring"):
        Virtqueue(mem, NUM, UVA, UVA + 0x100, UVA + SIZE - 8)
    with pytest.raises(RingError, match="power of two"):
        Virtqueue(mem, 6, UVA, UVA + 0x100, UVA + 0x200)


def test_event_idx_suppression() -> None:
    buf, q = make(event_idx=True)
    for i in range(3):
        desc(buf, DESC, i, GPA + DATA, 4, 0)
        offer(buf, i, idx=i + 1)
    for _ in range(3):
        c = q.pop()
        assert c is not None
    q.set_avail_event()
    assert struct.unpack_from("<H", buf, USED + 4 + 8 * NUM)[0] == 3
    q.push(0, 0)
    assert q.needs_notify()  # the first interrupt is always sent
    struct.pack_into("<H", buf, AVAIL + 4 + 2 * NUM, 2)  # used_event: "interrupt me once used passes 2"
    q.push(1, 0)
    assert not q.needs_notify()  # used idx 2: not past used_event yet
    q.push(2, 0)
    assert q.needs_notify()  # 3 > used_event


def test_regions_translate_by_gpa_and_uva() -> None:
    a, b = bytearray(0x1000), bytearray(0x2000)
    mem = GuestMemory([Region(0x1_0000_0000, 0x2000, 0x9000, memoryview(b)), Region(0, 0x1000, 0x5000, memoryview(a))])
    v = mem.gpa(0x1_0000_0ff0, 0x10)
    assert v is not None
    v[:] = b"x" * 16
    assert b[0xFF0:0x1000] == b"x" * 16
    assert mem.gpa(0xFF0, 0x20) is None  # runs off the end of a region
    assert mem.gpa(0x1000, 1) is None  # in the hole
    u = mem.uva(0x5000, 0x1000)
    assert u is not None and len(u) == 0x1000
    assert mem.total() == 0x3000


@settings(max_examples=300, deadline=None)
@given(table=st.binary(min_size=16 * NUM, max_size=16 * NUM), heads=st.lists(st.integers(0, 0xFFFF), max_size=4),
       idx=st.integers(0, 0xFFFF), indirect=st.binary(max_size=256))
def test_fuzzed_rings_never_escape(table: bytes, heads: list[int], idx: int, indirect: bytes) -> None:
    buf = bytearray(SIZE)
    buf[DESC : DESC + len(table)] = table
    buf[0x800 : 0x800 + len(indirect)] = indirect
    for i, h in enumerate(heads):
        struct.pack_into("<H", buf, AVAIL + 4 + 2 * i, h)
    struct.pack_into("<H", buf, AVAIL + 2, idx)
    _, q = make(buf)
    for _ in range(NUM + 1):
        try:
            c = q.pop()
        except DescriptorError:
            continue
        except RingError:
            return
        if c is None:
            return
        for v in c.readable + c.writable:
            # every buffer is a slice of the one region (never a copy, never truncated)
            assert isinstance(v, memoryview) and v.obj is buf and 0 < len(v) <= SIZE


def test_inflight_queue_returns_each_chain_once() -> None:
    """The sans-IO core of the worker pools: out-of-order completion, a head offered again while
    in flight, a second completion, and completions after stop (nothing written, nothing pushed)."""
    buf, vq = make()
    signals: list[int] = []
    ring = InflightQueue(vq, lambda: signals.append(vq.used_idx))
    for i in range(4):
        desc(buf, DESC, i, GPA + DATA + 0x100 * i, 16, 2)
    for n, head in enumerate([0, 1, 2], 1):
        offer(buf, head, n)
    a, b, c = ring.pop(), ring.pop(), ring.pop()
    assert a is not None and b is not None and c is not None and ring.pop() is None
    offer(buf, 1, 4)  # head 1 again, still in flight: refused, never walked
    offer(buf, 3, 5)
    d = ring.pop()
    assert d is not None and d.head == 3 and ring.duplicates == 1
    assert ring.complete(c, [b"C" * 16]) and ring.complete(a, [b"A" * 4])
    assert not ring.complete(c, [b"X" * 16])  # a second completion of the same chain
    assert struct.unpack_from("<HH", buf, USED) == (0, 2)
    assert [struct.unpack_from("<II", buf, USED + 4 + 8 * s) for s in range(2)] == [(2, 16), (0, 4)]
    assert bytes(buf[DATA + 0x200 : DATA + 0x210]) == b"C" * 16 and signals == [1, 2]
    assert not ring.wait_idle(0)
    offer(buf, 3, 6)
    ring.stop_popping()  # the first step of a stop: nothing more is consumed, replies still land
    assert ring.pop() is None and vq.last_avail == 5
    assert ring.complete(d, [b"D" * 16]) and struct.unpack_from("<H", buf, USED + 2)[0] == 3
    assert ring.stop() == 1  # b abandoned
    assert not ring.complete(b, [b"B" * 16]) and ring.dropped == 2
    assert bytes(buf[DATA + 0x100 : DATA + 0x110]) == b"\0" * 16
    assert struct.unpack_from("<H", buf, USED + 2)[0] == 3 and ring.wait_idle(0)
    assert ring.pop() is None and vq.last_avail == 5  # a stopped queue consumes nothing more


# -- the one-pass decode of linear indirect tables (Virtqueue._linear) -----------------------------
LIN_TABLE = 0x2000  # (room for 256 descriptors before DATA2)
DATA2 = 0x4000


def _linear_table(buf: bytearray, descs: list[tuple[int, int, int]], nexts: list[int] | None = None) -> None:
    """An indirect table of `descs` (gpa, len, flags without NEXT) chained i -> i+1, at head 0."""
    n = len(descs)
    for i, (addr, length, flags) in enumerate(descs):
        last = i == n - 1
        nxt = nexts[i] if nexts is not None else (0 if last else i + 1)
        desc(buf, LIN_TABLE, i, addr, length, flags | (0 if last else 1), nxt)
    desc(buf, DESC, 0, GPA + LIN_TABLE, 16 * n, 4)
    offer(buf, 0)


def _pop_both(buf: bytearray) -> tuple[object, object]:
    """(one-pass result, entry-by-entry result) of popping head 0: a Chain or the error text."""
    out: list[object] = []
    for linear in (True, False):
        _, q = make(bytearray(buf))
        q.linear_min = 1  # (every table, however short)
        if not linear:
            q._linear = lambda head, raw: None  # type: ignore[method-assign]
        try:
            c = q.pop()
            assert c is not None
            out.append((b"".join(c.readable), b"".join(c.writable), c.writable_size(),
                        # the writable views cover exactly the described bytes: write a marker through them
                        _marks(q, c)))
        except DescriptorError as e:
            out.append(("error", str(e)))
    return out[0], out[1]


def _marks(q: Virtqueue, c: Chain) -> bytes:
    n = c.writable_size()
    c.write([bytes((i * 7 + 1) & 0xFF for i in range(n))])
    return bytes(q.memory.regions[0].view)


@settings(max_examples=300, deadline=None)
@given(layout=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 300), st.booleans()), min_size=1, max_size=24),
       data=st.binary(min_size=64, max_size=64), spoil=st.integers(0, 5))
def test_linear_tables_decode_as_the_walk_does(layout: list[tuple[int, int, bool]], data: bytes, spoil: int) -> None:
    """Any linear table (adjacent, overlapping, empty, out-of-memory buffers; readable after
    writable; the byte limit) gives the one-pass decode the same chain, or the same error, as the
    entry-by-entry walk."""
    buf = bytearray(SIZE)
    buf[DATA2 : DATA2 + 64] = data
    descs = []
    for slot, length, writable in layout:
        addr = GPA + DATA2 + slot * 0x100 if slot < 38 else (GPA + SIZE - 8 if slot == 38 else 1 << 40)
        descs.append((addr, length, 2 if writable else 0))
    if spoil == 1:
        descs.sort(key=lambda d: d[2])  # the ordinary shape: readable then writable
    _linear_table(buf, descs)
    fast, slow = _pop_both(buf)
    assert fast == slow


def test_linear_table_merges_adjacent_buffers_and_remembers_the_writable_half() -> None:
    buf = bytearray(SIZE)
    pages = [GPA + DATA2 + 0x1000 * p for p in (3, 4, 5, 1, 7, 8)]  # runs: 3-5, 1, 7-8
    descs = [(GPA + 0x1000, 40, 0), (GPA + 0x1028, 40, 0), (GPA + 0x1050, 16, 2)] + [(a, 0x1000, 2) for a in pages]
    _linear_table(buf, descs)
    buf[0x1000:0x1050] = bytes(range(80))
    _, q = make(buf)
    q.linear_min = 1
    c = q.pop()
    assert c is not None
    assert [len(v) for v in c.readable] == [80] and bytes(c.readable[0]) == bytes(range(80))
    assert [len(v) for v in c.writable] == [16, 0x3000, 0x1000, 0x2000]  # never merged across halves
    assert c.writable_size() == 16 + 6 * 0x1000
    q.push(0, 0)
    # the same table again (a reader reusing its buffer): the writable views are reused, the
    # readable half is decoded afresh
    buf[0x1000:0x1050] = bytes(80)
    offer(buf, 0, idx=2)
    c2 = q.pop()
    assert c2 is not None and bytes(c2.readable[0]) == bytes(80)
    assert all(a is b for a, b in zip(c2.writable, c.writable, strict=True)) and c2.writable is not c.writable
    q.push(0, 0)
    # a changed page list is decoded afresh
    desc(buf, LIN_TABLE, len(descs) - 1, GPA + DATA2 + 0x9000, 0x1000, 2, 0)
    offer(buf, 0, idx=3)
    c3 = q.pop()
    assert c3 is not None and [len(v) for v in c3.writable] == [16, 0x3000, 0x1000, 0x1000, 0x1000]


def test_a_remembered_table_decodes_only_its_few_readable_descriptors() -> None:
    """A READ's table sent again (dd reusing its buffer) is decoded without the whole-table
    steps: its two readable descriptors one by one (adjacent ones still one view), its
    writable half taken from the memo."""
    buf = bytearray(SIZE)
    pages = [GPA + DATA2 + 0x1000 * p for p in (3, 4, 5, 1, 7, 8)]
    descs = [(GPA + 0x1000, 40, 0), (GPA + 0x1028, 40, 0), (GPA + 0x1050, 16, 2)] + [(a, 0x1000, 2) for a in pages]
    _linear_table(buf, descs)
    _, q = make(buf)
    q.linear_min = 1
    c = q.pop()
    assert c is not None
    q.push(0, 0)

    def no_table_steps(part: memoryview) -> None:
        raise AssertionError("a remembered table's head decoded in whole-table steps")

    q._buffers = no_table_steps  # type: ignore[method-assign]
    buf[0x1000:0x1050] = bytes(range(80))
    offer(buf, 0, idx=2)
    c2 = q.pop()
    assert c2 is not None and [bytes(v) for v in c2.readable] == [bytes(range(80))]
    assert c2.writable == c.writable and c2.writable_size() == c.writable_size()


@settings(max_examples=300, deadline=None)
@given(head=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 300), st.sampled_from([0, 2, 4])), max_size=4),
       nexts=st.one_of(st.none(), st.lists(st.integers(0, 12), min_size=12, max_size=12)),
       tail_pages=st.integers(1, 6), data=st.binary(min_size=64, max_size=64))
def test_a_table_after_a_remembered_one_decodes_as_the_walk_does(
        head: list[tuple[int, int, int]], nexts: list[int] | None, tail_pages: int, data: bytes) -> None:
    """A table whose writable tail is the remembered one byte for byte (the fast path checks
    only its head) gives the same chain, or the same error, as the entry-by-entry walk: any
    head (readable or writable or indirect entries, empty, outside memory, none) and any
    next fields."""
    tail = [(GPA + DATA2 + 0x100 * (41 + k), 0x80, 2) for k in range(tail_pages)]
    first = [(GPA + DATA2, 40, 0), (GPA + DATA2 + 0x40, 40, 0)] + tail
    buf = bytearray(SIZE)
    buf[DATA2 : DATA2 + 64] = data
    _linear_table(buf, first)
    _, q = make(buf)
    q.linear_min = 1
    c = q.pop()
    assert c is not None and q._memo is not None  # the tail is remembered
    q.push(0, 0)
    second = [(GPA + DATA2 + slot * 0x100 if slot < 38 else (GPA + SIZE - 8 if slot == 38 else 1 << 40), length,
               flags) for slot, length, flags in head] + tail
    _linear_table(buf, second, None if nexts is None else [n if i < len(head) else (0 if i == len(second) - 1
                                                                                      else i + 1)
                                                             for i, n in enumerate(nexts[: len(second)])]
                  + [0 if i == len(second) - 1 else i + 1 for i in range(len(nexts), len(second))])
    offer(buf, 0, idx=2)
    _, slow = _pop_both(buf)  # (on copies of the memory, before the fast pop marks it)
    try:
        c2 = q.pop()
        assert c2 is not None
        fast: object = (b"".join(c2.readable), b"".join(c2.writable), c2.writable_size(), _marks(q, c2))
    except DescriptorError as e:
        fast = ("error", str(e))
    assert fast == slow


@pytest.mark.parametrize("nexts, message", [
    ([1, 0, 0], "loops"),  # a loop inside the table
    ([1, 7, 0], "out of a table"),
])
def test_non_linear_tables_take_the_walk(nexts: list[int], message: str) -> None:
    buf = bytearray(SIZE)
    descs = [(GPA + DATA2, 8, 0), (GPA + DATA2 + 8, 8, 0), (GPA + DATA2 + 16, 8, 2)]
    _linear_table(buf, descs, nexts)
    _, q = make(buf)
    q.linear_min = 1
    with pytest.raises(DescriptorError, match=message):
        q.pop()


def test_a_table_whose_chain_skips_an_entry_is_not_taken_as_linear() -> None:
    buf = bytearray(SIZE)
    buf[DATA2 : DATA2 + 24] = b"a" * 8 + b"b" * 8 + b"c" * 8
    _linear_table(buf, [(GPA + DATA2, 8, 0), (GPA + DATA2 + 8, 8, 0), (GPA + DATA2 + 16, 8, 2)], [2, 2, 0])
    _, q = make(buf)
    q.linear_min = 1
    c = q.pop()
    assert c is not None and c.read_all() == b"a" * 8 and c.writable_size() == 8


def test_short_tables_take_the_walk_and_long_ones_the_one_pass_decode() -> None:
    """(the one-pass decode costs more than it saves below LINEAR_MIN descriptors)"""
    calls: list[int] = []
    for n in (4, LINEAR_MIN):
        buf = bytearray(SIZE)
        _linear_table(buf, [(GPA + DATA2, 40, 0)] + [(GPA + DATA2 + 0x100 * k, 16, 2) for k in range(1, n)])
        _, q = make(buf)
        real = q._linear
        q._linear = lambda head, raw, real=real: calls.append(len(raw) // 16) or real(head, raw)  # type: ignore[method-assign]
        c = q.pop()
        assert c is not None and c.writable_size() == 16 * (n - 1)
    assert calls == [LINEAR_MIN]


# -- short indirect tables decoded before (Virtqueue._tables) ------------------------------------
def _pop_twice_and_walk(buf: bytearray, limit: int, change: bytes) -> tuple[object, object]:
    """(second pop of head 0 from a queue that popped the same table before, with the data under
    it changed to `change` in between; the same from a fresh queue): a Chain's bytes and the
    marks written through it, or the error text."""
    out: list[object] = []
    for again in (True, False):
        mem = bytearray(buf)
        _, q = make(mem)
        q.max_chain_bytes = limit
        if again:
            try:
                q.pop()
                q.push(0, 0)
            except DescriptorError:
                pass
            offer(mem, 0, idx=2)
        mem[DATA2 : DATA2 + len(change)] = change
        if not again:
            offer(mem, 0, idx=2)
            q.last_avail = 1
        try:
            c = q.pop()
            assert c is not None
            # (the memory past the rings: the first queue pushed once more)
            out.append((b"".join(c.readable), b"".join(c.writable), c.writable_size(), _marks(q, c)[LIN_TABLE:]))
        except DescriptorError as e:
            out.append(("error", str(e)))
    return out[0], out[1]


@settings(max_examples=400, deadline=None)
@given(layout=st.lists(st.tuples(st.one_of(st.integers(0, 37), st.integers(38, 41)),
                                 st.sampled_from([0, 1, 8, 9, 16, 40, 100, 300]),
                                 st.sampled_from([0, 0, 2, 2, 4, 8, 10])), min_size=1, max_size=LINEAR_MIN - 1),
       nexts=st.one_of(st.none(), st.lists(st.integers(0, LINEAR_MIN), min_size=LINEAR_MIN, max_size=LINEAR_MIN)),
       data=st.binary(min_size=64, max_size=64), change=st.binary(min_size=64, max_size=64),
       limit=st.sampled_from([64 << 20, 64 << 20, 300, 100]), ordinary=st.booleans())
def test_a_short_table_sent_again_decodes_as_the_walk_does(layout: list[tuple[int, int, int]],
                                                           nexts: list[int] | None, data: bytes, change: bytes,
                                                           limit: int, ordinary: bool) -> None:
    """Any short table (empty, overlapping, out-of-memory and boundary-crossing buffers; nested
    indirect and unknown flags; readable after writable; loops and out-of-table nexts; the byte
    limits) popped a second time, with the data under its buffers changed in between, gives the
    same chain (the new data), or the same error, as the walk of a queue that never saw it."""
    buf = bytearray(SIZE)
    buf[DATA2 : DATA2 + 64] = data
    edges = {38: GPA + SIZE - 8, 39: GPA - 8, 40: GPA + SIZE, 41: 1 << 40}  # (straddling or outside memory)
    descs = [(edges.get(slot, GPA + DATA2 + slot * 0x100), length, flags) for slot, length, flags in layout]
    if ordinary:  # the shape drivers send: readable then writable, no other flags, linear nexts
        descs = sorted(((a, n, f & 2) for a, n, f in descs), key=lambda d: d[2])
    _linear_table(buf, descs, None if nexts is None or ordinary else nexts[: len(descs)])
    again, fresh = _pop_twice_and_walk(buf, limit, change)
    assert again == fresh


class _CountingDesc:
    """virtqueue.DESC, counting the tables it decodes entry by entry (the walk's iter_unpack)."""

    def __init__(self, real: struct.Struct) -> None:
        self.real = real
        self.size = real.size
        self.iter_unpacks = 0

    def unpack_from(self, buf: object, offset: int = 0) -> tuple[int, ...]:
        return self.real.unpack_from(buf, offset)  # type: ignore[arg-type]

    def iter_unpack(self, buf: bytes) -> object:
        self.iter_unpacks += 1
        return self.real.iter_unpack(buf)


def test_a_metadata_table_sent_again_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver sending one request at a time reuses its request buffers: an OPEN's and a
    RELEASE's tables come again byte for byte, and are decoded once each (their views kept,
    the data under them read afresh); a table that differs in one byte is decoded; at most
    TABLES_KEPT tables are kept."""
    from nydus_py.transport.vhost_user import virtqueue

    counting = _CountingDesc(virtqueue.DESC)
    monkeypatch.setattr(virtqueue, "DESC", counting)
    buf = bytearray(SIZE)
    open_ = [(GPA + DATA2, 40, 0), (GPA + DATA2 + 40, 8, 0), (GPA + DATA2 + 0x100, 16, 2), (GPA + DATA2 + 0x110, 16, 2)]
    release = [(GPA + DATA2, 40, 0), (GPA + DATA2 + 40, 24, 0), (GPA + DATA2 + 0x100, 16, 2)]
    _, q = make(buf)
    idx = 0
    for round_ in range(3):
        for descs in (open_, release):
            buf[DATA2 : DATA2 + 64] = bytes([round_]) * 64
            _linear_table(buf, descs)
            idx += 1
            offer(buf, 0, idx=idx)
            c = q.pop()
            assert c is not None and c.read_all() == bytes([round_]) * sum(d[1] for d in descs if not d[2])
            c.write([b"\x77" * c.writable_size()])
            assert bytes(buf[DATA2 + 0x100 : DATA2 + 0x100 + c.writable_size()]) == b"\x77" * c.writable_size()
            q.push(0, 0)
    assert counting.iter_unpacks == 2 and (q.tables_decoded, q.tables_reused) == (2, 4)
    for k in range(virtqueue.TABLES_KEPT + 4):  # (other argument buffers)
        _linear_table(buf, [(GPA + DATA2 + 8 * k, 40, 0), (GPA + DATA2 + 0x100, 16, 2)])
        idx += 1
        offer(buf, 0, idx=idx)
        c = q.pop()
        assert c is not None and len(c.read_all()) == 40
        q.push(0, 0)
    assert counting.iter_unpacks == 2 + virtqueue.TABLES_KEPT + 4 and 0 < len(q._tables) <= virtqueue.TABLES_KEPT


@settings(max_examples=200, deadline=None)
@given(event_idx=st.booleans(),
       steps=st.lists(st.tuples(st.integers(0, NUM - 1), st.integers(0, 1 << 20), st.integers(0, 0xFFFF),
                                st.integers(0, 3), st.integers(0, NUM)), min_size=1, max_size=40))
def test_push_notify_and_rearm_do_what_their_parts_do(event_idx: bool, steps: list[tuple[int, int, int, int, int]]) -> None:
    """The dispatcher's one-call forms: push_notify is push then needs_notify, rearm is
    set_avail_event then pending (the same ring bytes, answers and errors)."""
    one, q1 = make(event_idx=event_idx)
    two, q2 = make(event_idx=event_idx)
    for head, length, used_event, flags, offered in steps:
        for buf in (one, two):
            struct.pack_into("<HH", buf, AVAIL, flags, offered)
            struct.pack_into("<H", buf, AVAIL + 4 + 2 * NUM, used_event)
        q2.push(head, length)
        assert q1.push_notify(head, length) == q2.needs_notify()
        q2.set_avail_event()
        try:
            parts: object = q2.pending() > 0
        except RingError as e:
            parts = str(e)
        try:
            whole: object = q1.rearm()
        except RingError as e:
            whole = str(e)
        assert whole == parts and one == two


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=0, max_size=6),
       parts=st.lists(st.binary(min_size=0, max_size=60), min_size=1, max_size=3), as_view=st.booleans())
def test_chain_write_scatters_its_parts_in_order(sizes: list[int], parts: list[bytes], as_view: bool) -> None:
    """A reply (one buffer, as a metadata reply with arguments, or several) goes into the
    writable buffers in order, nothing past its length is touched, and one that does not fit
    raises before anything is written."""
    mem = bytearray(b"\xee" * 300)
    bufs, off = [], 0
    for n in sizes:
        bufs.append(memoryview(mem)[off : off + n])
        off += n + 3  # (gaps that must stay untouched)
    c = Chain(0, [], bufs)
    data = b"".join(parts)
    given_parts = [memoryview(p) if as_view else p for p in parts]
    expected = bytearray(mem)
    o = k = 0
    for n in sizes:
        take = data[k : k + n]
        expected[o : o + len(take)] = take
        k += len(take)
        o += n + 3
    if len(data) > sum(sizes):
        with pytest.raises(ValueError):
            c.write(given_parts)
        assert mem == b"\xee" * 300
    else:
        assert c.write(given_parts) == len(data) and mem == expected
