"""Mount-table helpers must never touch the mount itself: during a takeover its daemon is not
serving, and a stat of the mountpoint would wait for it indefinitely (seen as a hung upgrade)."""

from pathlib import Path

from nydus_py.fuse.api import FuseAttr
from nydus_py.fuse.protocol import FuseSession
from nydus_py.transport.fusedev import FuseDevSession
from nydus_py.transport.mount import is_mountpoint, real_mountpoint

from ..conftest import require_device
from ..fuse.memfs import MemFS


class CountingFS(MemFS):
    def __init__(self) -> None:
        super().__init__()
        self.getattrs = 0

    def getattr(self, ino: int) -> tuple[FuseAttr, float]:
        self.getattrs += 1
        return super().getattr(ino)


def test_real_mountpoint_resolves_parent_symlinks_only(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert real_mountpoint(str(tmp_path / "alias" / "mnt")) == str(tmp_path / "real" / "mnt")
    assert real_mountpoint(str(tmp_path / "real" / "mnt") + "/") == str(tmp_path / "real" / "mnt")


def test_is_mountpoint_sends_no_request_to_the_mount(tmp_path: Path) -> None:
    require_device("/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = CountingFS()
    transport = FuseDevSession(FuseSession(fs).handle, str(mnt), threads=1)
    transport.mount()
    try:
        before = fs.getattrs
        assert is_mountpoint(str(mnt))
        assert is_mountpoint(str(mnt) + "/")
        FuseDevSession(FuseSession(fs).handle, str(mnt), threads=1)  # constructing one neither
        assert fs.getattrs == before
    finally:
        transport.close()
    assert not is_mountpoint(str(mnt))


def test_session_ends_even_if_a_handler_keeps_a_request_view(tmp_path: Path) -> None:
    """A request slice still referenced at shutdown must not keep the session from ending."""
    require_device("/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = FuseSession(MemFS())
    kept: list[memoryview] = []

    def handler(req: memoryview) -> bytes | None:
        kept.append(req)  # e.g. a debug log or an in-flight table holding on to the request
        return session.handle(req)

    transport = FuseDevSession(handler, str(mnt), threads=2)
    transport.mount()
    try:
        assert sorted(p.name for p in mnt.iterdir())
        transport.unmount()
        assert transport.wait(10), "workers did not finish after the unmount"
    finally:
        transport.close()
