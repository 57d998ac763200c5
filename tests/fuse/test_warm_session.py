"""The session's warm gate over a real image, request by request (no kernel): while warming is
off it samples small files' LOOKUPs, not every LOOKUP, so a walk whose LOOKUPs come in a
fixed pattern of directories and files cannot hide its files from the sample."""

import struct
from pathlib import Path

from nydus_py.fuse.protocol import FuseSession, Then
from tests.fuse.kernel import LOOKUP, Kernel
from tests.fuse.warm_rig import warm_session


def _lookup(k: Kernel, session: FuseSession, parent: int, name: str) -> int:
    """LOOKUP as the kernel sends it; a reply with work after it has that work done (as the
    /dev/fuse worker does once the reply is written). The new nodeid."""
    _u, req = k.build(LOOKUP, parent, name.encode() + b"\0")
    reply = session.handle(req)
    assert reply is not None and struct.unpack_from("<i", reply, 4)[0] == 0, name
    if type(reply) is Then:
        reply.after()
    return int(struct.unpack_from("<Q", reply, 16)[0])


def test_files_looked_up_between_directories_in_a_fixed_pattern_still_bring_warming_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("dA", "dB", "dC"):
        (src / d).mkdir(parents=True)
    for i in range(17):
        (src / f"f{i:02d}").write_bytes(b"s" * (50 + i))
    for i in range(60):
        (src / "dA" / f"g{i:02d}").write_bytes(bytes([i]) * (200 + i))
    with warm_session(src, tmp_path / "img") as (k, session, fs):
        gate = session.warm_gate
        for i in range(17):  # stat'ed only: the 17th pushes an unread LOOKUP out, warming stops
            _lookup(k, session, 1, f"f{i:02d}")
        assert gate.score < 0
        hits = fs.device.warmed.hits
        for i in range(60):  # then read, each path walked as: dA, dA/gNN, dB, dC (4 LOOKUPs per file)
            da = _lookup(k, session, 1, "dA")
            g = _lookup(k, session, da, f"g{i:02d}")
            _lookup(k, session, 1, "dB")
            _lookup(k, session, 1, "dC")
            err, data = k.read(g, 0, 0, 4096)
            assert err == 0 and data == bytes([i]) * (200 + i)
        # counting every LOOKUP, the files would always fall on the same place of the sample
        # and never be watched; counting only small files' LOOKUPs, one in `sample` is
        assert gate.score >= 0 and fs.device.warmed.hits > hits, vars(gate)
