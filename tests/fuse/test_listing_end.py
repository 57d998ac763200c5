"""A walk's next listing is warmed after the reply that holds a listing's last entries, a round
trip before the empty READDIR(PLUS) that ends it would (no kernel: requests as it sends them)."""

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.protocol import FuseSession, Then
from tests.fuse.kernel import READDIR, READDIRPLUS, Kernel, decode_direntplus, decode_dirents
from tests.fuse.warm_rig import warm_session


@contextmanager
def _session(tmp_path: Path) -> Iterator[tuple[Kernel, FuseSession, RafsFilesystem]]:
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        (src / d / "f").write_bytes(d.encode())
    for i in range(40):  # a directory that takes several replies of 4 KiB
        (src / f"{'n' * 60}{i:03d}").write_bytes(b"x")
    with warm_session(src, tmp_path / "img") as rig:
        yield rig


def _list(k: Kernel, session: FuseSession, nodeid: int, size: int, plus: bool = True) -> list[bool]:
    """List directory `nodeid` to its end in replies of at most `size` bytes, as getdents does
    (the last request gets the empty reply); the work after each reply is done as the /dev/fuse
    worker does it. Per reply: whether it came with work after it."""
    offset, thens = 0, []
    while True:
        _u, req = k.build(READDIRPLUS if plus else READDIR, nodeid, struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0))
        reply = session.handle_vectored(req)  # (as the /dev/fuse worker: the header keeps its work)
        assert reply is not None
        head, body = reply[0], b"".join(reply[1:])
        assert isinstance(head, bytes) and struct.unpack_from("<i", head, 4)[0] == 0
        thens.append(type(head) is Then)
        if type(head) is Then:
            head.after()
        payload = bytes(head[16:]) + bytes(body)
        if not payload:
            return thens
        offs = [e[2] for e in decode_direntplus(payload)] if plus else [e[1] for e in decode_dirents(payload)]
        offset = offs[-1]


def test_the_reply_with_the_last_entries_warms_the_next_listing_and_the_end_does_not(tmp_path: Path) -> None:
    with _session(tmp_path) as (k, session, fs):
        # the root needs several 4 KiB replies: only the one that holds its last entries (with
        # room to spare for any further one) warms; the empty reply after it does not again
        thens = _list(k, session, 1, 4096)
        assert len(thens) > 2 and thens[-1] is False and thens.count(True) == 1, thens
        assert fs.walk.predicted == 1  # the root's first subdirectory, `a`
        # `a` fits one reply: it warms (`b`, next after it in the root) and its end does not
        _e, entry = k.lookup(1, b"a")
        a = struct.unpack_from("<Q", entry)[0]
        assert _list(k, session, a, 4096) == [True, False]
        assert fs.walk.predicted == 2
        assert _list(k, session, a, 4096, plus=False) == [True, False]  # (READDIR as well)


def test_a_reply_cut_short_by_its_buffer_leaves_the_warm_up_to_the_end(tmp_path: Path) -> None:
    with _session(tmp_path) as (k, session, fs):
        # 300 bytes hold `.`, `..` and a bit: each reply is full until the empty one, which warms
        thens = _list(k, session, 1, 300)
        assert thens[-1] is True and thens.count(True) == 1, thens
        assert fs.walk.predicted == 1
        session.warm_max = 0  # warming off: no reply carries work
        assert not any(_list(k, session, 1, 4096))
