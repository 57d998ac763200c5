"""Opt-in case-insensitive LOOKUP for shares served to Windows guests.

Windows users expect `README.txt` to open `\\readme.TXT`. The virtio-win service can do that
itself (`-i`), but at four requests and a full directory scan per miss, per path component, per
open. With `case_insensitive` the filesystem answers the first LOOKUP instead:

* a name that exists exactly is always looked up exactly (no cost for the common case);
* a name that does not exist is folded and looked for in a case-folded index of its directory;
  a single match is looked up under its real name;
* where two or more names of the directory fold the same (`Makefile` and `makefile`), the folded
  lookup is refused (ENOENT): lookups there stay exact, and the collision is logged once per
  directory and name and counted (`collisions`).

Folding is per code point to its upper case when that is one code point (NTFS's upcase-table
style: `ß` does not become `SS`, `ς`/`σ`/`Σ` are one letter), of the UTF-8 name; bytes that are not
UTF-8 fold as themselves.

Indexes are built per directory on the first miss in it, from the filesystem's own listing, and
kept in an LRU bounded by directories and total names (no per-inode objects for the whole image).
A directory with more names than `max_dir_entries` is not indexed: each miss in it scans it again
(counted as `uncached_scans`, logged once). An index carries its directory's version (None for an
immutable RAFS image; mtime/ctime for a passthrough directory) and is rebuilt when that changes.
"""

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from functools import lru_cache

log = logging.getLogger(__name__)

MAX_DIRS = 1024
MAX_ENTRIES = 1 << 17  # names held in all indexes together (~100 bytes each: ~13 MB at most)
MAX_DIR_ENTRIES = 1 << 16  # a larger directory is scanned per miss instead of indexed
MAX_LOGGED = 4096  # collisions (and large directories) remembered as logged; past it no more logs

COUNTERS = ("fallback_hits", "misses", "collisions", "ambiguous_lookups", "indexes_built", "indexes_evicted",
            "uncached_scans")


@lru_cache(maxsize=8192)
def _upper1(c: str) -> str:
    u = c.upper()
    return u if len(u) == 1 else c


def fold(name: bytes) -> bytes:
    """The case-folded form of a directory entry name (see the module docstring)."""
    if name.isascii():
        return name.upper()
    s = name.decode("utf-8", "surrogateescape")
    return "".join(map(_upper1, s)).encode("utf-8", "surrogateescape")


class _Ambiguous:
    """An index slot for a folded name that two or more real names share."""

    __slots__ = ("names",)

    def __init__(self, names: list[bytes]) -> None:
        self.names = names


_Index = dict[bytes, "bytes | _Ambiguous"]


class CaseFolder:
    """The case-folded directory indexes of one filesystem and their counters (thread-safe)."""

    def __init__(self, what: str, *, max_dirs: int = MAX_DIRS, max_entries: int = MAX_ENTRIES,
                 max_dir_entries: int = MAX_DIR_ENTRIES) -> None:
        self.what = what  # for log messages: the share or image
        self.max_dirs = max_dirs
        self.max_entries = max_entries
        self.max_dir_entries = max_dir_entries
        self._lock = threading.Lock()
        self._dirs: OrderedDict[int, tuple[Hashable, _Index]] = OrderedDict()
        self._entries = 0
        self._logged: set[tuple[int, bytes]] = set()
        self._logged_large: set[int] = set()
        self.counters = dict.fromkeys(COUNTERS, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counters)
            out["indexed_dirs"] = len(self._dirs)
            out["indexed_names"] = self._entries
        return out

    def clear(self) -> None:
        with self._lock:
            self._dirs.clear()
            self._entries = 0

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    def resolve(self, parent: int, name: bytes, names: Callable[[], Iterable[bytes]],
                version: Hashable = None) -> bytes | None:
        """The real name in directory `parent` that `name` (which did not match exactly) folds to,
        or None. `names()` lists the directory (it may raise: the caller's error); `version` is
        what makes a cached index of `parent` stale when it changes."""
        if name in (b".", b".."):
            return None
        key = fold(name)
        with self._lock:
            cached = self._dirs.get(parent)
            if cached is not None and cached[0] == version:
                self._dirs.move_to_end(parent)
                hit: bytes | _Ambiguous | None = cached[1].get(key)
                index: _Index | None = cached[1]
            else:
                index = None
        if index is None:
            index, hit = self._build(parent, names, key, version)
        return self._answer(parent, name, key, hit)

    def _build(self, parent: int, names: Callable[[], Iterable[bytes]], key: bytes,
               version: Hashable) -> tuple[_Index | None, "bytes | _Ambiguous | None"]:
        """Index `parent` (or, past max_dir_entries, just find `key` in it)."""
        index: _Index | None = {}
        matches: list[bytes] = []
        count = 0
        for n in names():
            if n in (b".", b".."):
                continue
            f = fold(n)
            if f == key:
                matches.append(n)
            count += 1
            if index is None:
                continue
            if count > self.max_dir_entries:
                index = None  # too large to keep: finish the scan for `key` only
                continue
            old = index.get(f)
            if old is None:
                index[f] = n
            elif isinstance(old, _Ambiguous):
                old.names.append(n)
            else:
                index[f] = _Ambiguous([old, n])
        hit: bytes | _Ambiguous | None = None
        if len(matches) == 1:
            hit = matches[0]
        elif matches:
            hit = _Ambiguous(matches)
        if index is None:
            with self._lock:
                self.counters["uncached_scans"] += 1
                first = parent not in self._logged_large and len(self._logged_large) < MAX_LOGGED
                if first:
                    self._logged_large.add(parent)
            if first:
                log.warning("%s: directory inode %d has more than %d names; case-insensitive lookups scan it "
                            "each time", self.what, parent, self.max_dir_entries)
            return None, hit
        with self._lock:
            old_entry = self._dirs.pop(parent, None)
            if old_entry is not None:
                self._entries -= len(old_entry[1])
            self._dirs[parent] = (version, index)
            self._entries += len(index)
            self.counters["indexes_built"] += 1
            while self._dirs and (len(self._dirs) > self.max_dirs or self._entries > self.max_entries):
                _, (_, dropped) = self._dirs.popitem(last=False)
                self._entries -= len(dropped)
                self.counters["indexes_evicted"] += 1
        return index, hit

    def _answer(self, parent: int, name: bytes, key: bytes, hit: "bytes | _Ambiguous | None") -> bytes | None:
        if hit is None:
            self._count("misses")
            return None
        if isinstance(hit, _Ambiguous):
            with self._lock:
                self.counters["ambiguous_lookups"] += 1
                first = (parent, key) not in self._logged and len(self._logged) < MAX_LOGGED
                if first:
                    self.counters["collisions"] += 1
                    self._logged.add((parent, key))
            if first:
                log.warning("%s: %r in directory inode %d matches %d names that differ only in case (%s); "
                            "lookups of them stay exact", self.what, name, parent, len(hit.names),
                            b", ".join(sorted(hit.names)).decode(errors="replace"))
            return None
        self._count("fallback_hits")
        return hit


__all__ = ["COUNTERS", "CaseFolder", "fold"]
