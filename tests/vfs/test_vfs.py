"""The pseudo-root VFS: routing, inode numbering, run-time mount/umount, dedicated mode."""

import errno
import stat
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_py.fuse.api import FuseError
from nydus_py.vfs import INO_SHIFT, MAX_INDEX, Vfs, VfsError
from tests.fuse.memfs import MemFS
from tests.waiting import wait_event

ROOT = 1


def names(vfs: Vfs, ino: int) -> list[bytes]:
    return [n for n, *_ in vfs.readdir(ino, 0, 0)]


def walk(vfs: Vfs, path: str) -> int:
    ino = ROOT
    for part in path.strip("/").split("/"):
        if part:
            ino = vfs.lookup(ino, part.encode()).ino
    return ino


def test_shared_mounts_route_and_keep_inodes_distinct() -> None:
    vfs = Vfs()
    a, b = MemFS(), MemFS()
    ia = vfs.mount("/snap-a", a)
    ib = vfs.mount("/rafs/c1/lowerdir", b)
    assert ia != ib and 1 <= ia <= MAX_INDEX and 1 <= ib <= MAX_INDEX
    assert names(vfs, ROOT) == [b".", b"..", b"rafs", b"snap-a"]
    rafs = vfs.lookup(ROOT, b"rafs")
    assert stat.S_ISDIR(rafs.attr.mode) and rafs.ino >> INO_SHIFT == 0
    root_b = walk(vfs, "/rafs/c1/lowerdir")
    assert root_b == (ib << INO_SHIFT) | 1
    ha = vfs.lookup(walk(vfs, "/snap-a"), b"hello")
    hb = vfs.lookup(root_b, b"hello")
    assert ha.ino == (ia << INO_SHIFT) | 2 and hb.ino == (ib << INO_SHIFT) | 2
    assert ha.attr.ino == ha.ino and hb.attr.ino == hb.ino
    assert vfs.getattr(hb.ino)[0].ino == hb.ino
    assert vfs.read(ha.ino, 102, 0, 100) == b"hello world\n"
    deep = vfs.lookup(vfs.lookup(root_b, b"sub").ino, b"deep")
    assert deep.ino >> INO_SHIFT == ib and vfs.read(deep.ino, 104, 0, 4) == bytes(range(4))
    assert vfs.readlink(vfs.lookup(root_b, b"link").ino) == b"hello"
    # ".." of a mounted root leads back into the pseudo tree, in lookup and in readdir
    c1 = walk(vfs, "/rafs/c1")
    assert vfs.lookup(root_b, b"..").ino == c1
    dots = {n: i for n, i, _t, _o in vfs.readdir(root_b, 0, 0)}
    assert dots[b".."] == c1 and dots[b"."] == root_b and dots[b"hello"] == hb.ino
    plus = {n: e for e, n, _t, _o in vfs.readdirplus(root_b, 0, 0)}
    assert plus[b"hello"].ino == hb.ino and plus[b"hello"].attr.ino == hb.ino
    assert plus[b".."].attr.ino == c1
    pseudo_plus = {n: e for e, n, _t, _o in vfs.readdirplus(ROOT, 0, 0)}
    assert pseudo_plus[b"snap-a"].ino == (ia << INO_SHIFT) | 1
    assert vfs.mounts() == {"/snap-a": ia, "/rafs/c1/lowerdir": ib}


def test_umount_prunes_auto_directories_and_stales_old_inodes() -> None:
    vfs = Vfs()
    vfs.mount("/keep", MemFS())
    idx = vfs.mount("/rafs/c1/lowerdir", MemFS())
    hello = vfs.lookup(walk(vfs, "/rafs/c1/lowerdir"), b"hello").ino
    vfs.mount("/rafs/c2/lowerdir", MemFS())
    vfs.umount("/rafs/c1/lowerdir")
    assert names(vfs, walk(vfs, "/rafs")) == [b".", b"..", b"c2"]
    with pytest.raises(FuseError) as e:
        vfs.getattr(hello)
    assert e.value.errno == errno.ESTALE
    vfs.umount("/rafs/c2/lowerdir/")
    assert names(vfs, ROOT) == [b".", b"..", b"keep"]
    with pytest.raises(FuseError):
        vfs.lookup(ROOT, b"rafs")
    # the freed index is not handed out again right away
    assert vfs.mount("/again", MemFS()) != idx


def test_mount_table_errors_change_nothing() -> None:
    vfs = Vfs()
    vfs.mount("/a/b", MemFS())
    before = (vfs.mounts(), names(vfs, ROOT), vfs.export_layout())
    cases = [("/a/b", errno.EEXIST), ("/a/b/c", errno.EBUSY), ("/a", errno.EBUSY), ("/", errno.EBUSY),
             ("relative", errno.EINVAL), ("/x/../y", errno.EINVAL), ("", errno.EINVAL)]
    for path, code in cases:
        with pytest.raises(VfsError) as e:
            vfs.mount(path, MemFS())
        assert e.value.errno == code, path
    with pytest.raises(VfsError) as e:
        vfs.umount("/nope")
    assert e.value.errno == errno.ENOENT
    assert (vfs.mounts(), names(vfs, ROOT), vfs.export_layout()) == before


def test_dedicated_root_passes_inodes_through() -> None:
    vfs = Vfs()
    fs = MemFS()
    assert vfs.mount("/", fs) == 0
    hello = vfs.lookup(ROOT, b"hello")
    assert hello.ino == 2 and hello.attr.ino == 2
    assert names(vfs, ROOT) == [n for n, *_ in fs.readdir(1, 0, 0)]
    with pytest.raises(VfsError):
        vfs.mount("/other", MemFS())
    assert vfs.umount("/") is fs
    with pytest.raises(FuseError):
        vfs.getattr(2)
    assert names(vfs, ROOT) == [b".", b".."]


def test_index_limit() -> None:
    vfs = Vfs()
    for i in range(MAX_INDEX):
        vfs.mount(f"/m{i}", MemFS())
    with pytest.raises(VfsError) as e:
        vfs.mount("/one-too-many", MemFS())
    assert e.value.errno == errno.ENOSPC
    vfs.umount("/m7")
    assert vfs.mount("/one-more", MemFS()) == 8


class SlowFS(MemFS):
    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release_read = threading.Event()

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        self.entered.set()
        assert self.release_read.wait(10)
        return super().read(ino, fh, offset, size)


def test_umount_waits_for_requests_inside() -> None:
    vfs = Vfs()
    fs = SlowFS()
    idx = vfs.mount("/slow", fs)
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(bytes(vfs.read((idx << INO_SHIFT) | 2, 102, 0, 5))))
    t.start()
    wait_event(fs.entered, what="the read to be inside the filesystem")
    # see umount block on the mount's idle condition (the read is still inside)
    slot = vfs._by_path["/slow"]
    waiting = threading.Event()
    real_wait = slot.idle.wait

    def spy(timeout: float | None = None) -> bool:
        waiting.set()
        return real_wait(timeout)

    slot.idle.wait = spy  # type: ignore[method-assign]
    done = threading.Event()
    u = threading.Thread(target=lambda: (vfs.umount("/slow"), done.set()))
    u.start()
    wait_event(waiting, what="umount to wait for the read inside")
    assert not done.is_set(), "umount returned while a read was inside the filesystem"
    fs.release_read.set()
    t.join(5)
    u.join(5)
    assert done.is_set() and out == [b"hello"]


def test_layout_round_trip_keeps_inode_numbers() -> None:
    vfs = Vfs()
    vfs.mount("/rafs/c1/lowerdir", MemFS())
    vfs.mount("/s2", MemFS())
    layout = vfs.export_layout()
    pseudo = {p: walk(vfs, p) for p in ("/rafs", "/rafs/c1")}
    other = Vfs()
    other.restore_layout(layout)
    for path, index in layout["mounts"].items():
        other.mount(path, MemFS(), index=index)
    assert {p: walk(other, p) for p in pseudo} == pseudo
    assert walk(other, "/rafs/c1/lowerdir/hello") == walk(vfs, "/rafs/c1/lowerdir/hello")
    assert other.mounts() == vfs.mounts()


paths = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(lambda p: "/" + "/".join(p))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), paths), max_size=25))
def test_random_mount_sequences_match_a_model(ops: list[tuple[bool, str]]) -> None:
    vfs = Vfs()
    model: dict[str, int] = {}
    for is_mount, path in ops:
        if is_mount:
            clash = any(path == p or path.startswith(p + "/") or p.startswith(path + "/") for p in model)
            try:
                model[path] = vfs.mount(path, MemFS())
                assert not clash
            except VfsError:
                assert clash
        else:
            try:
                vfs.umount(path)
                assert path in model
                del model[path]
            except VfsError:
                assert path not in model
        assert vfs.mounts() == model
        assert len(set(model.values())) == len(model)
        top = sorted({p.split("/")[1].encode() for p in model})
        assert names(vfs, ROOT)[2:] == top
        for path, idx in model.items():
            assert walk(vfs, path) == (idx << INO_SHIFT) | 1
            assert walk(vfs, path + "/sub/deep") == (idx << INO_SHIFT) | 4


def test_kernel_is_told_about_names_that_appear_and_go() -> None:
    from nydus_py.fuse.abi import InitFlags
    from nydus_py.fuse.protocol import notify_inval_entry, notify_inval_inode

    vfs = Vfs()
    sent: list[bytes] = []
    vfs.notifier = sent.append
    vfs.mount("/before-init", MemFS())
    assert sent == []  # nothing to tell a kernel that has not connected yet
    vfs.init(InitFlags(0))
    idx = vfs.mount("/rafs/c1/lowerdir", MemFS())
    c1 = walk(vfs, "/rafs/c1")
    assert sent == [notify_inval_entry(c1, b"lowerdir")]
    sent.clear()
    vfs.umount("/rafs/c1/lowerdir")
    # the topmost directory that went away is invalidated in its parent, and the old root inode
    assert sent == [notify_inval_entry(ROOT, b"rafs"), notify_inval_inode((idx << INO_SHIFT) | 1, -1)]


class _NoXattrs(MemFS):
    """An image without xattrs: ENOSYS, as RafsFilesystem answers (the Filesystem default)."""

    def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FuseError(errno.ENOSYS)

    def listxattr(self, ino: int) -> list[bytes]:
        raise FuseError(errno.ENOSYS)


def test_shared_daemon_asks_for_posix_acl_before_any_image() -> None:
    from nydus_py.fs.writable_vfs import WritableVfs
    from nydus_py.fuse.abi import InitFlags

    everything = InitFlags(0xFFFFFFFF)
    assert Vfs().init(everything) & InitFlags.POSIX_ACL
    # the writable layer's creates are not ACL-aware: it keeps the kernel's old behaviour
    assert not WritableVfs().init(everything) & InitFlags.POSIX_ACL


def test_an_image_without_xattrs_does_not_switch_xattrs_off_for_the_others() -> None:
    """ENOSYS would make the kernel stop sending GETXATTR on the whole connection: in a shared
    daemon it must become "no such attribute" (ENODATA, which the kernel caches as "no ACL")."""
    vfs = Vfs()
    vfs.mount("/bare", _NoXattrs())
    vfs.mount("/rich", MemFS())
    bare = vfs.lookup(walk(vfs, "/bare"), b"hello").ino
    rich = vfs.lookup(walk(vfs, "/rich"), b"hello").ino
    for name in (b"system.posix_acl_access", b"security.selinux", b"user.greeting"):
        with pytest.raises(FuseError) as ei:
            vfs.getxattr(bare, name)
        assert ei.value.errno == errno.ENODATA, name
    assert vfs.listxattr(bare) == []
    assert vfs.getxattr(rich, b"user.greeting") == b"hi there"
    # one image at "/" has the connection to itself: ENOSYS goes through (no GETXATTR ever again)
    solo = Vfs()
    solo.mount("/", _NoXattrs())
    for call in (lambda: solo.getxattr(vfs_root_child(solo), b"user.x"), lambda: solo.listxattr(ROOT)):
        with pytest.raises(FuseError) as ei:
            call()
        assert ei.value.errno == errno.ENOSYS


def vfs_root_child(vfs: Vfs) -> int:
    return vfs.lookup(ROOT, b"hello").ino


def test_read_into_routes_like_read_and_leaves_the_slot() -> None:
    """read_into (virtio-fs READs) answers as read does, in shared and dedicated mode: the
    mounted filesystem's bytes, EISDIR on a pseudo directory, ENOENT for an unknown pseudo
    inode, ESTALE after an umount; and it leaves the slot (an umount afterwards does not wait)."""
    from nydus_py.fuse.iovec import BufferDest

    def read_into(vfs: Vfs, ino: int, fh: int) -> bytes:
        buf = bytearray(100)
        n = vfs.read_into(ino, fh, 0, 100, BufferDest([memoryview(buf)], 100))
        return bytes(buf[:n])

    vfs = Vfs()
    ia = vfs.mount("/snap-a", MemFS())
    hello = vfs.lookup(walk(vfs, "/snap-a"), b"hello").ino
    assert read_into(vfs, hello, 102) == b"hello world\n"
    for ino, code in ((ROOT, errno.EISDIR), (walk(vfs, "/snap-a") - (ia << INO_SHIFT) + 7, errno.ENOENT)):
        with pytest.raises(FuseError) as e:
            read_into(vfs, ino, 0)
        assert e.value.errno == code
    assert vfs._slots[ia] is not None and vfs._slots[ia].active == 0  # (an umount would wait for it)
    vfs.umount("/snap-a")
    with pytest.raises(FuseError) as e:
        read_into(vfs, hello, 102)
    assert e.value.errno == errno.ESTALE
    dedicated = Vfs()
    dedicated.mount("/", MemFS())
    h = dedicated.lookup(ROOT, b"hello").ino
    assert h == 2 and read_into(dedicated, h, 102) == b"hello world\n"
    dedicated.umount("/")


def test_open_release_and_flush_route_and_leave_the_slot() -> None:
    """OPEN, FLUSH and RELEASE (entered inline) reach the owning filesystem with its own inode
    number, in shared and dedicated mode; OPEN is EISDIR on a pseudo directory, ENOENT for an
    unknown pseudo inode, ESTALE after an umount; RELEASE of a pseudo directory or of a gone
    filesystem is silent; each leaves the slot (an umount afterwards does not wait)."""
    vfs = Vfs()
    fs = MemFS()
    ia = vfs.mount("/snap-a", fs)
    hello = vfs.lookup(walk(vfs, "/snap-a"), b"hello").ino
    inner = hello & ((1 << INO_SHIFT) - 1)
    fh, _ = vfs.open(hello, 0)
    with pytest.raises(FuseError) as e:
        vfs.flush(hello, fh)  # (MemFS has none: the filesystem's answer, through the routing)
    assert e.value.errno == errno.ENOSYS
    vfs.release(hello, fh)
    assert fs.opened == [(inner, 0)] and fs.released == [(inner, fh)] and fh == 100 + inner
    for ino, code in ((ROOT, errno.EISDIR), (walk(vfs, "/snap-a") - (ia << INO_SHIFT) + 7, errno.ENOENT)):
        with pytest.raises(FuseError) as e:
            vfs.open(ino, 0)
        assert e.value.errno == code
    vfs.release(ROOT, 5)  # (a pseudo directory: nothing to release)
    with pytest.raises(FuseError) as e:
        vfs.open(walk(vfs, "/snap-a"), 0)  # (the filesystem's own directory: its answer)
    assert e.value.errno == errno.EISDIR
    assert vfs._slots[ia] is not None and vfs._slots[ia].active == 0
    vfs.umount("/snap-a")
    with pytest.raises(FuseError) as e:
        vfs.open(hello, 0)
    assert e.value.errno == errno.ESTALE
    vfs.release(hello, fh)  # (gone with its filesystem: silent)
    assert fs.released == [(inner, fh)]
    dedicated = Vfs()
    mem = MemFS()
    dedicated.mount("/", mem)
    h = dedicated.lookup(ROOT, b"hello").ino
    fh, _ = dedicated.open(h, 0)
    dedicated.release(h, fh)
    assert mem.opened == [(h, 0)] and mem.released == [(h, fh)] and dedicated._rootfs is not None
    assert dedicated._rootfs.active == 0
