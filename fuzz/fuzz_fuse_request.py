"""Coverage-guided fuzzing of the FUSE request decoder (`FuseSession.handle`) with atheris.

The session serves a real RAFS v6 image built by our builder (read-only), or, when the input
asks for it, a writable variant whose mutating methods only check what the decoder handed them
(names are one valid component, WRITE data is as long as it says) and answer EROFS: nothing on
the host is touched.

Input layout: byte 0 = flags (bit 0: send a standard INIT first; bit 1: writable variant), then
requests, each as a little-endian u16 length followed by that many bytes.

Per request the only allowed outcomes are: FuseProtocolError for fewer than 40 bytes; no reply
for the no-reply opcodes; otherwise a reply whose out header has len == the reply's length,
the request's unique, error 0 or -errno (1..4095) and nothing after an error header. The debug
decoders (describe_request/describe_reply) must not raise. A handler exception turned into EIO
by the session's catch-all (logged with a traceback) is a decoder bug too, and fails the input.
"""

from __future__ import annotations

import errno
import logging
import struct
import sys
import tempfile
from pathlib import Path

import atheris
from common import Tally, corpus_dir

with atheris.instrument_imports(include=["nydus_py.fuse", "nydus_py.fs.rafs_fs", "nydus_py.fs.readahead"]):
    from nydus_py.fs.rafs_fs import RafsFilesystem
    from nydus_py.fuse.abi import NO_REPLY_OPCODES, Opcode
    from nydus_py.fuse.api import Caller, Entry, FuseError, SetAttr
    from nydus_py.fuse.protocol import FuseProtocolError, FuseSession, describe_reply, describe_request

from nydus_py.builder.build import build_image  # noqa: E402
from nydus_py.builder.options import BuildOptions  # noqa: E402
from nydus_py.builder.sources import tree_from_directory  # noqa: E402
from nydus_py.rafs import open_bootstrap  # noqa: E402
from nydus_py.rafs.model import RafsImage  # noqa: E402
from nydus_py.storage.device import BlobDevice  # noqa: E402
from nydus_py.storage.localfs import LocalBlobDir  # noqa: E402
from tests.reliability.sweep import source_tree  # noqa: E402

TALLY = Tally("fuse", unit="requests")  # an input carries several
HDR = struct.Struct("<IIQQIIIHH")
OUT = struct.Struct("<IiQ")
INIT = HDR.pack(104, Opcode.INIT, 1, 0, 0, 0, 1, 0, 0) + struct.pack("<IIIII44x", 7, 45, 1 << 17, 0x73FFFFFB, 0x5FD)


class Caught(logging.Handler):
    """Collects records logged with a traceback: the session's catch-all for handler bugs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


CAUGHT = Caught()


def _check_name(name: bytes) -> None:
    if not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise AssertionError(f"decoder passed the filesystem an invalid name {name!r}")


class CheckingWritable(RafsFilesystem):
    """Writable as far as the session knows; every mutating call checks its arguments, then EROFS."""

    writable = True

    def _refuse(self, *names: bytes) -> None:
        for n in names:
            _check_name(n)
        raise FuseError(errno.EROFS)

    def setattr(self, ino: int, attr: SetAttr) -> tuple[object, float]:  # type: ignore[override]
        self._refuse()
        raise AssertionError

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Entry:
        self._refuse(name)
        raise AssertionError

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        self._refuse(name)
        raise AssertionError

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        if not target or b"\0" in target:
            raise AssertionError(f"symlink target {target!r}")
        self._refuse(name)
        raise AssertionError

    def link(self, ino: int, newparent: int, newname: bytes) -> Entry:
        self._refuse(newname)
        raise AssertionError

    def unlink(self, parent: int, name: bytes) -> None:
        self._refuse(name)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._refuse(name)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        self._refuse(name, newname)

    def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[Entry, int, int]:
        self._refuse(name)
        raise AssertionError

    def write(self, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        self._refuse()
        raise AssertionError

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        if not name or b"\0" in name:
            raise AssertionError(f"xattr name {name!r}")
        self._refuse()

    def removexattr(self, ino: int, name: bytes) -> None:
        if not name or b"\0" in name:
            raise AssertionError(f"xattr name {name!r}")
        self._refuse()

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        self._refuse()


IMAGE: RafsImage | None = None
DEVICE: BlobDevice | None = None


def check_reply(req: bytes, reply: bytes | None) -> str:
    length, opcode, unique = struct.unpack_from("<IIQ", req)
    if reply is None:
        if opcode not in NO_REPLY_OPCODES:
            raise AssertionError(f"no reply to opcode {opcode}")
        return "no reply"
    if len(reply) < OUT.size:
        raise AssertionError(f"reply of {len(reply)} bytes")
    rlen, error, runique = OUT.unpack_from(reply)
    if rlen != len(reply) or runique != unique:
        raise AssertionError(f"out header len {rlen}/{len(reply)} unique {runique}/{unique}")
    if error > 0 or error < -4095 or (error and rlen != OUT.size):
        raise AssertionError(f"out header error {error} with len {rlen}")
    return "error reply" if error else "ok reply"


def one_input(data: bytes) -> None:
    if not data:
        return
    assert IMAGE is not None and DEVICE is not None
    flags, pos = data[0], 1
    fs = (CheckingWritable if flags & 2 else RafsFilesystem)(IMAGE, DEVICE)
    session = FuseSession(fs)
    if flags & 1:
        session.handle(INIT)
    CAUGHT.records.clear()
    while pos + 2 <= len(data):
        (n,) = struct.unpack_from("<H", data, pos)
        req = data[pos + 2 : pos + 2 + n]
        pos += 2 + n
        describe_request(req)
        if len(req) < HDR.size:
            try:
                session.handle(req)
            except FuseProtocolError:
                TALLY.add("short")
                continue
            raise AssertionError(f"a {len(req)}-byte fragment was answered")
        reply = session.handle(req)
        describe_reply(reply)
        TALLY.add(check_reply(req, reply))
        if CAUGHT.records:
            r = CAUGHT.records[0]
            raise AssertionError(f"handler exception answered as EIO: {r.getMessage()}") from (
                r.exc_info[1] if r.exc_info else None
            )


def request(opcode: int, nodeid: int, args: bytes = b"", unique: int = 2) -> bytes:
    return HDR.pack(40 + len(args), opcode, unique, nodeid, 1000, 1000, 42, 0, 0) + args


def seeds(fs: RafsFilesystem) -> list[bytes]:
    """Valid request sequences for every opcode the session routes, against real inodes."""

    def ino(parent: int, name: bytes) -> int:
        return fs.lookup(parent, name)[0]

    small, a = ino(1, b"small"), ino(1, b"a")
    sym, multi, many = ino(1, b"sym"), ino(1, b"multi"), ino(1, b"many")
    rd = struct.pack("<QQIIQII", 0, 0, 4096, 0, 0, 0, 0)
    reqs = [
        [request(Opcode.LOOKUP, 1, b"small\0"), request(Opcode.LOOKUP, a, b"longsym\0")],
        [request(Opcode.GETATTR, small, bytes(16)), request(Opcode.STATFS, 1)],
        [request(Opcode.OPEN, multi, struct.pack("<II", 0, 0)), request(Opcode.READ, multi, rd),
         request(Opcode.READ, multi, struct.pack("<QQIIQII", 0, 5000, 8192, 0, 0, 0, 0)),
         request(Opcode.LSEEK, multi, struct.pack("<QQII", 0, 100, 3, 0)),
         request(Opcode.FLUSH, multi, struct.pack("<QIIQ", 0, 0, 0, 0)),
         request(Opcode.RELEASE, multi, struct.pack("<QIIQ", 0, 0, 0, 0))],
        [request(Opcode.OPENDIR, many, struct.pack("<II", 0, 0)), request(Opcode.READDIR, many, rd),
         request(Opcode.READDIRPLUS, many, struct.pack("<QQIIQII", 0, 7, 4096, 0, 0, 0, 0)),
         request(Opcode.RELEASEDIR, many, struct.pack("<QIIQ", 0, 0, 0, 0))],
        [request(Opcode.READLINK, sym), request(Opcode.ACCESS, small, struct.pack("<II", 4, 0))],
        [request(Opcode.GETXATTR, small, struct.pack("<II", 100, 0) + b"user.one\0"),
         request(Opcode.LISTXATTR, small, struct.pack("<II", 0, 0)),
         request(Opcode.LISTXATTR, small, struct.pack("<II", 200, 0))],
        [request(Opcode.FORGET, small, struct.pack("<Q", 1)),
         request(Opcode.BATCH_FORGET, 0, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", small, 1, a, 1)),
         request(Opcode.INTERRUPT, 0, struct.pack("<Q", 2))],
        [request(Opcode.MKDIR, a, struct.pack("<II", 0o755, 0o22) + b"newdir\0"),
         request(Opcode.CREATE, a, struct.pack("<IIII", 0o101, 0o644, 0o22, 0) + b"newfile\0"),
         request(Opcode.MKNOD, a, struct.pack("<IIII", 0o10644, 0, 0o22, 0) + b"fifo2\0"),
         request(Opcode.SYMLINK, a, b"ln\0target\0"), request(Opcode.UNLINK, 1, b"small\0"),
         request(Opcode.RMDIR, 1, b"empty-dir\0"),
         request(Opcode.RENAME, 1, struct.pack("<Q", a) + b"small\0moved\0"),
         request(Opcode.RENAME2, 1, struct.pack("<QII", a, 1, 0) + b"small\0moved\0"),
         request(Opcode.LINK, a, struct.pack("<Q", small) + b"hl2\0")],
        [request(Opcode.WRITE, small, struct.pack("<QQIIQII", 0, 0, 3, 0, 0, 0, 0) + b"abc"),
         request(Opcode.SETATTR, small, struct.pack("<IIQQQQQQIIIIIIII", 8, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0,
                                                    0o644, 0, 0, 0, 0)),
         request(Opcode.SETXATTR, small, struct.pack("<II", 2, 0) + b"user.n\0hi"),
         request(Opcode.REMOVEXATTR, small, b"user.one\0"),
         request(Opcode.FALLOCATE, small, struct.pack("<QQQII", 0, 0, 4096, 0, 0)),
         request(Opcode.FSYNC, small, struct.pack("<QII", 0, 1, 0))],
        [request(Opcode.DESTROY, 0), request(Opcode.GETATTR, 1, bytes(16)), request(9999, 1)],
    ]
    out = []
    for seq in reqs:
        body = b"".join(struct.pack("<H", len(r)) + r for r in seq)
        out += [b"\x01" + body, b"\x03" + body]
    return out


def main() -> None:
    global IMAGE, DEVICE
    argv = list(sys.argv)
    corpus = corpus_dir(argv, "/tmp/nydus-fuzz/fuse")
    log = logging.getLogger("nydus_py")
    log.setLevel(logging.ERROR)
    log.addHandler(CAUGHT)
    log.propagate = False
    with tempfile.TemporaryDirectory(prefix="nydus-fuzz-fuse-") as tmp:
        src, blobs, boot = Path(tmp) / "src", Path(tmp) / "blobs", Path(tmp) / "image.boot"
        source_tree(src)
        build_image(tree_from_directory(src), str(boot), str(blobs), BuildOptions(chunk_size=0x1000))
        IMAGE = open_bootstrap(str(boot))
        DEVICE = BlobDevice(IMAGE, LocalBlobDir(str(blobs)), validate=True)
        if not (corpus.is_dir() and any(corpus.iterdir())):
            corpus.mkdir(parents=True, exist_ok=True)
            for k, s in enumerate(seeds(RafsFilesystem(IMAGE, DEVICE))):
                (corpus / f"seed-{k:03d}").write_bytes(s)
        atheris.Setup(argv, one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
