"""Directory-aware read-around (issue 12, a first command read without hints), sans-IO.

A cold READ of a file from its start also takes, in the same ranged GET, the chunks of the files
that follow it in its directory when they sit right after it in the blob (a builder stores a
directory's files together: BFS over the tree, name order, subdirectories elsewhere), missing,
up to `dir_around` bytes. Programs read a package's modules, a set of libraries, the files of
one directory together; unlike the blind `read_around` window this guess stops where the
directory's files stop, and never crosses into another directory's.

Its own budget (`DirGate`), not the blind window's: the guess is better informed, so it is
judged by what it brought. It may go on while its unused bytes stay within `DIR_WASTE` times its
used ones, plus what is still free of the blind window's budget (`AROUND_WASTE` of what reads
asked for) and a fixed credit (`DIR_CREDIT`) for the first guesses, which have no record yet. A
reader whose neighbours go unread (a random start-up set) then wastes at most the blind budget
and that credit (and one window) before its guesses stop; one whose guesses are read keeps them
(it trades bytes for round trips: up to `DIR_WASTE` unused bytes per used one). The record decays (halved past
`DIR_DECAY` bytes fetched along) so a reader that changes its ways is judged on recent guesses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ...rafs.model import ChunkInfo

DIR_AROUND = 256 << 10  # compressed bytes of following files a cold read takes along (default)
DIR_WASTE = 2.0  # unused bytes allowed per byte of these guesses a read used
DIR_CREDIT = 512 << 10  # unused bytes allowed before the guesses have any record
DIR_DECAY = 64 << 20  # the record is halved past this many bytes fetched along


class DirGate:
    """The directory guesses' record: bytes fetched along and bytes of them reads used."""

    def __init__(self, waste: float = DIR_WASTE, credit: int = DIR_CREDIT, decay: int = DIR_DECAY) -> None:
        self.waste = waste
        self.credit = credit
        self.decay = decay
        self.fetched = 0
        self.used = 0

    def allows(self, window: int, shared: float) -> bool:
        """Whether a guess of up to `window` more bytes may go: the unused bytes so far, with
        `window` more, stay within the guesses' own allowance plus `shared` (the part of the
        blind budget's allowance still free)."""
        unused = self.fetched - self.used
        return unused + window <= self.waste * self.used + max(0.0, shared) + self.credit

    def fetched_along(self, n: int) -> None:
        self.fetched += n
        if self.fetched > self.decay:
            self.fetched //= 2
            self.used //= 2

    def used_later(self, n: int) -> None:
        self.used = min(self.fetched, self.used + n)


def take_adjacent(candidates: Iterable[ChunkInfo], end: int, budget: int, gap: int,
                  usable: Callable[[ChunkInfo], bool]) -> list[ChunkInfo]:
    """The candidates (the following files' chunks, in directory order) that continue the blob
    from `end`: each starts at most `gap` bytes after the previous one ends, until `budget`
    bytes (gaps included) or a chunk `usable` refuses (ready, being fetched, not cacheable).
    A chunk stored before `end` (deduplicated, a hard link's, one fetched already) is skipped:
    the files after it may still continue the run."""
    out: list[ChunkInfo] = []
    for c in candidates:
        g = c.compressed_offset - end
        if g < 0:
            continue
        if g > gap or c.compressed_size + g > budget or not usable(c):
            break
        out.append(c)
        budget -= c.compressed_size + g
        end = c.compressed_offset + c.compressed_size
    return out
