"""PassthroughFilesystem through FuseSession (kernel stand-in): read-write ops land on the host
directory, and nothing the guest sends reaches outside it."""

import errno
import fcntl
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from nydus_py.fs import passthrough as pt
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fuse.abi import FATTR_MODE, FATTR_MTIME, FATTR_SIZE, FOpenFlags
from nydus_py.fuse.protocol import FuseSession
from nydus_py.vfs import Vfs

from ..fuse import kernel as K
from ..fuse.kernel import Kernel, decode_attr_out, decode_dirents, decode_entry_out
from ..waiting import wait_event


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "f.txt").write_bytes(b"content\n")
    (root / "escape").symlink_to("/etc")
    (root / "rel-escape").symlink_to("../outside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    return root


@pytest.fixture
def pfs(tree: Path) -> PassthroughFilesystem:
    return PassthroughFilesystem(str(tree))


@pytest.fixture
def k(pfs: PassthroughFilesystem) -> Kernel:
    kern = Kernel(FuseSession(pfs))
    kern.uid = kern.gid = 0
    assert kern.init(38)[0] == 0
    return kern


def lookup(k: Kernel, parent: int, name: bytes) -> int:
    err, p = k.lookup(parent, name)
    assert err == 0, (name, errno.errorcode.get(err))
    return int(decode_entry_out(p)["nodeid"])


def create(k: Kernel, parent: int, name: bytes, mode: int = 0o644) -> tuple[int, int]:
    err, p = k.call(K.CREATE, parent, struct.pack("<IIII", os.O_RDWR | os.O_CREAT, stat.S_IFREG | mode, 0, 0)
                    + name + b"\0")
    assert err == 0, errno.errorcode.get(err)
    return int(decode_entry_out(p[:128])["nodeid"]), int(struct.unpack_from("<Q", p, 128)[0])


def write(k: Kernel, ino: int, fh: int, offset: int, data: bytes) -> int:
    err, p = k.call(K.WRITE, ino, struct.pack("<QQIIQII", fh, offset, len(data), 0, 0, 0, 0) + data)
    assert err == 0
    return int(struct.unpack_from("<I", p)[0])


def test_create_write_read_back_on_host(k: Kernel, tree: Path) -> None:
    ino, fh = create(k, 1, b"new.txt")
    assert write(k, ino, fh, 0, b"hello ") == 6
    assert write(k, ino, fh, 6, b"world") == 5
    err, data = k.read(ino, fh, 0, 100)
    assert err == 0 and data == b"hello world"
    assert k.call(K.FSYNC, ino, struct.pack("<QII", fh, 0, 0))[0] == 0
    assert k.call(K.FLUSH, ino, struct.pack("<QIIQ", fh, 0, 0, 0))[0] == 0
    assert k.release(ino, fh)[0] == 0
    assert (tree / "new.txt").read_bytes() == b"hello world"
    assert stat.S_IMODE((tree / "new.txt").stat().st_mode) == 0o644


def test_o_direct_is_not_passed_to_the_host(k: Kernel, pfs: PassthroughFilesystem) -> None:
    f = lookup(k, lookup(k, 1, b"dir"), b"f.txt")
    err, p = k.open(f, os.O_RDONLY | os.O_DIRECT)
    assert err == 0
    fh = struct.unpack_from("<Q", p)[0]
    # our read buffers are not aligned for O_DIRECT: on a disk filesystem reads would be EINVAL
    assert not fcntl.fcntl(pfs._handles[fh].fd, fcntl.F_GETFL) & os.O_DIRECT
    assert k.read(f, fh, 0, 4096) == (0, b"content\n")


def test_mkdir_rename_unlink_rmdir_symlink_link(k: Kernel, tree: Path) -> None:
    err, p = k.call(K.MKDIR, 1, struct.pack("<II", 0o750, 0) + b"sub\0")
    assert err == 0
    sub = int(decode_entry_out(p)["nodeid"])
    assert (tree / "sub").is_dir() and stat.S_IMODE((tree / "sub").stat().st_mode) == 0o750
    d = lookup(k, 1, b"dir")
    assert k.call(K.RENAME, d, struct.pack("<Q", sub) + b"f.txt\0g.txt\0")[0] == 0
    assert (tree / "sub" / "g.txt").read_bytes() == b"content\n"
    err, p = k.call(K.SYMLINK, sub, b"ln\0g.txt\0")
    assert err == 0 and os.readlink(tree / "sub" / "ln") == "g.txt"
    ln = int(decode_entry_out(p)["nodeid"])
    err, target = k.call(K.READLINK, ln)
    assert (err, target) == (0, b"g.txt")
    g = lookup(k, sub, b"g.txt")
    err, p = k.call(K.LINK, 1, struct.pack("<Q", g) + b"hard\0")
    assert err == 0
    e = decode_entry_out(p)
    assert e["nodeid"] == g and e["attr"]["nlink"] == 2  # a hard link is the same inode
    assert (tree / "hard").read_bytes() == b"content\n"
    assert k.call(K.RMDIR, 1, b"sub\0")[0] == errno.ENOTEMPTY
    for name in (b"g.txt\0", b"ln\0"):
        assert k.call(K.UNLINK, sub, name)[0] == 0
    assert k.call(K.RMDIR, 1, b"sub\0")[0] == 0
    assert not (tree / "sub").exists()
    # renameat2 flags: NOREPLACE over an existing name fails
    assert k.call(K.RENAME2, 1, struct.pack("<QII", 1, 1, 0) + b"hard\0dir\0")[0] == errno.EEXIST


def test_setattr_and_xattrs(k: Kernel, tree: Path) -> None:
    f = lookup(k, lookup(k, 1, b"dir"), b"f.txt")
    args = struct.pack("<IIQQQQQQIIIIIIII", FATTR_MODE | FATTR_SIZE | FATTR_MTIME, 0, 0, 3, 0, 0, 1_000_000, 0,
                       0, 5, 0, 0o100600, 0, 0, 0, 0)
    err, p = k.call(K.SETATTR, f, args)
    assert err == 0
    a = decode_attr_out(p)["attr"]
    assert a["size"] == 3 and a["mode"] == stat.S_IFREG | 0o600 and a["mtime"] == 1_000_000
    st = (tree / "dir" / "f.txt").stat()
    assert st.st_size == 3 and st.st_mtime_ns == 1_000_000 * 10**9 + 5
    assert k.call(K.SETXATTR, f, struct.pack("<II", 2, 0) + b"user.k\0v1")[0] == 0
    assert os.getxattr(tree / "dir" / "f.txt", "user.k") == b"v1"
    err, v = k.getxattr(f, b"user.k", 100)
    assert (err, v) == (0, b"v1")
    err, names = k.listxattr(f, 100)
    assert err == 0 and b"user.k\0" in names
    assert k.call(K.REMOVEXATTR, f, b"user.k\0")[0] == 0
    assert k.getxattr(f, b"user.k", 100)[0] == errno.ENODATA


def test_readdir_lists_host_entries(k: Kernel) -> None:
    err, p = k.open(1, os.O_RDONLY | os.O_DIRECTORY, opcode=K.OPENDIR)
    assert err == 0
    fh = struct.unpack_from("<Q", p)[0]
    err, data = k.read(1, fh, 0, 4096, opcode=K.READDIR)
    names = {n for _, _, _, n in decode_dirents(data)}
    assert names == {b".", b"..", b"dir", b"escape", b"rel-escape"}
    assert k.release(1, fh, opcode=K.RELEASEDIR)[0] == 0


def test_symlinks_never_lead_out(k: Kernel, tree: Path) -> None:
    esc = lookup(k, 1, b"escape")
    rel = lookup(k, 1, b"rel-escape")
    # a lookup "through" a symlink is not a directory; the link itself can't be opened
    assert k.lookup(esc, b"passwd")[0] == errno.ENOTDIR
    assert k.lookup(rel, b"secret")[0] == errno.ENOTDIR
    assert k.open(esc)[0] == errno.ELOOP
    # ".." of the root is the root; ".." elsewhere and names with "/" are refused
    assert lookup(k, 1, b"..") == 1
    d = lookup(k, 1, b"dir")
    assert k.lookup(d, b"..")[0] == errno.EACCES
    assert k.lookup(1, b"../outside")[0] == errno.EINVAL
    # creating over a symlink does not follow it
    err, _ = k.call(K.CREATE, 1, struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o100644, 0, 0) + b"rel-escape\0")
    assert err == errno.ELOOP
    assert not (tree.parent / "outside" / "x").exists()
    # setattr that would follow the link through /proc is refused
    args = struct.pack("<IIQQQQQQIIIIIIII", FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o777, 0, 0, 0, 0)
    assert k.call(K.SETATTR, esc, args)[0] == errno.EOPNOTSUPP
    assert stat.S_IMODE(os.stat("/etc").st_mode) != 0o777


def test_a_directory_swapped_for_a_symlink_on_the_host(k: Kernel, tree: Path) -> None:
    d = lookup(k, 1, b"dir")
    os.rename(tree / "dir", tree / "moved")
    (tree / "dir").symlink_to(tree.parent / "outside")
    # the old nodeid still names the real directory, never the planted link's target
    assert lookup(k, d, b"f.txt")
    assert k.lookup(d, b"secret")[0] == errno.ENOENT
    assert k.lookup(lookup(k, 1, b"dir"), b"secret")[0] == errno.ENOTDIR


def test_no_device_nodes(k: Kernel) -> None:
    args = struct.pack("<IIII", stat.S_IFBLK | 0o600, os.makedev(8, 0), 0, 0) + b"sda\0"
    assert k.call(K.MKNOD, 1, args)[0] == errno.EPERM
    err, p = k.call(K.MKNOD, 1, struct.pack("<IIII", stat.S_IFIFO | 0o600, 0, 0, 0) + b"fifo\0")
    assert err == 0
    fifo = int(decode_entry_out(p)["nodeid"])
    assert k.open(fifo)[0] == errno.EACCES  # never opened on the host (would block)


def test_read_only_mode(tree: Path) -> None:
    k = Kernel(FuseSession(PassthroughFilesystem(str(tree), writable=False)))
    k.init(38)
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"x\0") == (errno.EROFS, b"")
    d = lookup(k, 1, b"dir")
    f = lookup(k, d, b"f.txt")
    assert k.open(f, os.O_WRONLY)[0] == errno.EROFS


def test_forget_closes_and_destroy_resets(pfs: PassthroughFilesystem, k: Kernel) -> None:
    d = lookup(k, 1, b"dir")
    assert lookup(k, 1, b"dir") == d
    k.send(K.FORGET, d, struct.pack("<Q", 1))
    assert d in pfs._inodes
    k.send(K.FORGET, d, struct.pack("<Q", 1))
    assert d not in pfs._inodes
    lookup(k, 1, b"escape")
    pfs.destroy()
    assert list(pfs._inodes) == [1]


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_reads_without_open_under_the_fuse_daemon_vfs(tree: Path) -> None:
    """`nydusd-py fuse` serves mounts through a Vfs that negotiates zero-message open (the
    kernel then never sends OPEN and reads arrive with handle 0): a passthrough mounted there
    still reads, through one read-only fd per inode that its FORGET closes."""
    big = os.urandom(300_000)
    (tree / "dir" / "big").write_bytes(big)
    vfs = Vfs()
    vfs.mount("/pt", PassthroughFilesystem(str(tree)))
    k = Kernel(FuseSession(vfs))
    assert k.init()[0] == 0
    d = lookup(k, lookup(k, 1, b"pt"), b"dir")
    fds = _open_fds()
    f = lookup(k, d, b"big")
    assert k.open(f, os.O_RDONLY)[0] == errno.ENOSYS  # the kernel now stops sending OPEN
    got = b"".join(k.read(f, 0, off, 131072)[1] for off in range(0, len(big), 131072))
    assert got == big
    small = lookup(k, d, b"f.txt")
    assert k.read(small, 0, 0, 4096) == (0, b"content\n")
    assert k.call(K.LSEEK, small, struct.pack("<QQII", 0, 2, 3, 0))[0] == 0  # SEEK_DATA on handle 0
    assert k.call(K.FLUSH, f, struct.pack("<QIIQ", 0, 0, 0, 0))[0] == 0  # close(2) must not fail
    assert k.read(d, 0, 0, 10)[0] == errno.EISDIR
    assert len(_open_fds() - fds) == 4  # two O_PATH inodes, two read fds
    for ino in (f, small):
        k.send(K.FORGET, ino, struct.pack("<Q", 1))
    assert _open_fds() == fds
    # writes stay refused: the fuse daemon's VFS is read-only whatever the passthrough is
    assert k.open(small, os.O_RDONLY | os.O_TRUNC)[0] == errno.EROFS
    assert k.call(K.WRITE, small, struct.pack("<QQIIQII", 0, 0, 1, 0, 0, 0, 0) + b"x")[0] == errno.EROFS
    assert (tree / "dir" / "f.txt").read_bytes() == b"content\n"


def _plus(it: object) -> list[tuple[object, ...]]:
    """READDIRPLUS entries as comparable tuples (ino, attr, name, type, cookie)."""
    return [(e.ino, e.attr, name, typ, off) for e, name, typ, off in it]  # type: ignore[attr-defined]


def test_readdirplus_matches_readdir_plus_lookup(pfs: PassthroughFilesystem, tree: Path) -> None:
    """The one-pass READDIRPLUS gives what the generic readdir + lookup per entry gives (same
    inodes, attributes, cookies), and counts one lookup per entry sent."""
    from nydus_py.fuse.api import Filesystem

    for i in range(5):
        (tree / f"n{i}").write_bytes(b"x" * i)
    fh, _ = pfs.opendir(1, os.O_RDONLY)
    fast = _plus(pfs.readdirplus(1, fh, 0))
    slow = _plus(Filesystem.readdirplus(pfs, 1, fh, 0))
    assert fast == slow and len(fast) == 2 + 3 + 5
    d = next(e[0] for e in fast if e[2] == b"dir")
    assert pfs._inodes[d].nlookup == 2  # once per pass
    # resuming from a cookie
    assert _plus(pfs.readdirplus(1, fh, 4)) == fast[4:]


def test_readdirplus_leaves_out_an_entry_removed_since_the_listing(pfs: PassthroughFilesystem, tree: Path) -> None:
    for i in range(3):
        (tree / f"n{i}").write_bytes(b"x")
    fh, _ = pfs.opendir(1, os.O_RDONLY)
    it = iter(pfs.readdirplus(1, fh, 0))
    first = next(it)  # the listing is taken
    (tree / "n1").unlink()
    names = [first[1]] + [name for _e, name, _t, _o in it]
    assert b"n1" not in names and b"n0" in names and b"n2" in names
    # the directory was held for the reply and given back after it
    assert pfs._inodes[1].users == []


def test_attr_times_before_1970_keep_their_fraction(pfs: PassthroughFilesystem, tree: Path) -> None:
    """sec + nsec as the kernel reads them: a time of -1.5 s is (-2, 500000000), not (-1, 500000000),
    which was half a second off the other way."""
    f = tree / "dir" / "f.txt"
    os.utime(f, ns=(-1_500_000_000, 2_250_000_000))
    st = os.lstat(f)
    if st.st_atime_ns != -1_500_000_000:
        pytest.skip("the host filesystem does not keep times before 1970")
    d = pfs.lookup(1, b"dir").ino
    a = pfs.lookup(d, b"f.txt").attr
    assert (a.atime, a.atime_nsec) == (-2, 500_000_000)
    assert (a.mtime, a.mtime_nsec) == (2, 250_000_000)
    assert a.atime * 1_000_000_000 + a.atime_nsec == st.st_atime_ns


def test_readdirplus_opens_listed_symlinks_as_links(pfs: PassthroughFilesystem, tree: Path, tmp_path: Path) -> None:
    """READDIRPLUS opens the names of its own listing with openat(O_NOFOLLOW): a symlink there,
    even one pointing out of the share or swapped in after the listing was taken, is the link
    itself, never its target."""
    outside = tmp_path / "out-of-share"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * 4321)
    (tree / "to-dir").symlink_to(outside)
    (tree / "to-file").symlink_to(outside / "secret")
    (tree / "swapped").write_bytes(b"x")
    fh, _ = pfs.opendir(1, os.O_RDONLY)
    it = iter(pfs.readdirplus(1, fh, 0))
    got = {name: e for e, name, _t, _o in [next(it)]}
    (tree / "swapped").unlink()
    (tree / "swapped").symlink_to(outside / "secret")  # after the listing, before its lookup
    got.update({name: e for e, name, _t, _o in it})
    for name in (b"to-dir", b"to-file", b"swapped"):
        attr = got[name].attr
        assert stat.S_ISLNK(attr.mode), (name, oct(attr.mode))
        assert attr.ino != (outside / "secret").stat().st_ino and attr.ino != outside.stat().st_ino


# -- the small-request path (a `cat` of many small files: LOOKUP, OPEN, READ, FLUSH, RELEASE) -----

def test_lookup_opens_one_checked_name_without_openat2(pfs: PassthroughFilesystem, tree: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOKUP opens its one component with openat(O_NOFOLLOW) (as READDIRPLUS does), not the
    ctypes openat2: symlinks are the links themselves, and nothing but one name gets through."""
    def no_openat2(*a: object) -> int:
        raise AssertionError("LOOKUP used openat2")

    monkeypatch.setattr(pt, "_sys_openat2", no_openat2)
    d = pfs.lookup(1, b"dir")
    assert stat.S_ISDIR(d.attr.mode)
    f = pfs.lookup(d.ino, b"f.txt")
    assert stat.S_ISREG(f.attr.mode) and f.attr.size == len(b"content\n")
    for link in (b"escape", b"rel-escape"):
        e = pfs.lookup(1, link)
        assert stat.S_ISLNK(e.attr.mode) and e.attr.ino == os.lstat(tree / link.decode()).st_ino
        with pytest.raises(OSError) as err:
            pfs.lookup(e.ino, b"passwd")  # not a directory to look into
        assert err.value.errno == errno.ENOTDIR
    for bad in (b"../outside", b"dir/f.txt", b"", b"x\0y"):
        with pytest.raises(OSError) as err:
            pfs.lookup(1, bad)
        assert err.value.errno == errno.EINVAL
    with pytest.raises(OSError) as err:
        pfs.lookup(d.ino, b"..")
    assert err.value.errno == errno.EACCES


def test_flush_of_a_read_only_handle_does_no_host_work(pfs: PassthroughFilesystem,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """close(dup(fd)) reports deferred write errors (and drops POSIX locks, which we never take):
    a handle opened read-only has neither, so its FLUSH skips the two syscalls."""
    f = pfs.lookup(pfs.lookup(1, b"dir").ino, b"f.txt").ino
    ro, _ = pfs.open(f, os.O_RDONLY)
    rw, _ = pfs.open(f, os.O_RDWR)
    dups: list[int] = []
    real_dup = os.dup
    monkeypatch.setattr(os, "dup", lambda fd: dups.append(fd) or real_dup(fd))
    pfs.flush(f, ro)
    assert dups == []
    pfs.flush(f, rw)
    assert len(dups) == 1
    with pytest.raises(OSError) as err:
        pfs.flush(f, 999)  # an unknown handle is still refused
    assert err.value.errno == errno.EBADF
    for fh in (ro, rw):
        pfs.release(f, fh)


def test_read_only_opens_tell_the_kernel_not_to_send_flush(k: Kernel, tree: Path) -> None:
    """OPEN answers FOPEN_NOFLUSH for a read-only open (its FLUSH would do nothing): a `cat` of
    a small file costs four requests, not five. Opens for writing keep their FLUSH."""
    f = lookup(k, lookup(k, 1, b"dir"), b"f.txt")
    for flags, noflush in ((os.O_RDONLY, True), (os.O_RDONLY | os.O_NOATIME, True), (os.O_WRONLY, False),
                           (os.O_RDWR, False), (os.O_WRONLY | os.O_APPEND, False)):
        err, p = k.open(f, flags)
        assert err == 0
        fh, open_flags = struct.unpack_from("<QI", p)
        assert bool(open_flags & FOpenFlags.NOFLUSH) == noflush, (flags, open_flags)
        assert k.call(K.RELEASE, f, struct.pack("<QIIQ", fh, flags, 0, 0))[0] == 0


def test_open_reopens_through_a_held_proc_fd_directory(pfs: PassthroughFilesystem) -> None:
    """OPEN resolves /proc/self/fd/N from a held fd of /proc/self/fd (one name to walk); a forked
    child gets its own (the parent's would name the parent's fds)."""
    p = pfs._proc
    assert os.readlink(f"/proc/self/fd/{p.fd}") == f"/proc/{os.getpid()}/fd"
    f = pfs.lookup(pfs.lookup(1, b"dir").ino, b"f.txt").ino
    fh, _ = pfs.open(f, os.O_RDONLY)
    assert pfs.read(f, fh, 0, 100) == b"content\n"
    pfs.release(f, fh)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report where its copy points, and whether an OPEN works there
        try:
            ok = os.readlink(f"/proc/self/fd/{p.fd}") == f"/proc/{os.getpid()}/fd"
            fh2, _ = pfs.open(f, os.O_RDONLY)
            ok = ok and pfs.read(f, fh2, 0, 100) == b"content\n"
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 10) == b"ok"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_close_leaves_the_proc_fd_directory_to_a_reopen_in_flight(pfs: PassthroughFilesystem,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """close() during an OPEN's reopen does not close the /proc/self/fd fd under it (its number
    could be reused meanwhile); the reopen's end closes it."""
    f = pfs.lookup(pfs.lookup(1, b"dir").ino, b"f.txt").ino
    p = pfs._proc
    entered, go = threading.Event(), threading.Event()
    real_open = os.open

    def paused_open(path: Any, flags: int, *args: Any, dir_fd: int | None = None, **kw: Any) -> int:
        if dir_fd is not None and dir_fd == p.fd:
            entered.set()
            wait_event(go, what="the test to let the reopen go on")
            os.fstat(dir_fd)  # still open
        return real_open(path, flags, *args, dir_fd=dir_fd, **kw)

    monkeypatch.setattr(os, "open", paused_open)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(pfs.open(f, os.O_RDONLY)), daemon=True)
    t.start()
    wait_event(entered, what="the reopen to start")
    fd = p.fd
    pfs.close()
    assert p.fd == fd
    os.fstat(fd)  # the reopen in flight keeps it
    go.set()
    t.join(10)
    assert result and p.fd == -1  # closed by the reopen's end
    with pytest.raises(OSError) as err:
        p.reopen(0, os.O_RDONLY)
    assert err.value.errno == errno.ESTALE
