"""The request observer (the daemon's metrics) sees every request that has a header exactly
once, with the opcode, inode and unique the request carried and the reply the session returned:
answers, errors the filesystem raised, unknown and malformed requests, requests with no reply."""

import struct
from typing import Any

import pytest

from nydus_py.fuse.protocol import FuseProtocolError, FuseSession, Reply

from . import kernel as K
from .kernel import Kernel
from .memfs import MemFS

FORGET = 2


class Recorder:
    def __init__(self) -> None:
        self.open: dict[int, tuple[int, int, int]] = {}
        self.done: list[tuple[tuple[int, int, int], Any]] = []

    def started(self, opcode: int, nodeid: int, unique: int) -> object:
        token = (opcode, nodeid, unique)
        assert unique not in self.open
        self.open[unique] = token
        return token

    def finished(self, token: object, reply: Reply) -> None:
        assert isinstance(token, tuple)
        del self.open[token[2]]
        self.done.append((token, reply))


class Broken(MemFS):
    def getattr(self, ino: int) -> Any:
        raise RuntimeError("broken on purpose")


@pytest.mark.parametrize("debug", [False, True])
def test_every_request_is_observed_once_with_its_reply(debug: bool) -> None:
    session = FuseSession(Broken(), debug=debug)
    rec = Recorder()
    session.set_observer(rec)
    k = Kernel(session)
    assert k.init(45)[0] == 0

    def sent(opcode: int, nodeid: int, args: bytes = b"", **kw: Any) -> tuple[int, bytes | None]:
        unique, req = k.build(opcode, nodeid, args, **kw)
        got = session.handle_vectored(req)
        return unique, None if got is None else b"".join(got)

    cases = [(K.LOOKUP, 1, b"hello\0"),  # an answer
             (K.LOOKUP, 1, b"nothing-here\0"),  # ENOENT from the filesystem
             (K.GETATTR, 1, bytes(16)),  # an exception: EIO
             (4000, 1, b""),  # an unknown opcode
             (K.READ, 2, b"short"),  # malformed: too short for its op
             (FORGET, 2, struct.pack("<Q", 1))]  # no reply
    for opcode, nodeid, args in cases:
        before = len(rec.done)
        unique, reply = sent(opcode, nodeid, args)
        assert len(rec.done) == before + 1 and not rec.open
        token, seen = rec.done[-1]
        assert token == (opcode, nodeid, unique)
        seen_bytes = None if seen is None else b"".join(seen) if isinstance(seen, tuple) else seen
        assert seen_bytes == reply
        if opcode != FORGET:
            assert reply is not None and struct.unpack_from("<iQ", reply, 4)[1] == unique
    errors = [struct.unpack_from("<i", r, 4)[0] for (_t, r) in rec.done[1:5]]
    assert errors[0] == 0 and all(e < 0 for e in errors[1:])
    with pytest.raises(FuseProtocolError):  # no header: nothing to observe, nothing to answer
        session.handle(b"\0" * 10)
    assert not rec.open
