"""The FUSE request handler: one request's bytes in, the reply's bytes out (sans-IO).

The same `FuseSession` serves /dev/fuse (a worker reads one request per read(2)) and virtio-fs
(a request is the readable half of a descriptor chain). Model: fuse-backend-rs `Server`.

Wire rules the handler implements:
* INIT negotiates min(kernel minor, 45); init_out is sized for the kernel's minor (64 bytes from
  7.23, 24 bytes for 7.13..7.22); only flags the kernel offered are answered; major > 7 gets our
  version back (the kernel retries), major < 7 or minor < 13 gets EPROTO.
* Before INIT (and after DESTROY) every request gets EIO, except INIT itself and the
  no-reply opcodes.
* FORGET, BATCH_FORGET, INTERRUPT and NOTIFY_REPLY never get a reply (`None`); virtio-fs must
  still complete their descriptor chains.
* Unless the filesystem sets `writable = True`, every mutating opcode answers EROFS, OPEN with
  write access or O_TRUNC/O_CREAT/O_TMPFILE too; a writable filesystem gets SETATTR, MKNOD,
  MKDIR, SYMLINK, LINK, UNLINK, RMDIR, RENAME(2), CREATE, WRITE, FSYNC(DIR), SETXATTR, REMOVEXATTR and FALLOCATE
  (COPY_FILE_RANGE and TMPFILE answer ENOSYS: the kernel falls back to read+write / EOPNOTSUPP).
  For read-only ones FSYNC, FSYNCDIR, SYNCFS, POLL, locks, BMAP, STATX and DAX mapping answer ENOSYS: the kernel then
  stops sending them and treats fsync as success and poll as "always ready", exactly what a
  read-only image wants (this is also what nydusd's RAFS answers). IOCTL answers ENOTTY.
  Unknown opcodes answer ENOSYS.
* Errors are fuse_out_header(len=16, error=-errno). Truncated or malformed arguments answer
  EINVAL, a header whose len exceeds the buffer answers EIO, and fewer than 40 bytes (no header
  to answer to) raise FuseProtocolError: the transport logs it and reads the next request.
"""

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Protocol, cast

from .abi import (
    ACCESS_IN,
    ATTR_FMT,
    BATCH_FORGET_IN,
    CREATE_IN,
    DIRENT,
    DIRENTPLUS,
    ENTRY_OUT,
    FALLOCATE_IN,
    FATTR_FH,
    FILESYSTEM_MAX_STACK_DEPTH,
    FORGET_IN,
    FORGET_ONE,
    FSYNC_FDATASYNC,
    FSYNC_IN,
    GETXATTR_IN,
    IN_HEADER,
    INIT_IN_COMPAT,
    INIT_OUT,
    KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
    LINK_IN,
    MIN_KERNEL_MINOR_VERSION,
    MIN_READ_BUFFER,
    MKDIR_IN,
    MKNOD_IN,
    NAME_MAX,
    NO_REPLY_OPCODES,
    NOTIFY_DELETE_OUT,
    NOTIFY_INVAL_ENTRY_OUT,
    NOTIFY_INVAL_INODE_OUT,
    OPEN_IN,
    OUT_HEADER,
    RENAME2_IN,
    RENAME_IN,
    REQUEST_ARGS,
    SETATTR_IN,
    SETXATTR_IN,
    SETXATTR_IN_COMPAT,
    WRITE_IN,
    WRITE_OUT,
    FOpenFlags,
    InitFlags,
    NotifyCode,
    Opcode,
    init_out_size,
)
from .api import OPEN_MUTATING_FLAGS, Caller, Entry, Filesystem, OpenResult, SetAttr
from .iovec import WouldBlock, trim
from .warm import WarmGate

log = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_FLAGS",
    "FuseProtocolError",
    "FuseSession",
    "RequestObserver",
    "describe_reply",
    "describe_request",
    "notify_delete",
    "notify_inval_entry",
    "notify_inval_inode",
]

# Flags this handler can honour if the filesystem wants them and the kernel offers them. Not
# here: splice (we copy), writeback cache and locks (read-only), DAX/io_uring/security
# contexts/supplementary groups (need transport or request-format support we lack). PASSTHROUGH
# is only asked for by a filesystem that the /dev/fuse transport gave its backing registry.
SUPPORTED_FLAGS = (
    InitFlags.ASYNC_READ
    | InitFlags.EXPORT_SUPPORT
    | InitFlags.BIG_WRITES
    | InitFlags.AUTO_INVAL_DATA
    | InitFlags.DO_READDIRPLUS
    | InitFlags.READDIRPLUS_AUTO
    | InitFlags.ASYNC_DIO
    | InitFlags.NO_OPEN_SUPPORT
    | InitFlags.PARALLEL_DIROPS
    | InitFlags.POSIX_ACL
    | InitFlags.ABORT_ERROR
    | InitFlags.MAX_PAGES
    | InitFlags.CACHE_SYMLINKS
    | InitFlags.NO_OPENDIR_SUPPORT
    | InitFlags.EXPLICIT_INVAL_DATA
    | InitFlags.DIRECT_IO_ALLOW_MMAP
    | InitFlags.PASSTHROUGH
)

_MUTATING = (
    Opcode.SETATTR, Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR,
    Opcode.RENAME, Opcode.LINK, Opcode.WRITE, Opcode.SETXATTR, Opcode.REMOVEXATTR, Opcode.CREATE,
    Opcode.FALLOCATE, Opcode.RENAME2, Opcode.COPY_FILE_RANGE, Opcode.COPY_FILE_RANGE_64,
    Opcode.TMPFILE,
)
_UNSUPPORTED = (
    Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.SYNCFS, Opcode.GETLK, Opcode.SETLK, Opcode.SETLKW,
    Opcode.BMAP, Opcode.POLL, Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING, Opcode.STATX,
)

_HDR_SIZE = IN_HEADER.size
_OUT = OUT_HEADER.pack
_ENTRY_REPLY = struct.Struct("<IiQQQQQII" + ATTR_FMT)
_ATTR_REPLY = struct.Struct("<IiQQII" + ATTR_FMT)
_OPEN_REPLY = struct.Struct("<IiQQIi")
_STATFS_REPLY = struct.Struct("<IiQQQQQQIII28x")
_XATTR_SIZE_REPLY = struct.Struct("<IiQII")
_LSEEK_REPLY = struct.Struct("<IiQQ")
_FH = struct.Struct("<Q")  # the fh that starts read/release/flush/lseek in-args
_NODEID = struct.Struct("<Q")  # fuse_in_header.nodeid, at offset 16
_READ_HEAD = struct.Struct("<QQI")  # fh, offset, size of fuse_read_in
_U32 = struct.Struct("<I")
_U64X2 = struct.Struct("<QQ")
_S_IFMT = 0o170000
_S_IFREG = 0o100000
_U32X2 = struct.Struct("<II")
_LSEEK_IN = struct.Struct("<QqI")  # fh, offset (signed loff_t), whence
_CREATE_REPLY = struct.Struct("<IiQQQQQII" + ATTR_FMT + "QIi")  # out_header, entry_out, open_out
_MAX_OFFSET = (1 << 63) - 1
_ENTRY_SIZE = _ENTRY_REPLY.size
_ENTRY_OUT_SIZE = ENTRY_OUT.size
_ATTR_SIZE = _ATTR_REPLY.size
_DIRENT_SIZE = DIRENT.size
# the biggest record of one entry (a NAME_MAX name), READDIR and READDIRPLUS
_DIRENT_MAX = (DIRENT.size + NAME_MAX + 7) & ~7
_DIRENTPLUS_MAX = (DIRENTPLUS.size + NAME_MAX + 7) & ~7
_DIRENTPLUS_SIZE = DIRENTPLUS.size
_DIRENT_PACK = DIRENT.pack
_DIRENTPLUS_PACK = DIRENTPLUS.pack
_PADS = [b"\0" * i for i in range(8)]
_MAX_SECS = (1 << 63) - 1
# refused for a read-only filesystem: write access, or flags that write with O_RDONLY
_O_READ_ONLY_REFUSED = os.O_ACCMODE | OPEN_MUTATING_FLAGS

Reply = bytes | tuple[bytes, bytes | bytearray | memoryview] | None


class Then(bytes):
    """A reply with work for its transport to do once the reply is written (the kernel has it,
    the requester is being woken): `after()`. Used to read a small file while the process that
    looked it up wakes up and opens it, so the READ that follows finds it ready, and to decode
    the next directory of a walk after a listing's end. Any transport may write it as plain
    bytes and skip `after` (nothing is lost but time)."""

    after: Callable[[], object]

    @classmethod
    def reply(cls, reply: bytes, fn: Callable[..., object], *args: int) -> "Then":
        then = cls(reply)
        then.after = partial(fn, *args)
        return then

Buffer = bytes | bytearray | memoryview
_OUT_SIZE = OUT_HEADER.size
_OUT_INTO = OUT_HEADER.pack_into
_READ_MIN = _HDR_SIZE + 40  # in_header + fuse_read_in
_OP_READ = int(Opcode.READ)
_FOPEN_PASSTHROUGH = int(FOpenFlags.PASSTHROUGH)
_OP_FORGET = int(Opcode.FORGET)
_FORGET_LEN = IN_HEADER.size + FORGET_IN.size
_Op = Callable[[int, int, memoryview, int, int], Reply]


class _Span:
    """The length of READ data already written elsewhere, for the observer (which only counts it)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class _GuardedDest:
    """A ReadDest over a transport's buffers, written only while its guard is held. A fill
    that succeeds also writes the reply header (into `head`) for its byte count inside the
    same guard: a READ then takes the guard once, not twice (`header` says which count)."""

    __slots__ = ("bufs", "size", "guard", "head", "unique", "header")

    def __init__(self, bufs: list[memoryview], size: int, guard: AbstractContextManager[object],
                 head: memoryview, unique: int) -> None:
        self.bufs = bufs
        self.size = size
        self.guard = guard
        self.head = head
        self.unique = unique
        self.header = -1  # the byte count of the success header written, -1: none

    def fill(self, write: Callable[[list[memoryview]], int]) -> int:
        with self.guard:
            n = write(self.bufs)
            if 0 <= n <= self.size:
                _OUT_INTO(self.head, 0, _OUT_SIZE + n, 0, self.unique)
                self.header = n
            return n


class FuseProtocolError(ValueError):
    """A buffer too short to hold a fuse_in_header: there is no request to answer."""


class RequestObserver(Protocol):
    """Sees every request around its handling (metrics, in-flight tracking). `started` returns
    a token handed back to `finished` with the reply (None: no reply, or the handler raised)."""

    def started(self, opcode: int, nodeid: int, unique: int) -> object: ...

    def finished(self, token: object, reply: Reply) -> None: ...


_timeout_cache: dict[float, tuple[int, int]] = {}


def split_timeout(t: float) -> tuple[int, int]:
    """Seconds as a float -> (sec, nsec) for the *_valid fields (cached: filesystems reuse a
    handful of timeout values)."""
    r = _timeout_cache.get(t)
    if r is None:
        if not t > 0:  # also NaN
            r = (0, 0)
        elif t >= _MAX_SECS:
            r = (_MAX_SECS, 0)
        else:
            s = int(t)
            r = (s, min(int((t - s) * 1e9), 999_999_999))
        if len(_timeout_cache) < 256:
            _timeout_cache[t] = r
    return r


def _cstr(body: memoryview, start: int) -> bytes:
    """The NUL-terminated name at `start` of the in-args."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    if end < 0:
        raise OSError(errno.EINVAL, "name is not NUL-terminated")
    return raw[:end]


def _fixed_reply(code: int) -> _Op:
    neg = -code

    def reply(unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        return _OUT(16, neg, unique)

    return reply


def _no_reply(unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> None:
    return None


class FuseSession:
    """One FUSE connection's protocol state around a `Filesystem`.

    `handle()` is thread-safe after INIT (transports call it from several workers); INIT and
    DESTROY swap the dispatch table atomically. Per-request cost is one header unpack, one dict
    lookup and the op's own packing.
    """

    def __init__(
        self,
        fs: Filesystem,
        *,
        max_write: int = 1 << 20,
        max_readahead: int = 1 << 20,
        max_pages: int = 256,
        max_background: int = 0,
        congestion_threshold: int = 0,
        time_gran: int = 1,
        max_stack_depth: int = 1,
        supported: int = SUPPORTED_FLAGS,
        debug: bool = False,
    ) -> None:
        self.fs = fs
        self.max_write = max_write
        self.max_readahead = max_readahead
        self.max_pages = max_pages
        # 0 keeps the kernel defaults (12 and 9)
        self.max_background = max_background
        self.congestion_threshold = congestion_threshold
        self.time_gran = time_gran
        # With PASSTHROUGH: how deep this mount stacks on its backing files (1: they must live
        # on a plain filesystem). A filesystem mounted on our files (EROFS on a blob view) adds
        # one level, and the kernel allows FILESYSTEM_MAX_STACK_DEPTH in all.
        self.max_stack_depth = max_stack_depth
        self.supported = InitFlags(supported)
        self.debug = debug
        # INIT flags the transport itself asks for whatever the filesystem wants (OVER_IO_URING)
        self.transport_flags = 0
        # negotiated state (valid while `initialized`)
        self.initialized = False
        self.kernel_major = 0
        self.kernel_minor = 0
        self.proto_minor = 0
        self.capable = InitFlags(0)  # what the kernel offered
        self.flags = InitFlags(0)  # what we enabled (as sent in the reply)
        self.readahead = 0  # the negotiated max_readahead
        self._no_open = False
        self._passthrough = False  # PASSTHROUGH negotiated (read per OPEN: an int, not an enum op)
        self._no_opendir = False
        # LOOKUPs of regular files up to this size (0: none) warm their data after the reply
        # (`Filesystem.warm`) while READs follow LOOKUPs; a transport that runs `Then.after` sets it
        self.warm_max = 0
        self.warm_gate = WarmGate()
        # the directory whose listing's last entries went out with its next listing's warm-up
        # (its empty READDIR then has none; a heuristic slot, shared by the workers)
        self._ended_early = 0
        self._init_lock = threading.Lock()

        self._pre_init_ops: dict[int, tuple[_Op, int]] = {
            Opcode.INIT: (self._init, 8),
            Opcode.FORGET: (_no_reply, 0),
            Opcode.BATCH_FORGET: (_no_reply, 0),
            Opcode.INTERRUPT: (_no_reply, 0),
            Opcode.NOTIFY_REPLY: (_no_reply, 0),
        }
        ops: dict[int, tuple[_Op, int]] = {
            Opcode.INIT: (self._init, 8),
            Opcode.DESTROY: (self._destroy, 0),
            Opcode.LOOKUP: (self._lookup, 1),
            Opcode.FORGET: (self._forget, FORGET_IN.size),
            Opcode.BATCH_FORGET: (self._batch_forget, BATCH_FORGET_IN.size),
            Opcode.INTERRUPT: (_no_reply, 0),
            Opcode.NOTIFY_REPLY: (_no_reply, 0),
            Opcode.GETATTR: (self._getattr, 0),
            Opcode.READLINK: (self._readlink, 0),
            Opcode.OPEN: (self._open, OPEN_IN.size),
            Opcode.READ: (self._read, 40),
            Opcode.RELEASE: (self._release, 24),
            Opcode.FLUSH: (self._flush, 24),
            Opcode.OPENDIR: (self._opendir, OPEN_IN.size),
            Opcode.READDIR: (self._readdir, 40),
            Opcode.READDIRPLUS: (self._readdirplus, 40),
            Opcode.RELEASEDIR: (self._releasedir, 24),
            Opcode.STATFS: (self._statfs, 0),
            Opcode.GETXATTR: (self._getxattr, GETXATTR_IN.size + 1),
            Opcode.LISTXATTR: (self._listxattr, GETXATTR_IN.size),
            Opcode.ACCESS: (self._access, ACCESS_IN.size),
            Opcode.LSEEK: (self._lseek, 24),
            Opcode.IOCTL: (_fixed_reply(errno.ENOTTY), 0),
        }
        for op in _MUTATING:
            ops[op] = (_fixed_reply(errno.EROFS), 0)
        for op in _UNSUPPORTED:
            ops[op] = (_fixed_reply(errno.ENOSYS), 0)
        self._post_init_ops = ops
        self._writable = False
        self._install_write_ops()
        self._ops = self._pre_init_ops
        self._unknown = -errno.EIO
        self.observer: RequestObserver | None = None
        # FORGETs taken by defer_forget, applied together by flush_forgets
        self._forgets: list[tuple[int, int]] = []
        self._forgets_lock = threading.Lock()
        self._call: Callable[[bytes | bytearray | memoryview], Reply] = self._dispatch
        self.set_observer(None)

    # -- public ---------------------------------------------------------------------------------
    @property
    def min_read_buffer(self) -> int:
        """The smallest buffer a /dev/fuse reader may pass: the kernel refuses a read(2) that
        could not hold in_header + write_in + max_write."""
        return max(MIN_READ_BUFFER, 4096 + self.max_write)

    def set_observer(self, observer: RequestObserver | None) -> None:
        """Install (or remove) the request observer (`_dispatch` calls it around each request);
        without one a request costs nothing extra."""
        self.observer = observer
        self._call = self._handle_debug if self.debug else self._dispatch

    def handle(self, req: bytes | bytearray | memoryview) -> bytes | None:
        """The reply to one request (None when the kernel expects none)."""
        r = self._call(req)
        if isinstance(r, tuple):
            return b"".join(r)
        return r

    def handle_vectored(self, req: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview] | None:
        """Like handle(), but the reply as buffers to gather (writev / virtqueue descriptors),
        so READ data is not copied once more behind its header."""
        r = self._call(req)
        if r is None:
            return None
        if isinstance(r, tuple):
            return list(r)
        return [r]

    def handle_into(self, req: bytes | bytearray | memoryview, bufs: Sequence[memoryview],
                    guard: AbstractContextManager[object], nowait: bool = False,
                    room: int = -1) -> int | list[Buffer] | None:
        """Like handle_vectored(), but a READ's reply goes straight into `bufs` (the reply's own
        memory: a virtio-fs chain's writable buffers), written only inside `with guard:`, and the
        number of bytes written is returned. The filesystem's `read_into` puts the data there
        (preadv for passthrough: no copy of ours at all). Anything else, and a READ whose
        `size` does not fit `bufs` (handle_vectored's EIO-or-short answer applies), returns its
        reply as buffers, written nowhere. `nowait`: raise WouldBlock rather than wait for I/O
        (the caller then retries on a thread that may wait); only READs can be answered so.
        `room`: the bytes of `bufs` when the caller knows them (a virtio chain does: summing
        a READ's 257 buffer lengths here cost a tenth of its Python time)."""
        if (len(req) >= _READ_MIN and _U32.unpack_from(req, 4)[0] == _OP_READ and self._ops is self._post_init_ops
                and not self.debug):
            length, opcode, unique, nodeid, _uid, _gid, _pid, extlen, _pad = IN_HEADER.unpack_from(req)
            if (length <= len(req) and length - (extlen << 3) >= _READ_MIN
                    and bufs and len(bufs[0]) >= _OUT_SIZE):
                fh, offset, size = _READ_HEAD.unpack_from(req, _HDR_SIZE)
                if room < 0:
                    room = sum(map(len, bufs))
                if room - _OUT_SIZE >= size:
                    return self._read_into(unique, nodeid, fh, offset, size, bufs, room, guard, nowait)
        if nowait:
            raise WouldBlock
        return self.handle_vectored(req)

    def read_waits(self, req: bytes | bytearray | memoryview) -> bool:
        """Whether request `req` (a READ) may wait on slow I/O: the filesystem's `read_waits`
        for its inode and range (True before INIT, for a request too short to name an inode,
        or when the filesystem fails to say: the cautious answer only costs a thread hand-off;
        a READ too short to name its range asks about the inode alone)."""
        if len(req) < _HDR_SIZE or self._ops is not self._post_init_ops:
            return True
        offset = size = 0
        if len(req) >= _HDR_SIZE + _READ_HEAD.size:
            _fh, offset, size = _READ_HEAD.unpack_from(req, _HDR_SIZE)
        try:
            return bool(self.fs.read_waits(_NODEID.unpack_from(req, 16)[0], offset, size))
        except Exception:
            log.exception("read_waits failed; handing the READ on")
            return True

    def defer_forget(self, req: bytes | bytearray | memoryview) -> bool:
        """Take a well-formed FORGET (after INIT) to be applied by the next `flush_forgets`,
        with the others that came with it, in one `batch_forget`: a guest's drop_caches sends
        thousands at once, one per chain, and each answered through the whole dispatch costs
        the request queue's thread the GIL meanwhile. Lookup counts add up in any order, so a
        LOOKUP served before the flush loses nothing. False: not one (the caller handles it)."""
        if len(req) != _FORGET_LEN or self._ops is not self._post_init_ops or self.debug:
            return False
        length, opcode, unique, nodeid, _uid, _gid, _pid, extlen, _pad = IN_HEADER.unpack_from(req)
        if opcode != _OP_FORGET or length != _FORGET_LEN or extlen:
            return False
        nlookup = FORGET_IN.unpack_from(req, _HDR_SIZE)[0]
        obs = self.observer
        if obs is not None:
            obs.finished(obs.started(_OP_FORGET, nodeid, unique), None)
        with self._forgets_lock:
            self._forgets.append((nodeid, nlookup))
        return True

    def flush_forgets(self) -> int:
        """Apply the FORGETs `defer_forget` took; how many."""
        if not self._forgets:
            return 0
        with self._forgets_lock:
            items, self._forgets = self._forgets, []
        try:
            self.fs.batch_forget(items)
        except Exception:
            log.exception("batch_forget of %d deferred FORGETs failed", len(items))
        return len(items)

    def _read_into(self, unique: int, nodeid: int, fh: int, offset: int, size: int, bufs: Sequence[memoryview],
                   room: int, guard: AbstractContextManager[object], nowait: bool) -> int:
        obs = self.observer
        token = obs.started(_OP_READ, nodeid, unique) if obs is not None and not nowait else None
        dest = _GuardedDest(trim(bufs, _OUT_SIZE, size, room), size, guard, bufs[0], unique)
        err = 0
        got = 0
        try:
            got = self.fs.read_into(nodeid, fh, offset, size, dest, nowait)
        except WouldBlock:
            if obs is not None and token is not None:
                obs.finished(token, None)
            raise
        except OSError as e:
            code = e.errno
            if isinstance(code, int) and 0 < code < 4096:
                err = code
            else:
                log.error("FUSE READ on nodeid %d: %r has no usable errno", nodeid, e)
                err = errno.EIO
        except Exception:
            log.exception("FUSE READ on nodeid %d failed", nodeid)
            err = errno.EIO
        if got > size or got < 0:
            log.error("read_into(%d) says %d bytes for a %d-byte request; EIO", nodeid, got, size)
            err, got = errno.EIO, 0
        elif err:
            got = 0
        try:
            if err or dest.header != got:  # (else written with the data, in the same guard)
                with guard:  # (raises when the transport has dropped the request meanwhile)
                    _OUT_INTO(bufs[0], 0, _OUT_SIZE + got, -err, unique)
        finally:
            if obs is not None:
                if token is None:
                    token = obs.started(_OP_READ, nodeid, unique)
                obs.finished(token, cast(Reply, (_OUT(_OUT_SIZE + got, -err, unique), _Span(got))))
        return _OUT_SIZE + got

    def reset(self) -> None:
        """Forget the connection (its transport went away, e.g. a virtio-fs guest disconnected):
        the filesystem's destroy() runs and the next request must be INIT."""
        with self._init_lock:
            with self._forgets_lock:
                self._forgets = []  # (the connection's inodes go with it)
            if self.initialized:
                self._teardown()

    def export_state(self) -> dict[str, int]:
        """What INIT negotiated, for a successor that takes the /dev/fuse fd over (failover,
        hot upgrade): the kernel will not send INIT again on that connection."""
        with self._init_lock:
            return {"initialized": int(self.initialized), "kernel_major": self.kernel_major,
                    "kernel_minor": self.kernel_minor, "proto_minor": self.proto_minor,
                    "capable": int(self.capable), "flags": int(self.flags), "readahead": self.readahead}

    def restore_state(self, state: dict[str, int]) -> None:
        """Continue a connection a predecessor initialised (see export_state)."""
        if not state.get("initialized"):
            return
        with self._init_lock:
            capable = InitFlags(int(state["capable"]))
            self.fs.init(capable)
            self.kernel_major = int(state["kernel_major"])
            self.kernel_minor = int(state["kernel_minor"])
            self.proto_minor = int(state["proto_minor"])
            self.capable = capable
            self.flags = InitFlags(int(state["flags"]))
            self.readahead = int(state["readahead"])
            self.fs.negotiated(self.flags)
            self._no_open = bool(self.flags & InitFlags.NO_OPEN_SUPPORT)
            self._passthrough = bool(self.flags & InitFlags.PASSTHROUGH)
            self._no_opendir = bool(self.flags & InitFlags.NO_OPENDIR_SUPPORT)
            self.initialized = True
            self._unknown = -errno.ENOSYS
            self._ops = self._post_init_ops

    def _install_write_ops(self) -> None:
        """Route mutating opcodes to the filesystem if it is writable (EROFS otherwise); checked
        again at every INIT, so a filesystem may decide in init()."""
        writable = bool(getattr(self.fs, "writable", False))
        ops = self._post_init_ops
        if writable:
            ops.update({
                Opcode.SETATTR: (self._setattr, SETATTR_IN.size),
                Opcode.MKNOD: (self._mknod, MKNOD_IN.size + 1),
                Opcode.MKDIR: (self._mkdir, MKDIR_IN.size + 1),
                Opcode.SYMLINK: (self._symlink, 2),
                Opcode.LINK: (self._link, LINK_IN.size + 1),
                Opcode.UNLINK: (self._unlink, 1),
                Opcode.RMDIR: (self._rmdir, 1),
                Opcode.RENAME: (self._rename, RENAME_IN.size + 2),
                Opcode.RENAME2: (self._rename2, RENAME2_IN.size + 2),
                Opcode.CREATE: (self._create, CREATE_IN.size + 1),
                Opcode.WRITE: (self._write, WRITE_IN.size),
                Opcode.FSYNC: (self._fsync, FSYNC_IN.size),
                Opcode.FSYNCDIR: (self._fsyncdir, FSYNC_IN.size),
                Opcode.SETXATTR: (self._setxattr, SETXATTR_IN_COMPAT.size + 1),
                Opcode.REMOVEXATTR: (self._removexattr, 1),
                Opcode.FALLOCATE: (self._fallocate, FALLOCATE_IN.size),
                Opcode.COPY_FILE_RANGE: (_fixed_reply(errno.ENOSYS), 0),
                Opcode.COPY_FILE_RANGE_64: (_fixed_reply(errno.ENOSYS), 0),
                Opcode.TMPFILE: (_fixed_reply(errno.ENOSYS), 0),
            })
        else:
            for op in _MUTATING:
                ops[op] = (_fixed_reply(errno.EROFS), 0)
            for op in (Opcode.FSYNC, Opcode.FSYNCDIR):
                ops[op] = (_fixed_reply(errno.ENOSYS), 0)
        self._writable = writable

    # -- dispatch -------------------------------------------------------------------------------
    def _dispatch(self, req: bytes | bytearray | memoryview) -> Reply:
        # The observer (metrics) is called from here, not from a wrapper around this: on every
        # request that is one frame and one header unpack fewer (a cold LOOKUP or READ pays
        # each Python frame twice over, its caches gone to the client and the kernel meanwhile).
        n = len(req)
        if n < _HDR_SIZE:
            raise FuseProtocolError(f"request of {n} bytes is shorter than fuse_in_header")
        length, opcode, unique, nodeid, uid, gid, _pid, extlen, _pad = IN_HEADER.unpack_from(req)
        obs = self.observer
        token = obs.started(opcode, nodeid, unique) if obs is not None else None
        r: Reply = None
        try:
            entry = self._ops.get(opcode)
            if entry is None:
                r = _OUT(16, self._unknown, unique)
                return r
            fn, minlen = entry
            end = length - (extlen << 3)
            if length > n or length < _HDR_SIZE or end < _HDR_SIZE + minlen:
                if opcode in NO_REPLY_OPCODES:
                    log.warning("dropping malformed %s (len %d, %d bytes)", _opname(opcode), length, n)
                    return None
                code = errno.EINVAL if _HDR_SIZE <= length <= n else errno.EIO
                r = _OUT(16, -code, unique)
                return r
            body = memoryview(req)[_HDR_SIZE:end]
            try:
                r = fn(unique, nodeid, body, uid, gid)
            except OSError as e:
                err = e.errno
                if not isinstance(err, int) or not 0 < err < 4096:
                    log.error("FUSE %s on nodeid %d: %r has no usable errno", _opname(opcode), nodeid, e)
                    err = errno.EIO
                r = _OUT(16, -err, unique)
            except Exception:
                log.exception("FUSE %s on nodeid %d failed", _opname(opcode), nodeid)
                r = _OUT(16, -errno.EIO, unique)
            return r
        finally:
            if obs is not None:
                obs.finished(token, r)

    def _handle_debug(self, req: bytes | bytearray | memoryview) -> Reply:
        t0 = time.perf_counter_ns()
        try:
            r = self._dispatch(req)
        except FuseProtocolError as e:
            log.debug("FUSE bad request: %s", e)
            raise
        us = (time.perf_counter_ns() - t0) / 1000
        log.debug("FUSE %s -> %s [%.1f us]", describe_request(req), describe_reply(r), us)
        return r

    # -- session --------------------------------------------------------------------------------
    def _init(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        major, minor = _U32X2.unpack_from(body)
        if major > KERNEL_VERSION:
            # Tell the kernel our major; it resends INIT with it (fuse.h version negotiation).
            return _OUT(16 + INIT_OUT.size, 0, unique) + INIT_OUT.pack(
                KERNEL_VERSION, KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        if major < KERNEL_VERSION or minor < MIN_KERNEL_MINOR_VERSION:
            log.error("unsupported FUSE protocol %d.%d", major, minor)
            return _OUT(16, -errno.EPROTO, unique)
        if len(body) < INIT_IN_COMPAT.size:
            return _OUT(16, -errno.EINVAL, unique)
        _, _, max_readahead, flags = INIT_IN_COMPAT.unpack_from(body)
        capable = flags
        if flags & InitFlags.INIT_EXT:
            if len(body) >= INIT_IN_COMPAT.size + 4:
                capable |= _U32.unpack_from(body, INIT_IN_COMPAT.size)[0] << 32
            else:
                capable &= ~int(InitFlags.INIT_EXT)  # a short init_in despite INIT_EXT: no flags2
        with self._init_lock:
            if self.initialized:
                # A second INIT restarts the connection (a virtio-fs guest that rebooted).
                self._teardown()
            want = self.fs.init(InitFlags(capable))
            self._install_write_ops()
            enabled = capable & ((int(want) & int(self.supported)) | self.transport_flags)
            if enabled & InitFlags.PASSTHROUGH and not 1 <= self.max_stack_depth <= FILESYSTEM_MAX_STACK_DEPTH:
                log.warning("FUSE INIT: max_stack_depth %d is outside 1..%d; not enabling passthrough",
                            self.max_stack_depth, FILESYSTEM_MAX_STACK_DEPTH)
                enabled &= ~int(InitFlags.PASSTHROUGH)
            proto_minor = min(minor, KERNEL_MINOR_VERSION)
            out_flags = enabled & 0xFFFF_FFFF
            out_flags2 = enabled >> 32
            if capable & InitFlags.INIT_EXT:
                out_flags |= InitFlags.INIT_EXT
            else:
                out_flags2 = 0
            stack_depth = self.max_stack_depth if enabled & InitFlags.PASSTHROUGH else 0
            max_pages = self.max_pages if enabled & InitFlags.MAX_PAGES else 0
            readahead = min(max_readahead, self.max_readahead)
            out = INIT_OUT.pack(
                KERNEL_VERSION, proto_minor, readahead, out_flags,
                self.max_background, self.congestion_threshold, self.max_write, self.time_gran,
                max_pages, 0, out_flags2, stack_depth, 0,
            )[: init_out_size(minor)]
            self.kernel_major, self.kernel_minor, self.proto_minor = major, minor, proto_minor
            self.capable = InitFlags(capable)
            self.flags = InitFlags(out_flags | out_flags2 << 32)
            self.readahead = readahead
            self._no_open = bool(enabled & InitFlags.NO_OPEN_SUPPORT)
            self._passthrough = bool(self.flags & InitFlags.PASSTHROUGH)
            self._no_opendir = bool(enabled & InitFlags.NO_OPENDIR_SUPPORT)
            self.fs.negotiated(InitFlags(enabled))
            self.initialized = True
            self._unknown = -errno.ENOSYS
            self._ops = self._post_init_ops
        log.info("FUSE INIT: kernel %d.%d flags %#x, negotiated 7.%d flags %#x", major, minor, capable,
                 proto_minor, self.flags)
        return _OUT(16 + len(out), 0, unique) + out

    def _teardown(self) -> None:
        self._ops = self._pre_init_ops
        self._unknown = -errno.EIO
        self.initialized = False
        try:
            self.fs.destroy()
        except Exception:
            log.exception("filesystem destroy() failed")

    def _destroy(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        with self._init_lock:
            self._teardown()
        return _OUT(16, 0, unique)

    # -- inodes ---------------------------------------------------------------------------------
    def _lookup(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        name = _cstr(body, 0)
        packed = self.fs.lookup_packed(nodeid, name)
        if packed is None:
            return _entry_reply(unique, self.fs.lookup(nodeid, name))
        if len(packed) != _ENTRY_OUT_SIZE:
            log.error("lookup(%d, %r): %d packed bytes, not a fuse_entry_out", nodeid, name, len(packed))
            return _OUT(16, -errno.EIO, unique)
        reply = _OUT(_ENTRY_SIZE, 0, unique) + packed
        if self.warm_max:
            child, size = _U64X2.unpack_from(packed, 40)  # fuse_attr.ino (the nodeid), .size
            if (0 < size <= self.warm_max and _U32.unpack_from(packed, 100)[0] & _S_IFMT == _S_IFREG
                    and self.warm_gate.looked_up(child)):
                return Then.reply(reply, self.fs.warm, child, size)
        return reply

    def _forget(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> None:
        try:
            self.fs.forget(nodeid, FORGET_IN.unpack_from(body)[0])
        except Exception:
            log.exception("forget(%d) failed", nodeid)

    def _batch_forget(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> None:
        count = BATCH_FORGET_IN.unpack_from(body)[0]
        avail = (len(body) - BATCH_FORGET_IN.size) // FORGET_ONE.size
        if count > avail:
            log.warning("BATCH_FORGET claims %d entries but carries %d", count, avail)
            count = avail
        start = BATCH_FORGET_IN.size
        items = list(FORGET_ONE.iter_unpack(body[start : start + count * FORGET_ONE.size]))
        try:
            self.fs.batch_forget(items)
        except Exception:
            log.exception("batch_forget of %d inodes failed", count)

    def _getattr(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        attr, timeout = self.fs.getattr(nodeid)
        s, ns = split_timeout(timeout)
        return _ATTR_REPLY.pack(_ATTR_SIZE, 0, unique, s, ns, 0, *attr)

    def _readlink(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        target = bytes(self.fs.readlink(nodeid))
        return _OUT(16 + len(target), 0, unique) + target

    def _statfs(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        return _STATFS_REPLY.pack(_STATFS_REPLY.size, 0, unique, *self.fs.statfs(nodeid))

    def _access(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        self.fs.access(nodeid, ACCESS_IN.unpack_from(body)[0], uid, gid)
        return _OUT(16, 0, unique)

    # -- files ----------------------------------------------------------------------------------
    def _open(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        flags = OPEN_IN.unpack_from(body)[0]
        if flags & _O_READ_ONLY_REFUSED and not self._writable:
            return _OUT(16, -errno.EROFS, unique)
        if self._no_open:
            return _OUT(16, -errno.ENOSYS, unique)
        return open_reply(unique, self.fs.open(nodeid, flags), self._passthrough)

    def _read(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> Reply:
        fh, offset, size = _READ_HEAD.unpack_from(body)
        if not offset and self.warm_max:
            self.warm_gate.read(nodeid)
        data = self.fs.read(nodeid, fh, offset, size)
        n = len(data)
        if n > size:
            log.error("read(%d) returned %d bytes for a %d-byte request; truncating", nodeid, n, size)
            data = memoryview(data)[:size]
            n = size
        if not n:
            return _OUT(16, 0, unique)
        return _OUT(16 + n, 0, unique), data

    def _release(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        self.fs.release(nodeid, _FH.unpack_from(body)[0])
        return _OUT(16, 0, unique)

    def _flush(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        self.fs.flush(nodeid, _FH.unpack_from(body)[0])
        return _OUT(16, 0, unique)

    def _lseek(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        fh, offset, whence = _LSEEK_IN.unpack_from(body)
        pos = self.fs.lseek(nodeid, fh, offset, whence)
        return _LSEEK_REPLY.pack(_LSEEK_REPLY.size, 0, unique, pos)

    # -- directories ----------------------------------------------------------------------------
    def _opendir(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        if self._no_opendir:
            return _OUT(16, -errno.ENOSYS, unique)
        fh, open_flags = self.fs.opendir(nodeid, OPEN_IN.unpack_from(body)[0])
        return _OPEN_REPLY.pack(_OPEN_REPLY.size, 0, unique, fh, open_flags, 0)

    def _releasedir(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        self.fs.releasedir(nodeid, _FH.unpack_from(body)[0])
        return _OUT(16, 0, unique)

    def _readdir(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> Reply:
        fh, offset, size = _READ_HEAD.unpack_from(body)
        parts = [b""]
        append = parts.append
        used = 0
        for name, ino, typ, off in self.fs.readdir(nodeid, fh, offset):
            nl = len(name)
            if not 0 < nl <= NAME_MAX or b"/" in name:
                log.error("readdir(%d): skipping invalid name %r", nodeid, name)
                continue
            rec = (_DIRENT_SIZE + nl + 7) & ~7
            if used + rec > size:
                break
            append(_DIRENT_PACK(ino, off, nl, typ >> 12))
            append(name)
            pad = rec - _DIRENT_SIZE - nl
            if pad:
                append(_PADS[pad])
            used += rec
        if not used:
            return self._listing_ended(unique, nodeid)
        return self._listing_head(unique, nodeid, used, size, _DIRENT_MAX), b"".join(parts)

    def _listing_head(self, unique: int, nodeid: int, used: int, size: int, biggest: int) -> bytes:
        """The header of a READDIR(PLUS) reply of `used` bytes. When any further entry would have
        fit in `size` bytes, this reply holds the listing's last entry: the walk's next listing
        is warmed once it is written (`Filesystem.warm_next_dir`), a round trip before the empty
        READDIR that ends the listing would (the walker then still has this reply's entries to
        take in, and that READDIR to send, while the worker decodes)."""
        head = _OUT(16 + used, 0, unique)
        if not self.warm_max or used + biggest > size:
            return head
        self._ended_early = nodeid
        return Then.reply(head, self.fs.warm_next_dir, nodeid)

    def _listing_ended(self, unique: int, nodeid: int) -> bytes:
        """The empty reply that ends a listing; with warming on, it warms the listing a walk
        of the tree asks for next (`Filesystem.warm_next_dir`) once written."""
        reply = _OUT(16, 0, unique)
        if self._ended_early == nodeid:  # (warmed after its last entries already)
            self._ended_early = 0
            return reply
        return Then.reply(reply, self.fs.warm_next_dir, nodeid) if self.warm_max else reply

    def _readdirplus(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> Reply:
        fh, offset, size = _READ_HEAD.unpack_from(body)
        packed = self.fs.readdirplus_packed(nodeid, fh, offset, size)
        if packed is not None:
            n = len(packed)
            if n > size:
                log.error("readdirplus(%d): %d packed bytes for a %d-byte request", nodeid, n, size)
                return _OUT(16, -errno.EIO, unique)
            if not n:
                return self._listing_ended(unique, nodeid)
            return self._listing_head(unique, nodeid, n, size, _DIRENTPLUS_MAX), packed
        parts = [b""]
        append = parts.append
        used = 0
        for entry, name, typ, off in self.fs.readdirplus(nodeid, fh, offset):
            nl = len(name)
            if not 0 < nl <= NAME_MAX or b"/" in name:
                log.error("readdirplus(%d): skipping invalid name %r", nodeid, name)
                continue
            rec = (_DIRENTPLUS_SIZE + nl + 7) & ~7
            if used + rec > size:
                # looked up but not sent: give that lookup back (as fuse-backend-rs does), or
                # every full reply would leak one
                if entry.ino:
                    try:
                        self.fs.forget(entry.ino, 1)
                    except Exception:
                        log.exception("readdirplus(%d): forget(%d) of an entry that did not fit failed", nodeid,
                                      entry.ino)
                break
            ino, gen, attr, et, at = entry
            es, ens = split_timeout(et)
            as_, ans = split_timeout(at)
            append(_DIRENTPLUS_PACK(ino, gen, es, as_, ens, ans, *attr, attr[0] or ino, off, nl, typ >> 12))
            append(name)
            pad = rec - _DIRENTPLUS_SIZE - nl
            if pad:
                append(_PADS[pad])
            used += rec
        parts[0] = _OUT(16 + used, 0, unique)
        return b"".join(parts)

    # -- writes (only routed for a writable filesystem) ----------------------------------------
    def _setattr(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        (valid, _, fh, size, _lock_owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec, mode, _,
         a_uid, a_gid, _) = SETATTR_IN.unpack_from(body)
        req = SetAttr(valid, fh if valid & FATTR_FH else None, size, atime, atimensec, mtime, mtimensec, mode,
                      a_uid, a_gid)
        attr, timeout = self.fs.setattr(nodeid, req)
        s, ns = split_timeout(timeout)
        return _ATTR_REPLY.pack(_ATTR_SIZE, 0, unique, s, ns, 0, *attr)

    def _mknod(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        mode, rdev, _umask, _ = MKNOD_IN.unpack_from(body)
        name = _cstr(body, MKNOD_IN.size)
        return _entry_reply(unique, self.fs.mknod(nodeid, _name(name), mode, rdev, Caller(uid, gid)))

    def _mkdir(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        mode, _umask = MKDIR_IN.unpack_from(body)
        name = _cstr(body, MKDIR_IN.size)
        return _entry_reply(unique, self.fs.mkdir(nodeid, _name(name), mode, Caller(uid, gid)))

    def _symlink(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        name, target = _two_names(body, 0)
        if not target:
            raise OSError(errno.EINVAL, "empty symlink target")
        return _entry_reply(unique, self.fs.symlink(nodeid, _name(name), target, Caller(uid, gid)))

    def _link(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        old = LINK_IN.unpack_from(body)[0]
        name = _cstr(body, LINK_IN.size)
        return _entry_reply(unique, self.fs.link(old, nodeid, _name(name)))

    def _unlink(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        self.fs.unlink(nodeid, _name(_cstr(body, 0)))
        return _OUT(16, 0, unique)

    def _rmdir(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        self.fs.rmdir(nodeid, _name(_cstr(body, 0)))
        return _OUT(16, 0, unique)

    def _rename(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        newdir = RENAME_IN.unpack_from(body)[0]
        old, new = _two_names(body, RENAME_IN.size)
        self.fs.rename(nodeid, _name(old), newdir, _name(new), 0)
        return _OUT(16, 0, unique)

    def _rename2(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        newdir, flags, _ = RENAME2_IN.unpack_from(body)
        old, new = _two_names(body, RENAME2_IN.size)
        self.fs.rename(nodeid, _name(old), newdir, _name(new), flags)
        return _OUT(16, 0, unique)

    def _create(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        flags, mode, _umask, _open_flags = CREATE_IN.unpack_from(body)
        name = _cstr(body, CREATE_IN.size)
        entry, fh, open_flags = self.fs.create(nodeid, _name(name), mode, flags, Caller(uid, gid))
        ino, gen, attr, et, at = entry
        es, ens = split_timeout(et)
        as_, ans = split_timeout(at)
        return _CREATE_REPLY.pack(_CREATE_REPLY.size, 0, unique, ino, gen, es, as_, ens, ans, *attr, fh,
                                  open_flags, 0)

    def _write(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        fh, offset, size, write_flags, _lock_owner, flags, _ = WRITE_IN.unpack_from(body)
        data = body[WRITE_IN.size :]
        if len(data) != size:
            return _OUT(16, -errno.EINVAL, unique)
        if offset > _MAX_OFFSET:
            return _OUT(16, -errno.EFBIG, unique)
        n = self.fs.write(nodeid, fh, offset, data, flags)
        if not 0 <= n <= size:
            log.error("write(%d) claims %d bytes of %d written", nodeid, n, size)
            return _OUT(16, -errno.EIO, unique)
        return _OUT(16 + WRITE_OUT.size, 0, unique) + WRITE_OUT.pack(n, 0)

    def _fsync(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        fh, fsync_flags, _ = FSYNC_IN.unpack_from(body)
        self.fs.fsync(nodeid, fh, bool(fsync_flags & FSYNC_FDATASYNC))
        return _OUT(16, 0, unique)

    def _fsyncdir(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        fh, fsync_flags, _ = FSYNC_IN.unpack_from(body)
        self.fs.fsyncdir(nodeid, fh, bool(fsync_flags & FSYNC_FDATASYNC))
        return _OUT(16, 0, unique)

    def _setxattr(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        # fuse_setxattr_in is 16 bytes only with SETXATTR_EXT, which we never enable
        ext = bool(self.flags & InitFlags.SETXATTR_EXT)
        head = SETXATTR_IN if ext else SETXATTR_IN_COMPAT
        if len(body) < head.size + 1:
            return _OUT(16, -errno.EINVAL, unique)
        size, flags = head.unpack_from(body)[:2]
        name = _cstr(body, head.size)
        start = head.size + len(name) + 1
        value = bytes(body[start : start + size])
        if len(value) != size:
            return _OUT(16, -errno.EINVAL, unique)
        if not name:
            return _OUT(16, -errno.EINVAL, unique)
        self.fs.setxattr(nodeid, name, value, flags)
        return _OUT(16, 0, unique)

    def _removexattr(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        name = _cstr(body, 0)
        if not name:
            return _OUT(16, -errno.EINVAL, unique)
        self.fs.removexattr(nodeid, name)
        return _OUT(16, 0, unique)

    def _fallocate(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body)
        if offset > _MAX_OFFSET or length > _MAX_OFFSET:
            return _OUT(16, -errno.EFBIG, unique)
        self.fs.fallocate(nodeid, fh, offset, length, mode)
        return _OUT(16, 0, unique)

    # -- xattrs ---------------------------------------------------------------------------------
    def _getxattr(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        size = GETXATTR_IN.unpack_from(body)[0]
        value = bytes(self.fs.getxattr(nodeid, _cstr(body, GETXATTR_IN.size)))
        return _xattr_reply(unique, size, value)

    def _listxattr(self, unique: int, nodeid: int, body: memoryview, uid: int, gid: int) -> bytes:
        size = GETXATTR_IN.unpack_from(body)[0]
        names = self.fs.listxattr(nodeid)
        return _xattr_reply(unique, size, b"".join(bytes(n) + b"\0" for n in names))


def open_reply(unique: int, opened: OpenResult, passthrough: bool) -> bytes:
    """fuse_out_header + fuse_open_out for an OPEN result. A passthrough answer needs the
    session to have negotiated PASSTHROUGH and a registered backing id (> 0): the kernel
    fails the open(2) otherwise, so such a filesystem bug is an EIO logged here."""
    fh, open_flags = opened[0], int(opened[1])  # (int: `&` of an IntFlag costs 0.6 us)
    backing_id = opened[2] if len(opened) > 2 else 0
    if open_flags & _FOPEN_PASSTHROUGH:
        if not passthrough or backing_id <= 0:
            log.error("OPEN answered FOPEN_PASSTHROUGH with backing id %d, but passthrough is %s",
                      backing_id, "on" if passthrough else "not negotiated")
            return _OUT(16, -errno.EIO, unique)
    else:
        backing_id = 0
    return _OPEN_REPLY.pack(_OPEN_REPLY.size, 0, unique, fh, open_flags, backing_id)


def _entry_reply(unique: int, entry: Entry) -> bytes:
    ino, gen, attr, et, at = entry
    es, ens = split_timeout(et)
    as_, ans = split_timeout(at)
    return _ENTRY_REPLY.pack(_ENTRY_SIZE, 0, unique, ino, gen, es, as_, ens, ans, *attr)


def _name(name: bytes) -> bytes:
    """A directory entry name the kernel may send: non-empty, no "/" (the kernel never sends
    "." or ".." for creates, but a hostile transport might)."""
    if not name or b"/" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, f"invalid entry name {name!r}")
    return name


def _two_names(body: memoryview, start: int) -> tuple[bytes, bytes]:
    """Two consecutive NUL-terminated strings (SYMLINK, RENAME)."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    end2 = raw.find(b"\0", end + 1) if end >= 0 else -1
    if end2 < 0:
        raise OSError(errno.EINVAL, "names are not NUL-terminated")
    return raw[:end], raw[end + 1 : end2]


def _xattr_reply(unique: int, size: int, value: bytes) -> bytes:
    """size 0 asks only for the length (fuse_getxattr_out); a too small buffer is ERANGE."""
    n = len(value)
    if size == 0:
        return _XATTR_SIZE_REPLY.pack(_XATTR_SIZE_REPLY.size, 0, unique, n, 0)
    if n > size:
        return _OUT(16, -errno.ERANGE, unique)
    return _OUT(16 + n, 0, unique) + value


# -- notifications (server -> kernel, unique 0) -------------------------------------------------
def notify_inval_inode(ino: int, offset: int = 0, length: int = 0) -> bytes:
    """Drop cached attributes of `ino`, and its cached pages from `offset` (length <= 0: to the
    end; offset < 0: attributes only)."""
    return _OUT(16 + NOTIFY_INVAL_INODE_OUT.size, NotifyCode.INVAL_INODE, 0) + NOTIFY_INVAL_INODE_OUT.pack(
        ino, offset, length)


def notify_inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    """Drop the cached dentry `name` in directory `parent` (flags: EXPIRE_ONLY)."""
    payload = NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags) + name + b"\0"
    return _OUT(16 + len(payload), NotifyCode.INVAL_ENTRY, 0) + payload


def notify_resend() -> bytes:
    """Ask the kernel to send again every request it is waiting on (a successor's failover)."""
    return _OUT(16, NotifyCode.RESEND, 0)


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    """Tell the kernel `name` (inode `child`) is gone from `parent`."""
    payload = NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0) + name + b"\0"
    return _OUT(16 + len(payload), NotifyCode.DELETE, 0) + payload


# -- debug decoding -----------------------------------------------------------------------------
def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"OPCODE_{opcode}"


def describe_request(req: bytes | bytearray | memoryview) -> str:
    """A one-line decoding of a request (header, in-args, names) for logs; never raises."""
    if len(req) < _HDR_SIZE:
        return f"<{len(req)}-byte fragment>"
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(req)
    out = [f"{_opname(opcode)} unique={unique} nodeid={nodeid} uid={uid} gid={gid} pid={pid}"]
    if length != len(req):
        out.append(f"len={length}/{len(req)}")
    if extlen:
        out.append(f"extlen={extlen * 8}")
    body = bytes(memoryview(req)[_HDR_SIZE : min(length, len(req), _HDR_SIZE + 4096)])
    st, fields, nnames = REQUEST_ARGS.get(opcode, (None, (), 0))
    off = 0
    if st is not None:
        if len(body) < st.size:
            return " ".join([*out, f"<{len(body)}-byte args, {st.size} needed>"])
        for k, v in zip(fields, st.unpack_from(body), strict=True):
            if k in ("padding", "dummy", "unused", "unused4", "unused5", "reserved"):
                continue
            out.append(f"{k}={v:#x}" if "flags" in k or k in ("mask", "valid") else f"{k}={v}")
        off = st.size
    for _ in range(nnames):
        end = body.find(b"\0", off)
        if end < 0:
            out.append(f"name={body[off:]!r}<no NUL>")
            break
        out.append(f"name={body[off:end]!r}")
        off = end + 1
    return " ".join(out)


def describe_reply(reply: object) -> str:
    """A one-line summary of what handle() returned."""
    if reply is None:
        return "no reply"
    head = reply[0] if isinstance(reply, tuple) else reply
    if not isinstance(head, bytes | bytearray | memoryview) or len(head) < OUT_HEADER.size:
        return f"<malformed reply {reply!r:.60}>"
    length, error, _unique = OUT_HEADER.unpack_from(head)
    if error:
        return f"error {errno.errorcode.get(-error, str(-error))}"
    return f"ok len={length}"
