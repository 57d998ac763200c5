"""Hostile callers against the passthrough share (issue 16, items 1 and 2).

Two levels: the filesystem's own Python API (`PassthroughFilesystem` called directly, as another
front-end or a bug in one would), and raw FUSE requests through `FuseSession` (a hostile
virtio-fs guest). Every attack must fail with a clear errno and leave both the host outside the
share and the share itself exactly as they were.
"""

import errno
import hashlib
import os
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.fs import passthrough as pt
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fs.writable_vfs import WritableVfs
from nydus_py.fuse.abi import FATTR_ATIME, FATTR_FH, FATTR_GID, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, FATTR_UID
from nydus_py.fuse.api import Caller, Filesystem, FuseError, SetAttr
from nydus_py.fuse.protocol import FuseSession
from nydus_py.vfs import Vfs

from ..fuse import kernel as K
from ..fuse.kernel import Kernel, decode_entry_out

ROOT = 1
CALLER = Caller(0, 0)
SECRET = b"host secret\n"


@dataclass
class Share:
    tmp: Path  # holds the share and the host files around it
    root: Path  # the shared directory
    outside: Path  # a host directory beside the share


@pytest.fixture
def share(tmp_path: Path) -> Share:
    root = tmp_path / "share"
    outside = tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "f.txt").write_bytes(b"inside\n")
    (root / "file").write_bytes(b"movable\n")
    (root / "linkdir").symlink_to("../outside")  # a symlinked directory inside the share
    (root / "abslink").symlink_to(outside)
    outside.mkdir()
    (outside / "victim").write_bytes(SECRET)
    (outside / "victimdir").mkdir()
    (tmp_path / "victim").write_bytes(SECRET)
    return Share(tmp_path, root, outside)


def snapshot(top: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under `top`: (type, mode, content hash or link target)."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = ""
            out[os.path.relpath(p, top)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), what)
    return out


def routes(s: Share, target: str) -> list[bytes]:
    """Names that lead from the share's root to outside/`target`."""
    return [
        b"../outside/" + target.encode(),
        os.fsencode(s.outside / target),
        b"linkdir/" + target.encode(),
        b"abslink/" + target.encode(),
        b"dir/../../outside/" + target.encode(),
    ]


def lookup_ino(fs: PassthroughFilesystem, parent: int, name: bytes) -> int:
    return fs.lookup(parent, name).ino


# -- the Python API ---------------------------------------------------------------------------------

# (op, which outside name it aims at, the call)
ApiAttack = Callable[[PassthroughFilesystem, bytes], object]
API_ATTACKS: list[tuple[str, str, ApiAttack]] = [
    ("unlink", "victim", lambda fs, n: fs.unlink(ROOT, n)),
    ("rmdir", "victimdir", lambda fs, n: fs.rmdir(ROOT, n)),
    ("mkdir", "new", lambda fs, n: fs.mkdir(ROOT, n, 0o755, CALLER)),
    ("create", "new", lambda fs, n: fs.create(ROOT, n, 0o644, os.O_WRONLY | os.O_CREAT, CALLER)),
    ("create-trunc", "victim", lambda fs, n: fs.create(ROOT, n, 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                                       CALLER)),
    ("symlink", "new", lambda fs, n: fs.symlink(ROOT, n, b"/etc/shadow", CALLER)),
    ("mknod", "new", lambda fs, n: fs.mknod(ROOT, n, stat.S_IFIFO | 0o600, 0, CALLER)),
    ("link", "new", lambda fs, n: fs.link(lookup_ino(fs, ROOT, b"file"), ROOT, n)),
    ("rename-out", "new", lambda fs, n: fs.rename(ROOT, b"file", ROOT, n, 0)),
    ("rename-in", "victim", lambda fs, n: fs.rename(ROOT, n, ROOT, b"stolen", 0)),
    ("rename-exchange", "victim", lambda fs, n: fs.rename(ROOT, b"file", ROOT, n, 2)),  # RENAME_EXCHANGE
    ("lookup", "victim", lambda fs, n: fs.lookup(ROOT, n)),
]


@pytest.mark.parametrize("route", range(5), ids=["dotdot", "absolute", "symlinked-dir", "abs-symlinked-dir",
                                                  "dotdot-in-middle"])
@pytest.mark.parametrize(("op", "target", "attack"), API_ATTACKS, ids=[a[0] for a in API_ATTACKS])
def test_api_names_never_leave_the_share(share: Share, op: str, target: str, attack: ApiAttack,
                                         route: int) -> None:
    fs = PassthroughFilesystem(str(share.root))
    before = snapshot(share.tmp)
    name = routes(share, target)[route]
    with pytest.raises(FuseError) as e:
        attack(fs, name)
    assert e.value.errno == errno.EINVAL, (op, name, e.value)
    assert snapshot(share.tmp) == before
    fs.close()


BAD_NAMES = [b"", b".", b"..", b"a\0b", b"x/", b"/", b"x" * 256]


@pytest.mark.parametrize("name", BAD_NAMES, ids=["empty", "dot", "dotdot", "nul", "slash-end", "slash", "long"])
@pytest.mark.parametrize(("op", "target", "attack"), [a for a in API_ATTACKS if a[0] != "lookup"],
                         ids=[a[0] for a in API_ATTACKS if a[0] != "lookup"])
def test_api_names_are_one_component(share: Share, op: str, target: str, attack: ApiAttack, name: bytes) -> None:
    """Not a path, not "." or "..", no NUL: a clean errno, never a ValueError or a host change."""
    fs = PassthroughFilesystem(str(share.root))
    before = snapshot(share.tmp)
    with pytest.raises(FuseError) as e:
        attack(fs, name)
    assert e.value.errno == (errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL), (op, name, e.value)
    assert snapshot(share.tmp) == before
    fs.close()


def test_api_symlinked_directory_is_not_a_parent(share: Share) -> None:
    """The inode of a symlink to a host directory can't be used as the directory itself."""
    fs = PassthroughFilesystem(str(share.root))
    before = snapshot(share.tmp)
    f = lookup_ino(fs, ROOT, b"file")
    attacks: list[Callable[[int], object]] = [
        lambda d: fs.mkdir(d, b"new", 0o755, CALLER),
        lambda d: fs.create(d, b"new", 0o644, os.O_WRONLY | os.O_CREAT, CALLER),
        lambda d: fs.mknod(d, b"new", stat.S_IFIFO | 0o600, 0, CALLER),
        lambda d: fs.symlink(d, b"new", b"x", CALLER),
        lambda d: fs.unlink(d, b"victim"),
        lambda d: fs.rmdir(d, b"victimdir"),
        lambda d: fs.rename(ROOT, b"file", d, b"new", 0),
        lambda d: fs.rename(d, b"victim", ROOT, b"stolen", 0),
        lambda d: fs.link(f, d, b"new"),
    ]
    for link in (b"linkdir", b"abslink"):
        ino = lookup_ino(fs, ROOT, link)
        for attack in attacks:
            with pytest.raises(FuseError) as e:
                attack(ino)
            assert e.value.errno == errno.ENOTDIR
    assert snapshot(share.tmp) == before
    fs.close()


# Ops that create a name, with what each leaves if it gets half-way
Creator = Callable[[PassthroughFilesystem, int], object]
CREATORS: list[tuple[str, Creator]] = [
    ("create", lambda fs, f: fs.create(ROOT, b"new", 0o644, os.O_RDWR | os.O_CREAT, CALLER)),
    ("mkdir", lambda fs, f: fs.mkdir(ROOT, b"new", 0o755, CALLER)),
    ("mknod", lambda fs, f: fs.mknod(ROOT, b"new", stat.S_IFIFO | 0o600, 0, CALLER)),
    ("symlink", lambda fs, f: fs.symlink(ROOT, b"new", b"file", CALLER)),
    ("link", lambda fs, f: fs.link(f, ROOT, b"new")),
]


@pytest.mark.parametrize(("op", "make"), CREATORS, ids=[c[0] for c in CREATORS])
def test_api_failed_create_leaves_nothing_behind(share: Share, op: str, make: Creator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of fds (or any error) after the name exists: the name goes again."""
    fs = PassthroughFilesystem(str(share.root))
    f = lookup_ino(fs, ROOT, b"file")  # the source of a link is known before the fault starts
    before = snapshot(share.tmp)
    real_register = fs._register

    def out_of_fds(fd: int) -> object:
        os.close(fd)
        raise OSError(errno.EMFILE, "injected: too many open files")

    monkeypatch.setattr(fs, "_register", out_of_fds)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as e:
        make(fs, f)
    assert e.value.errno == errno.EMFILE
    assert snapshot(share.tmp) == before
    assert set(os.listdir("/proc/self/fd")) == fds  # and no fd is left open either
    monkeypatch.setattr(fs, "_register", real_register)
    make(fs, f)  # and the same call works once the fault is gone
    assert os.path.lexists(share.root / "new")
    fs.close()


def test_api_create_over_a_fifo_does_not_block(share: Share) -> None:
    """O_CREAT on an existing FIFO must not open it (that blocks until a writer comes)."""
    os.mkfifo(share.root / "fifo")
    fs = PassthroughFilesystem(str(share.root))
    result: list[BaseException | object] = []
    done = threading.Event()

    def attempt() -> None:
        try:
            result.append(fs.create(ROOT, b"fifo", 0o644, os.O_RDONLY | os.O_CREAT, CALLER))
        except BaseException as e:  # noqa: BLE001  (handed to the test thread)
            result.append(e)
        done.set()

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    finished = done.wait(10)
    if not finished:  # unblock the stuck open so the thread ends, then fail
        os.close(os.open(share.root / "fifo", os.O_WRONLY | os.O_NONBLOCK))
        done.wait(10)
    t.join(10)
    assert finished, "create() over a FIFO blocked"
    assert isinstance(result[0], FuseError) and result[0].errno == errno.EACCES
    fs.close()


def test_openat2_enosys_fallback_is_logged_and_counted(share: Share, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """On a kernel without openat2 the O_NOFOLLOW fallback still confines, and says so. (Lookups
    never use openat2: one checked component opened with openat(O_NOFOLLOW) is as confined;
    creates do.)"""
    monkeypatch.setattr(pt, "_have_openat2", True)
    monkeypatch.setattr(pt, "_sys_openat2", lambda dirfd, name, how: -errno.ENOSYS)
    before_count = pt.FALLBACKS["openat2_enosys"]
    fs = PassthroughFilesystem(str(share.root))
    d = lookup_ino(fs, ROOT, b"dir")
    with caplog.at_level("ERROR", logger=pt.__name__):
        for name in (b"new1", b"new2"):
            _entry, fh, _flags = fs.create(d, name, 0o644, os.O_RDWR | os.O_CREAT, CALLER)
            fs.release(0, fh)
    assert (share.root / "dir" / "new2").is_file()
    f = lookup_ino(fs, d, b"f.txt")
    assert fs.getattr(f)[0].size == len(b"inside\n")
    assert pt.FALLBACKS["openat2_enosys"] == before_count + 2  # each fallback use counts
    assert any("openat2" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError) as e:
        fs.lookup(lookup_ino(fs, ROOT, b"linkdir"), b"victim")
    assert e.value.errno == errno.ENOTDIR
    fs.close()


# -- read-only shares: the Python API ---------------------------------------------------------------

def _ro_attacks() -> list[tuple[str, Callable[[PassthroughFilesystem, int, int], object]]]:
    def sa(valid: int, **kw: int) -> SetAttr:
        a = {"fh": None, "size": 0, "atime": 1, "atime_nsec": 0, "mtime": 1, "mtime_nsec": 0, "mode": 0o777,
             "uid": 1234, "gid": 1234}
        a.update(kw)
        return SetAttr(valid, a["fh"], a["size"], a["atime"], a["atime_nsec"], a["mtime"], a["mtime_nsec"],
                       a["mode"], a["uid"], a["gid"])

    return [
        ("open-trunc", lambda fs, f, fh: fs.open(f, os.O_RDONLY | os.O_TRUNC)),
        ("open-append", lambda fs, f, fh: fs.open(f, os.O_RDONLY | os.O_APPEND)),
        ("open-creat", lambda fs, f, fh: fs.open(f, os.O_RDONLY | os.O_CREAT)),
        ("open-wronly", lambda fs, f, fh: fs.open(f, os.O_WRONLY)),
        ("open-rdwr", lambda fs, f, fh: fs.open(f, os.O_RDWR)),
        ("open-accmode3", lambda fs, f, fh: fs.open(f, os.O_ACCMODE)),
        ("setattr-size", lambda fs, f, fh: fs.setattr(f, sa(FATTR_SIZE))),
        ("setattr-size-fh", lambda fs, f, fh: fs.setattr(f, sa(FATTR_SIZE, fh=fh))),
        ("setattr-mode", lambda fs, f, fh: fs.setattr(f, sa(FATTR_MODE))),
        ("setattr-owner", lambda fs, f, fh: fs.setattr(f, sa(FATTR_UID | FATTR_GID))),
        ("setattr-times", lambda fs, f, fh: fs.setattr(f, sa(FATTR_ATIME | FATTR_MTIME))),
        ("write", lambda fs, f, fh: fs.write(f, fh, 0, memoryview(b"pwned"), 0)),
        ("fallocate", lambda fs, f, fh: fs.fallocate(f, fh, 0, 1 << 20, 0)),
        ("setxattr", lambda fs, f, fh: fs.setxattr(f, b"user.x", b"v", 0)),
        ("removexattr", lambda fs, f, fh: fs.removexattr(f, b"user.keep")),
        ("mkdir", lambda fs, f, fh: fs.mkdir(ROOT, b"new", 0o755, CALLER)),
        ("create", lambda fs, f, fh: fs.create(ROOT, b"new", 0o644, os.O_RDONLY | os.O_CREAT, CALLER)),
        ("mknod", lambda fs, f, fh: fs.mknod(ROOT, b"new", stat.S_IFREG | 0o644, 0, CALLER)),
        ("symlink", lambda fs, f, fh: fs.symlink(ROOT, b"new", b"x", CALLER)),
        ("link", lambda fs, f, fh: fs.link(f, ROOT, b"new")),
        ("unlink", lambda fs, f, fh: fs.unlink(ROOT, b"file")),
        ("rmdir", lambda fs, f, fh: fs.rmdir(ROOT, b"dir")),
        ("rename", lambda fs, f, fh: fs.rename(ROOT, b"file", ROOT, b"new", 0)),
    ]


RO_ATTACKS = _ro_attacks()


@pytest.mark.parametrize(("op", "attack"), RO_ATTACKS, ids=[a[0] for a in RO_ATTACKS])
def test_api_read_only_share_refuses_every_mutation(share: Share, op: str,
                                                    attack: Callable[[PassthroughFilesystem, int, int], object]
                                                    ) -> None:
    os.setxattr(share.root / "file", "user.keep", b"1")
    fs = PassthroughFilesystem(str(share.root), writable=False)
    f = lookup_ino(fs, ROOT, b"file")
    fh, _ = fs.open(f, os.O_RDONLY)
    before = snapshot(share.tmp)
    st = os.stat(share.root / "file")
    with pytest.raises(FuseError) as e:
        attack(fs, f, fh)
    assert e.value.errno == errno.EROFS, (op, e.value)
    assert snapshot(share.tmp) == before
    after = os.stat(share.root / "file")
    assert (after.st_size, after.st_mtime_ns, after.st_mode, after.st_uid) == (st.st_size, st.st_mtime_ns,
                                                                               st.st_mode, st.st_uid)
    assert os.getxattr(share.root / "file", "user.keep") == b"1"
    assert fs.read(f, fh, 0, 100) == b"movable\n"
    fs.close()


# -- raw FUSE requests ------------------------------------------------------------------------------

def kernel(fs: Filesystem) -> Kernel:
    k = Kernel(FuseSession(fs))
    k.uid = k.gid = 0
    assert k.init()[0] == 0
    return k


def k_lookup(k: Kernel, parent: int, name: bytes) -> int:
    err, p = k.lookup(parent, name)
    assert err == 0, (name, errno.errorcode.get(err))
    return int(decode_entry_out(p)["nodeid"])


# (kernel, parent directory, name, inode of "file") -> (errno, payload)
FuseAttack = Callable[[Kernel, int, bytes, int], tuple[int, bytes]]


def _fuse_attacks() -> list[tuple[str, str, FuseAttack]]:
    return [
        ("unlink", "victim", lambda k, d, n, f: k.call(K.UNLINK, d, n + b"\0")),
        ("rmdir", "victimdir", lambda k, d, n, f: k.call(K.RMDIR, d, n + b"\0")),
        ("mkdir", "new", lambda k, d, n, f: k.call(K.MKDIR, d, struct.pack("<II", 0o755, 0) + n + b"\0")),
        ("create", "new", lambda k, d, n, f: k.call(K.CREATE, d, struct.pack(
            "<IIII", os.O_WRONLY | os.O_CREAT, stat.S_IFREG | 0o644, 0, 0) + n + b"\0")),
        ("symlink", "new", lambda k, d, n, f: k.call(K.SYMLINK, d, n + b"\0/etc/shadow\0")),
        ("mknod", "new", lambda k, d, n, f: k.call(K.MKNOD, d, struct.pack("<IIII", stat.S_IFIFO | 0o600, 0, 0, 0)
                                                + n + b"\0")),
        ("link", "new", lambda k, d, n, f: k.call(K.LINK, d, struct.pack("<Q", f) + n + b"\0")),
        ("rename-out", "new", lambda k, d, n, f: k.call(K.RENAME, d, struct.pack("<Q", d) + b"file\0" + n + b"\0")),
        ("rename-in", "victim", lambda k, d, n, f: k.call(K.RENAME, d, struct.pack("<Q", d) + n + b"\0stolen\0")),
        ("rename2-exchange", "victim", lambda k, d, n, f: k.call(K.RENAME2, d, struct.pack("<QII", d, 2, 0)
                                                             + b"file\0" + n + b"\0")),
        ("lookup", "victim", lambda k, d, n, f: k.lookup(d, n)),
    ]


FUSE_ATTACKS = _fuse_attacks()


@pytest.mark.parametrize("layout", ["session", "writable-vfs"])
@pytest.mark.parametrize(("op", "target", "attack"), FUSE_ATTACKS, ids=[a[0] for a in FUSE_ATTACKS])
def test_fuse_requests_never_leave_the_share(share: Share, op: str, target: str, attack: FuseAttack,
                                             layout: str) -> None:
    """What a hostile virtio-fs guest can send: the passthrough alone, or under the Kata VFS."""
    fs = PassthroughFilesystem(str(share.root))
    if layout == "session":
        k, d = kernel(fs), ROOT
    else:
        vfs = WritableVfs()
        vfs.mount("/containers", fs)
        k = kernel(vfs)
        d = k_lookup(k, ROOT, b"containers")
    f = k_lookup(k, d, b"file")
    before = snapshot(share.tmp)
    for name in routes(share, target):
        err, _ = attack(k, d, name, f)
        assert err == errno.EINVAL, (op, name, errno.errorcode.get(err))
    assert snapshot(share.tmp) == before
    # a symlink to a host directory is never a parent
    for link in (b"linkdir", b"abslink"):
        ino = k_lookup(k, d, link)
        err, _ = attack(k, ino, target.encode(), f)
        assert err == errno.ENOTDIR, (op, link, errno.errorcode.get(err))
    assert snapshot(share.tmp) == before


def test_fuse_guest_planted_symlink_is_not_a_way_out(share: Share) -> None:
    k = kernel(PassthroughFilesystem(str(share.root)))
    before = snapshot(share.outside)
    err, p = k.call(K.SYMLINK, ROOT, b"sneaky\0" + os.fsencode(share.outside) + b"\0")
    assert err == 0
    sneaky = int(decode_entry_out(p)["nodeid"])
    assert k.call(K.MKDIR, sneaky, struct.pack("<II", 0o755, 0) + b"x\0")[0] == errno.ENOTDIR
    assert k.call(K.UNLINK, sneaky, b"victim\0")[0] == errno.ENOTDIR
    assert k.open(sneaky, os.O_RDONLY)[0] == errno.ELOOP
    err, _ = k.call(K.CREATE, ROOT, struct.pack("<IIII", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                                stat.S_IFREG | 0o644, 0, 0) + b"sneaky\0")
    assert err == errno.ELOOP
    assert snapshot(share.outside) == before


def test_fuse_create_over_a_fifo_does_not_block(share: Share) -> None:
    """A guest mknods a FIFO, then CREATEs the same name: no daemon thread may hang on it."""
    k = kernel(PassthroughFilesystem(str(share.root)))
    assert k.call(K.MKNOD, ROOT, struct.pack("<IIII", stat.S_IFIFO | 0o600, 0, 0, 0) + b"fifo\0")[0] == 0
    result: list[int] = []
    done = threading.Event()

    def attempt() -> None:
        result.append(k.call(K.CREATE, ROOT, struct.pack("<IIII", os.O_RDONLY | os.O_CREAT,
                                                         stat.S_IFREG | 0o644, 0, 0) + b"fifo\0")[0])
        done.set()

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    finished = done.wait(10)
    if not finished:
        os.close(os.open(share.root / "fifo", os.O_WRONLY | os.O_NONBLOCK))
        done.wait(10)
    t.join(10)
    assert finished, "CREATE over a FIFO blocked a daemon thread"
    assert result == [errno.EACCES]


# -- read-only shares: raw FUSE requests ------------------------------------------------------------

OPEN_BYPASSES = [
    ("trunc", os.O_RDONLY | os.O_TRUNC),
    ("append", os.O_RDONLY | os.O_APPEND),
    ("creat", os.O_RDONLY | os.O_CREAT),
    ("creat-trunc", os.O_RDONLY | os.O_CREAT | os.O_TRUNC),
    ("wronly-trunc", os.O_WRONLY | os.O_TRUNC),
    ("accmode3", os.O_ACCMODE),
]


def _read_only_layouts(share: Share) -> dict[str, tuple[Kernel, int]]:
    """Kernel + parent of "file" for each way a read-only passthrough is served."""
    out = {}
    out["ro-passthrough"] = (kernel(PassthroughFilesystem(str(share.root), writable=False)), ROOT)
    # `nydusd-py fuse` with a passthrough mounted at "/": a read-only VFS over a writable fs
    vfs = Vfs()
    vfs.mount("/", PassthroughFilesystem(str(share.root)))
    out["fuse-daemon-vfs"] = (kernel(vfs), ROOT)
    # the virtio-fs daemon's VFS with a read-only passthrough under a path
    wvfs = WritableVfs()
    wvfs.mount("/ro", PassthroughFilesystem(str(share.root), writable=False))
    k = kernel(wvfs)
    out["writable-vfs"] = (k, k_lookup(k, ROOT, b"ro"))
    return out


@pytest.mark.parametrize("layout", ["ro-passthrough", "fuse-daemon-vfs", "writable-vfs"])
@pytest.mark.parametrize(("what", "flags"), OPEN_BYPASSES, ids=[o[0] for o in OPEN_BYPASSES])
def test_fuse_open_cannot_modify_a_read_only_share(share: Share, what: str, flags: int, layout: str) -> None:
    k, d = _read_only_layouts(share)[layout]
    f = k_lookup(k, d, b"file")
    before = snapshot(share.tmp)
    err, _ = k.open(f, flags)
    if layout == "fuse-daemon-vfs" and what == "append":
        # a read-only session keeps Linux's rule for read-only mounts: O_RDONLY|O_APPEND opens,
        # and the fd it gets can't write
        assert err == 0
    else:
        assert err == errno.EROFS, (what, errno.errorcode.get(err))
    assert snapshot(share.tmp) == before
    assert (share.root / "file").read_bytes() == b"movable\n"


def test_fuse_read_only_share_refuses_every_mutating_request(share: Share) -> None:
    k = kernel(PassthroughFilesystem(str(share.root), writable=False))
    f = k_lookup(k, ROOT, b"file")
    err, p = k.open(f, os.O_RDONLY)
    assert err == 0
    fh = struct.unpack_from("<Q", p)[0]
    before = snapshot(share.tmp)
    setattr_args = struct.pack("<IIQQQQQQIIIIIIII", FATTR_SIZE | FATTR_MODE | FATTR_MTIME | FATTR_FH, 0, fh, 0, 0,
                               0, 1, 0, 0, 0, 0, 0o777, 0, 0, 0, 0)
    requests = {
        "setattr": (K.SETATTR, f, setattr_args),
        "write": (K.WRITE, f, struct.pack("<QQIIQII", fh, 0, 5, 0, 0, 0, 0) + b"pwned"),
        "fallocate": (K.FALLOCATE, f, struct.pack("<QQQII", fh, 0, 1 << 20, 0, 0)),
        "copy_file_range": (K.COPY_FILE_RANGE, f, struct.pack("<QQQQQQQ", fh, 0, f, fh, 0, 5, 0)),
        "setxattr": (K.SETXATTR, f, struct.pack("<II", 1, 0) + b"user.x\0v"),
        "removexattr": (K.REMOVEXATTR, f, b"user.x\0"),
        "mkdir": (K.MKDIR, ROOT, struct.pack("<II", 0o755, 0) + b"new\0"),
        "create": (K.CREATE, ROOT, struct.pack("<IIII", os.O_RDONLY | os.O_CREAT, 0o100644, 0, 0) + b"new\0"),
        "unlink": (K.UNLINK, ROOT, b"file\0"),
        "rename": (K.RENAME, ROOT, struct.pack("<Q", ROOT) + b"file\0new\0"),
        "link": (K.LINK, ROOT, struct.pack("<Q", f) + b"new\0"),
        "tmpfile": (K.TMPFILE, ROOT, struct.pack("<IIII", os.O_RDWR, 0o100644, 0, 0) + b"x\0"),
    }
    for what, (op, node, args) in requests.items():
        err, _ = k.call(op, node, args)
        assert err in (errno.EROFS, errno.ENOSYS), (what, errno.errorcode.get(err))
        assert err == errno.EROFS or what in ("copy_file_range", "tmpfile"), what
    assert snapshot(share.tmp) == before
