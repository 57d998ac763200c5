"""PassthroughFilesystem packs READDIRPLUS itself (`readdirplus_packed`): what the session builds
from the `readdirplus` tuples, for every piece of a listing and reply size, at the root of the
share and below a shared daemon's pseudo directories; it opens only the entries it sends, and a
reply that fails counts no lookups and leaks no fds."""

import errno
import os
import stat
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nydus_py.fs import passthrough as pt
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.vfs import INO_MASK, Vfs

from ..fuse import kernel as K
from ..fuse.kernel import Kernel, decode_direntplus, decode_entry_out

READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding


class Unpacked(PassthroughFilesystem):
    """The same filesystem without the packed path: the session packs `readdirplus` tuples."""

    def readdirplus_packed(self, ino: int, fh: int, offset: int, size: int, base: int = 0,  # type: ignore[override]
                           dotdot: int = 0) -> None:
        return None


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    big = root / "big"
    big.mkdir(parents=True)
    for i in range(60):  # several 4 KiB replies
        (big / f"a-long-file-name-to-fill-replies-{i:04d}").write_bytes(b"x" * i)
    (big / "sub").mkdir()
    (root / "file").write_bytes(b"hello")
    os.link(root / "file", root / "hard")
    os.link(root / "file", big / "hard-elsewhere")
    (root / "link").symlink_to("file")
    (root / "out").symlink_to("/etc")
    os.mkfifo(root / "fifo")
    (root / "empty").mkdir()
    os.utime(root / "file", ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))  # three distinct times
    os.utime(big / "a-long-file-name-to-fill-replies-0001", ns=(-1_500_000_000, 333_000_000_001))
    return root


_SHARED: list[PassthroughFilesystem] = []


@pytest.fixture(autouse=True)
def _close_shares() -> Iterator[None]:
    """Each test's filesystems closed after it: every inode a listing registers holds an fd,
    and a test session that kept them all reached fd numbers select() refuses (1024+)."""
    yield
    while _SHARED:
        _SHARED.pop().close()


class Share:
    """A passthrough filesystem at `at` of a Vfs, behind a session."""

    def __init__(self, fs: PassthroughFilesystem, at: str) -> None:
        self.fs = fs
        _SHARED.append(fs)
        vfs = Vfs()
        vfs.mount(at, fs)
        self.k = Kernel(FuseSession(vfs))
        self.k.uid = self.k.gid = 0
        assert self.k.init(38)[0] == 0
        self.root = 1
        for part in at.strip("/").split("/"):
            if part:
                self.root = self.lookup(self.root, part.encode())

    def lookup(self, parent: int, name: bytes) -> int:
        err, p = self.k.lookup(parent, name)
        assert err == 0, (name, errno.errorcode.get(err))
        return int(decode_entry_out(p)["nodeid"])

    def opendir(self, ino: int) -> int:
        err, p = self.k.call(K.OPENDIR, ino, struct.pack("<II", os.O_RDONLY, 0))
        assert err == 0
        return int(struct.unpack_from("<Q", p)[0])

    def readdirplus(self, ino: int, fh: int, offset: int, size: int) -> tuple[int, bytes]:
        return self.k.call(K.READDIRPLUS, ino, READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def key(self, nodeid: int) -> tuple[int, int] | int:
        """The host inode behind a nodeid (nodeids are handed out in lookup order: not compared)."""
        return self.fs._inodes[nodeid & INO_MASK].key if nodeid else 0

    def normal(self, payload: bytes) -> list[object]:
        """The records of a reply, each entry's nodeid replaced by its host inode."""
        return [({**e, "nodeid": self.key(e["nodeid"])}, ino, off, typ, name)
                for e, ino, off, typ, name in decode_direntplus(payload)]

    def pages(self, ino: int, fh: int, offset: int = 0) -> Iterator[list[Any]]:
        """The decoded 4 KiB READDIRPLUS replies of a listing from `offset` to its end."""
        while True:
            err, p = self.readdirplus(ino, fh, offset, 4096)
            assert err == 0
            recs = decode_direntplus(p)
            if not recs:
                return
            yield recs
            offset = recs[-1][2]

    def lookups(self) -> Counter[tuple[int, int]]:
        return Counter({n.key: n.nlookup for i, n in self.fs._inodes.items() if i != pt.ROOT_ID})


@pytest.mark.parametrize("at", ["/", "/shared/a"])
def test_packed_replies_equal_the_tuple_path_for_every_piece_and_size(tree: Path, at: str) -> None:
    packed, plain = Share(PassthroughFilesystem(str(tree)), at), Share(Unpacked(str(tree)), at)
    dirs = [(packed.root, plain.root)]
    for name in (b"big", b"empty"):
        dirs.append((packed.lookup(packed.root, name), plain.lookup(plain.root, name)))
    for d_packed, d_plain in dirs:
        fhs = packed.opendir(d_packed), plain.opendir(d_plain)
        (err, whole), (err2, whole2) = (packed.readdirplus(d_packed, fhs[0], 0, 1 << 20),
                                        plain.readdirplus(d_plain, fhs[1], 0, 1 << 20))
        assert err == err2 == 0 and packed.normal(whole) == plain.normal(whole2)
        n = len(decode_direntplus(whole))
        for size in (100, 152 + 8, 4096, 32768):  # none fits, one fits, pieces, all
            for offset in sorted({0, 1, 2, 3, n // 2, n - 1, n, n + 5}):
                (e1, got), (e2, want) = (packed.readdirplus(d_packed, fhs[0], offset, size),
                                         plain.readdirplus(d_plain, fhs[1], offset, size))
                assert e1 == e2 == 0
                assert packed.normal(got) == plain.normal(want), (d_packed, offset, size)
    # the same lookups counted for the same host inodes (the tuple path gives back the entry
    # that did not fit; the packed one never takes it)
    assert packed.lookups() == plain.lookups()
    recs = {name: (e, ino) for e, ino, _off, _typ, name in decode_direntplus(packed.readdirplus(
        packed.root, packed.opendir(packed.root), 0, 32768)[1])}
    assert recs[b"file"][0]["nodeid"] == recs[b"hard"][0]["nodeid"] != 0
    assert recs[b"file"][1] == os.stat(tree / "file").st_ino | (packed.root & ~INO_MASK)
    assert stat.S_ISLNK(recs[b"out"][0]["attr"]["mode"]) and stat.S_ISFIFO(recs[b"fifo"][0]["attr"]["mode"])
    assert recs[b"file"][0]["attr"]["nlink"] == 3


def test_only_the_entries_sent_are_opened(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full reply opens the entries it carries and no more: the tuple path opened (and
    registered, then forgot) one more per reply."""
    share = Share(PassthroughFilesystem(str(tree)), "/")
    big = share.lookup(1, b"big")
    fh = share.opendir(big)
    opened: list[bytes] = []
    real_open = os.open

    def counting_open(path: object, flags: int, *a: object, **kw: object) -> int:
        if kw.get("dir_fd") is not None and flags & os.O_PATH:
            opened.append(path)  # type: ignore[arg-type]
        return real_open(path, flags, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pt.os, "open", counting_open)
    sent = 0
    for recs in share.pages(big, fh):
        sent += sum(1 for e, *_ in recs if e["nodeid"])
        assert len(opened) == sent, (len(opened), sent)
    assert sent == 62  # 60 files, sub, hard-elsewhere


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_failing_entry_fails_the_reply_without_lookups_or_fds(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    share = Share(PassthroughFilesystem(str(tree)), "/")
    big = share.lookup(1, b"big")
    fh = share.opendir(big)
    before_inodes, before_fds = dict(share.fs._inodes), _fds()
    calls = []
    real_fstat = os.fstat

    def failing_fstat(fd: int) -> os.stat_result:
        calls.append(fd)
        if len(calls) == 5:
            raise OSError(errno.EIO, "injected")
        return real_fstat(fd)

    monkeypatch.setattr(pt.os, "fstat", failing_fstat)
    err, _ = share.readdirplus(big, fh, 0, 4096)
    monkeypatch.undo()
    assert err == errno.EIO and len(calls) == 5
    assert share.fs._inodes == before_inodes and _fds() == before_fds
    # and the next try answers in full
    err, p = share.readdirplus(big, fh, 0, 4096)
    assert err == 0 and len(decode_direntplus(p)) > 5


def test_an_entry_removed_or_swapped_since_the_listing(tree: Path, tmp_path: Path) -> None:
    """The listing is taken at offset 0; a name removed before its reply is left out (the
    others still come), and one swapped for a symlink is sent as the link, never its target."""
    share = Share(PassthroughFilesystem(str(tree)), "/")
    big = share.lookup(1, b"big")
    fh = share.opendir(big)
    err, p = share.readdirplus(big, fh, 0, 500)  # ".", "..", and one or two entries
    assert err == 0
    first = decode_direntplus(p)
    names = sorted(n.name.encode() for n in os.scandir(tree / "big"))
    listed = [name for *_r, name in first]
    rest = [n for n in names if n not in listed]
    gone, swapped = rest[0], rest[1]
    (tree / "big" / gone.decode()).unlink()
    os.unlink(tree / "big" / swapped.decode())
    (tree / "big" / swapped.decode()).symlink_to(tmp_path / "elsewhere")
    got = {}
    for recs in share.pages(big, fh, first[-1][2]):
        got.update({name: e for e, _i, _o, _t, name in recs})
    assert gone not in got and set(got) == set(rest) - {gone}
    assert stat.S_ISLNK(got[swapped]["attr"]["mode"])
