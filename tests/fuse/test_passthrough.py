"""FUSE passthrough, sans-IO: INIT negotiates PASSTHROUGH (flags2 bit 5, with max_stack_depth)
only when the kernel offers it and the filesystem asks, and OPEN replies carry the backing id."""

import errno
import struct

import pytest

from nydus_py.fuse.abi import FOpenFlags, InitFlags
from nydus_py.fuse.api import DEFAULT_WANT, Opened, OpenResult
from nydus_py.fuse.protocol import FuseSession

from .kernel import KERNEL_645_FLAGS, KERNEL_645_FLAGS2, Kernel, decode_init_out
from .memfs import MemFS

PASSTHROUGH_BIT2 = 1 << (37 - 32)  # FUSE_PASSTHROUGH in init_in/out.flags2
INIT_EXT = 1 << 30
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id


class PassFS(MemFS):
    """A MemFS that wants passthrough and answers OPEN with a fixed result."""

    def __init__(self, answer: OpenResult = (0, 0), want: InitFlags = DEFAULT_WANT | InitFlags.PASSTHROUGH) -> None:
        super().__init__(want=want)
        self.answer = answer
        self.negotiations: list[InitFlags] = []

    def negotiated(self, flags: InitFlags) -> None:
        self.negotiations.append(flags)

    def open(self, ino: int, flags: int) -> OpenResult:
        return self.answer


def test_passthrough_negotiated_with_stack_depth_one() -> None:
    assert KERNEL_645_FLAGS2 & PASSTHROUGH_BIT2  # a 6.x kernel with CONFIG_FUSE_PASSTHROUGH offers it
    fs = PassFS()
    session = FuseSession(fs)
    _, out = Kernel(session).init(45)
    o = decode_init_out(out)
    assert o["flags"] & INIT_EXT
    assert o["flags2"] & PASSTHROUGH_BIT2
    assert o["max_stack_depth"] == 1
    assert session.flags & InitFlags.PASSTHROUGH
    assert fs.negotiations and fs.negotiations[-1] & InitFlags.PASSTHROUGH
    # a filesystem that does not ask never gets it
    plain = PassFS(want=DEFAULT_WANT)
    _, out = Kernel(FuseSession(plain)).init(45)
    o = decode_init_out(out)
    assert not o["flags2"] & PASSTHROUGH_BIT2 and o["max_stack_depth"] == 0
    assert not plain.negotiations[-1] & InitFlags.PASSTHROUGH


def test_no_passthrough_when_the_kernel_does_not_offer_it() -> None:
    fs = PassFS()
    _, out = Kernel(FuseSession(fs)).init(45, flags2=KERNEL_645_FLAGS2 & ~PASSTHROUGH_BIT2)
    o = decode_init_out(out)
    assert not o["flags2"] & PASSTHROUGH_BIT2
    assert o["max_stack_depth"] == 0
    assert not fs.negotiations[-1] & InitFlags.PASSTHROUGH


def test_no_passthrough_without_init_ext() -> None:
    fs = PassFS()
    _, out = Kernel(FuseSession(fs)).init(45, flags=KERNEL_645_FLAGS & ~INIT_EXT)
    o = decode_init_out(out)
    assert o["flags2"] == 0 and o["max_stack_depth"] == 0
    assert not fs.negotiations[-1] & InitFlags.PASSTHROUGH


def test_stack_depth_outside_the_kernel_limit_drops_passthrough() -> None:
    for depth in (0, 3):
        fs = PassFS()
        _, out = Kernel(FuseSession(fs, max_stack_depth=depth)).init(45)
        o = decode_init_out(out)
        assert not o["flags2"] & PASSTHROUGH_BIT2 and o["max_stack_depth"] == 0
    fs = PassFS()
    _, out = Kernel(FuseSession(fs, max_stack_depth=2)).init(45)
    assert decode_init_out(out)["max_stack_depth"] == 2


def test_open_reply_carries_the_backing_id() -> None:
    fs = PassFS(Opened(9, FOpenFlags.PASSTHROUGH, 7))
    k = Kernel(FuseSession(fs))
    k.init(45)
    err, out = k.open(2)
    assert err == 0
    assert OPEN_OUT.unpack(out) == (9, FOpenFlags.PASSTHROUGH, 7)


def test_plain_open_reply_has_no_backing_id() -> None:
    for answer in ((3, FOpenFlags.KEEP_CACHE), Opened(3, FOpenFlags.KEEP_CACHE, 5)):
        fs = PassFS(answer)
        k = Kernel(FuseSession(fs))
        k.init(45)
        err, out = k.open(2)
        assert err == 0 and OPEN_OUT.unpack(out) == (3, FOpenFlags.KEEP_CACHE, 0)


def test_passthrough_open_without_negotiation_or_id_is_eio(caplog: pytest.LogCaptureFixture) -> None:
    """The kernel would fail the open(2) itself; the filesystem bug is logged and answered EIO."""
    fs = PassFS(Opened(0, FOpenFlags.PASSTHROUGH, 7))
    k = Kernel(FuseSession(fs))
    k.init(45, flags2=KERNEL_645_FLAGS2 & ~PASSTHROUGH_BIT2)
    assert k.open(2)[0] == errno.EIO
    assert "passthrough is not negotiated" in caplog.text
    caplog.clear()
    fs = PassFS(Opened(0, FOpenFlags.PASSTHROUGH, 0))
    k = Kernel(FuseSession(fs))
    k.init(45)
    assert k.open(2)[0] == errno.EIO
    assert "backing id 0" in caplog.text


def test_restored_connection_tells_the_filesystem() -> None:
    fs = PassFS()
    first = FuseSession(fs)
    Kernel(first).init(45)
    heir_fs = PassFS()
    heir = FuseSession(heir_fs)
    heir.restore_state(first.export_state())
    assert heir_fs.negotiations and heir_fs.negotiations[-1] & InitFlags.PASSTHROUGH
