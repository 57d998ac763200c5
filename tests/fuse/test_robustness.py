"""Garbage, truncated and hostile requests: the handler answers with a well-formed error or stays
silent, raises only FuseProtocolError (for fragments shorter than a header), and keeps working."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.fuse.protocol import FuseProtocolError, FuseSession

from . import kernel as K
from .kernel import Kernel, check_out_header
from .memfs import MemFS

NO_REPLY = {K.FORGET, K.BATCH_FORGET, K.INTERRUPT, K.NOTIFY_REPLY}
OPCODES = list(range(0, 56)) + [4096, 0xFFFFFFFF]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def session(initialized: bool = True) -> FuseSession:
    s = FuseSession(MemFS())
    if initialized:
        Kernel(s).init(45)
    return s


def check(s: FuseSession, req: bytes) -> bytes | None:
    """Run one request and check the only outcomes the handler may have."""
    if len(req) < 40:
        with pytest.raises(FuseProtocolError):
            s.handle(req)
        return None
    length, opcode, unique = struct.unpack_from("<IIQ", req)
    reply = s.handle(memoryview(req))
    if opcode in NO_REPLY:
        assert reply is None
        return None
    assert reply is not None
    check_out_header(reply, unique)
    return reply


def still_works(s: FuseSession) -> None:
    k = Kernel(s, unique=10_000)
    err, p = k.lookup(1, b"hello")
    assert err == 0 and struct.unpack_from("<Q", p)[0] == 2


@SETTINGS
@given(data=st.binary(max_size=300), initialized=st.booleans())
def test_random_bytes(data: bytes, initialized: bool) -> None:
    s = session(initialized)
    check(s, data)
    if initialized:
        still_works(s)


@SETTINGS
@given(
    opcode=st.sampled_from(OPCODES),
    nodeid=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 999, 2**64 - 1]),
    args=st.binary(max_size=200),
    len_delta=st.integers(-60, 60),
    extlen=st.sampled_from([0, 0, 0, 1, 2, 0xFFFF]),
)
def test_random_args_and_lengths(opcode: int, nodeid: int, args: bytes, len_delta: int, extlen: int) -> None:
    s = session()
    length = max(0, min(2**32 - 1, 40 + len(args) + len_delta))
    req = struct.pack("<IIQQIIIHH", length, opcode, 42, nodeid, 0, 0, 1, extlen, 0) + args
    reply = check(s, req)
    if reply is not None and length > len(req):
        assert struct.unpack_from("<i", reply, 4)[0] < 0  # a header promising more than it carries
    if not s.initialized:
        assert opcode == K.DESTROY
        Kernel(s).init(45)
    still_works(s)


def _valid_requests() -> list[bytes]:
    k = Kernel(FuseSession(MemFS()))
    reqs = [
        k.build(K.INIT, 0, struct.pack("<IIIII44x", 7, 45, 131072, K.KERNEL_645_FLAGS, K.KERNEL_645_FLAGS2))[1],
        k.build(K.LOOKUP, 1, b"hello\0")[1],
        k.build(K.GETATTR, 2, bytes(16))[1],
        k.build(K.OPEN, 2, struct.pack("<II", 0, 0))[1],
        k.build(K.READ, 2, struct.pack("<QQIIQII", 102, 0, 4096, 0, 0, 0, 0))[1],
        k.build(K.READDIR, 6, struct.pack("<QQIIQII", 206, 0, 4096, 0, 0, 0, 0))[1],
        k.build(K.READDIRPLUS, 1, struct.pack("<QQIIQII", 201, 2, 4096, 0, 0, 0, 0))[1],
        k.build(K.GETXATTR, 2, struct.pack("<II", 0, 0) + b"user.greeting\0")[1],
        k.build(K.LISTXATTR, 2, struct.pack("<II", 100, 0))[1],
        k.build(K.BATCH_FORGET, 0, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 2, 1, 3, 1))[1],
        k.build(K.LSEEK, 2, struct.pack("<QQII", 102, 0, 3, 0))[1],
        k.build(K.RELEASE, 2, struct.pack("<QIIQ", 102, 0, 0, 0))[1],
        k.build(K.ACCESS, 2, struct.pack("<II", 4, 0))[1],
        k.build(K.WRITE, 2, struct.pack("<QQIIQII", 102, 0, 3, 0, 0, 0, 0) + b"abc")[1],
    ]
    return reqs


VALID = _valid_requests()


@SETTINGS
@given(which=st.integers(0, len(VALID) - 1), cut=st.integers(0, 300), fix_len=st.booleans())
def test_truncated_valid_requests(which: int, cut: int, fix_len: bool) -> None:
    s = session()
    req = VALID[which][:cut]
    if fix_len and len(req) >= 40:
        req = struct.pack("<I", len(req)) + req[4:]  # as if the kernel had sent only this much
    check(s, req)
    still_works(s)


@SETTINGS
@given(which=st.integers(0, len(VALID) - 1), pos=st.integers(0, 299), byte=st.integers(0, 255))
def test_corrupted_valid_requests(which: int, pos: int, byte: int) -> None:
    s = session()
    req = bytearray(VALID[which])
    if pos < len(req):
        req[pos] = byte
    check(s, bytes(req))
    still_works(s)


class Exploding(MemFS):
    """Every call fails with whatever the test picked."""

    exc: BaseException = RuntimeError()

    def _raise(self, *args: object, **kw: object) -> object:
        raise self.exc

    lookup = getattr = readlink = open = read = readdir = opendir = statfs = _raise  # type: ignore[assignment]
    getxattr = listxattr = access = lseek = release = releasedir = forget = _raise  # type: ignore[assignment]


@SETTINGS
@given(
    which=st.integers(1, len(VALID) - 1),
    exc=st.sampled_from([RuntimeError("x"), KeyError(1), ValueError(), struct.error("y"), TypeError(),
                         OSError(), OSError(99999, "big"), OSError(-5, "neg"), IndexError(), RecursionError()]),
)
def test_filesystem_exceptions_become_eio(which: int, exc: Exception) -> None:
    fs = Exploding()
    fs.exc = exc
    s = FuseSession(fs)
    Kernel(s).init(45)
    req = VALID[which]
    reply = check(s, req)
    opcode = struct.unpack_from("<I", req, 4)[0]
    if reply is not None and opcode not in (K.WRITE,):
        assert struct.unpack_from("<i", reply, 4)[0] == -5  # EIO


def test_fragments_shorter_than_a_header_raise() -> None:
    s = session()
    for n in (0, 1, 16, 39):
        with pytest.raises(FuseProtocolError):
            s.handle(bytes(n))
    still_works(s)
