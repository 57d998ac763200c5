"""A RAFS image as a FUSE filesystem: the one request handler behind /dev/fuse and virtio-fs.

Everything is answered from the mmap'd bootstrap on demand (no per-inode state but a bounded
map of the directories regular files were looked up in, for directory-aware read-around), with long
entry/attr timeouts and KEEP_CACHE/CACHE_DIR because the tree never changes. Data goes through a
BlobDevice, so a damaged chunk is EIO and never wrong bytes.
"""

import errno
import itertools
import logging
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial

from ..fuse.abi import DIRENTPLUS, ENTRY_OUT, FOpenFlags, InitFlags
from ..fuse.api import (
    DEFAULT_WANT,
    DirEntryPlusTuple,
    DirEntryTuple,
    Entry,
    Filesystem,
    FuseAttr,
    FuseError,
    StatFs,
)
from ..fuse.iovec import ReadDest, WouldBlock, scatter
from ..fuse.protocol import split_timeout
from ..rafs.acl import ACL_NAMES, acl_xattr_problem
from ..rafs.errors import FormatError
from ..rafs.model import Attr, DirEntry, RafsImage
from ..storage.device import BlobDevice
from .casefold import CaseFolder
from .failed_reads import RecentFailures
from .readahead import SequentialReadahead
from .walk_ahead import WalkAhead

log = logging.getLogger(__name__)

FUSE_ROOT_ID = 1
SEEK_DATA = 3
SEEK_HOLE = 4
# readdir cookies: 1 = ".", 2 = "..", 3 + i = after child i
_DOT, _DOTDOT, _FIRST_CHILD = 1, 2, 3
# Security-label probes: `ls -l` asks every file for security.selinux (libselinux does, also
# with SELinux off), and the kernel caches no xattr answer but ACLs, so each `ls -l` of an image
# with any xattr costs one GETXATTR round trip per file. A name of this namespace that no inode
# of the image carries answers EOPNOTSUPP, "this filesystem has no such labels", as a
# filesystem without label support does: ls then stops asking for the rest of the device.
LABEL_NAMESPACE = b"security."
# Validated listings of recently read directories, for the requests that continue a listing:
# the kernel reads a directory in 4 KiB replies until one comes back empty, so a directory of
# n entries costs 1 + n/25 requests, and each used to decode and check the directory from its
# start again. Bounded by entries, not directories: a directory bigger than the whole budget is
# streamed as before. One budget for every filesystem of the process (a shared daemon with 50
# images walked holds at most this many entries, not this many per image).
LISTING_BUDGET = 8192
# Parents of the regular files looked up lately, for directory-aware read-around (a cold READ of
# a file takes the following files of its directory along: storage/cache/around.py). A READ
# follows its file's LOOKUP closely; the map is cleared when full (no per-inode state).
PARENTS_MAX = 4096


# a listed child: name, image inode, S_IFMT bits, attributes (RafsImage.listing)
_Child = tuple[bytes, int, int, Attr]


class _Listings:
    """The process-wide LRU of validated listings, keyed by (filesystem serial, directory)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: OrderedDict[tuple[int, int], tuple[int, tuple[_Child, ...]]] = OrderedDict()
        self.entries = 0
        self.serials = itertools.count(1)

    def get(self, key: tuple[int, int]) -> tuple[int, tuple[_Child, ...]] | None:
        with self.lock:
            hit = self.held.get(key)
            if hit is not None:
                self.held.move_to_end(key)
            return hit

    def put(self, key: tuple[int, int], value: tuple[int, tuple[_Child, ...]]) -> None:
        with self.lock:
            if key in self.held:
                return
            self.held[key] = value
            self.entries += len(value[1])
            while self.entries > LISTING_BUDGET:
                _, (_, old) = self.held.popitem(last=False)
                self.entries -= len(old)

    def drop(self, serial: int) -> bool:
        """Forget the listings of filesystem `serial`; True if it had any."""
        with self.lock:
            mine = [k for k in self.held if k[0] == serial]
            for k in mine:
                self.entries -= len(self.held.pop(k)[1])
            return bool(mine)

    def held_by(self, serial: int) -> int:
        with self.lock:
            return sum(len(v[1]) for k, v in self.held.items() if k[0] == serial)


_LISTINGS = _Listings()
_TUPLE_NEW = tuple.__new__  # a FuseAttr/Entry made without their keyword-taking __new__ (hot path)
_DP_SIZE = DIRENTPLUS.size  # fuse_entry_out + fuse_dirent, before the name
_DP_PACK_INTO = DIRENTPLUS.pack_into
_ENTRY_PACK = ENTRY_OUT.pack
_DT_DIR = stat.S_IFDIR >> 12
_S_IFMT, _S_IFREG = 0o170000, stat.S_IFREG
_NAME_MAX = 255


class RafsFilesystem(Filesystem):
    def __init__(self, image: RafsImage, device: BlobDevice, *, entry_timeout: float = 86400.0,
                 attr_timeout: float = 86400.0, enable_xattr: bool = True, readahead_chunks: int = 4,
                 case_insensitive: bool = False) -> None:
        """`case_insensitive`: a LOOKUP that misses falls back to a case-folded match (fs.casefold)."""
        self.image = image
        self.device = device
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.xattrs = enable_xattr and image.has_xattrs
        self.root = image.root_ino
        # a file of a quarter of the chunk cache read sequentially releases what it passed (it
        # would flush the cache of everything else)
        self.readahead = (SequentialReadahead(image, device, readahead_chunks,
                                              release_behind=max(device.cache.capacity // 4, 8 * image.chunk_size))
                          if readahead_chunks > 0 else None)
        self.failures = RecentFailures()
        self.casefold = CaseFolder("RAFS image") if case_insensitive else None
        self._statfs = StatFs(blocks=0, bfree=0, bavail=0, files=image.superblock_inodes(), ffree=0, bsize=4096,
                              namelen=255, frsize=4096)
        # every xattr name some inode carries, once scanned (None: not known yet; see xattr_names)
        self._xattr_names: frozenset[bytes] | None = None
        self._scan_lock = threading.Lock()
        self._scan: threading.Thread | None = None
        self._closed = False
        self.name_scan_failures = 0
        self._serial = next(_LISTINGS.serials)  # this filesystem's key in _LISTINGS
        self._listing_lock = threading.Lock()  # (_too_big, walk)
        self._too_big: set[int] = set()  # directories streamed (more entries than the budget)
        self.walk = WalkAhead()  # the directory a depth-first walk lists next (under _listing_lock)
        # regular file -> the directory it was looked up in (PARENTS_MAX), only when the device
        # reads around by directory
        self._parents: dict[int, int] = {}
        self._dir_aware = device.dir_aware

    def init(self, capable: InitFlags) -> InitFlags:
        """Zero-message open/opendir (as nydusd's RAFS asks): the kernel stops sending OPEN,
        OPENDIR and their RELEASEs after the first ENOSYS and treats files as KEEP_CACHE and
        directories as KEEP_CACHE|CACHE_DIR, which is what open()/opendir() answer anyway. That
        is two round trips fewer per file opened, warm or cold.

        POSIX_ACL when the image has xattrs: the kernel then enforces the image's ACLs (it turns
        on default_permissions, which our mounts have anyway) and caches each inode's ACLs, also
        "none", for as long as its attributes. Without it every `ls -l` sends a GETXATTR of
        system.posix_acl_access per file that nothing remembers. An image without xattrs gains
        nothing: its first GETXATTR answers ENOSYS and the kernel stops asking altogether."""
        want = DEFAULT_WANT | InitFlags.NO_OPEN_SUPPORT | InitFlags.NO_OPENDIR_SUPPORT
        if self.xattrs:
            want |= InitFlags.POSIX_ACL
        return want

    # -- inode numbers: the kernel's root is 1, the image's may be a v6 nid ------------------------
    def _img(self, ino: int) -> int:
        return self.root if ino == FUSE_ROOT_ID else ino

    def _fuse(self, ino: int) -> int:
        if ino == self.root:
            return FUSE_ROOT_ID
        if ino == FUSE_ROOT_ID:
            raise FuseError(errno.EIO, "image inode 1 is not the root and cannot be exported")
        return ino

    def _attr(self, a: Attr) -> FuseAttr:
        # positional (keywords cost a third more on every entry of every listing), in FuseAttr's
        # order: ino, size, blocks, atime, mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev,
        # blksize, flags
        ino, mode, nlink, uid, gid, rdev, size, blocks, mtime, nsec = a
        root = ino == self.root
        if ino == FUSE_ROOT_ID and not root:
            self._fuse(ino)  # raises: image inode 1 cannot be exported
        return _TUPLE_NEW(FuseAttr, (FUSE_ROOT_ID if root else ino, size, blocks, mtime, mtime, mtime, nsec, nsec,
                                     nsec, mode, nlink, uid, gid, rdev, 4096, 0))

    def _getattr(self, ino: int) -> Attr:
        try:
            return self.image.getattr(ino)
        except FormatError as e:
            log.error("inode %d: %s", ino, e)
            raise FuseError(errno.EIO) from None

    def _entry(self, ino: int) -> Entry:
        attr = self._attr(self._getattr(ino))  # attr.ino: the kernel's number of `ino`
        return _TUPLE_NEW(Entry, (attr[0], 0, attr, self.entry_timeout, self.attr_timeout))

    # -- metadata ----------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Entry:
        i = self._child(parent, name)
        e = self._entry(i)
        if self._dir_aware and stat.S_ISREG(e.attr.mode):
            self._note_parent(i, self._img(parent))
        return e

    def _note_parent(self, ino: int, parent: int) -> None:
        parents = self._parents
        if len(parents) >= PARENTS_MAX:
            parents.clear()  # (atomic; the READs of files looked up just before lose their guess)
        parents[ino] = parent

    def lookup_packed(self, parent: int, name: bytes, base: int = 0) -> bytes:
        """`lookup`'s fuse_entry_out packed from the child's decoded attributes (as
        `readdirplus_packed` packs its records): no Entry/FuseAttr tuples."""
        attr = None
        if self.casefold is None:
            try:  # (the common case in one image call; errors and misses take _child, which says why)
                attr = self.image.lookup_attr(self._img(parent), name)
            except FormatError:
                attr = None
        if attr is None:
            attr = self._getattr(self._child(parent, name))
        _i, mode, nlink, uid, gid, rdev, size, blocks, mtime, nsec = attr
        if self._dir_aware and mode & _S_IFMT == _S_IFREG:
            self._note_parent(_i, self._img(parent))
        root = _i == self.root
        if _i == FUSE_ROOT_ID and not root:
            self._fuse(_i)  # raises: image inode 1 cannot be exported
        kino = (FUSE_ROOT_ID if root else _i) | base
        es, ens = split_timeout(self.entry_timeout)
        as_, ans = split_timeout(self.attr_timeout)
        return _ENTRY_PACK(kino, 0, es, as_, ens, ans, kino, size, blocks, mtime, mtime, mtime, nsec, nsec, nsec,
                           mode, nlink, uid, gid, rdev, 4096, 0)

    def _child(self, parent: int, name: bytes) -> int:
        """The image inode of child `name` of kernel inode `parent` (FuseError when none)."""
        p = self._img(parent)
        try:
            if name == b".":
                return p
            if name == b"..":
                return self.image.parent(p)
            if not stat.S_ISDIR(self.image.mode(p)):
                raise FuseError(errno.ENOTDIR)
            child = self.image.lookup(p, name)
            if child is None and self.casefold is not None:
                real = self.casefold.resolve(p, name, lambda: (e.name for e in self.image.readdir(p)))
                if real is not None:
                    child = self.image.lookup(p, real)
        except FormatError as e:
            log.error("lookup %r in inode %d: %s", name, p, e)
            raise FuseError(errno.EIO) from None
        if child is None:
            raise FuseError(errno.ENOENT)
        return child

    def getattr(self, ino: int) -> tuple[FuseAttr, float]:
        return self._attr(self._getattr(self._img(ino))), self.attr_timeout

    def readlink(self, ino: int) -> bytes:
        i = self._img(ino)
        if not stat.S_ISLNK(self._getattr(i).mode):
            raise FuseError(errno.EINVAL)
        try:
            return self.image.readlink(i)
        except FormatError as e:
            log.error("readlink inode %d: %s", i, e)
            raise FuseError(errno.EIO) from None

    def open(self, ino: int, flags: int) -> tuple[int, int]:
        mode = self._getattr(self._img(ino)).mode
        if stat.S_ISDIR(mode):
            raise FuseError(errno.EISDIR)
        return 0, FOpenFlags.KEEP_CACHE

    def opendir(self, ino: int, flags: int) -> tuple[int, int]:
        if not stat.S_ISDIR(self._getattr(self._img(ino)).mode):
            raise FuseError(errno.ENOTDIR)
        return 0, FOpenFlags.KEEP_CACHE | FOpenFlags.CACHE_DIR

    def trim(self) -> bool:
        """Drop the kept listings and walk predictions (an idle mount's: the idle trimmer's
        round); True if any."""
        with self._listing_lock:
            walked = self.walk.clear()
        return _LISTINGS.drop(self._serial) or walked

    @property
    def _listed(self) -> int:
        """Entries of this filesystem's listings held now."""
        return _LISTINGS.held_by(self._serial)

    def _listing(self, i: int) -> tuple[int, tuple[_Child, ...] | None]:
        """(parent, validated children with their attributes) of directory `i`, kept for the
        requests that continue the listing; children None for a directory too big for
        LISTING_BUDGET (streamed)."""
        hit = _LISTINGS.get((self._serial, i))
        if hit is not None:
            return hit
        parent = self.image.parent(i)
        if i in self._too_big:
            return parent, None
        kids = self.image.listing(i, LISTING_BUDGET)
        if kids is None:
            with self._listing_lock:
                if len(self._too_big) >= 1024:
                    self._too_big.clear()
                self._too_big.add(i)
            return parent, None
        listed = (parent, tuple(kids))
        _LISTINGS.put((self._serial, i), listed)
        return listed

    def _children(self, i: int, offset: int) -> tuple[int, Iterator[tuple[int, _Child | DirEntry]]]:
        """(parent, (cookie, (name, inode, type, ...)) of each child after readdir cookie `offset`)."""
        parent, kids = self._listing(i)
        skip = max(0, offset - _DOTDOT)
        if kids is None:
            return parent, enumerate(self.image.readdir(i, skip), start=skip + _FIRST_CHILD)
        return parent, enumerate(kids[skip:], start=skip + _FIRST_CHILD)

    def readdir(self, ino: int, fh: int, offset: int) -> Iterator[DirEntryTuple]:
        i = self._img(ino)
        try:
            parent, kids = self._children(i, offset)
            if offset < _DOT:
                yield b".", ino, stat.S_IFDIR, _DOT
            if offset < _DOTDOT:
                yield b"..", self._fuse(parent), stat.S_IFDIR, _DOTDOT
            for n, e in kids:
                yield e[0], self._fuse(e[1]), e[2], n
        except FormatError as ex:
            log.error("readdir inode %d: %s", i, ex)
            raise FuseError(errno.EIO) from None

    def readdirplus(self, ino: int, fh: int, offset: int) -> Iterator[DirEntryPlusTuple]:
        i = self._img(ino)
        try:
            parent, kids = self._children(i, offset)
            if offset < _DOT:
                yield Entry(0, 0, FuseAttr(ino=ino, mode=stat.S_IFDIR), 0.0, 0.0), b".", stat.S_IFDIR, _DOT
            if offset < _DOTDOT:
                pino = self._fuse(parent)
                yield Entry(0, 0, FuseAttr(ino=pino, mode=stat.S_IFDIR), 0.0, 0.0), b"..", stat.S_IFDIR, _DOTDOT
            for n, e in kids:
                yield self._entry(e[1]), e[0], e[2], n
        except FormatError as ex:
            log.error("readdirplus inode %d: %s", i, ex)
            raise FuseError(errno.EIO) from None

    def readdirplus_packed(self, ino: int, fh: int, offset: int, size: int, base: int = 0,
                           dotdot: int = 0) -> bytes | bytearray | memoryview | None:
        """`readdirplus` packed into one buffer: each child's attributes, decoded with the listing,
        go straight into its fuse_direntplus record (no Entry/FuseAttr per entry, no generator
        hops). A directory too big to keep (streamed) takes `readdirplus`."""
        i = self._img(ino)
        try:
            parent, kids = self._listing(i)
            if kids is None:
                return None
            skip = max(0, offset - _DOTDOT)
            heads: list[tuple[bytes, int]] = []
            if offset < _DOT:
                heads.append((b".", ino | base))
            if offset < _DOTDOT:
                heads.append((b"..", dotdot or self._fuse(parent) | base))
            # how many records fit: the exact buffer (the kernel may offer far more than needed)
            used = 0
            for h, (name, _d) in enumerate(heads):
                rec = (_DP_SIZE + len(name) + 7) & ~7
                if used + rec > size:
                    heads = heads[:h]
                    skip = len(kids)  # full: no child goes after a head that did not fit
                    break
                used += rec
            end = skip
            n_kids = len(kids)
            while end < n_kids:
                rec = (_DP_SIZE + len(kids[end][0]) + 7) & ~7
                if used + rec > size:
                    break
                used += rec
                end += 1
            buf = bytearray(used)
            pack = _DP_PACK_INTO
            pos = 0
            cookie = _DOT if offset < _DOT else _DOTDOT
            for name, d_ino in heads:
                nl = len(name)
                pack(buf, pos, 0, 0, 0, 0, 0, 0, d_ino, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR, 0, 0, 0, 0, 0, 0,
                     d_ino, cookie, nl, _DT_DIR)
                buf[pos + _DP_SIZE : pos + _DP_SIZE + nl] = name
                pos += (_DP_SIZE + nl + 7) & ~7
                cookie += 1
            es, ens = split_timeout(self.entry_timeout)
            as_, ans = split_timeout(self.attr_timeout)
            root = self.root
            for k in range(skip, end):
                name, child, typ, attr = kids[k]
                nl = len(name)
                if not 0 < nl <= _NAME_MAX or b"/" in name:  # (the image checked them: never sent)
                    log.error("readdirplus(%d): skipping invalid name %r", ino, name)
                    continue
                _i, mode, nlink, uid, gid, rdev, fsize, blocks, mtime, nsec = attr
                kino = (child if child != root and child != FUSE_ROOT_ID else self._fuse(child)) | base
                pack(buf, pos, kino, 0, es, as_, ens, ans, kino, fsize, blocks, mtime, mtime, mtime, nsec, nsec,
                     nsec, mode, nlink, uid, gid, rdev, 4096, 0, kino, k + _FIRST_CHILD, nl, typ >> 12)
                buf[pos + _DP_SIZE : pos + _DP_SIZE + nl] = name
                pos += (_DP_SIZE + nl + 7) & ~7
        except FormatError as ex:
            log.error("readdirplus inode %d: %s", i, ex)
            raise FuseError(errno.EIO) from None
        return buf if pos == used else memoryview(buf)[:pos]

    def statfs(self, ino: int) -> StatFs:
        """From the superblock, like nydusd: counting the inodes would walk the whole tree (and,
        on a damaged image, fail the same way on every call)."""
        return self._statfs

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if not self.xattrs:
            raise FuseError(errno.ENOSYS)
        try:
            value = self.image.getxattr(self._img(ino), name)
        except FormatError as e:
            log.error("getxattr inode %d: %s", ino, e)
            raise FuseError(errno.EIO) from None
        if value is None:
            if name.startswith(LABEL_NAMESPACE) and self._carried_nowhere(name):
                raise FuseError(errno.EOPNOTSUPP)
            raise FuseError(errno.ENODATA)
        if name in ACL_NAMES:
            problem = acl_xattr_problem(value)
            if problem is not None:
                # the kernel would fail every permission check on the inode with EINVAL, or
                # evaluate entries out of order: refuse it loudly instead
                log.error("inode %d: %s is not a usable ACL (%s)", ino, name.decode(), problem)
                raise FuseError(errno.EIO)
        return value

    def _carried_nowhere(self, name: bytes) -> bool:
        """True once the image is known to have no inode with xattr `name`. The first question
        starts the scan on a thread (a walk of the whole tree: 0.6 s for 100k inodes) and
        answers False, as every question does until the scan is over."""
        names = self._xattr_names
        if names is not None:
            return name not in names
        with self._scan_lock:
            if self._scan is None and not self._closed:
                self._scan = threading.Thread(target=self._scan_names, name="rafs-xattr-names", daemon=True)
                self._scan.start()
        return False

    def _scan_names(self) -> None:
        t0 = time.monotonic()
        names: set[bytes] = set()
        n = 0
        try:
            for _path, ino in self.image.walk():
                if self._closed:
                    return
                names.update(self.image.listxattr(ino))
                n += 1
        except Exception as e:  # a damaged image, or one closed under the scan
            self.name_scan_failures += 1
            if not self._closed:
                log.warning("xattr name scan failed after %d inodes (%s); absent %s* xattrs keep answering ENODATA",
                            n, e, LABEL_NAMESPACE.decode())
            return
        self._xattr_names = frozenset(names)
        log.info("xattr names scanned: %d inodes, %d distinct names, in %.0f ms; %s* names none carries answer "
                 "EOPNOTSUPP", n, len(names), (time.monotonic() - t0) * 1e3, LABEL_NAMESPACE.decode())

    def xattr_names(self, timeout: float) -> frozenset[bytes] | None:
        """The scanned names, waiting up to `timeout` for a scan under way (None: none finished)."""
        scan = self._scan
        if scan is not None:
            scan.join(timeout)
        return self._xattr_names

    def listxattr(self, ino: int) -> list[bytes]:
        if not self.xattrs:
            raise FuseError(errno.ENOSYS)
        try:
            return self.image.listxattr(self._img(ino))
        except FormatError as e:
            log.error("listxattr inode %d: %s", ino, e)
            raise FuseError(errno.EIO) from None

    # -- data ------------------------------------------------------------------------------------
    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes | memoryview:
        if not offset:
            # the READ that follows the file's LOOKUP: what `warm` read then (a regular file,
            # read whole moments ago) needs none of `_readable`'s checks (7% of a cold small
            # file's daemon CPU without this)
            data = self.device.take_warmed(self._img(ino), size)
            if data is not None:
                return data
        i, file_size = self._readable(ino, offset, size)
        # the whole file at once (a small file's one READ): nothing follows for readahead
        whole = offset == 0 and size >= file_size
        # a file's first READ: its directory's next files may come along (`_siblings`)
        p = self._parents.get(i) if offset == 0 and self._parents else None
        sib = None if p is None else partial(self._siblings, i, p)
        try:
            data = (self.device.read_whole(i, file_size, sib) if whole
                    else self.device.read(i, offset, size, file_size, sib))
        except (FormatError, OSError) as e:
            log.error("read inode %d [%d, +%d): %s", i, offset, size, e)
            self.failures.failed(i, offset, min(file_size, offset + size))
            raise FuseError(errno.EIO) from None
        if self.readahead is not None and data and not whole:
            self.readahead.after_read(i, offset, offset + len(data), file_size)
        return data

    def _siblings(self, i: int, parent: int) -> Iterator[tuple[int, int]]:
        """(inode, size) of the regular files after `i` in directory `parent`, in listing
        order (subdirectories and other types skipped: a builder stores a directory's files
        together, its subdirectories' elsewhere), from the kept listing; nothing for a
        directory too big to keep. Called by the blob cache on a random miss only."""
        _pp, kids = self._listing(parent)
        if kids is None:
            return
        after = False
        for _name, ino, ifmt, attr in kids:
            if after:
                if ifmt == stat.S_IFREG:
                    yield ino, attr.size
            elif ino == i:
                after = True

    def warm(self, ino: int, size: int) -> None:
        """The file read for the READ that follows, which `read_whole` then takes (`BlobDevice.warm`)."""
        try:
            self.device.warm(self._img(ino), size)
        except Exception as e:  # (the READ reports a broken file; a warm-up only says so in debug)
            log.debug("warm inode %d: %s", ino, e)

    def warm_next_dir(self, ino: int) -> None:
        """Decode the listing a depth-first walk asks for after directory `ino`'s (`WalkAhead`),
        into the listings LRU its READDIRPLUS packs from."""
        try:
            i = self._img(ino)
            _parent, kids = self._listing(i)
            subdirs = [] if kids is None else [k[1] for k in kids if k[2] == stat.S_IFDIR]
            with self._listing_lock:
                nxt = self.walk.listed(i, subdirs)
            if nxt is not None:
                self._listing(nxt)
        except Exception as e:  # (the READDIR itself reports a broken directory)
            log.debug("warm the listing after directory %d: %s", ino, e)

    def read_waits(self, ino: int, offset: int = 0, size: int = 0) -> bool:
        """A local backend without a blob cache never waits; otherwise a READ waits unless
        every chunk of its range is ready locally now (`BlobDevice.range_ready`)."""
        if self.device.local:
            return False
        if size <= 0:
            return True
        try:
            return not self.device.range_ready(self._img(ino), offset, size)
        except (FormatError, OSError):  # (the READ itself reports a broken chunk table)
            return True

    def read_into(self, ino: int, fh: int, offset: int, size: int, dest: ReadDest, nowait: bool = False) -> int:
        """With a blob cache (validation off) whose chunks of the range are all ready: preadv
        from its data files straight into `dest`, no copy. Else one copy from the decoded
        chunks into `dest`; `nowait` answers only from chunks held now (the in-memory chunk
        cache or ready in the blob cache), else WouldBlock."""
        if self.device.direct:
            i, file_size = self._readable(ino, offset, size)
            try:
                n = dest.fill(partial(self.device.read_ready_into, i, offset, min(size, dest.size), file_size,
                                      nowait=nowait))
            except BlockingIOError:
                raise WouldBlock from None  # ready, but on disk: a pool thread reads it
            except (FormatError, OSError) as e:  # the decoded-chunk path below answers (or reports) it
                log.debug("read inode %d [%d, +%d) from the blob cache files: %s", i, offset, size, e)
                n = -1
            if n >= 0:
                if self.readahead is not None and n and not self.device.raw_direct:
                    self.readahead.after_read(i, offset, offset + n, file_size)
                return n
        if not nowait:
            return dest.fill(partial(scatter, data=self.read(ino, fh, offset, size)))
        i, file_size = self._readable(ino, offset, size)
        try:
            data = self.device.read_cached(i, offset, min(size, dest.size), file_size)
        except (FormatError, OSError) as e:  # a broken chunk table: the pool's read reports it
            log.debug("read inode %d [%d, +%d) from the caches: %s", i, offset, size, e)
            raise WouldBlock from None
        if data is None:
            raise WouldBlock
        n = dest.fill(partial(scatter, data=data))
        if self.readahead is not None and n:
            self.readahead.after_read(i, offset, offset + n, file_size)
        return n

    def _readable(self, ino: int, offset: int, size: int) -> tuple[int, int]:
        """(image inode, file size) of a regular file whose range [offset, +size) did not
        fail moments ago (EIO at once then)."""
        i = self._img(ino)
        attr = self._getattr(i)
        if not stat.S_ISREG(attr.mode):
            raise FuseError(errno.EISDIR if stat.S_ISDIR(attr.mode) else errno.EINVAL)
        end = min(attr.size, offset + size)
        if self.failures.covers(i, offset, end):
            log.info("read inode %d [%d, +%d): this range failed moments ago; EIO at once", i, offset, size)
            raise FuseError(errno.EIO)
        return i, attr.size

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        i = self._img(ino)
        size = self._getattr(i).size
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise FuseError(errno.EINVAL)
        if offset < 0 or offset >= size:
            raise FuseError(errno.ENXIO)
        try:
            chunks = self.image.chunks(i, offset, size - offset)
        except FormatError as e:
            log.error("lseek inode %d: %s", i, e)
            raise FuseError(errno.EIO) from None
        if whence == SEEK_DATA:
            for c in chunks:
                if c.file_offset + c.uncompressed_size > offset:
                    return max(offset, c.file_offset)
            raise FuseError(errno.ENXIO)
        pos = offset
        for c in chunks:
            if c.file_offset > pos:
                return pos
            pos = max(pos, c.file_offset + c.uncompressed_size)
        return min(pos, size)

    def destroy(self) -> None:
        log.debug("FUSE session destroyed")
        if self.readahead is not None:
            self.readahead.close()

    def close(self) -> None:
        """Stop background work (the readahead pool, the xattr name scan); the image and device
        stay the caller's."""
        self._closed = True
        _LISTINGS.drop(self._serial)
        scan = self._scan
        if scan is not None:
            scan.join(5.0)  # it checks _closed at every inode
        if self.readahead is not None:
            self.readahead.close()


