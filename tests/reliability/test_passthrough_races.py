"""A hostile guest races FORGET / RELEASE / RELEASEDIR against a request on the same inode or handle.

The request took an fd from the tables; if the forget or release closed it there and then, the
number would go to the next open anywhere in the daemon, and the request's syscall would land on
that file or directory instead (mkdir elsewhere, a host file's bytes or xattrs read, its mode
changed). Each test stops the request right at its syscall (a hook that blocks the worker thread
on an Event), sends the forget or release from the test thread, opens host files until every
free fd number up to the request's is taken ("squatting"), lets the request go on, and checks
that it acted on the share — and that every fd is closed once the last user is gone.
"""

import errno
import os
import random
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nydus_py.fs import passthrough as pt
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fuse.abi import FATTR_ATIME, FATTR_GID, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, FATTR_UID
from nydus_py.fuse.api import Caller, Entry, FuseError, SetAttr
from nydus_py.fuse.protocol import FuseSession

from ..fuse import kernel as K
from ..fuse.kernel import Kernel, decode_entry_out

ROOT = 1
CALLER = Caller(0, 0)
DEADLINE = 10.0  # seconds any wait may take before the test fails (never reached when it passes)
INSIDE = b"share file\n"
SECRET = b"host secret, not for the guest\n"


@dataclass
class Share:
    root: Path  # the shared directory: dir/, dir/f.txt, file (xattr user.tag=share)
    outside: Path  # host directory beside it: victim (xattr user.tag=host), victimdir/


@pytest.fixture
def share(tmp_path: Path) -> Share:
    root, outside = tmp_path / "share", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "f.txt").write_bytes(INSIDE)
    (root / "dir" / "gone").write_bytes(b"")
    (root / "dir" / "gonedir").mkdir()
    (root / "file").write_bytes(INSIDE)
    (root / "link").symlink_to("file")
    os.setxattr(root / "file", "user.tag", b"share")
    outside.mkdir()
    (outside / "victim").write_bytes(SECRET)
    (outside / "victim").chmod(0o600)
    os.setxattr(outside / "victim", "user.tag", b"host")
    (outside / "victimdir").mkdir()
    return Share(root, outside)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def key_of(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def fds_of(key: tuple[int, int]) -> set[int]:
    """Every fd of this process that refers to the host inode `key`."""
    out = set()
    for fd in open_fds():
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key:
            out.add(fd)
    return out


class Pause:
    """Makes the worker thread's first call of `owner.attr` wait until `resume()`: the request
    then stands right at its syscall, its fd taken from the tables."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str) -> None:
        self.real = getattr(owner, attr)
        self.reached = threading.Event()
        self.go = threading.Event()
        self.fired = False
        self.worker: threading.Thread | None = None
        self.result: list[object] = []
        monkeypatch.setattr(owner, attr, self._hook)

    def _hook(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is self.worker and not self.fired:
            self.fired = True
            self.reached.set()
            if not self.go.wait(DEADLINE):
                raise TimeoutError("the test never resumed the request")
        return self.real(*args, **kwargs)

    def start(self, op: Callable[[], object]) -> None:
        """Run `op` on a worker thread and wait until it stands at the hook."""

        def run() -> None:
            try:
                res = op()
                self.result.append(list(res) if isinstance(res, Iterator) else res)
            except BaseException as e:  # noqa: BLE001  (handed to the test thread)
                self.result.append(e)
            finally:
                self.reached.set()  # also when the op failed before reaching the hook

        self.worker = threading.Thread(target=run, daemon=True)
        self.worker.start()
        assert self.reached.wait(DEADLINE), "the request never reached its syscall"
        assert self.fired, f"the request ended before its syscall: {self.result}"

    def finish(self, *, raising: bool = True) -> object:
        """Let the request go on; its result (an exception is raised here, or returned)."""
        self.go.set()
        assert self.worker is not None
        self.worker.join(DEADLINE)
        assert not self.worker.is_alive(), "the request did not finish"
        res = self.result[0]
        if raising and isinstance(res, BaseException):
            raise res
        return res


def squat(path: Path, flags: int, above: set[int]) -> list[int]:
    """Open `path` until every free fd number up to max(`above`) is taken (fds are handed out
    lowest first): whichever of `above` was closed is now this file."""
    opened: list[int] = []
    while True:
        fd = os.open(path, flags | os.O_CLOEXEC)
        opened.append(fd)
        if fd > max(above):
            return opened


def unsquat(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def setattr_req(valid: int, *, fh: int | None = None, size: int = 0, mode: int = 0, uid: int = 0,
                gid: int = 0) -> SetAttr:
    return SetAttr(valid, fh, size, 1, 0, 2, 0, mode, uid, gid)


def close_all(fs: PassthroughFilesystem, baseline: set[int]) -> None:
    """Drop everything and check that no fd of the filesystem is left open."""
    fs.destroy()
    fs.close()
    assert open_fds() == baseline


# -- the reproducers --------------------------------------------------------------------------------

def test_forget_during_mkdir_does_not_make_the_directory_elsewhere(share: Share,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    d = fs.lookup(ROOT, b"dir").ino
    pause = Pause(monkeypatch, os, "mkdir")
    pause.start(lambda: fs.mkdir(d, b"new", 0o755, CALLER))
    held = fds_of(key_of(share.root / "dir"))
    fs.forget(d, 1)  # the guest forgets the parent while its MKDIR is in flight
    squatters = squat(share.outside, os.O_PATH | os.O_DIRECTORY, held)  # another open in the daemon
    try:
        entry = pause.finish()
    finally:
        unsquat(squatters)
    assert not (share.outside / "new").exists(), "mkdir landed in a host directory outside the share"
    assert (share.root / "dir" / "new").is_dir()
    assert isinstance(entry, Entry)
    fs.forget(entry.ino, 1)
    close_all(fs, baseline)


def test_forget_during_getxattr_does_not_read_another_file(share: Share,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    f = fs.lookup(ROOT, b"file").ino
    pause = Pause(monkeypatch, os, "getxattr")
    pause.start(lambda: fs.getxattr(f, b"user.tag"))
    held = fds_of(key_of(share.root / "file"))
    fs.forget(f, 1)
    squatters = squat(share.outside / "victim", os.O_RDONLY, held)
    try:
        value = pause.finish()
    finally:
        unsquat(squatters)
    assert value == b"share", "getxattr read a host file's xattr"
    close_all(fs, baseline)


def test_forget_during_setattr_does_not_chmod_another_file(share: Share,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    f = fs.lookup(ROOT, b"file").ino
    pause = Pause(monkeypatch, os, "chmod")
    pause.start(lambda: fs.setattr(f, setattr_req(FATTR_MODE, mode=0o606)))
    held = fds_of(key_of(share.root / "file"))
    fs.forget(f, 1)
    squatters = squat(share.outside / "victim", os.O_RDONLY, held)
    try:
        result = pause.finish(raising=False)
    finally:
        unsquat(squatters)
    assert stat.S_IMODE(os.lstat(share.outside / "victim").st_mode) == 0o600, "a host file was chmod'ed"
    assert isinstance(result, tuple), result
    assert stat.S_IMODE(os.lstat(share.root / "file").st_mode) == 0o606
    close_all(fs, baseline)


def test_release_during_read_does_not_read_another_file(share: Share, monkeypatch: pytest.MonkeyPatch) -> None:
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    f = fs.lookup(ROOT, b"file").ino
    fh, _ = fs.open(f, os.O_RDONLY)
    pause = Pause(monkeypatch, os, "pread")
    pause.start(lambda: fs.read(f, fh, 0, 4096))
    held = fds_of(key_of(share.root / "file"))
    fs.release(f, fh)  # the guest closes the file while its READ is in flight
    squatters = squat(share.outside / "victim", os.O_RDONLY, held)
    try:
        data = pause.finish()
    finally:
        unsquat(squatters)
    assert data == INSIDE, "read returned a host file's bytes"
    fs.forget(f, 1)
    close_all(fs, baseline)


def test_release_during_write_does_not_write_another_file(share: Share,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    f = fs.lookup(ROOT, b"file").ino
    fh, _ = fs.open(f, os.O_RDWR)
    pause = Pause(monkeypatch, os, "pwrite")
    pause.start(lambda: fs.write(f, fh, 0, memoryview(b"PWNED"), 0))
    held = fds_of(key_of(share.root / "file"))
    fs.release(f, fh)
    squatters = squat(share.outside / "victim", os.O_RDWR, held)
    try:
        assert pause.finish() == 5
    finally:
        unsquat(squatters)
    assert (share.outside / "victim").read_bytes() == SECRET, "write landed in a host file"
    assert (share.root / "file").read_bytes() == b"PWNED" + INSIDE[5:]
    fs.forget(f, 1)
    close_all(fs, baseline)


def test_forget_during_a_read_without_open_does_not_read_another_file(share: Share,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Handle 0 (zero-message open): the read goes through the inode's own read fd, which
    FORGET used to close under the read."""
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    f = fs.lookup(ROOT, b"file").ino
    pause = Pause(monkeypatch, os, "pread")
    pause.start(lambda: fs.read(f, 0, 0, 4096))
    held = fds_of(key_of(share.root / "file"))
    fs.forget(f, 1)
    squatters = squat(share.outside / "victim", os.O_RDONLY, held)
    try:
        data = pause.finish()
    finally:
        unsquat(squatters)
    assert data == INSIDE, "read returned a host file's bytes"
    close_all(fs, baseline)


def test_guest_forget_during_mkdir_through_fuse_requests(share: Share, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race sent as raw FUSE requests (a virtio-fs guest: MKDIR on one queue thread,
    FORGET of its parent on another)."""
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    session = FuseSession(fs)
    k = Kernel(session)
    k.uid = k.gid = 0
    assert k.init(38)[0] == 0
    err, p = k.lookup(ROOT, b"dir")
    assert err == 0
    d = int(decode_entry_out(p)["nodeid"])
    other = Kernel(session, unique=1 << 40)  # a second queue: its own request numbers
    other.uid = other.gid = 0
    pause = Pause(monkeypatch, os, "mkdir")
    pause.start(lambda: other.call(K.MKDIR, d, struct.pack("<II", 0o755, 0) + b"new\0"))
    held = fds_of(key_of(share.root / "dir"))
    assert k.send(K.FORGET, d, struct.pack("<Q", 1)) is None
    squatters = squat(share.outside, os.O_PATH | os.O_DIRECTORY, held)
    try:
        result = pause.finish()
    finally:
        unsquat(squatters)
    assert isinstance(result, tuple) and result[0] == 0, result
    assert not (share.outside / "new").exists(), "the guest's mkdir landed outside the share"
    assert (share.root / "dir" / "new").is_dir()
    close_all(fs, baseline)


# -- every op keeps its fds while it runs -----------------------------------------------------------

@dataclass
class Rig:
    fs: PassthroughFilesystem
    share: Share
    ino: dict[str, int] = field(default_factory=dict)  # looked-up inodes (nlookup 1 each)
    fh: dict[str, int] = field(default_factory=dict)  # open handles

    def forget(self, name: str) -> None:
        self.fs.forget(self.ino[name], 1)

    def release(self, name: str) -> None:
        (self.fs.releasedir if name == "dirh" else self.fs.release)(0, self.fh[name])


def rig(share: Share) -> Rig:
    fs = PassthroughFilesystem(str(share.root))
    r = Rig(fs, share)
    r.ino["dir"] = fs.lookup(ROOT, b"dir").ino
    r.ino["file"] = fs.lookup(ROOT, b"file").ino
    r.ino["link"] = fs.lookup(ROOT, b"link").ino
    r.fh["file"] = fs.open(r.ino["file"], os.O_RDWR)[0]
    r.fh["dirh"] = fs.opendir(r.ino["dir"], os.O_RDONLY)[0]
    return r


# What each op uses, for the kill: an inode ("ino:<name>") or a handle ("fh:<name>"), and the
# host path it stands for. (id, hook owner, hooked function, op, what to kill)
Op = Callable[[Rig], object]
OPS: list[tuple[str, Any, str, Op, str]] = [
    ("lookup", os, "open", lambda r: r.fs.lookup(r.ino["dir"], b"f.txt"), "ino:dir"),
    ("lookup-dot", os, "dup", lambda r: r.fs.lookup(r.ino["dir"], b"."), "ino:dir"),
    ("getattr", os, "fstat", lambda r: r.fs.getattr(r.ino["file"]), "ino:file"),
    ("readlink", pt, "_readlink_fd", lambda r: r.fs.readlink(r.ino["link"]), "ino:link"),
    ("statfs", os, "statvfs", lambda r: r.fs.statfs(r.ino["file"]), "ino:file"),
    ("open", os, "open", lambda r: r.fs.open(r.ino["file"], os.O_RDONLY), "ino:file"),
    ("opendir", os, "open", lambda r: r.fs.opendir(r.ino["dir"], os.O_RDONLY), "ino:dir"),
    ("read", os, "pread", lambda r: r.fs.read(r.ino["file"], r.fh["file"], 0, 100), "fh:file"),
    ("read-fh0", os, "pread", lambda r: r.fs.read(r.ino["file"], 0, 0, 100), "ino:file"),
    ("write", os, "pwrite", lambda r: r.fs.write(r.ino["file"], r.fh["file"], 0, memoryview(b"x"), 0), "fh:file"),
    ("flush", os, "dup", lambda r: r.fs.flush(r.ino["file"], r.fh["file"]), "fh:file"),
    ("fsync", os, "fsync", lambda r: r.fs.fsync(r.ino["file"], r.fh["file"], False), "fh:file"),
    ("fdatasync-fh0", os, "fdatasync", lambda r: r.fs.fsync(r.ino["file"], 0, True), "ino:file"),
    ("fsyncdir", os, "fsync", lambda r: r.fs.fsyncdir(r.ino["dir"], r.fh["dirh"], False), "fh:dirh"),
    ("fallocate", os, "posix_fallocate", lambda r: r.fs.fallocate(r.ino["file"], r.fh["file"], 0, 10, 0),
     "fh:file"),
    ("lseek", os, "lseek", lambda r: r.fs.lseek(r.ino["file"], r.fh["file"], 0, os.SEEK_DATA), "fh:file"),
    ("lseek-fh0", os, "lseek", lambda r: r.fs.lseek(r.ino["file"], 0, 0, os.SEEK_DATA), "ino:file"),
    ("readdir", os, "scandir", lambda r: r.fs.readdir(r.ino["dir"], r.fh["dirh"], 0), "fh:dirh"),
    ("mkdir", os, "mkdir", lambda r: r.fs.mkdir(r.ino["dir"], b"new", 0o755, CALLER), "ino:dir"),
    ("mknod", os, "mknod", lambda r: r.fs.mknod(r.ino["dir"], b"new", stat.S_IFIFO | 0o600, 0, CALLER),
     "ino:dir"),
    ("symlink", os, "symlink", lambda r: r.fs.symlink(r.ino["dir"], b"new", b"f.txt", CALLER), "ino:dir"),
    ("link-parent", pt, "_link_empty", lambda r: r.fs.link(r.ino["file"], r.ino["dir"], b"new"), "ino:dir"),
    ("link-source", pt, "_link_empty", lambda r: r.fs.link(r.ino["file"], r.ino["dir"], b"new"), "ino:file"),
    ("create", pt, "_sys_openat2",
     lambda r: r.fs.create(r.ino["dir"], b"new", 0o644, os.O_RDWR | os.O_CREAT, CALLER), "ino:dir"),
    ("create-existing", os, "open",
     lambda r: r.fs.create(r.ino["dir"], b"f.txt", 0o644, os.O_RDONLY | os.O_CREAT, CALLER), "ino:dir"),
    ("finish", os, "stat", lambda r: r.fs.mkdir(r.ino["dir"], b"new", 0o755, CALLER), "ino:dir"),
    ("unlink", os, "unlink", lambda r: r.fs.unlink(r.ino["dir"], b"gone"), "ino:dir"),
    ("rmdir", os, "rmdir", lambda r: r.fs.rmdir(r.ino["dir"], b"gonedir"), "ino:dir"),
    ("rename-from", os, "rename", lambda r: r.fs.rename(r.ino["dir"], b"gone", ROOT, b"moved", 0), "ino:dir"),
    ("rename-to", os, "rename", lambda r: r.fs.rename(ROOT, b"file", r.ino["dir"], b"moved", 0), "ino:dir"),
    ("rename2", pt, "_renameat2", lambda r: r.fs.rename(r.ino["dir"], b"gone", ROOT, b"moved", 1), "ino:dir"),
    ("setattr-mode", os, "chmod", lambda r: r.fs.setattr(r.ino["file"], setattr_req(FATTR_MODE, mode=0o644)),
     "ino:file"),
    ("setattr-owner", pt, "_fchown_empty",
     lambda r: r.fs.setattr(r.ino["file"], setattr_req(FATTR_UID | FATTR_GID)), "ino:file"),
    ("setattr-size", os, "open", lambda r: r.fs.setattr(r.ino["file"], setattr_req(FATTR_SIZE, size=3)),
     "ino:file"),
    ("setattr-size-fh", os, "ftruncate",
     lambda r: r.fs.setattr(r.ino["file"], setattr_req(FATTR_SIZE, fh=r.fh["file"], size=3)), "fh:file"),
    ("setattr-times", os, "utime",
     lambda r: r.fs.setattr(r.ino["file"], setattr_req(FATTR_ATIME | FATTR_MTIME)), "ino:file"),
    ("getxattr", os, "getxattr", lambda r: r.fs.getxattr(r.ino["file"], b"user.tag"), "ino:file"),
    ("listxattr", os, "listxattr", lambda r: r.fs.listxattr(r.ino["file"]), "ino:file"),
    ("setxattr", os, "setxattr", lambda r: r.fs.setxattr(r.ino["file"], b"user.x", b"1", 0), "ino:file"),
    ("removexattr", os, "removexattr", lambda r: r.fs.removexattr(r.ino["file"], b"user.tag"), "ino:file"),
]
PATHS = {"dir": "dir", "file": "file", "link": "link", "dirh": "dir"}


@pytest.mark.parametrize(("owner", "fn", "op", "kill"), [o[1:] for o in OPS], ids=[o[0] for o in OPS])
def test_every_op_keeps_its_fds_until_it_is_done(share: Share, monkeypatch: pytest.MonkeyPatch, owner: Any,
                                                 fn: str, op: Op, kill: str) -> None:
    """Forgetting the inode (or releasing the handle) a request stands on closes none of its fds
    while the request runs; once it is done they are closed (nothing leaks)."""
    baseline = open_fds()
    r = rig(share)
    r.fs.read(r.ino["file"], 0, 0, 1)  # the inode's own read fd exists, so forget has it to close
    kind, name = kill.split(":")
    key = key_of(share.root / PATHS[name])
    pause = Pause(monkeypatch, owner, fn)
    pause.start(lambda: op(r))
    before = fds_of(key)
    if kind == "ino":
        r.forget(name)
    else:
        r.release(name)
    assert fds_of(key) == before, f"{kill} closed an fd that the running request uses"
    pause.finish()
    monkeypatch.undo()
    if kind == "ino":
        assert r.ino[name] not in r.fs._inodes
    close_all(r.fs, baseline)


def test_forgotten_and_released_fds_close_once_their_request_ends(share: Share,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No leak through the deferred close: after the request ends, the forgotten inode's fds
    (O_PATH and read fd) and the released handle's fd are gone, before any destroy()."""
    fs = PassthroughFilesystem(str(share.root))
    f = fs.lookup(ROOT, b"file").ino
    fh, _ = fs.open(f, os.O_RDONLY)
    fs.read(f, 0, 0, 1)
    key = key_of(share.root / "file")
    assert len(fds_of(key)) == 3  # O_PATH, handle, read fd
    pause = Pause(monkeypatch, os, "pread")
    pause.start(lambda: fs.read(f, fh, 0, 100))
    fs.forget(f, 1)  # nobody uses the inode: its O_PATH and read fds close at once
    fs.release(f, fh)  # the read in flight keeps the handle's fd
    assert len(fds_of(key)) == 1
    assert pause.finish() == INSIDE
    assert fds_of(key) == set()
    with pytest.raises(FuseError) as e:
        fs.getattr(f)
    assert e.value.errno == errno.ESTALE
    with pytest.raises(FuseError) as e:
        fs.read(f, fh, 0, 1)
    assert e.value.errno == errno.EBADF
    fs.close()


def test_forget_and_release_without_users_close_at_once(share: Share) -> None:
    baseline = open_fds()
    fs = PassthroughFilesystem(str(share.root))
    after_root = open_fds()
    d = fs.lookup(ROOT, b"dir").ino
    f = fs.lookup(d, b"f.txt").ino
    fh, _ = fs.open(f, os.O_RDONLY)
    dh, _ = fs.opendir(d, 0)
    assert list(fs.readdir(d, dh, 0))
    fs.read(f, 0, 0, 1)
    assert len(open_fds() - after_root) == 5
    fs.release(f, fh)
    fs.releasedir(d, dh)
    fs.forget(f, 1)
    fs.forget(d, 1)
    assert open_fds() == after_root
    fs.close()
    assert open_fds() == baseline


def test_failed_requests_leave_no_user_behind(share: Share, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that fails (before, inside or while taking its inode or handle) gives it back:
    afterwards forget and release still close every fd at once."""
    fs = PassthroughFilesystem(str(share.root))
    after_root = open_fds()
    d = fs.lookup(ROOT, b"dir").ino
    f = fs.lookup(ROOT, b"file").ino
    ln = fs.lookup(ROOT, b"link").ino
    fh, _ = fs.open(f, os.O_RDONLY)
    failing: list[tuple[int, Callable[[], object]]] = [
        (errno.ENOTDIR, lambda: fs.lookup(f, b"x")),
        (errno.ENOTDIR, lambda: fs.mkdir(f, b"x", 0o755, CALLER)),
        (errno.EACCES, lambda: fs.lookup(d, b"..")),
        (errno.EINVAL, lambda: fs.readlink(f)),
        (errno.EISDIR, lambda: fs.open(d, os.O_RDONLY)),
        (errno.ELOOP, lambda: fs.open(ln, os.O_RDONLY)),
        (errno.EISDIR, lambda: fs.read(d, 0, 0, 10)),
        (errno.EPERM, lambda: fs.setxattr(ln, b"user.x", b"1", 0)),
        (errno.ENODATA, lambda: fs.getxattr(ln, b"user.x")),
        (errno.EOPNOTSUPP, lambda: fs.setattr(ln, setattr_req(FATTR_MODE, mode=0o644))),
        (errno.EPERM, lambda: fs.link(d, ROOT, b"x")),
        (errno.EINVAL, lambda: fs.rename(d, b"f.txt", ROOT, b"x", 1 << 8)),
        (errno.EEXIST, lambda: fs.mkdir(d, b"f.txt", 0o755, CALLER)),
        (errno.ENOENT, lambda: fs.unlink(d, b"missing")),
        (errno.EBADF, lambda: list(fs.readdir(d, fh, 0))),  # a file handle is not a directory's
        (errno.EBADF, lambda: fs.write(f, fh, 0, memoryview(b"x"), 0)),  # opened read-only
        (errno.ENODATA, lambda: fs.getxattr(f, b"user.missing")),
    ]
    for want, op in failing:
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == want, (want, e.value)

    real_open = os.open

    def emfile(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # a reopen: /proc/self/fd/N, or N from a held fd of /proc/self/fd
        if str(path).startswith("/proc/self/fd/") or (str(path).isdigit() and kwargs.get("dir_fd") is not None):
            raise OSError(errno.EMFILE, "injected")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", emfile)
    for op in (lambda: fs.read(f, 0, 0, 10), lambda: fs.opendir(d, 0),
               lambda: fs.setattr(f, setattr_req(FATTR_SIZE, size=1))):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EMFILE
    monkeypatch.undo()
    fs.release(f, fh)
    for ino in (d, f, ln):
        fs.forget(ino, 1)
    assert open_fds() == after_root
    fs.close()


# -- a free-running mix, as a sweep -----------------------------------------------------------------

FILES = 6


def test_hostile_mix_never_serves_another_files_bytes_and_leaks_nothing(tmp_path: Path) -> None:
    """Readers look up, open and read files whose content names them; a hostile thread forgets
    inodes and releases handles it never owned; a squatter keeps opening a host file. Reads
    answer the right bytes or ESTALE/EBADF, never the host file's; nothing stays open after."""
    root, outside = tmp_path / "share", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    contents = {i: (f"file {i}\n".encode() * 50) for i in range(FILES)}
    for i, data in contents.items():
        (root / f"f{i}").write_bytes(data)
    (outside / "victim").write_bytes(SECRET * 20)
    baseline = open_fds()
    fs = PassthroughFilesystem(str(root))
    stop = threading.Event()
    wrong: list[str] = []
    errors: list[BaseException] = []
    counts = {"reads": 0, "refused": 0}
    seen_inos: list[int] = []  # what the hostile thread forgets and releases (list.append is atomic)
    seen_fhs: list[int] = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings per run

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(800):
                i = rng.randrange(FILES)
                try:
                    ino = fs.lookup(ROOT, f"f{i}".encode()).ino
                    seen_inos.append(ino)
                    fh = fs.open(ino, os.O_RDONLY)[0] if rng.random() < 0.5 else 0
                    if fh:
                        seen_fhs.append(fh)
                    data = bytes(fs.read(ino, fh, 0, 4096))
                    counts["reads"] += 1
                    if data != contents[i]:
                        wrong.append(f"f{i}: {data[:20]!r}")
                    if fh:
                        fs.release(ino, fh)
                except FuseError as e:
                    if e.errno not in (errno.ESTALE, errno.EBADF):
                        raise
                    counts["refused"] += 1
        except BaseException as e:  # noqa: BLE001  (handed to the test thread)
            errors.append(e)

    def hostile() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            if seen_inos:
                fs.forget(rng.choice(seen_inos[-8:]), 1 << 20)
            if seen_fhs:
                fs.release(0, rng.choice(seen_fhs[-8:]))

    def squatter() -> None:
        while not stop.is_set():
            fds = [os.open(outside / "victim", os.O_RDONLY | os.O_CLOEXEC) for _ in range(4)]
            for fd in fds:
                os.close(fd)

    helpers = [threading.Thread(target=hostile, daemon=True), threading.Thread(target=squatter, daemon=True)]
    readers = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(3)]
    try:
        for t in helpers + readers:
            t.start()
        for t in readers:
            t.join(120)
            assert not t.is_alive(), "a reader hung"
    finally:
        stop.set()
        for t in helpers:
            t.join(DEADLINE)
        sys.setswitchinterval(old_interval)
    assert not errors, errors
    assert not wrong, f"{len(wrong)} reads served other bytes, e.g. {wrong[:3]}"
    assert counts["reads"] > 0
    close_all(fs, baseline)
