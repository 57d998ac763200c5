"""What the Windows virtio-fs driver (virtio-win `viofs`) sends, written down and replayable.

Source read: github.com/virtio-win/kvm-guest-drivers-windows at commit fbcc19d7 (2026-07-22),
directory viofs/: the WinFsp-based user-mode service `svc/virtiofs.cpp` (with `svc/fusereq.h`,
`svc/utils.h`, `shared/fuse.h`, `shared/virtiofs.h`) and the KMDF function driver `pci/`
(`ioctl.c`, `power.c`, `viofs.c`, `viofs.h`). Below, "svc:F" is a function of svc/virtiofs.cpp,
"pci:file:F" one of the driver. `ViofsGuest` replays these sequences over the Python vhost-user
front-end of tests/transport/vhost_frontend.py, laying out descriptors the way the driver does.

The device and the virtqueues (pci)
-----------------------------------
* Two queues only: 0 = hiprio, 1 = the one request queue (pci:power.c:VirtFsEvtDevicePrepareHardware
  sets NumQueues = 2; it reads `num_request_queues` from the config space and only logs it).
  FORGET, INTERRUPT and BATCH_FORGET go to hiprio, everything else to queue 1
  (pci:ioctl.c:VirtFsOpcodeIsHighPrio).
* Features: VERSION_1 (+ ANY_LAYOUT / ACCESS_PLATFORM if offered, VirtIO/WDF VirtIOWdfSetDriverFeatures)
  and VIRTIO_RING_F_INDIRECT_DESC if the device offers it (power.c). No EVENT_IDX, split ring.
* One request at a time: the IOCTL queue is `WdfIoQueueDispatchSequential` (pci:viofs.c:
  VirtFsEvtDeviceAdd), so the next request reaches the device only after the previous one completed.
  WinFsp's dispatcher threads queue up behind it; a worker pool on our side cannot overlap a
  Windows guest's requests.
* Descriptors: every buffer is split at 4 KiB page boundaries (`SplitToPages = TRUE`, power.c; pci:
  ioctl.c:PopulateSG/FragmentSize), device-readable fragments first, then device-writable ones.
  With INDIRECT_DESC and 2 < fragments <= 1024 (VIRT_FS_INDIRECT_AREA_CAPACITY) the chain is one
  indirect descriptor whose table lives in a fixed 4-page area (pci:ioctl.c:
  VirtioFsRxTransactionCallback; safe only because of the sequential queue); more than
  VIRT_FS_MAX_QUEUE_SIZE = 1024 fragments fails the request. Without INDIRECT_DESC the chain needs that
  many free ring descriptors (VirtIORing.c:virtqueue_add_buf_split returns -ENOSPC otherwise).
* Queue size: a 1 MiB READ is 1 (in, 80 bytes; 2 if it crosses a page) + 1 (out header, 16 bytes)
  + 256 (data pages; 257 when the user buffer is not page aligned) = 258..260 fragments. It fits a
  ring of 128 only through an indirect table; without one it needs >= 260 free descriptors, hence
  the driver's advice `queue-size=1024` (the most QEMU allows). The driver caps what it uses at 1024.
* FUSE requests reach the driver as DeviceIoControl: IOCTL_VIRTFS_FUSE_REQUEST with the request as
  input and a reply buffer as output (copied by the service), and IOCTL_VIRTFS_FUSE_REQUEST_READ for
  READ, whose output names the user's buffer so the data lands there directly
  (pci:ioctl.c:HandleFuseRead: writable part = [16-byte fuse_out_header] + [the data buffer]).
* A request whose output buffer is shorter than fuse_out_header is refused by the driver
  (pci:ioctl.c:HandleSubmitFuseRequest); svc:VirtFsFuseRequestNoReply passes none, so the
  service's FORGETs (svc:SubmitForgetRequest, only after UNLINK/RMDIR) never reach the device.

The service's requests (svc)
----------------------------
Header (svc:FUSE_HEADER_INIT): len = 40 + args, unique = 2, 3, 4, ... (one process-wide counter),
uid = gid = 0 (CREATE/MKDIR/SYMLINK carry the owner ids), pid = the service's pid. Request and
reply sizes are the fixed C structs of svc/fusereq.h:

| op (opcode)        | when (svc function)                                  | in bytes          | out buffer |
|--------------------|------------------------------------------------------|-------------------|------------|
| INIT (26)          | start, VIRTFS::SubmitInitRequest                     | 56                | 80         |
| STATFS (17)        | GetVolumeInfo, nodeid 1                              | 40                | 96         |
| LOOKUP (1)         | every path component, SubmitLookupRequest            | 40 + strlen + 1   | 144        |
| OPEN/OPENDIR (14/27)| Open, SubmitOpenRequest                             | 48                | 32         |
| GETATTR (3)        | GetFileInfo/Flush/Overwrite, GetFileInfoInternal     | 56                | 120        |
| READDIRPLUS (44)   | ReadDirectory, SubmitReadDirRequest(Plus)            | 80                | 16 + 2*BufferLength |
| READDIR (28)       | IsEmptyDirectory (4080), ReadDirAndIgnoreCaseSearch (4080) | 80          | 4096       |
| READ (15)          | Read, IOCTL_VIRTFS_FUSE_REQUEST_READ                 | 80                | 16 + size  |
| READLINK (5)       | symlinks, SubmitReadLinkRequest                      | 300 (*)           | 276        |
| RELEASE(DIR) (18/29)| Close, SubmitReleaseRequest                         | 64                | 16         |
| FLUSH (25)         | Flush                                                | 64                | 16         |
| DESTROY (38)       | stop, SubmitDestroyRequest                           | 40                | 16         |

(*) READLINK's header says len = 40 + 260 and the driver is handed 300 bytes, of which all but the
header are whatever follows the 40-byte struct on the service's stack: a server must ignore them.
Its reply buffer holds 260 bytes of target: a longer target does not fit, and our backend answers
EIO rather than a truncated target (virtio-fs: a reply never overflows the writable part).

* INIT (svc:SubmitInitRequest): protocol 7.31, 16-byte fuse_init_in: max_readahead = 0,
  flags = FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES (0x402000), nothing else. From the reply it keeps
  only max_write and max_pages (0 -> FUSE_DEFAULT_MAX_PAGES_PER_REQ = 32); it does not look at the
  flags we answer, so it sends READDIRPLUS whatever we negotiate.
* Mount (svc:VIRTFS::Start, then WinFsp): INIT; the volume (GetVolumeInfo) is a STATFS of nodeid 1:
  TotalSize = bsize * blocks, FreeSize = bsize * bavail; the root's security (GetSecurityByName
  "\\") is a LOOKUP of "." in nodeid 1 (svc:VirtFsLookupFileName maps "\\" to ".").
* Paths (svc:PathWalkthough + VirtFsLookupFileName): a Windows path "\\a\\b\\c" becomes "a/b/c"
  (FspPosixMapWindowsToPosixPath) and is walked from FUSE_ROOT_ID with one LOOKUP per component,
  each time, for every operation (no dentry cache: FileInfoTimeout = 1000 ms is WinFsp's own cache
  of the results). A component that is a symlink is READLINKed and its target looked up again
  from the root. Each successful LOOKUP is counted in the service's LookupMap (svc:
  LookupMapNewOrIncNode), as is each READDIRPLUS entry except "." and "..".
* Open (svc:Open): the path walk, then OPEN (flags from the granted access, O_RDONLY = 0 for
  reading) or OPENDIR (flags O_RDONLY | O_DIRECTORY = 0x10000); symlinks are not opened.
  GetFileInfo = GETATTR with FUSE_GETATTR_FH and the fh (svc:GetFileInfoInternal).
* Directory listing (svc:ReadDirectory): READDIRPLUS with size = 2 * BufferLength (WinFsp's
  query buffer) from offset 0, then from the last entry's `off`, until a reply with no entries;
  the whole directory is read into WinFsp's directory buffer on the first query. Every entry's
  entry_out becomes its FileInfo (svc:SetFileInfo): mode -> attributes (S_IFDIR directory,
  S_IFLNK reparse point, no write bit -> read-only), size, blocks * 512 rounded up to 4 KiB, the
  three times, ino (nodeid if ino is 0), nlink. A symlink entry costs a READLINK and a path walk
  (svc:FixReparsePointAttributes). A name looked up without wildcard in a directory
  (PassQueryDirectoryFileName) is one LOOKUP (svc:GetDirInfoByName).
* Read (svc:Read): READ of min(Length, max_pages * 4096) bytes per request (1 MiB with our
  max_pages 256), in a loop until Length is done or a reply is short (0 bytes: end of file); a
  reply longer than asked is an error.
* Close (svc:Close): RELEASE or RELEASEDIR with the fh. Cleanup of a file opened read-only posts
  nothing (PostCleanupWhenModifiedOnly); of a modified one a path walk and SETATTR.
* Stop (svc:VIRTFS::Stop): DESTROY.
* Errors (svc:VirtFsFuseRequest): EPERM/EACCES -> access denied, ENOENT -> object name not found,
  EIO, EBADF, ENOMEM, EEXIST, EINVAL, ENAMETOOLONG, ENOSYS, EOPNOTSUPP map to NTSTATUS; anything
  else (EROFS, ENOTDIR...) is STATUS_UNSUCCESSFUL.
* Case (svc:NameAwareRequest, ReadDirAndIgnoreCaseSearch): with the service's `-i` /
  registry CaseInsensitive=1, a LOOKUP (or UNLINK/RMDIR/RENAME) that fails is retried after
  OPENDIR of the parent, READDIR pages of 4080 bytes until a name compares equal ignoring case
  (CompareStringW, LOCALE_INVARIANT, NORM_IGNORECASE), then LOOKUP of that name and RELEASEDIR:
  four requests and a full directory scan per miss, for every path component, every time.
  A server-side case-insensitive LOOKUP (nydusd-py --case-insensitive) answers the first LOOKUP.
"""

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .vhost_frontend import GPA_BASE, WRITE, DriverQueue, Frontend, _chain_ids

PAGE = 4096
VIRT_FS_MAX_QUEUE_SIZE = 1024  # pci/viofs.h
VIRT_FS_INDIRECT_AREA_CAPACITY = 4 * 256  # pci/viofs.h: 4 pages of 256 descriptors
HIPRIO, REQUEST = 0, 1  # pci/viofs.h VQ_TYPE_HIPRIO, VQ_TYPE_REQUEST

# opcodes (shared/fuse.h)
LOOKUP, FORGET, GETATTR, READLINK, OPEN, READ, STATFS, RELEASE = 1, 2, 3, 5, 14, 15, 17, 18
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, DESTROY, READDIRPLUS = 25, 26, 27, 28, 29, 38, 44

FUSE_ROOT_ID = 1
FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION = 7, 31  # shared/fuse.h
FUSE_DO_READDIRPLUS, FUSE_MAX_PAGES = 1 << 13, 1 << 22
FUSE_GETATTR_FH = 1
FUSE_DEFAULT_MAX_PAGES_PER_REQ = 32  # svc/virtiofs.cpp
O_RDONLY, O_DIRECTORY = 0, 0o200000  # svc/virtiofs.cpp redefines them to Linux's values
MAX_PATH = 260  # MAX_NAME_LENGTH in svc/fusereq.h

# struct sizes of svc/fusereq.h (the service's fixed request/reply buffers)
IN_HDR = struct.Struct("<IIQQIIIHH")  # fuse_in_header: len opcode unique nodeid uid gid pid extlen pad
OUT_HDR = struct.Struct("<IiQ")  # fuse_out_header: len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
ENTRY_OUT = struct.Struct("<QQQQII")  # fuse_entry_out before its fuse_attr: nodeid gen entry/attr valid
INIT_OUT = struct.Struct("<IIIIHHIIHH32x")  # fuse_init_out of 7.31 (64 bytes)
OPEN_OUT = struct.Struct("<QII")
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then fuse_attr
KSTATFS = struct.Struct("<QQQQQIII28x")  # fuse_kstatfs (80 bytes)
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
DIRENT = struct.Struct("<QQII")  # ino off namelen type
LOOKUP_OUT_SIZE = 16 + ENTRY_OUT.size + ATTR.size  # 144
GETATTR_OUT_SIZE = 16 + ATTR_OUT.size + ATTR.size  # 120
INIT_OUT_SIZE = 16 + INIT_OUT.size  # 80
OPEN_OUT_SIZE = 16 + OPEN_OUT.size  # 32
STATFS_OUT_SIZE = 16 + KSTATFS.size  # 96
READLINK_OUT_SIZE = 16 + MAX_PATH  # 276

_ATTR_NAMES = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec", "ctimensec",
               "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags")


class FuseReplyError(OSError):
    """The device answered a request with a negative error."""


@dataclass
class Attr:
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


@dataclass
class EntryOut:
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    attr: Attr


@dataclass
class FileContext:
    """svc VIRTFS_FILE_CONTEXT: what Open keeps per open file or directory."""

    node_id: int
    file_handle: int
    is_directory: bool
    entry: EntryOut | None  # None: opened by NameAwareRequest without a lookup


@dataclass
class DirEntryPlus:
    name: bytes
    ino: int
    off: int
    type: int
    entry: EntryOut


def parse_entry(buf: bytes, off: int = 0) -> EntryOut:
    nodeid, gen, ev, av, _evn, _avn = ENTRY_OUT.unpack_from(buf, off)
    return EntryOut(nodeid, gen, ev, av, Attr(*ATTR.unpack_from(buf, off + ENTRY_OUT.size)))


def page_fragments(gpa: int, length: int) -> list[tuple[int, int]]:
    """pci:ioctl.c:PopulateSG with SplitToPages: (address, length) pieces that never cross a page."""
    out = []
    while length:
        n = min(PAGE - (gpa & (PAGE - 1)), length)
        out.append((gpa, n))
        gpa += n
        length -= n
    return out


class ViofsGuest:
    """The Windows service and driver, as a request source for a vhost-user-fs backend.

    `fe` must be set up with the driver's features (VERSION_1, INDIRECT_DESC optional) and two
    queues. Buffers start `misalign` bytes into a page, so replies cross page boundaries the way
    a Windows stack or heap buffer does. Every reply is checked against its header (length,
    unique, room) before it is handed back; `sent` logs (opcode, in bytes, fragments, indirect).
    """

    def __init__(self, fe: Frontend, *, misalign: int = 0x9F0) -> None:
        self.fe = fe
        self.misalign = misalign
        self.unique = 1  # svc:GetUniqueIdentifier pre-increments
        self.indirect = False
        self.max_pages = 0
        self.max_write = 0
        # the service's own `-i` / CaseInsensitive=1 (svc:NameAwareRequest)
        self.case_insensitive = False
        self.sent: list[tuple[int, int, int, bool]] = []

    # -- the transport (pci driver) ---------------------------------------------------------
    def _place(self, size: int) -> int:
        """Guest memory offset for a `size`-byte buffer starting `misalign` into a page."""
        off = self.fe.alloc(size + 2 * PAGE)
        return ((off + PAGE - 1) & ~(PAGE - 1)) + self.misalign % PAGE

    def submit(self, request: bytes, out_sizes: list[int], *, queue: int = REQUEST,
               timeout: float = 10.0) -> tuple[int, list[bytes]]:
        """One DeviceIoControl: `request` readable, `out_sizes` writable buffers (READ: the
        16-byte header and the user's data buffer). Returns (used length, each out buffer)."""
        q: DriverQueue = self.fe.queues[queue]
        in_off = self._place(len(request))
        self.fe.mem[in_off : in_off + len(request)] = request
        descs = [(a, n, 0) for a, n in page_fragments(GPA_BASE + in_off, len(request))]
        outs = []
        for size in out_sizes:
            off = self._place(size)
            self.fe.mem[off : off + size] = b"\xee" * size
            outs.append((off, size))
            descs += [(a, n, WRITE) for a, n in page_fragments(GPA_BASE + off, size)]
        n = len(descs)
        if n > VIRT_FS_MAX_QUEUE_SIZE:
            raise OSError(f"{n} fragments: the driver fails the request (VIRT_FS_MAX_QUEUE_SIZE)")
        indirect = self.indirect and queue != HIPRIO and 2 < n <= VIRT_FS_INDIRECT_AREA_CAPACITY
        if not indirect and n > len(q.free):
            raise OSError(f"{n} descriptors on a ring with {len(q.free)} free: -ENOSPC in the driver")
        self.sent.append((IN_HDR.unpack_from(request)[1], len(request), n, indirect))
        head, _ = q.add([], [], indirect=indirect, raw=descs)
        q.do_kick()
        got, length = q.wait_used(timeout)
        assert got == head, (got, head)
        q.free.extend(_chain_ids(q, head, indirect, n))
        return length, [bytes(self.fe.mem[o : o + s]) for o, s in outs]

    def request(self, opcode: int, nodeid: int, args: bytes, out_size: int) -> bytes:
        """svc:VirtFsFuseRequest: the payload after fuse_out_header, FuseReplyError on error."""
        self.unique += 1
        unique = self.unique
        hdr = IN_HDR.pack(40 + len(args), opcode, unique, nodeid, 0, 0, 4242, 0, 0)
        used, (out,) = self.submit(hdr + args, [out_size])
        olen, error, ouniq = OUT_HDR.unpack_from(out)
        assert ouniq == unique, (ouniq, unique)
        assert olen == used, f"opcode {opcode}: header len {olen} but {used} bytes used"
        assert 16 <= olen <= out_size, (olen, out_size)
        if error:
            assert olen == 16 and error < 0, (olen, error)
            raise FuseReplyError(-error, f"opcode {opcode} on {nodeid}: errno {-error}")
        return out[16:olen]

    # -- the service ------------------------------------------------------------------------
    def init(self) -> tuple[int, ...]:
        """svc:SubmitInitRequest; returns the fuse_init_out fields."""
        args = struct.pack("<IIII", FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0,
                           FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES)
        p = self.request(INIT, FUSE_ROOT_ID, args, INIT_OUT_SIZE)
        assert len(p) == INIT_OUT.size, len(p)
        fields = INIT_OUT.unpack(p)
        self.max_write = fields[6]
        self.max_pages = fields[8] or FUSE_DEFAULT_MAX_PAGES_PER_REQ
        return fields

    def statfs(self) -> tuple[int, ...]:
        """svc:GetVolumeInfo: fuse_kstatfs (blocks bfree bavail files ffree bsize namelen frsize)."""
        p = self.request(STATFS, FUSE_ROOT_ID, b"", STATFS_OUT_SIZE)
        assert len(p) == KSTATFS.size
        return KSTATFS.unpack(p)

    def lookup(self, parent: int, name: bytes) -> EntryOut:
        """svc:NameAwareRequest(SubmitLookupRequest): with `case_insensitive` a failed LOOKUP is
        retried under the first name of `parent` that matches ignoring case (OPENDIR, READDIR
        pages, RELEASEDIR: svc:ReadDirAndIgnoreCaseSearch)."""
        try:
            return self._lookup(parent, name)
        except FuseReplyError:
            if not self.case_insensitive:
                raise
        p = self.request(OPENDIR, parent, struct.pack("<II", O_RDONLY | O_DIRECTORY, 0), OPEN_OUT_SIZE)
        ctx = FileContext(parent, OPEN_OUT.unpack(p)[0], True, None)
        try:
            want = name.decode().lower()
            real = next((n for n in self.read_dir_names(ctx) if n.decode(errors="replace").lower() == want), None)
        finally:
            self.close(ctx)
        if real is None:
            raise FuseReplyError(errno.ENOENT, f"{name!r}: no match ignoring case")
        return self._lookup(parent, real)

    def _lookup(self, parent: int, name: bytes) -> EntryOut:
        """svc:SubmitLookupRequest."""
        assert len(name) < MAX_PATH
        p = self.request(LOOKUP, parent, name + b"\0", LOOKUP_OUT_SIZE)
        assert len(p) == LOOKUP_OUT_SIZE - 16
        return parse_entry(p)

    def readlink(self, nodeid: int) -> bytes:
        """svc:SubmitReadLinkRequest, with its 260 bytes of stack after the header."""
        return self.request(READLINK, nodeid, b"\xcc" * MAX_PATH, READLINK_OUT_SIZE)

    def lookup_path(self, path: str) -> EntryOut:
        """svc:VirtFsLookupFileName: "\\" is "." of the root, else one LOOKUP per component
        from the root; a symlink component is resolved by READLINK and a walk of its target."""
        if path == "\\":
            return self.lookup(FUSE_ROOT_ID, b".")
        parts = path.lstrip("\\").split("\\")
        parent = FUSE_ROOT_ID
        for comp in parts[:-1]:
            e = self.lookup(parent, comp.encode())
            if e.attr.mode & 0o170000 == 0o120000:
                target = self.readlink(e.nodeid).decode()
                e = self.lookup_path(target.replace("/", "\\"))
            parent = e.nodeid
        return self.lookup(parent, parts[-1].encode())

    def open(self, path: str) -> FileContext:
        """svc:Open: path walk, then OPEN / OPENDIR (not for a symlink)."""
        e = self.lookup_path(path)
        is_dir = e.attr.mode & 0o170000 == 0o040000
        fh = 0
        if e.attr.mode & 0o170000 != 0o120000:
            flags = O_RDONLY | O_DIRECTORY if is_dir else O_RDONLY
            p = self.request(OPENDIR if is_dir else OPEN, e.nodeid, struct.pack("<II", flags, 0), OPEN_OUT_SIZE)
            assert len(p) == OPEN_OUT.size
            fh = OPEN_OUT.unpack(p)[0]
        return FileContext(e.nodeid, fh, is_dir, e)

    def getattr(self, ctx: FileContext) -> Attr:
        """svc:GetFileInfoInternal (with FUSE_GETATTR_FH)."""
        p = self.request(GETATTR, ctx.node_id, struct.pack("<IIQ", FUSE_GETATTR_FH, 0, ctx.file_handle),
                         GETATTR_OUT_SIZE)
        assert len(p) == GETATTR_OUT_SIZE - 16
        return Attr(*ATTR.unpack_from(p, ATTR_OUT.size))

    def read_directory(self, ctx: FileContext, buffer_length: int) -> list[DirEntryPlus]:
        """svc:ReadDirectory: READDIRPLUS of 2 * buffer_length from the last `off` until empty."""
        size = 2 * buffer_length
        out: list[DirEntryPlus] = []
        offset = 0
        while True:
            p = self.request(READDIRPLUS, ctx.node_id, READ_IN.pack(ctx.file_handle, offset, size, 0, 0, 0, 0),
                             16 + size)
            assert len(p) <= size
            if not p:
                return out
            pos = 0
            fixed = ENTRY_OUT.size + ATTR.size + DIRENT.size  # sizeof(struct fuse_direntplus)
            while len(p) - pos > fixed:
                entry = parse_entry(p, pos)
                ino, off, namelen, typ = DIRENT.unpack_from(p, pos + ENTRY_OUT.size + ATTR.size)
                rec = (fixed + namelen + 7) & ~7
                assert rec <= len(p) - pos, "direntplus runs past the reply"
                name = p[pos + fixed : pos + fixed + namelen]
                out.append(DirEntryPlus(name, ino, off, typ, entry))
                offset = off
                pos += rec
            assert pos == len(p), f"{len(p) - pos} stray bytes after the last direntplus"

    def read_dir_names(self, ctx: FileContext) -> Iterator[bytes]:
        """svc:ReadDirAndIgnoreCaseSearch's READDIR pages of 4080 bytes, names only; the next
        page is asked for only when the caller wants more (the service stops at a match)."""
        size = PAGE - 16
        offset = 0
        while True:
            p = self.request(READDIR, ctx.node_id, READ_IN.pack(ctx.file_handle, offset, size, 0, 0, 0, 0), PAGE)
            if not p:
                return
            pos = 0
            while len(p) - pos > DIRENT.size:
                _ino, off, namelen, _typ = DIRENT.unpack_from(p, pos)
                rec = (DIRENT.size + namelen + 7) & ~7
                assert rec <= len(p) - pos, "dirent runs past the reply"
                offset = off
                yield p[pos + DIRENT.size : pos + DIRENT.size + namelen]
                pos += rec
            assert pos == len(p)

    def read(self, ctx: FileContext, offset: int, length: int) -> bytes:
        """svc:Read: READs of min(length, max_pages * 4096) into the caller's buffer until done
        or short; each reply's length is checked as the service does."""
        buf_size = min(self.max_pages * PAGE, length)
        data = bytearray()
        while length:
            size = min(length, buf_size)
            self.unique += 1
            unique = self.unique
            req = IN_HDR.pack(80, READ, unique, ctx.node_id, 0, 0, 4242, 0, 0) + READ_IN.pack(
                ctx.file_handle, offset, size, 0, 0, 0, 0)
            used, (hdr, body) = self.submit(req, [16, size])
            olen, error, ouniq = OUT_HDR.unpack(hdr)
            assert ouniq == unique and olen == used, (ouniq, unique, olen, used)
            if error:
                raise FuseReplyError(-error, f"READ errno {-error}")
            assert 16 <= olen <= 16 + size, (olen, size)
            got = olen - 16
            data += body[:got]
            if got < size:
                break
            offset += got
            length -= got
        return bytes(data)

    def close(self, ctx: FileContext) -> None:
        """svc:Close -> SubmitReleaseRequest."""
        if ctx.entry is not None and ctx.entry.attr.mode & 0o170000 == 0o120000:
            return
        op = RELEASEDIR if ctx.is_directory else RELEASE
        p = self.request(op, ctx.node_id, struct.pack("<QIIQ", ctx.file_handle, 0, 0, 0), 16)
        assert p == b""

    def forget(self, nodeid: int, nlookup: int) -> int:
        """FORGET on hiprio with no reply buffer (what a driver that passed it on would send);
        returns the used length (must be 0)."""
        self.unique += 1
        req = IN_HDR.pack(48, FORGET, self.unique, nodeid, 0, 0, 4242, 0, 0) + struct.pack("<Q", nlookup)
        used, _ = self.submit(req, [], queue=HIPRIO)
        return used

    def destroy(self) -> None:
        """svc:SubmitDestroyRequest."""
        assert self.request(DESTROY, FUSE_ROOT_ID, b"", 16) == b""

    def mount(self) -> tuple[tuple[int, ...], tuple[int, ...], EntryOut]:
        """svc:VIRTFS::Start and WinFsp's first calls: INIT, STATFS, LOOKUP "." of the root."""
        return self.init(), self.statfs(), self.lookup_path("\\")


__all__ = ["Attr", "DirEntryPlus", "EntryOut", "FileContext", "FuseReplyError", "ViofsGuest", "page_fragments"]
