"""FUSE_INIT negotiation against kernels of different protocol minors, byte by byte."""

import errno
import struct

import pytest

from nydus_py.fuse.abi import InitFlags
from nydus_py.fuse.api import DEFAULT_WANT
from nydus_py.fuse.protocol import FuseSession

from .kernel import (
    DESTROY,
    GETATTR,
    INIT,
    KERNEL_631_FLAGS,
    KERNEL_636_FLAGS,
    KERNEL_636_FLAGS2,
    KERNEL_645_FLAGS,
    KERNEL_645_FLAGS2,
    VIRTIOFS_638_FLAGS,
    VIRTIOFS_638_FLAGS2,
    Kernel,
    decode_init_out,
)
from .memfs import MemFS

# ASYNC_READ | EXPORT_SUPPORT | BIG_WRITES | DO_READDIRPLUS | READDIRPLUS_AUTO | PARALLEL_DIROPS
# | MAX_PAGES | CACHE_SYMLINKS, written out from the fuse.h bit numbers 0, 4, 5, 13, 14, 18, 22, 23
OUR_FLAGS = 0x1 | 0x10 | 0x20 | 0x2000 | 0x4000 | 0x40000 | 0x400000 | 0x800000
INIT_EXT = 1 << 30


def new(**kw: object) -> tuple[Kernel, MemFS, FuseSession]:
    fs = MemFS()
    session = FuseSession(fs, **kw)  # type: ignore[arg-type]
    return Kernel(session), fs, session


@pytest.mark.parametrize(
    ("minor", "flags", "flags2", "want_flags"),
    [
        (45, KERNEL_645_FLAGS, KERNEL_645_FLAGS2, OUR_FLAGS | INIT_EXT),
        (38, VIRTIOFS_638_FLAGS, VIRTIOFS_638_FLAGS2, OUR_FLAGS | INIT_EXT),
        (36, KERNEL_636_FLAGS, KERNEL_636_FLAGS2, OUR_FLAGS | INIT_EXT),
        (31, KERNEL_631_FLAGS, 0, OUR_FLAGS),
    ],
)
def test_init_modern_minors(minor: int, flags: int, flags2: int, want_flags: int) -> None:
    k, fs, session = new()
    err, out = k.init(minor, flags, flags2)
    assert err == 0
    assert len(out) == 64  # init_out has been 64 bytes since 7.23
    o = decode_init_out(out)
    assert (o["major"], o["minor"]) == (7, minor)
    assert o["flags"] == want_flags
    assert o["flags"] & ~flags == 0, "answered a flag the kernel did not offer"
    assert o["flags2"] == 0  # nothing from the high half: no secctx, DAX, passthrough, io_uring
    assert o["max_readahead"] == 128 * 1024
    assert o["max_write"] == 1 << 20
    assert o["max_pages"] == 256
    assert o["time_gran"] == 1
    assert (o["max_background"], o["congestion_threshold"]) == (0, 0)  # kernel defaults
    assert (o["map_alignment"], o["max_stack_depth"], o["request_timeout"]) == (0, 0, 0)
    assert out[42:] == b"\0" * 22
    assert session.initialized and session.proto_minor == minor and session.kernel_minor == minor
    offered = flags | (flags2 << 32 if flags & INIT_EXT and minor >= 36 else 0)
    assert fs.capable == [InitFlags(offered)]


def test_init_newer_kernel_minor_is_capped_to_ours() -> None:
    k, _, session = new()
    err, out = k.init(46)
    assert err == 0 and decode_init_out(out)["minor"] == 45
    assert session.proto_minor == 45 and session.kernel_minor == 46


def test_init_minor_22_gets_the_24_byte_reply() -> None:
    k, _, _ = new()
    err, out = k.init(22, flags=0xFFFB, flags2=0)
    assert err == 0
    assert len(out) == 24
    o = decode_init_out(out)
    assert (o["major"], o["minor"]) == (7, 22)
    # PARALLEL_DIROPS, MAX_PAGES, CACHE_SYMLINKS did not exist yet: never answered
    assert o["flags"] == 0x1 | 0x10 | 0x20 | 0x2000 | 0x4000
    assert o["max_write"] == 1 << 20


def test_init_only_offered_flags() -> None:
    k, _, _ = new()
    offered = 0x1 | 0x20 | 0x2000  # ASYNC_READ, BIG_WRITES, DO_READDIRPLUS
    _, out = k.init(45, flags=offered, flags2=0)
    o = decode_init_out(out)
    assert o["flags"] == offered
    assert o["max_pages"] == 0  # no FUSE_MAX_PAGES negotiated -> the field stays 0


def test_init_never_splice_or_writeback_even_if_wanted() -> None:
    fs = MemFS(want=DEFAULT_WANT | InitFlags.SPLICE_READ | InitFlags.SPLICE_WRITE | InitFlags.SPLICE_MOVE
               | InitFlags.WRITEBACK_CACHE | InitFlags.POSIX_LOCKS | InitFlags.SECURITY_CTX)
    k = Kernel(FuseSession(fs))
    _, out = k.init(45)
    o = decode_init_out(out)
    assert o["flags"] & (0x80 | 0x100 | 0x200 | 0x10000 | 0x2) == 0
    assert o["flags2"] == 0


def test_init_opt_in_flags_for_zero_message_open_and_acl() -> None:
    fs = MemFS(want=DEFAULT_WANT | InitFlags.NO_OPEN_SUPPORT | InitFlags.NO_OPENDIR_SUPPORT
               | InitFlags.DIRECT_IO_ALLOW_MMAP)
    k = Kernel(FuseSession(fs))
    _, out = k.init(45)
    o = decode_init_out(out)
    assert o["flags"] == OUR_FLAGS | INIT_EXT | (1 << 17) | (1 << 24)
    assert o["flags2"] == 1 << (36 - 32)


def test_init_ext_without_flags2_payload() -> None:
    # INIT_EXT set in a 16-byte init_in: there is no flags2, and we must not claim INIT_EXT
    k, fs, _ = new()
    err, out = k.call(INIT, 0, struct.pack("<IIII", 7, 36, 65536, KERNEL_636_FLAGS))
    assert err == 0
    o = decode_init_out(out)
    assert o["flags"] == OUR_FLAGS
    assert not fs.capable[0] & InitFlags.INIT_EXT


def test_init_readahead_is_the_smaller_one() -> None:
    k, _, session = new(max_readahead=64 * 1024)
    _, out = k.init(45, max_readahead=128 * 1024)
    assert decode_init_out(out)["max_readahead"] == 64 * 1024 == session.readahead
    k, _, _ = new()
    _, out = k.init(45, max_readahead=32 * 1024)
    assert decode_init_out(out)["max_readahead"] == 32 * 1024


def test_init_session_settings_reach_the_reply() -> None:
    k, _, session = new(max_write=128 * 1024, max_pages=32, max_background=64, congestion_threshold=48,
                        time_gran=1000)
    _, out = k.init(45)
    o = decode_init_out(out)
    assert (o["max_write"], o["max_pages"], o["max_background"], o["congestion_threshold"], o["time_gran"]) == (
        128 * 1024, 32, 64, 48, 1000)
    assert session.min_read_buffer >= 80 + 128 * 1024


def test_init_major_8_answers_our_version_and_waits() -> None:
    k, _, session = new()
    err, out = k.init(0, major=8)
    assert err == 0
    o = decode_init_out(out)
    assert (o["major"], o["minor"]) == (7, 45)
    assert not session.initialized
    assert k.getattr(1)[0] == errno.EIO
    assert k.init(45)[0] == 0 and session.initialized


@pytest.mark.parametrize(("major", "minor"), [(6, 45), (7, 12), (7, 0)])
def test_init_unsupported_versions_are_eproto(major: int, minor: int) -> None:
    k, fs, session = new()
    err, out = k.init(minor, major=major, flags=0, flags2=0)
    assert (err, out) == (errno.EPROTO, b"")
    assert not session.initialized and fs.capable == []


def test_init_truncated_is_einval() -> None:
    k, _, session = new()
    assert k.call(INIT, 0, struct.pack("<II", 7, 45))[0] == errno.EINVAL
    assert k.call(INIT, 0, struct.pack("<I", 7))[0] == errno.EINVAL
    assert not session.initialized


def test_requests_before_init_are_eio() -> None:
    k, _, _ = new()
    assert k.getattr(1)[0] == errno.EIO
    assert k.lookup(1, b"hello")[0] == errno.EIO
    assert k.call(999, 1)[0] == errno.EIO
    assert k.send(2, 1, struct.pack("<Q", 1)) is None  # FORGET: still never answered


def test_destroy_and_reinit() -> None:
    k, fs, session = new()
    k.init(45)
    assert k.getattr(1)[0] == 0
    assert k.call(DESTROY, 0) == (0, b"")
    assert fs.destroyed == 1 and not session.initialized
    assert k.call(GETATTR, 1, bytes(16))[0] == errno.EIO
    assert k.init(38, VIRTIOFS_638_FLAGS, VIRTIOFS_638_FLAGS2)[0] == 0
    assert k.getattr(1)[0] == 0 and session.proto_minor == 38


def test_second_init_restarts_the_session() -> None:
    k, fs, session = new()
    k.init(45)
    k.init(38, VIRTIOFS_638_FLAGS, VIRTIOFS_638_FLAGS2)
    assert fs.destroyed == 1 and len(fs.capable) == 2
    assert session.initialized and session.proto_minor == 38


def test_fs_init_failure_is_reported() -> None:
    class Broken(MemFS):
        def init(self, capable: InitFlags) -> InitFlags:
            raise RuntimeError("cannot start")

    session = FuseSession(Broken())
    k = Kernel(session)
    assert k.init(45)[0] == errno.EIO
    assert not session.initialized
