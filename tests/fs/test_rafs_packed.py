"""RafsFilesystem packs READDIRPLUS and LOOKUP replies itself (`readdirplus_packed`,
`lookup_packed`): byte for byte what the session builds from `readdirplus`/`lookup` tuples, for
every piece of a listing, every reply size, hard links, several-block directories, errors, and a
VFS that moves the inode numbers of a mount below another (shared daemons)."""

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.abi import IN_HEADER, INIT_IN, Opcode
from nydus_py.fuse.api import Entry
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import RafsImage
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.vfs import Vfs

READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
DIRENTPLUS_HEAD = 128 + 24  # fuse_entry_out + fuse_dirent, then the name


class Unpacked(RafsFilesystem):
    """The same filesystem without the packed paths: the session packs `readdirplus` and
    `lookup` tuples."""

    def readdirplus_packed(self, ino: int, fh: int, offset: int, size: int, base: int = 0,
                           dotdot: int = 0) -> None:
        return None

    def lookup_packed(self, parent: int, name: bytes, base: int = 0) -> None:
        return None


class Session:
    def __init__(self, fs: RafsFilesystem, at: str) -> None:
        self.vfs = Vfs()
        self.vfs.mount(at, fs)
        self.session = FuseSession(self.vfs)
        self.unique = 0
        self.call(Opcode.INIT, 0, INIT_IN.pack(7, 45, 1 << 20, 0x73FFFFFB | (1 << 30), 0x5FD))
        self.root = 1
        for part in at.strip("/").split("/"):
            if part:
                self.root = self.entry_ino(part.encode(), self.root)

    def call(self, opcode: int, nodeid: int, args: bytes) -> bytes:
        self.unique += 2
        req = IN_HEADER.pack(IN_HEADER.size + len(args), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + args
        r = self.session.handle(req)
        assert r is not None
        return r

    def entry_ino(self, name: bytes, parent: int) -> int:
        r = self.call(Opcode.LOOKUP, parent, name + b"\0")
        assert struct.unpack_from("<i", r, 4)[0] == 0, name
        return struct.unpack_from("<Q", r, 16)[0]

    def readdirplus(self, ino: int, offset: int, size: int) -> bytes:
        return self.call(Opcode.READDIRPLUS, ino, READ_IN.pack(0, offset, size, 0, 0, 0, 0))


def records(reply: bytes) -> list[tuple[int, bytes, int, int, int, int]]:
    """(entry nodeid, name, d_ino, cookie, mode, nlink) of each fuse_direntplus of a reply."""
    out, pos = [], 16
    while pos < len(reply):
        nodeid = struct.unpack_from("<Q", reply, pos)[0]
        mode, nlink = struct.unpack_from("<II", reply, pos + 40 + 60)
        d_ino, cookie, nl, _typ = struct.unpack_from("<QQII", reply, pos + 128)
        out.append((nodeid, reply[pos + DIRENTPLUS_HEAD : pos + DIRENTPLUS_HEAD + nl], d_ino, cookie, mode, nlink))
        pos += (DIRENTPLUS_HEAD + nl + 7) & ~7
    return out


@pytest.fixture(params=[5, 6])
def image(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[RafsImage, str]:
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(300):  # several 4 KiB directory blocks in v6
        (src / "big" / f"a-long-file-name-to-fill-blocks-{i:04d}").write_bytes(b"x" * (i % 5))
    (src / "big" / "sub").mkdir()
    (src / "big" / "sub" / "leaf").write_bytes(b"leaf")
    (src / "file").write_bytes(b"hello")
    os.link(src / "file", src / "hard")
    os.link(src / "file", src / "big" / "hard-elsewhere")
    (src / "link").symlink_to("file")
    os.mkfifo(src / "fifo")
    (src / "empty-dir").mkdir()
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    os.makedirs(blobs)
    build_image(tree_from_directory(src), boot, blobs, BuildOptions(fs_version=request.param))
    return open_bootstrap(boot), blobs


def _pair(image: tuple[RafsImage, str], at: str) -> tuple[Session, Session, RafsFilesystem]:
    img, blobs = image
    packed = RafsFilesystem(img, BlobDevice(img, LocalBlobDir(blobs)), readahead_chunks=0)
    plain = Unpacked(img, BlobDevice(img, LocalBlobDir(blobs)), readahead_chunks=0)
    return Session(packed, at), Session(plain, at), packed


@pytest.mark.parametrize("at", ["/", "/shared/a"])
def test_packed_replies_equal_the_tuple_path_for_every_piece_and_size(image: tuple[RafsImage, str], at: str) -> None:
    packed, plain, fs = _pair(image, at)
    dirs = [packed.root, packed.entry_ino(b"big", packed.root), packed.entry_ino(b"empty-dir", packed.root)]
    dirs.append(packed.entry_ino(b"sub", dirs[1]))
    assert dirs[:2] == [plain.root, plain.entry_ino(b"big", plain.root)]
    for d in dirs:
        whole = records(packed.readdirplus(d, 0, 1 << 20))
        assert [r[3] for r in whole] == list(range(1, len(whole) + 1))
        for size in (100, 152 + 8, 4096, 32768):  # none fits, one fits, pieces, all
            for offset in sorted({0, 1, 2, 3, len(whole) // 2, len(whole) - 1, len(whole), len(whole) + 5}):
                got, want = packed.readdirplus(d, offset, size), plain.readdirplus(d, offset, size)
                assert got[16:] == want[16:], (d, offset, size)  # (the header's unique differs)
                assert got[:8] == want[:8]
    # the packed path answered (not the tuple path by falling back)
    _idx, inner = Vfs.split(dirs[1])
    assert fs.readdirplus_packed(inner if inner != 1 else 1, 0, 0, 32768) is not None


def test_packed_listing_of_a_shared_mount_leads_back_to_the_pseudo_tree(image: tuple[RafsImage, str]) -> None:
    packed, _plain, _fs = _pair(image, "/shared/a")
    shared = packed.entry_ino(b"shared", 1)
    recs = {r[1]: r for r in records(packed.readdirplus(packed.root, 0, 32768))}
    assert recs[b".."][2] == shared and recs[b"."][2] == packed.root
    # hard links: one inode under each name, its link count the image's
    file_ino = packed.entry_ino(b"file", packed.root)
    assert recs[b"file"][0] == recs[b"hard"][0] == file_ino and recs[b"file"][2] == file_ino
    assert recs[b"file"][5] == 3 and stat.S_ISREG(recs[b"file"][4])
    big = {r[1]: r for r in records(packed.readdirplus(packed.entry_ino(b"big", packed.root), 0, 1 << 20))}
    assert big[b"hard-elsewhere"][0] == file_ino
    assert stat.S_ISFIFO(recs[b"fifo"][4]) and stat.S_ISLNK(recs[b"link"][4])


@pytest.mark.parametrize("at", ["/", "/shared/a"])
def test_packed_lookups_equal_the_tuple_path(image: tuple[RafsImage, str], at: str) -> None:
    packed, plain, _fs = _pair(image, at)
    big = packed.entry_ino(b"big", packed.root)
    sub = packed.entry_ino(b"sub", big)
    file_ino = packed.entry_ino(b"file", packed.root)
    names = [b"file", b"hard", b"link", b"fifo", b"big", b"empty-dir", b".", b"..", b"missing"]
    asked = [(packed.root, n) for n in names] + [(big, b"sub"), (big, b"hard-elsewhere"), (big, b".."),
                                                 (sub, b"leaf"), (sub, b".."), (file_ino, b"x"), (1, b"nope")]
    errors = set()
    for parent, name in asked:
        got = packed.call(Opcode.LOOKUP, parent, name + b"\0")
        want = plain.call(Opcode.LOOKUP, parent, name + b"\0")
        assert got[:8] == want[:8] and got[16:] == want[16:], (parent, name)  # (the uniques differ)
        errors.add(struct.unpack_from("<i", got, 4)[0])
    assert errors == {0, -errno.ENOENT, -errno.ENOTDIR}


def test_the_session_answers_lookup_from_the_packed_form(image: tuple[RafsImage, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    packed, _plain, fs = _pair(image, "/shared/a")
    calls: list[bytes] = []
    tuple_lookup = fs.lookup

    def counted(parent: int, name: bytes) -> Entry:
        calls.append(name)
        return tuple_lookup(parent, name)

    monkeypatch.setattr(fs, "lookup", counted)
    big = packed.entry_ino(b"big", packed.root)
    assert packed.entry_ino(b"sub", big) and packed.entry_ino(b"..", big) == packed.root
    assert calls == []  # no Entry/FuseAttr tuples on the way
    # ".." of the mount's root leads to the pseudo tree: the VFS answers it from `lookup`
    assert packed.entry_ino(b"..", packed.root) == packed.entry_ino(b"shared", 1)
