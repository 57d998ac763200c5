"""Build trees from a local directory or an OCI layer tar, without extracting anything.

Decisions for tar input (every name is treated as hostile):
* Names are normalised lexically like containerd (`filepath.Clean`): leading '/', '.' and empty
  components are dropped, so absolute names are relative to the layer root; `a/../b` is `b`; a
  `..` that would climb above the root is a FormatError.
* A path component that exists but is not a directory (file, symlink) is a FormatError: symlinks
  are never followed while building, and tar extraction would fail there too.
* Hard links (LNKTYPE) must name an earlier regular member of the same layer (as nydus-image
  requires); they become hard links to that member's entry.
* Duplicates: the later member wins (like extraction); a directory replacing a directory keeps
  its children and takes the new attributes.
* Missing parents are created as 0755 root-owned directories.
* Member data must lie inside the archive (no declared size past its end); GNU sparse members and
  unknown member types are refused, like nydus-image does.
* Whiteouts (`.wh.NAME`, `.wh..wh..opq`) stay ordinary entries; `merge.merge_layers` applies them.
* Compressed (or unseekable) input is expanded into an anonymous file (in `spool_dir`) and
  refused once it expands past its `ExpansionLimits` (decompression bombs, see `limits`).

Xattrs: RAFS can store only `user.`, `trusted.`, `security.` and `system.posix_acl_{access,default}`
names (value <= 64 KiB, name suffix <= 255 bytes); others are logged and counted, not stored.
"""

import base64
import errno as _errno
import grp
import io
import logging
import os
import pwd
import stat
import tarfile
import tempfile
import threading
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Generic, Protocol, TypeVar

import zstandard

from ..rafs.acl import acl_from_text
from ..rafs.errors import FormatError
from .limits import ExpansionLimits, ExpansionMeter, remaining_size
from .packed import DEAD, Tree
from .tar_headers import plain_next
from .tree import NO_XATTRS

log = logging.getLogger(__name__)

MAX_NAME_LEN = 255
MAX_SYMLINK_LEN = 4095
MAX_XATTR_VALUE = 65535
_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")
_XATTR_EXACT = (b"system.posix_acl_access", b"system.posix_acl_default")

DEFAULT_LIMITS = ExpansionLimits()

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class SourceStats:
    """What a source reader dropped or noticed, for the CLI to report."""

    entries: int = 0
    plain_headers: int = 0  # tar members whose header `tar_headers.plain_next` read (not tarfile)
    skipped_xattrs: int = 0
    skipped_xattr_names: set[bytes] = field(default_factory=set)


def xattr_storable(name: bytes, value: bytes) -> bool:
    """Whether RAFS v5/v6 can store this xattr (EROFS name_index prefixes, u8 name, u16 value)."""
    if len(value) > MAX_XATTR_VALUE:
        return False
    if name in _XATTR_EXACT:
        return True
    for prefix in _XATTR_PREFIXES:
        if name.startswith(prefix):
            return 0 < len(name) - len(prefix) <= MAX_NAME_LEN
    return False


def _keep_xattrs(xattrs: dict[bytes, bytes], where: str, stats: SourceStats | None) -> Mapping[bytes, bytes]:
    if not xattrs:
        return NO_XATTRS
    kept: dict[bytes, bytes] = {}
    for name, value in xattrs.items():
        if xattr_storable(name, value):
            kept[name] = value
            continue
        log.warning("%s: xattr %r cannot be stored in RAFS; skipped", where, name)
        if stats is not None:
            stats.skipped_xattrs += 1
            stats.skipped_xattr_names.add(name)
    return kept or NO_XATTRS


# --------------------------------------------------------------------------------------------
# Directory source
# --------------------------------------------------------------------------------------------


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (_errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == _errno.ENODATA:  # removed between list and get
                continue
            raise
    return out


def tree_from_directory(path: str | bytes | os.PathLike[str], stats: SourceStats | None = None) -> Tree:
    """The packed tree under directory `path` (lstat only, symlinks never followed).

    Hard links (same st_dev/st_ino) become links to one entry; regular files keep their path
    (K_PATH), so nothing is read until a writer asks.
    """
    top = os.fsencode(path)
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{os.fsdecode(top)}: source is not a directory")
    tree = Tree()
    _set_from_stat(tree, 0, top, st, stats)
    seen: dict[tuple[int, int], int] = {}  # only files with st_nlink > 1, only while reading
    stack: list[tuple[bytes, int]] = [(top, 0)]
    while stack:
        dir_path, d = stack.pop()
        with os.scandir(dir_path) as it:
            entries = list(it)
        for entry in entries:
            name = os.fsencode(entry.name)
            if len(name) > MAX_NAME_LEN:
                raise FormatError(f"{os.fsdecode(entry.path)}: name longer than {MAX_NAME_LEN} bytes")
            child_path = os.fsencode(entry.path)
            est = entry.stat(follow_symlinks=False)
            if stats is not None:
                stats.entries += 1
            if not stat.S_ISDIR(est.st_mode) and est.st_nlink > 1:
                key = (est.st_dev, est.st_ino)
                shared = seen.get(key)
                if shared is not None:
                    tree.add_link(d, name, shared)
                    continue
            idx = tree.add(d, name, 0)
            _set_from_stat(tree, idx, child_path, est, stats)
            if stat.S_ISDIR(est.st_mode):
                stack.append((child_path, idx))
            elif est.st_nlink > 1:
                seen[(est.st_dev, est.st_ino)] = idx
    tree.freeze()
    return tree


def _set_from_stat(tree: Tree, idx: int, path: bytes, st: os.stat_result, stats: SourceStats | None) -> None:
    mode = st.st_mode
    fmt = stat.S_IFMT(mode)
    if fmt not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        raise FormatError(f"{os.fsdecode(path)}: unsupported file type {fmt:o}")
    tree.set_attrs(
        idx,
        mode,
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns // 1_000_000_000,
        st.st_mtime_ns % 1_000_000_000,
        _keep_xattrs(_read_xattrs(path), os.fsdecode(path), stats),
    )
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        tree.set_rdev(idx, st.st_rdev)
    elif fmt == stat.S_IFREG:
        tree.set_path(idx, path, st.st_size)
    elif fmt == stat.S_IFLNK:
        target = os.readlink(path)
        if not target or len(target) > MAX_SYMLINK_LEN:
            raise FormatError(f"{os.fsdecode(path)}: symlink target of {len(target)} bytes")
        tree.set_symlink(idx, target)


# --------------------------------------------------------------------------------------------
# Tar source
# --------------------------------------------------------------------------------------------


_WINDOW = 1 << 20  # read-ahead of small members
PLAIN_HEADERS = True  # plain member headers read by `tar_headers` (tests compare with tarfile's own)
_SMALL = 128 << 10


class Restarted(Exception):
    """The file being followed was truncated to start again (its download restarted)."""


class Growth:
    """How far a file that another thread is still writing has got (a layer tar while its
    download inflates into it): readers of a `tree_from_tar(..., growth=)` wait here for the
    bytes they need. The writer calls `grew` after each write, `restart` when it truncates the
    file to write it again, and `close` at the end (with `failed` when it will not complete)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.written = 0
        self.generation = 0  # bumped by a restart that dropped written bytes
        self.done = False
        self.failed = False
        self._want = 1 << 63  # the least end a reader waits for: writes short of it wake nobody
        self._events = 0  # changes a waiter must see (a reader that let go of the lock compares it)

    def grew(self, total: int) -> None:
        with self._cond:
            self.written = total
            if total >= self._want:  # (a wake-up per write would cost a futex call each, GIL held)
                self._cond.notify_all()

    def restart(self) -> None:
        with self._cond:
            if self.written:
                self.generation += 1
                self.written = 0
                self._events += 1
                self._cond.notify_all()

    def close(self, failed: bool = False) -> None:
        with self._cond:
            self.done = True
            self.failed = self.failed or failed
            self._events += 1
            self._cond.notify_all()

    def check(self, generation: int) -> None:
        """`Restarted` if the file restarted since `generation` (a short read's explanation)."""
        with self._cond:
            if self.generation != generation:
                raise Restarted("the file restarted")

    def wait(self, end: int, generation: int) -> int:
        """Block until `end` bytes are written or the file is complete; the bytes written.
        `Restarted` when the file was restarted since `generation`, OSError when it failed."""
        with self._cond:
            while self.written < end and not self.done and self.generation == generation:
                self._want = min(self._want, end)
                self._cond.wait()
                self._want = 1 << 63  # (each waiter sets its end again before it waits again)
            if self.generation != generation:
                raise Restarted("the file restarted")
            if self.failed:
                raise OSError(_errno.EIO, "the file being read was not completed")
            return self.written


class PipeSource(Protocol):
    """What a `TarPipe`'s reader may run itself instead of waiting for a writer thread: the
    inflating of the next compressed piece (`pull`), which `feed`s the pipe."""

    def pull(self) -> bool:
        """Feed the pipe from the next piece waiting, unless none is waiting or another thread
        is feeding; whether a piece was taken. Called without the pipe's lock."""

    def reader_gone(self) -> None:
        """The reader will not pull again (`release`): what still comes must be fed by others."""


class TarPipe(Growth):
    """A layer tar handed in memory from the thread that inflates it to the build that reads it
    (`tree_from_tar(growth=pipe)`, with `on_file`): no tar file is written and read back, which
    cost a copy into the page cache, one out of it, and the file's pages. The writer `feed`s
    pieces (and `restart`s, `close`s as for `Growth`); the reader takes the bytes in archive order,
    and the pieces before its latest read are dropped.

    Bounded: a writer more than `limit` bytes ahead of its reader waits for it, unless the reader
    is waiting for more than that (one read bigger than `limit`, a big pax header: let through, or
    both would wait for good). A reader that stops for good (`release`: the build failed or is
    done) lets the writer go on, dropping what it writes.

    With a `source` (`attach`), the reader inflates the tar itself: when it lacks bytes it
    `pull`s the next compressed piece, and waits only when none has arrived (the download tells
    it of each with `arrived`). A writer thread between download and build cost two thread
    hand-offs per piece, each a futex call and a GIL hand-off, and under CFS a preempted
    holder of the GIL stalled every thread of the conversion."""

    def __init__(self, limit: int = 2 << 20) -> None:
        super().__init__()
        self.limit = limit
        self._pieces: deque[bytes] = deque()
        self._base = 0  # archive offset of the first piece held
        self._held = 0  # bytes held
        self._starving = False  # the reader waits for bytes not written yet
        self._gone = False  # no reader will come: writes are dropped
        self._draining = False  # the reader is past the archive's end: what follows is dropped
        self.dropped_unread = 0  # bytes written after the reader went
        self.peak_held = 0  # the most bytes held at once
        self.writer_waits = 0  # times the writer blocked on a full pipe (each ends in a wake-up)
        self.writer_blocked = False
        self.source: PipeSource | None = None
        self._reader_waiting = False  # the reader waits on the lock's condition (`arrived` wakes it)
        self.pulled = 0  # pieces the reader inflated itself
        self.reader_waits = 0  # times the reader waited for bytes (each ended in a wake-up)

    def attach(self, source: PipeSource) -> None:
        """The reader pulls from `source` from now on (see the class docstring)."""
        with self._cond:
            self.source = source

    def arrived(self) -> None:
        """A compressed piece is waiting for `source.pull`: a reader waiting for bytes wakes."""
        with self._cond:
            self._events += 1
            if self._reader_waiting:
                self._cond.notify_all()

    def _pull_or_wait(self) -> None:
        """With the lock held: inflate the next piece (the lock let go meanwhile), or wait for one
        (or for a writer's bytes) when none is waiting."""
        source = self.source
        if source is not None:
            seen = self._events
            self._cond.release()  # (held once: read and final_size do not nest)
            try:
                pulled = source.pull()
            finally:
                self._cond.acquire()
            if pulled:
                self.pulled += 1
                return
            if self._events != seen:  # a piece arrived (or the end, a restart) while the lock was let go
                return
        self.reader_waits += 1
        self._reader_waiting = True
        try:
            self._cond.wait()
        finally:
            self._reader_waiting = False

    def feed(self, data: bytes) -> None:
        """Append the next piece of the tar (waiting while the reader is `limit` bytes behind;
        never with a `source`: its feeder is the reader, pulling what it lacks)."""
        with self._cond:
            while self._held >= self.limit and not (self._starving or self._gone or self.done or self.source):
                self.writer_waits += 1
                self.writer_blocked = True
                self._cond.wait()
                self.writer_blocked = False
            self.written += len(data)
            self._events += 1
            if self._gone or self._draining:
                self.dropped_unread += len(data) if self._gone else 0
                self._base = self.written
            else:
                self._pieces.append(data)
                self._held += len(data)
                self.peak_held = max(self.peak_held, self._held)
            if self.written >= self._want:
                self._starving = False  # (what it waits for is in: the limit holds again)
                self._cond.notify_all()

    def grew(self, total: int) -> None:
        raise TypeError("a TarPipe is fed (`feed`), not written beside")

    def restart(self) -> None:
        with self._cond:
            self._pieces.clear()
            self._base = self._held = 0
            self._starving = self._draining = False
            super().restart()

    def release(self) -> None:
        """The reader is done with the tar (or failed): nothing written from now on is kept,
        and a `source` is told that nobody pulls any more."""
        with self._cond:
            self._gone = True
            self._pieces.clear()
            self._base = self.written
            self._held = 0
            self._events += 1
            self._cond.notify_all()
            source = self.source
        if source is not None:
            source.reader_gone()

    def _wake_writer(self) -> None:
        self.writer_blocked = False  # (woken: blocked again only once it waits again)
        self._cond.notify_all()

    def _drop_before(self, offset: int) -> None:
        pieces = self._pieces
        freed = False
        while pieces and self._base + len(pieces[0]) <= offset:
            n = len(pieces.popleft())
            self._base += n
            self._held -= n
            freed = True
        # a writer held back by the limit goes on once half the pipe is read (then it feeds
        # several pieces in a row): a wake-up per piece read cost a futex call and a thread
        # switch each, with the GIL hand-offs around them
        if freed and self.writer_blocked and self._held <= self.limit // 2:
            self._wake_writer()

    def read(self, offset: int, n: int, generation: int) -> bytes:
        """Up to `n` bytes at `offset` (fewer only at the end of the tar), waiting for them;
        what lies before `offset` is dropped. `Restarted`/OSError as `Growth.wait`."""
        end = offset + n
        with self._cond:
            if self._gone:  # (a build still running after its conversion gave up on it)
                raise OSError(_errno.ECANCELED, "the tar's reader was let go")
            if offset < self._base:
                raise AssertionError(f"TarPipe: read at {offset}, behind the pieces kept (from {self._base})")
            self._drop_before(offset)
            while self.written < end and not self.done and self.generation == generation and not self._gone:
                self._starving = True
                self._want = min(self._want, end)
                self._wake_writer()
                self._pull_or_wait()
                self._want = 1 << 63
            self._starving = False
            if self.generation != generation:
                raise Restarted("the file restarted")
            if self._gone:
                raise OSError(_errno.ECANCELED, "the tar's reader was let go")
            if self.failed:
                raise OSError(_errno.EIO, "the file being read was not completed")
            return self._slice(offset, min(end, self.written))

    def _slice(self, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        parts: list[memoryview | bytes] = []
        pos = self._base
        for p in self._pieces:
            if pos >= end:
                break
            stop = pos + len(p)
            if stop > start:
                if pos >= start and stop <= end and len(p) == end - start:
                    return p  # exactly one piece: no copy
                parts.append(memoryview(p)[max(0, start - pos):min(len(p), end - pos)])
            pos = stop
        return b"".join(parts)

    def final_size(self, generation: int) -> int:
        """The tar's size once it is complete; the bytes still coming are dropped unread."""
        with self._cond:
            if self._gone:
                raise OSError(_errno.ECANCELED, "the tar's reader was let go")
            if self.generation == generation:
                self._pieces.clear()
                self._base, self._held = self.written, 0
                self._draining = True
                self._cond.notify_all()
            while not self.done and self.generation == generation and not self._gone:
                self._pull_or_wait()  # (draining: what the pulls feed is dropped)
            if self._gone:
                raise OSError(_errno.ECANCELED, "the tar's reader was let go")
            if self.generation != generation:
                raise Restarted("the file restarted")
            if self.failed:
                raise OSError(_errno.EIO, "the file being read was not completed")
            return self.written


_B = TypeVar("_B", bound="_Backing | _PipeBacking")


class _Backing:
    """A seekable file holding the (decompressed) tar; member data is read from it with pread.

    Small reads are served from a 1 MiB read-ahead window: members come mostly in archive order,
    so a layer of many small files costs a few big preads instead of one syscall (and one GIL
    hand-off) per file."""

    def __init__(self, file: BinaryIO, growth: Growth | None = None) -> None:
        self.file = file
        self.fd = file.fileno()
        self.growth = growth
        self.generation = growth.generation if growth is not None else 0
        self.size = os.fstat(self.fd).st_size if growth is None else 0
        self._win: tuple[int, memoryview] = (0, memoryview(b""))  # replaced whole: safe to share

    def covers(self, end: int) -> bool:
        """Whether the file reaches `end` (waiting for a growing file to get there or end)."""
        if self.growth is not None and end > self.size:
            self.size = self.growth.wait(end, self.generation)
        return end <= self.size

    def final_size(self) -> int:
        if self.growth is not None:
            self.covers(1 << 62)
        return self.size

    def _short(self, offset: int) -> FormatError:
        """The error of a read that came back short at `offset`: `Restarted` (raised) when the
        file being followed was truncated to start again meanwhile."""
        if self.growth is not None:
            self.growth.check(self.generation)
        return FormatError(f"tar data truncated at offset {offset}")

    def pread(self, offset: int, n: int) -> bytes:
        """The `n` bytes at `offset` (FormatError past the end of the file)."""
        if n <= _SMALL:
            buf = bytearray(n)
            self.read_into(memoryview(buf), offset)
            return bytes(buf)
        if self.growth is not None:
            self.covers(offset + n)
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise self._short(offset + len(data))
        return data

    def open_range(self, offset: int, size: int) -> BinaryIO:
        """A stream over the member bytes [offset, offset+size)."""
        return io.BufferedReader(_MemberReader(self, offset, size))

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` with the bytes at `offset` (FormatError past the end of the file)."""
        n = len(view)
        if self.growth is not None:
            self.covers(offset + n)
        if n <= _SMALL:
            start, data = self._win
            if not (start <= offset and offset + n <= start + len(data)):
                start, data = offset, memoryview(os.pread(self.fd, max(_WINDOW, n), offset))
                self._win = (start, data)
            got = data[offset - start:offset - start + n]
            if len(got) != n:
                raise self._short(offset + len(got))
            view[:] = got
            return
        done = 0
        while done < n:  # straight into the caller's buffer (no bytes object in between)
            k = os.preadv(self.fd, [view[done:]], offset + done)
            if k <= 0:
                raise self._short(offset + done)
            done += k


class _BackingStream(io.RawIOBase, Generic[_B]):
    """A readable, seekable stream with its own position over a backing (`_Backing`, or a
    `_PipeBacking`)."""

    def __init__(self, backing: _B) -> None:
        self._b = backing
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos


class _MemberReader(_BackingStream[_Backing]):
    """Read-only stream over [offset, offset+size) of the backing file (independent position)."""

    def __init__(self, backing: _Backing, offset: int, size: int) -> None:
        super().__init__(backing)
        self._off = offset
        self._size = size

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: "bytearray | memoryview") -> int:  # type: ignore[override]
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        self._b.read_into(memoryview(buf)[:n], self._off + self._pos)
        self._pos += n
        return n


class _TarStream(_BackingStream[_B]):
    """The tar stream of a backing still being written, for `tarfile`: SEEK_END waits for the
    end of the archive (only when asked for)."""

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            base = 0
        elif whence == io.SEEK_CUR:
            base = self._pos
        else:
            base = self._b.final_size()
        self._pos = max(0, base + pos)
        return self._pos


class _FollowingFile(_TarStream[_Backing]):
    """The tar stream of a growing backing file: reads wait for the bytes."""

    def readinto(self, buf: "bytearray | memoryview") -> int:  # type: ignore[override]
        b = self._b
        b.covers(self._pos + len(buf))
        n = max(0, min(len(buf), b.size - self._pos))
        if not n:
            return 0
        k = os.preadv(b.fd, [memoryview(buf)[:n]], self._pos)
        if k < n:
            b._short(self._pos + k)  # (raises Restarted if that is why)
        self._pos += k
        return k


class _PipeBacking:
    """`_Backing` over a `TarPipe`: reads come in archive order (tarfile's headers, the member
    data `on_file` chunks); member data is not checked ahead (`covers` does not wait: waiting
    would hold a whole member in memory), a short one is found as it is read."""

    def __init__(self, pipe: TarPipe) -> None:
        self.pipe = pipe
        self.generation = pipe.generation

    @property
    def size(self) -> int:
        return self.pipe.written

    def covers(self, end: int) -> bool:
        pipe = self.pipe
        return not (pipe.done and pipe.generation == self.generation and pipe.written < end)

    def final_size(self) -> int:
        return self.pipe.final_size(self.generation)

    def pread(self, offset: int, n: int) -> bytes:
        data = self.pipe.read(offset, n, self.generation)
        if len(data) != n:
            raise FormatError(f"tar data truncated at offset {offset + len(data)}")
        return data

    def read_into(self, view: memoryview, offset: int) -> None:
        view[:] = self.pread(offset, len(view))

    def open_range(self, offset: int, size: int) -> BinaryIO:
        raise AssertionError("a piped tar's member data is read once, by on_file")


class _PipeFile(_TarStream["_PipeBacking"]):
    """The tar stream of a `TarPipe` (seeks forward only in effect: the bytes skipped are
    dropped by the next read)."""

    def readinto(self, buf: "bytearray | memoryview") -> int:  # type: ignore[override]
        data = self._b.pipe.read(self._pos, len(buf), self._b.generation)
        n = len(data)
        memoryview(buf)[:n] = data
        self._pos += n
        return n


class _CountingReader:
    """Reads through to `src`, telling `meter` how many compressed bytes were read."""

    def __init__(self, src: BinaryIO, meter: ExpansionMeter) -> None:
        self._src = src
        self._meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._meter.consumed(len(data))
        return data


def _spool(
    src: BinaryIO, decompress: str | None, limits: ExpansionLimits | None, spool_dir: str | None
) -> BinaryIO:
    """Copy `src` (decompressing gzip/zstd) into an anonymous temp file in `spool_dir`
    (default: the temp dir), refusing a layer that expands past `limits`."""
    meter = ExpansionMeter(limits, remaining_size(src))
    tmp = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 (returned open)
    counted: Any = _CountingReader(src, meter)
    try:
        if decompress == "gzip":
            import gzip
            import zlib

            try:
                with gzip.GzipFile(fileobj=counted, mode="rb") as gz:
                    _copy(gz, tmp, meter)
            except (OSError, EOFError, zlib.error) as e:
                raise FormatError(f"corrupt gzip layer: {e}") from None
        elif decompress == "zstd":
            try:
                with zstandard.ZstdDecompressor().stream_reader(counted, read_across_frames=True, closefd=False) as zr:
                    _copy(zr, tmp, meter)
            except zstandard.ZstdError as e:
                raise FormatError(f"corrupt zstd layer: {e}") from None
        else:
            _copy(counted, tmp, meter)
        tmp.flush()
        tmp.seek(0)
        return tmp
    except BaseException:
        tmp.close()
        raise


def _copy(src: Any, dst: BinaryIO, meter: ExpansionMeter) -> None:
    while True:
        block = src.read(1 << 20)
        if not block:
            return
        meter.produce(len(block))
        dst.write(block)


def detect_compression(head: bytes) -> str | None:
    """'gzip', 'zstd' or None (plain tar) from the first bytes of a layer."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def _open_backing(
    src: str | os.PathLike[str] | BinaryIO, limits: ExpansionLimits | None, spool_dir: str | None
) -> _Backing:
    if isinstance(src, str | bytes | os.PathLike):
        f: BinaryIO = open(src, "rb")  # noqa: SIM115 (kept open for FileData)
        owned = True
    else:
        f = src
        owned = False
    try:
        head = _peek(f, 4)
        kind = detect_compression(head)
        if kind is None and _has_fileno(f) and f.seekable():
            return _Backing(f)
        spooled = _spool(f, kind, limits, spool_dir)
        if owned:
            f.close()
        return _Backing(spooled)
    except BaseException:
        if owned:
            f.close()
        raise


def _has_fileno(f: BinaryIO) -> bool:
    try:
        f.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return False
    return True


def _peek(f: BinaryIO, n: int) -> bytes:
    if f.seekable():
        pos = f.tell()
        head = f.read(n)
        f.seek(pos)
        return head
    peek = getattr(f, "peek", None)
    if peek is not None:
        return bytes(peek(n)[:n])
    raise FormatError("tar source must be seekable or a buffered stream")


def _norm(raw: bytes, what: str) -> list[bytes]:
    """Path components of a tar name, lexically cleaned; `..` above the root is refused."""
    parts: list[bytes] = []
    for comp in raw.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not parts:
                raise FormatError(f"tar {what} {raw!r} escapes the layer root")
            parts.pop()
            continue
        if len(comp) > MAX_NAME_LEN:
            raise FormatError(f"tar {what} {raw!r}: component longer than {MAX_NAME_LEN} bytes")
        parts.append(comp)
    return parts


def _tar_bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


# ACLs in text form (GNU tar --acls, star): `SCHILY.acl.access` / `.default`
_TEXT_ACLS = {"SCHILY.acl.access": b"system.posix_acl_access", "SCHILY.acl.default": b"system.posix_acl_default"}


def _user_id(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _group_id(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _pax_xattrs(member: tarfile.TarInfo, stats: "SourceStats | None" = None) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    texts: dict[bytes, str] = {}
    for key, value in member.pax_headers.items():
        if key in _TEXT_ACLS:
            texts[_TEXT_ACLS[key]] = value
        elif key.startswith("SCHILY.xattr."):
            out[_tar_bytes(key[len("SCHILY.xattr.") :])] = _tar_bytes(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except ValueError:
                raise FormatError(f"tar member {member.name!r}: bad base64 in xattr {key!r}") from None
    for name, text in texts.items():
        if name in out:
            continue  # the binary form (SCHILY.xattr.system.posix_acl_*) wins over the text
        # Names resolve against the build host's passwd and group, as `tar -x --acls` would.
        try:
            out[name] = acl_from_text(text, user_id=_user_id, group_id=_group_id)
        except (KeyError, ValueError) as e:  # as tar -x --acls: that ACL is lost, the entry is kept
            log.warning("tar member %r: ACL %s %r cannot be used (%s); skipped", member.name, name.decode(), text, e)
            if stats is not None:
                stats.skipped_xattrs += 1
                stats.skipped_xattr_names.add(name)
    return out


def _mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    """(seconds, nanoseconds); PAX mtime is parsed exactly, not through a float."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        whole, _, frac = text.partition(".")
        try:
            sec = int(whole)
            nsec = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            raise FormatError(f"tar member {member.name!r}: bad PAX mtime {text!r}") from None
        if text.startswith("-"):
            return 0, 0
        return sec, nsec
    return max(0, int(member.mtime)), 0


_TYPES = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.AREGTYPE: stat.S_IFREG,
    tarfile.CONTTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


class _TarTree:
    """Inserts members into a packed tree following the rules in the module docstring."""

    def __init__(self, stats: SourceStats | None, backing: _Backing) -> None:
        self.tree = Tree()
        self.tree.backings.append(backing)
        self.stats = stats
        self._dir_key: list[bytes] = []  # the parent components last resolved ...
        self._dir_idx = 0  # ... and their entry (members come directory by directory)

    def parent_of(self, parts: list[bytes], raw: str) -> int:
        tree = self.tree
        dirs = parts[:-1]
        if dirs == self._dir_key and self._alive(self._dir_idx):
            return self._dir_idx
        node = 0
        for comp in dirs:
            child = tree.lookup(node, comp)
            if child < 0:
                child = tree.add(node, comp, stat.S_IFDIR | 0o755)
            elif not tree.is_dir(child):
                raise FormatError(f"tar member {raw!r}: parent component {comp!r} is not a directory")
            node = child
        self._dir_key, self._dir_idx = dirs, node
        return node

    def _alive(self, idx: int) -> bool:
        """No directory on the way up from `idx` was replaced since it was resolved."""
        parent = self.tree.parent
        while idx > 0:
            idx = parent[idx]
            if idx == DEAD:
                return False
        return True

    def lookup(self, parts: list[bytes]) -> int:
        tree = self.tree
        node = 0
        for comp in parts:
            if not tree.is_dir(node):
                return -1
            node = tree.lookup(node, comp)
            if node < 0:
                return -1
        return node


def tree_from_tar(
    src: str | os.PathLike[str] | BinaryIO | None,
    stats: SourceStats | None = None,
    *,
    limits: ExpansionLimits | None = DEFAULT_LIMITS,
    spool_dir: str | None = None,
    growth: Growth | None = None,
    on_file: Callable[[_Backing, int, int], None] | None = None,
) -> Tree:
    """The packed tree of one OCI layer tar (plain, gzip or zstd, detected by magic).

    Regular files are byte ranges of the archive (the decompressed copy for compressed layers),
    so the archive (or a temp copy) stays open while the tree is alive.
    A compressed (or unseekable) layer is first copied into an anonymous file in `spool_dir`
    (default: the temp dir; nothing is left there, whatever happens), refused with an
    `ExpansionLimitError` when it expands past `limits` (None: no caps).

    With `growth`, `src` is a plain tar file still being written (see `Growth`): the archive is
    read as far as it has got, waiting for more. With a `TarPipe` as `growth`, the tar comes
    through it in memory instead (`src` is not read; `on_file` required). `on_file(backing, offset, size)` is called for
    each regular member with data as soon as it is parsed (its bytes are then at hand in the
    backing: a caller chunks files in archive order while the rest is still arriving).
    """
    backing: Any
    if isinstance(growth, TarPipe):
        if on_file is None:
            raise TypeError("a piped tar's member data must be taken by on_file (it is not kept)")
        backing = _PipeBacking(growth)
        fileobj: Any = _PipeFile(backing)
        try:
            tree = _tree_from_tar(fileobj, backing, stats, on_file)
        except Restarted:
            raise  # (the build starts again, reading the new attempt: the pipe keeps what is fed)
        except BaseException:
            growth.release()  # no reader will come: a writer waiting for one goes on
            raise
        growth.release()
        return tree
    if src is None:
        raise TypeError("no tar given")
    if growth is not None:
        if isinstance(src, str | bytes | os.PathLike):
            raise TypeError("a growing tar must be given as an open file")
        backing = _Backing(src, growth)
        fileobj = _FollowingFile(backing)
    else:
        backing = _open_backing(src, limits, spool_dir)
        fileobj = backing.file
    return _tree_from_tar(fileobj, backing, stats, on_file)


def _tree_from_tar(fileobj: Any, backing: Any, stats: SourceStats | None,
                   on_file: Callable[[Any, int, int], None] | None) -> Tree:
    try:
        tar = tarfile.open(  # noqa: SIM115 (closing would close the backing file)
            fileobj=fileobj, mode="r:", encoding="utf-8", errors="surrogateescape"
        )
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise FormatError(f"not a tar archive: {e}") from None
    tt = _TarTree(stats, backing)
    while True:
        try:
            member = plain_next(tar) if PLAIN_HEADERS else None
            if member is None:
                member = tar.next()
            elif stats is not None:
                stats.plain_headers += 1
        except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as e:
            raise FormatError(f"corrupt tar archive at offset {tar.offset}: {e}") from None
        if member is None:
            break
        tar.members.clear()  # type: ignore[attr-defined]  # else TarFile keeps every TarInfo (~0.5 KiB each)
        _add_member(tt, member, backing)
        if on_file is not None and member.isreg() and member.size > 0:
            on_file(backing, member.offset_data, member.size)
    trailing = backing.final_size() - tar.offset
    if 0 < trailing < tarfile.BLOCKSIZE:
        raise FormatError(f"tar archive truncated: {trailing} stray bytes after offset {tar.offset}")
    tt.tree.freeze()
    return tt.tree


def _add_member(tt: _TarTree, m: tarfile.TarInfo, backing: _Backing) -> None:
    raw = m.name
    tree = tt.tree
    if tt.stats is not None:
        tt.stats.entries += 1
    if m.sparse is not None or m.type == tarfile.GNUTYPE_SPARSE:
        raise FormatError(f"tar member {raw!r}: GNU sparse members are not supported")
    parts = _norm(_tar_bytes(raw), "name")
    if m.type == tarfile.LNKTYPE:
        target_parts = _norm(_tar_bytes(m.linkname), "hard link target")
        target = tt.lookup(target_parts)
        if target < 0 or not stat.S_ISREG(tree.mode[tree.resolve(target)]):
            raise FormatError(
                f"tar member {raw!r}: hard link target {m.linkname!r} is not an earlier regular file of this layer"
            )
        if not parts:
            raise FormatError(f"tar member {raw!r}: hard link cannot be the layer root")
        tree.add_link(tt.parent_of(parts, raw), parts[-1], target)
        return
    fmt = _TYPES.get(m.type)
    if fmt is None:
        raise FormatError(f"tar member {raw!r}: unsupported member type {m.type!r}")
    for what, v in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= v <= 0xFFFF_FFFF:
            raise FormatError(f"tar member {raw!r}: {what} {v} out of range")
    sec, nsec = _mtime(m)
    if sec >= 1 << 64:
        raise FormatError(f"tar member {raw!r}: mtime {sec} out of range")
    where = f"tar member {raw!r}"
    xattrs = _keep_xattrs(_pax_xattrs(m, tt.stats), where, tt.stats) if m.pax_headers else NO_XATTRS
    mode = fmt | (m.mode & 0o7777)
    if fmt == stat.S_IFREG and (m.size < 0 or not backing.covers(m.offset_data + m.size)):
        raise FormatError(
            f"{where}: declared size {m.size} at offset {m.offset_data} runs past the end of "
            f"the archive ({backing.size} bytes)"
        )
    rdev = 0
    link = b""
    if fmt == stat.S_IFLNK:
        link = _tar_bytes(m.linkname)
        if not link or len(link) > MAX_SYMLINK_LEN:
            raise FormatError(f"{where}: symlink target of {len(link)} bytes")
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        try:
            rdev = os.makedev(m.devmajor, m.devminor)
        except (OverflowError, ValueError):
            raise FormatError(f"{where}: device {m.devmajor}:{m.devminor} out of range") from None
        if rdev > 0xFFFF_FFFF:
            raise FormatError(f"{where}: device {m.devmajor}:{m.devminor} does not fit 32 bits")
    if not parts:
        if fmt != stat.S_IFDIR:
            raise FormatError(f"tar member {raw!r} names the layer root but is not a directory")
        tree.set_attrs(0, mode, m.uid, m.gid, sec, nsec, xattrs)
        return
    parent = tt.parent_of(parts, raw)
    if fmt == stat.S_IFDIR:
        old = tree.lookup(parent, parts[-1])
        if old >= 0 and tree.is_dir(old):  # a directory again: keep its children
            tree.set_attrs(old, mode, m.uid, m.gid, sec, nsec, xattrs)
            return
    idx = tree.add(parent, parts[-1], mode, m.uid, m.gid, sec, nsec, xattrs)
    if fmt == stat.S_IFREG:
        tree.set_tar(idx, m.offset_data, m.size)
    elif fmt == stat.S_IFLNK:
        tree.set_symlink(idx, link)
    elif rdev:
        tree.set_rdev(idx, rdev)
