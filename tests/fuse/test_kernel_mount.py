"""The handler against the real Linux FUSE driver: mount MemFS through /dev/fuse and use it.

The client side runs in a subprocess with a timeout, and a stuck connection is aborted through
/sys/fs/fuse/connections, so a protocol bug fails the test instead of hanging it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nydus_py.fuse.abi import InitFlags
from nydus_py.fuse.protocol import FuseSession
from nydus_py.transport.fusedev import FuseDevSession

from ..conftest import require_device
from .kernel import KERNEL_645_FLAGS, KERNEL_645_FLAGS2
from .memfs import MemFS

CLIENT = textwrap.dedent(
    """
    import errno, json, os, sys
    m = sys.argv[1]
    out = {}
    def err(f, *a):
        try:
            f(*a)
        except OSError as e:
            return errno.errorcode[e.errno]
        return "ok"
    out["root"] = sorted(os.listdir(m))
    out["many"] = len(os.listdir(m + "/many"))
    out["many_names"] = sorted(os.listdir(m + "/many"))[:3]
    st = os.stat(m + "/hello")
    out["hello_stat"] = [st.st_size, st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_nlink, st.st_ino]
    out["hello"] = open(m + "/hello", "rb").read().decode()
    out["deep"] = open(m + "/sub/deep", "rb").read() == bytes(range(256)) * 40
    with open(m + "/sub/deep", "rb") as f:
        f.seek(5000)
        out["deep_mid"] = list(f.read(4))
    out["link"] = os.readlink(m + "/link")
    out["via_link"] = open(m + "/link", "rb").read().decode()
    out["xattr"] = os.getxattr(m + "/hello", "user.greeting").decode()
    out["xattrs"] = sorted(os.listxattr(m + "/hello"))
    out["xattr_missing"] = err(os.getxattr, m + "/hello", "user.nope")
    out["missing"] = err(os.stat, m + "/missing")
    out["boom"] = err(os.stat, m + "/boom")
    out["write"] = err(open, m + "/hello", "wb")
    out["mkdir"] = err(os.mkdir, m + "/newdir")
    out["statvfs_files"] = os.statvfs(m).f_files
    fd = os.open(m + "/hello", os.O_RDONLY)
    out["seek_data"] = os.lseek(fd, 3, os.SEEK_DATA)
    out["seek_hole"] = os.lseek(fd, 3, os.SEEK_HOLE)
    os.close(fd)
    walked = sum(len(files) for _, _, files in os.walk(m))
    out["walked"] = walked
    print(json.dumps(out))
    """
)


def _mount_devnum(mountpoint: str) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                return fields[2]
    return None


def _abort(mountpoint: str) -> None:
    dev = _mount_devnum(mountpoint)
    if dev:
        major, minor = (int(x) for x in dev.split(":"))
        path = Path(f"/sys/fs/fuse/connections/{major << 20 | minor}/abort")
        if path.exists():
            path.write_text("1")


@pytest.mark.slow
@pytest.mark.root
def test_mount_and_use(tmp_path: Path) -> None:
    require_device("/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = MemFS()
    session = FuseSession(fs)
    dev = FuseDevSession(session.handle, str(mnt), threads=2, max_write=session.max_write, fsname="nydus-py-test")
    dev.mount()
    try:
        try:
            proc = subprocess.run([sys.executable, "-c", CLIENT, str(mnt)], capture_output=True, text=True,
                                  timeout=60)
        except subprocess.TimeoutExpired:
            _abort(os.path.realpath(mnt))
            pytest.fail("client hung on the FUSE mount")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
    finally:
        try:
            dev.close()
        except OSError:
            _abort(os.path.realpath(mnt))
            dev.unmount(lazy=True)

    assert session.kernel_major == 7 and session.kernel_minor >= 31
    assert not session.flags & ~session.capable & ~InitFlags.INIT_EXT
    if session.kernel_minor == 45:  # the stand-in's idea of what a 7.45 kernel offers
        # OVER_IO_URING is offered only while /sys/module/fuse/parameters/enable_uring is Y
        offered = int(session.capable & ~InitFlags.OVER_IO_URING)
        assert offered == KERNEL_645_FLAGS | KERNEL_645_FLAGS2 << 32, hex(session.capable)
    assert out["root"] == ["hello", "link", "many", "sub"]
    assert out["many"] == 41 and out["many_names"] == ["L" * 255, "f00", "f01"]
    assert out["hello_stat"] == [12, 0o100644, 1_700_000_002_123_456_789, 1000, 100, 1, 2]
    assert out["hello"] == "hello world\n" and out["via_link"] == "hello world\n"
    assert out["deep"] is True and out["deep_mid"] == [5000 % 256 + i for i in range(4)]
    assert out["link"] == "hello"
    assert out["xattr"] == "hi there"
    assert out["xattrs"] == ["security.x", "user.empty", "user.greeting"]
    assert out["xattr_missing"] == "ENODATA"
    assert out["missing"] == "ENOENT"
    assert out["boom"] == "EIO"
    assert out["write"] == "EROFS" and out["mkdir"] == "EROFS"
    assert out["statvfs_files"] == len(fs.nodes)
    assert (out["seek_data"], out["seek_hole"]) == (3, 12)
    assert out["walked"] == 1 + 1 + 41 + 1  # hello, link (a file to walk), many/*, sub/deep
