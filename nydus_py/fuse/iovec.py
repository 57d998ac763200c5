"""Scatter helpers for replies written straight into a caller's buffers (virtio-fs guest memory).

`ReadDest` is what a filesystem's `read_into` writes a READ's data through: the transport's
buffers, writable only inside `fill` (which a transport guards, e.g. so that nothing is written
into guest memory once a queue has been stopped).
"""

from collections.abc import Callable, Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class WouldBlock(Exception):
    """`read_into(..., nowait=True)`: answering would wait (a chunk fetch, a disk read that
    misses the page cache); the caller hands the request to a thread that may wait."""


class ReadDest(Protocol):
    """The buffers a READ's data goes into: exactly the request's size, or less when the caller
    has less room."""

    size: int

    def fill(self, write: Callable[[list[memoryview]], int]) -> int:
        """Run `write` over the buffers while they may be written; returns what it returns.
        OSError when they no longer may (the reply would be dropped anyway)."""


def trim(bufs: Sequence[memoryview], skip: int, limit: int, total: int = -1) -> list[memoryview]:
    """The bytes [skip, skip + limit) of the concatenation of `bufs`, as views (no copy).
    `total`: their combined length when the caller knows it (a READ's usual shape, a header
    buffer then exactly `limit` bytes of pages, is then a slice of the list)."""
    if total < 0:
        total = sum(map(len, bufs))
    i = 0
    n = len(bufs)
    while i < n and skip >= len(bufs[i]):
        skip -= len(bufs[i])
        total -= len(bufs[i])
        i += 1
    if not skip and total == limit:
        rest = bufs[i:]  # (a list's slice is a new list already: not copied twice)
        return rest if type(rest) is list else list(rest)
    out: list[memoryview] = []
    for b in bufs[i:]:
        if not limit:
            break
        n = len(b)
        take = min(n - skip, limit)
        out.append(b[skip : skip + take] if skip or take < n else b)
        skip = 0
        limit -= take
    return out


def split(bufs: list[memoryview], sizes: list[int]) -> list[list[memoryview]]:
    """`bufs` cut into consecutive pieces of `sizes` bytes (views, in one walk); the buffers
    hold at least their sum."""
    out: list[list[memoryview]] = []
    it = iter(bufs)
    cur: memoryview | None = None
    for want in sizes:
        part: list[memoryview] = []
        while want:
            if cur is None or not len(cur):
                cur = next(it)
                continue
            take = min(want, len(cur))
            part.append(cur if take == len(cur) else cur[:take])
            cur = cur[take:]
            want -= take
        out.append(part)
    return out


def scatter(bufs: Sequence[memoryview], data: Buffer) -> int:
    """Copy `data` across `bufs` in order; returns the bytes copied (at most their total)."""
    src = memoryview(data)
    if src.format != "B" or src.ndim != 1:
        src = src.cast("B")
    end = len(src)
    pos = 0
    for b in bufs:
        e = pos + len(b)
        if e > end:  # the data ends inside this buffer
            if pos < end:
                b[: end - pos] = src[pos:end]
                pos = end
            break
        b[:] = src[pos:e]
        pos = e
    return pos


class BufferDest:
    """A ReadDest over plain buffers with no guard (tests, and callers that own the memory)."""

    def __init__(self, bufs: Sequence[memoryview], size: int) -> None:
        self.bufs = trim(bufs, 0, size)
        self.size = sum(len(b) for b in self.bufs)

    def fill(self, write: Callable[[list[memoryview]], int]) -> int:
        return write(self.bufs)
