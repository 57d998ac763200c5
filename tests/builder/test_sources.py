"""Directory and tar sources: every file type, and tar names/links/sizes treated as hostile."""

import gzip
import io
import os
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.builder.sources import SourceStats, tree_from_directory, tree_from_tar, xattr_storable
from nydus_py.builder.tree import Inode, walk
from nydus_py.rafs.errors import FormatError
from tests.conftest import require_tool

from .treeutil import describe, lookup, make_tar, member, read_all

IS_ROOT = os.geteuid() == 0


# ------------------------------------------------------------------------------------------
# directory source
# ------------------------------------------------------------------------------------------


def populate(root: Path) -> None:
    """A tree with every type the directory reader must handle."""
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"hello\n")
    os.link(root / "d" / "f", root / "hl")
    (root / "big").write_bytes(os.urandom(300_000))
    (root / "empty").write_bytes(b"")
    os.symlink("../../outside", root / "d" / "sl")
    os.symlink("/etc", root / "abs")
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()
    os.chmod(root / "d" / "f", 0o4751)
    os.setxattr(root / "d" / "f", b"user.one", b"\x00\xffbinary")
    os.setxattr(root / "d", b"user.dir", b"v")
    os.utime(root / "big", ns=(1_000_000_123_456_789, 1_600_000_000_987_654_321))
    name = b"non-utf8-\xff\xfe"
    with open(os.path.join(os.fsencode(root), name), "wb") as f:
        f.write(b"x")
    if IS_ROOT:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 200))
        os.chown(root / "d" / "f", 1234, 5678, follow_symlinks=False)
        os.chown(root / "abs", 42, 43, follow_symlinks=False)
        os.setxattr(root / "big", b"trusted.t", b"tv")
        os.chmod(root / "d" / "f", 0o4751)  # chown cleared the setuid bit


def test_directory_every_type(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    populate(src)
    stats = SourceStats()
    root = tree_from_directory(src, stats).root
    assert root.is_dir
    f = lookup(root, "d/f")
    assert f.is_reg and read_all(f) == b"hello\n"
    assert stat.S_IMODE(f.mode) == 0o4751
    assert f.xattrs == {b"user.one": b"\x00\xffbinary"}
    assert lookup(root, "hl") == f  # hard link: one object
    assert lookup(root, "d").xattrs == {b"user.dir": b"v"}
    assert lookup(root, "d/sl").symlink == b"../../outside"
    assert lookup(root, "abs").symlink == b"/etc" and lookup(root, "abs").children is None  # not followed
    assert stat.S_ISFIFO(lookup(root, "fifo").mode)
    assert stat.S_ISSOCK(lookup(root, "sock").mode)
    big = lookup(root, "big")
    assert big.size == 300_000 and read_all(big) == (src / "big").read_bytes()
    assert (big.mtime, big.mtime_nsec) == (1_600_000_000, 987_654_321)
    assert lookup(root, "empty").size == 0
    assert read_all(lookup(root, b"non-utf8-\xff\xfe")) == b"x"
    assert lookup(root, "d/e").children == {}
    expected_entries = sum(1 for _ in src.rglob("*"))
    assert stats.entries == expected_entries
    if IS_ROOT:
        null = lookup(root, "null")
        assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
        loop = lookup(root, "loop")
        assert stat.S_ISBLK(loop.mode) and (os.major(loop.rdev), os.minor(loop.rdev)) == (7, 200)
        assert (f.uid, f.gid) == (1234, 5678)
        assert (lookup(root, "abs").uid, lookup(root, "abs").gid) == (42, 43)
        assert big.xattrs == {b"trusted.t": b"tv"}


def test_directory_data_is_lazy_and_reopenable(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"first")
    root = tree_from_directory(tmp_path).root
    (tmp_path / "a").write_bytes(b"later")  # nothing was read at tree time
    node = lookup(root, "a")
    assert read_all(node) == b"later" and read_all(node) == b"later"


def test_directory_deep_tree_is_iterative(tmp_path: Path) -> None:
    depth = 1200  # beyond the default recursion limit of 1000
    p = os.fsencode(tmp_path)
    for _ in range(depth):  # os.makedirs itself recurses
        p += b"/a"
        os.mkdir(p)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    try:
        root = tree_from_directory(tmp_path).root
        paths = [path for path, _ in walk(root)]
    finally:
        sys.setrecursionlimit(old)
        while p != os.fsencode(tmp_path):  # shutil.rmtree (pytest's cleanup) recurses too
            os.rmdir(p)
            p = os.path.dirname(p)
    assert len(paths) == depth + 1


def test_directory_source_must_be_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FormatError, match="not a directory"):
        tree_from_directory(tmp_path / "f")
    with pytest.raises(FileNotFoundError):
        tree_from_directory(tmp_path / "missing")


def test_xattr_filter() -> None:
    assert xattr_storable(b"user.a", b"v")
    assert xattr_storable(b"security.capability", b"\x01")
    assert xattr_storable(b"trusted.overlay.opaque", b"y")
    assert xattr_storable(b"system.posix_acl_access", b"\x02")
    assert not xattr_storable(b"system.nfs4_acl", b"")
    assert not xattr_storable(b"user.", b"v")
    assert not xattr_storable(b"user." + b"n" * 256, b"v")
    assert not xattr_storable(b"user.big", b"v" * 65536)
    assert not xattr_storable(b"foo.bar", b"")


# ------------------------------------------------------------------------------------------
# tar source: regular content
# ------------------------------------------------------------------------------------------


def full_tar() -> bytes:
    return make_tar(
        [
            member("./", tarfile.DIRTYPE, mode=0o700, uid=1, gid=2),
            member("etc/", tarfile.DIRTYPE, mode=0o755),
            member("etc/passwd", data=b"root:x:0:0\n", mode=0o600, uid=0, gid=0),
            member("etc/link", tarfile.LNKTYPE, linkname="etc/passwd"),
            member("etc/sym", tarfile.SYMTYPE, linkname="/nowhere/../at/all", mode=0o777),
            member("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
            member("dev/sda", tarfile.BLKTYPE, mode=0o660, dev=(8, 300)),
            member("run/fifo", tarfile.FIFOTYPE, mode=0o600),
            member(
                "x/attrs",
                data=b"data",
                uid=70000,
                gid=80000,
                pax={
                    "SCHILY.xattr.user.bin": b"\x00\xff\xfe".decode("utf-8", "surrogateescape"),
                    "SCHILY.xattr.security.capability": "\x01\x02",
                    "SCHILY.xattr.system.nfs4_acl": "dropped",
                    "mtime": "1600000000.123456789",
                },
            ),
            member("x/.wh.gone", data=b""),
            member("x/.wh..wh..opq", data=b""),
            member("/abs/file", data=b"abs"),
            member("./dot/./a/../b", data=b"b"),
            member("big", data=bytes(range(256)) * 4000),
        ]
    )


def check_full_tree(root: Inode, stats: SourceStats) -> None:
    assert stat.S_IMODE(root.mode) == 0o700 and (root.uid, root.gid) == (1, 2)
    passwd = lookup(root, "etc/passwd")
    assert read_all(passwd) == b"root:x:0:0\n" and stat.S_IMODE(passwd.mode) == 0o600
    assert lookup(root, "etc/link") == passwd
    assert lookup(root, "etc/sym").symlink == b"/nowhere/../at/all"
    null = lookup(root, "dev/null")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    sda = lookup(root, "dev/sda")
    assert stat.S_ISBLK(sda.mode) and (os.major(sda.rdev), os.minor(sda.rdev)) == (8, 300)
    assert stat.S_ISFIFO(lookup(root, "run/fifo").mode)
    attrs = lookup(root, "x/attrs")
    assert attrs.xattrs == {b"user.bin": b"\x00\xff\xfe", b"security.capability": b"\x01\x02"}
    assert (attrs.uid, attrs.gid, attrs.mtime, attrs.mtime_nsec) == (70000, 80000, 1_600_000_000, 123_456_789)
    assert stats.skipped_xattrs == 1 and stats.skipped_xattr_names == {b"system.nfs4_acl"}
    # whiteouts are ordinary entries in a single layer
    assert lookup(root, "x/.wh.gone").is_reg and lookup(root, "x/.wh..wh..opq").is_reg
    assert read_all(lookup(root, "abs/file")) == b"abs"
    assert read_all(lookup(root, "dot/b")) == b"b" and set(lookup(root, "dot").children or {}) == {b"b"}
    assert read_all(lookup(root, "big")) == bytes(range(256)) * 4000
    # parents that had no member of their own
    for implicit in ("dev", "run", "x", "abs"):
        node = lookup(root, implicit)
        assert node.is_dir and stat.S_IMODE(node.mode) == 0o755 and node.uid == 0


@pytest.mark.parametrize("wrap", ["plain", "gzip", "zstd", "bytesio", "gzip-bytesio", "path-gz"])
def test_tar_full(tmp_path: Path, wrap: str) -> None:
    raw = full_tar()
    stats = SourceStats()
    if wrap == "plain":
        (tmp_path / "l.tar").write_bytes(raw)
        root = tree_from_tar(tmp_path / "l.tar", stats).root
    elif wrap in ("gzip", "path-gz"):
        (tmp_path / "l.tgz").write_bytes(gzip.compress(raw))
        root = tree_from_tar(str(tmp_path / "l.tgz"), stats).root if wrap == "path-gz" else None
        if root is None:
            with open(tmp_path / "l.tgz", "rb") as f:
                root = tree_from_tar(f, stats).root
    elif wrap == "zstd":
        (tmp_path / "l.tzst").write_bytes(zstandard.ZstdCompressor().compress(raw))
        root = tree_from_tar(tmp_path / "l.tzst", stats).root
    elif wrap == "bytesio":
        root = tree_from_tar(io.BytesIO(raw), stats).root
    else:
        root = tree_from_tar(io.BytesIO(gzip.compress(raw)), stats).root
    check_full_tree(root, stats)


def test_tar_data_streams_are_independent(tmp_path: Path) -> None:
    (tmp_path / "l.tar").write_bytes(make_tar([member("a", data=b"A" * 5000), member("b", data=b"B" * 7)]))
    root = tree_from_tar(tmp_path / "l.tar").root
    fa = lookup(root, "a").data.open()  # type: ignore[union-attr]
    fb = lookup(root, "b").data.open()  # type: ignore[union-attr]
    assert fa.read(10) == b"A" * 10
    assert fb.read() == b"B" * 7
    fa.seek(4990)
    assert fa.read() == b"A" * 10
    assert fa.read() == b""


def test_tar_non_utf8_and_long_names() -> None:
    name = b"caf\xe9/\xff".decode("utf-8", "surrogateescape")
    long = "d/" + "l" * 250 + "/x"  # > 100 bytes: GNU longname record / PAX path
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        root = tree_from_tar(io.BytesIO(make_tar([member(name, data=b"v"), member(long, data=b"long")], fmt=fmt))).root
        assert read_all(lookup(root, b"caf\xe9/\xff")) == b"v"
        assert read_all(lookup(root, long)) == b"long"
    with pytest.raises(FormatError, match="longer than 255"):
        tree_from_tar(io.BytesIO(make_tar([member("l" * 256, data=b"")])))


def test_tar_matches_gnu_tar_of_same_directory(tmp_path: Path) -> None:
    tar_tool = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    populate(src)
    os.unlink(src / "sock")
    out = tmp_path / "l.tar"
    subprocess.run(
        [tar_tool, "--xattrs", "--xattrs-include=*", "--format=posix", "-C", str(src), "-cf", str(out), "."],
        check=True,
    )
    from_dir = describe(tree_from_directory(src), mtime_nsec=False)
    from_tar = describe(tree_from_tar(out), mtime_nsec=False)
    assert from_tar.keys() == from_dir.keys()
    for path in from_dir:
        d, t = from_dir[path], from_tar[path]
        if path == b"/":
            continue
        assert t == d, path


# ------------------------------------------------------------------------------------------
# tar source: hostile input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/../x", "./../x", "a/b/../../../x"])
def test_tar_escaping_names_refused(name: str) -> None:
    with pytest.raises(FormatError, match="escapes the layer root"):
        tree_from_tar(io.BytesIO(make_tar([member(name, data=b"x")])))


def test_tar_absolute_and_dotted_names_are_relative() -> None:
    root = tree_from_tar(io.BytesIO(make_tar([member("/etc/x", data=b"1"), member("//./etc//./y/", tarfile.DIRTYPE)]))).root
    assert set(root.children or {}) == {b"etc"}
    assert set(lookup(root, "etc").children or {}) == {b"x", b"y"}


@pytest.mark.parametrize(
    "members, message",
    [
        ([member("h", tarfile.LNKTYPE, linkname="missing")], "hard link target"),
        ([member("h", tarfile.LNKTYPE, linkname="../etc/passwd")], "escapes the layer root"),
        ([member("h", tarfile.LNKTYPE, linkname="/../../etc/passwd")], "escapes the layer root"),
        ([member("h", tarfile.LNKTYPE, linkname="later"), member("later", data=b"x")], "hard link target"),
        ([member("d/", tarfile.DIRTYPE), member("h", tarfile.LNKTYPE, linkname="d")], "hard link target"),
        ([member("s", tarfile.SYMTYPE, linkname="x"), member("h", tarfile.LNKTYPE, linkname="s")], "hard link target"),
        ([member("f", data=b"1"), member("./", tarfile.LNKTYPE, linkname="f")], "layer root"),
    ],
)
def test_tar_bad_hard_links(members: list, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        tree_from_tar(io.BytesIO(make_tar(members)))


def test_tar_hard_link_survives_replacement_of_its_target() -> None:
    root = tree_from_tar(
        io.BytesIO(
            make_tar(
                [
                    member("a", data=b"old"),
                    member("b", tarfile.LNKTYPE, linkname="./a"),
                    member("a", data=b"new"),
                ]
            )
        )
    ).root
    assert read_all(lookup(root, "a")) == b"new"
    assert read_all(lookup(root, "b")) == b"old"


def test_tar_duplicates() -> None:
    root = tree_from_tar(
        io.BytesIO(
            make_tar(
                [
                    member("f", data=b"first"),
                    member("f", data=b"second"),
                    member("d/", tarfile.DIRTYPE, mode=0o700),
                    member("d/kid", data=b"k"),
                    member("d/", tarfile.DIRTYPE, mode=0o711, uid=5),  # dir over dir keeps children
                    member("e/", tarfile.DIRTYPE),
                    member("e/kid", data=b"k"),
                    member("e", tarfile.SYMTYPE, linkname="d"),  # non-dir over dir drops children
                    member("g", data=b"file"),
                    member("g/", tarfile.DIRTYPE),  # dir over file
                    member("./", tarfile.DIRTYPE, mode=0o750),
                    member(".", tarfile.DIRTYPE, mode=0o751),
                ]
            )
        )
    ).root
    assert read_all(lookup(root, "f")) == b"second"
    d = lookup(root, "d")
    assert stat.S_IMODE(d.mode) == 0o711 and d.uid == 5 and set(d.children or {}) == {b"kid"}
    assert lookup(root, "e").symlink == b"d"
    assert lookup(root, "g").is_dir and lookup(root, "g").children == {}
    assert stat.S_IMODE(root.mode) == 0o751


@pytest.mark.parametrize(
    "members",
    [
        [member("f", data=b"x"), member("f/child", data=b"y")],
        [member("s", tarfile.SYMTYPE, linkname="/etc"), member("s/passwd", data=b"owned")],
        [member("./", tarfile.SYMTYPE, linkname="/")],
    ],
)
def test_tar_never_goes_through_non_directories(members: list) -> None:
    with pytest.raises(FormatError):
        tree_from_tar(io.BytesIO(make_tar(members)))


def test_tar_truncated_member_data() -> None:
    raw = make_tar([member("small", data=b"s"), member("huge", data=b"h" * 100_000)])
    cut = raw[: 512 * 4 + 1000]  # header of "huge" present, most of its data gone
    with pytest.raises(FormatError, match="runs past the end"):
        tree_from_tar(io.BytesIO(cut))


def test_tar_declared_size_absurd() -> None:
    ti, _ = member("liar", data=b"")
    ti.size = 1 << 40  # GNU base-256 size field
    buf = ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + b"\0" * 1024
    with pytest.raises(FormatError, match="runs past the end"):
        tree_from_tar(io.BytesIO(buf))


def test_tar_truncated_header_and_padding() -> None:
    raw = make_tar([member("a", data=b"x" * 10), member("b", data=b"y")])
    with pytest.raises(FormatError):
        tree_from_tar(io.BytesIO(raw[: 512 * 2 + 100]))  # partial second header
    with pytest.raises(FormatError):
        tree_from_tar(io.BytesIO(raw[: 512 + 10]))  # data of "a" without its padding


def test_tar_empty_layer() -> None:
    root = tree_from_tar(io.BytesIO(make_tar([]))).root
    assert root.is_dir and root.children == {}


def test_tar_without_end_marker_is_fine() -> None:
    raw = make_tar([member("a", data=b"x" * 10)])
    root = tree_from_tar(io.BytesIO(raw[:1024])).root  # header + one data block, no zero blocks
    assert read_all(lookup(root, "a")) == b"x" * 10


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not a tar at all" * 100,
        gzip.compress(b"garbage inside gzip" * 50),
        gzip.compress(full_tar())[:300],
        b"\x1f\x8b" + b"\0" * 100,
        zstandard.ZstdCompressor().compress(full_tar())[:200],
    ],
)
def test_tar_garbage(blob: bytes) -> None:
    with pytest.raises(FormatError):
        tree_from_tar(io.BytesIO(blob))


def test_tar_unknown_member_type() -> None:
    ti, _ = member("weird", data=b"")
    ti.type = b"Z"
    with pytest.raises(FormatError, match="unsupported member type"):
        tree_from_tar(io.BytesIO(make_tar([(ti, b"")])))


def test_tar_gnu_sparse_refused(tmp_path: Path) -> None:
    tar_tool = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    out = tmp_path / "s.tar"
    subprocess.run([tar_tool, "--sparse", "--format=gnu", "-C", str(src), "-cf", str(out), "."], check=True)
    with pytest.raises(FormatError, match="sparse"):
        tree_from_tar(out)


def test_tar_bad_numbers() -> None:
    with pytest.raises(FormatError, match="out of range"):
        tree_from_tar(io.BytesIO(make_tar([member("u", data=b"", pax={"uid": str(1 << 33)})])))
    with pytest.raises(FormatError, match="bad PAX mtime"):
        tree_from_tar(io.BytesIO(make_tar([member("m", data=b"", pax={"mtime": "12x.5"})])))
    root = tree_from_tar(io.BytesIO(make_tar([member("neg", data=b"", pax={"mtime": "-5.5"})]))).root
    assert lookup(root, "neg").mtime == 0


def test_tar_symlink_targets_are_data_not_followed(tmp_path: Path) -> None:
    root = tree_from_tar(
        io.BytesIO(make_tar([member("s", tarfile.SYMTYPE, linkname="../../../../etc/shadow"), member("t", data=b"t")]))
    ).root
    assert lookup(root, "s").symlink == b"../../../../etc/shadow"
    with pytest.raises(FormatError, match="symlink target"):
        tree_from_tar(io.BytesIO(make_tar([member("s", tarfile.SYMTYPE, linkname="")])))


def test_tar_building_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    raw = make_tar([member("ok", data=b"1"), member("/tmp-evil-abs", data=b"1"), member("a/b", data=b"2")])
    tree_from_tar(io.BytesIO(raw))
    assert list(work.iterdir()) == []
    assert not os.path.exists("/tmp-evil-abs")


def _valid_tar() -> bytes:
    return make_tar(
        [
            member("d/", tarfile.DIRTYPE),
            member("d/f", data=b"abc" * 200),
            member("d/h", tarfile.LNKTYPE, linkname="d/f"),
            member("s", tarfile.SYMTYPE, linkname="d"),
            member("x", data=b"y" * 700, pax={"SCHILY.xattr.user.k": "v"}),
        ]
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_tar_mutations_only_format_error(data: st.DataObject) -> None:
    raw = bytearray(_valid_tar())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        root = tree_from_tar(io.BytesIO(bytes(raw))).root
    except FormatError:
        return
    for _path, node in walk(root):
        if node.is_reg and node.size:
            assert len(read_all(node)) == node.size  # sizes were checked against the archive
