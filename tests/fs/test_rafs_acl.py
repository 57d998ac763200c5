"""RafsFilesystem and ACLs, in process: POSIX_ACL is asked for exactly when the image has xattrs,
and an ACL value the kernel could not use is refused with EIO instead of being served."""

import errno
import os
import struct
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.abi import InitFlags
from nydus_py.fuse.api import FuseError
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.acl import ACL_ACCESS, ACL_DEFAULT, GROUP_OBJ, OTHER, USER_OBJ, acl_from_text
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

GOOD = acl_from_text("u::rw-,u:1000:r--,g::r--,m::r--,o::---")
# USER_OBJ after GROUP_OBJ: the kernel's permission walk would read it in the wrong order
OUT_OF_ORDER = struct.pack("<I2HI2HI2HI", 2, GROUP_OBJ, 4, 0xFFFFFFFF, USER_OBJ, 6, 0xFFFFFFFF, OTHER, 0, 0xFFFFFFFF)


def _fs(tmp_path: Path, xattrs: dict[str, dict[bytes, bytes]], version: int) -> RafsFilesystem:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("good", "bad", "none"):
        (src / name).write_bytes(name.encode())
    root = tree_from_directory(src)
    for name, xs in xattrs.items():
        root.set_xattrs(root.find(b"/" + name.encode()), xs)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    os.makedirs(blobs)
    build_image(root, boot, blobs, BuildOptions(fs_version=version))
    image = open_bootstrap(boot)
    return RafsFilesystem(image, BlobDevice(image, LocalBlobDir(blobs)), readahead_chunks=0)


def _ino(fs: RafsFilesystem, name: bytes) -> int:
    return fs.lookup(1, name).ino


@pytest.mark.parametrize("version", [5, 6])
def test_acls_served_checked_and_negotiated(tmp_path: Path, version: int) -> None:
    fs = _fs(tmp_path, {"good": {ACL_ACCESS: GOOD, ACL_DEFAULT: GOOD}, "bad": {ACL_ACCESS: OUT_OF_ORDER}}, version)
    assert fs.init(InitFlags(0xFFFFFFFF)) & InitFlags.POSIX_ACL
    assert fs.getxattr(_ino(fs, b"good"), ACL_ACCESS) == GOOD
    assert fs.getxattr(_ino(fs, b"good"), ACL_DEFAULT) == GOOD
    with pytest.raises(FuseError) as ei:
        fs.getxattr(_ino(fs, b"bad"), ACL_ACCESS)
    assert ei.value.errno == errno.EIO
    with pytest.raises(FuseError) as ei:
        fs.getxattr(_ino(fs, b"none"), ACL_ACCESS)
    assert ei.value.errno == errno.ENODATA  # "no ACL": what the kernel caches


def test_no_posix_acl_without_xattrs(tmp_path: Path) -> None:
    fs = _fs(tmp_path, {}, 6)
    assert not fs.init(InitFlags(0xFFFFFFFF)) & InitFlags.POSIX_ACL
    with pytest.raises(FuseError) as ei:
        fs.getxattr(_ino(fs, b"none"), ACL_ACCESS)
    assert ei.value.errno == errno.ENOSYS  # the kernel then stops asking for any xattr


CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


@pytest.mark.parametrize("version", [5, 6])
def test_label_probe_of_a_name_no_inode_carries_is_eopnotsupp(tmp_path: Path, version: int) -> None:
    """`ls -l` asks every file for security.selinux; EOPNOTSUPP (not ENODATA) for a label name the
    image never carries makes it stop asking, while names some inode carries stay ENODATA elsewhere."""
    fs = _fs(tmp_path, {"good": {b"security.capability": CAPABILITY}, "bad": {b"user.note": b"x"}}, version)
    none = _ino(fs, b"none")
    with pytest.raises(FuseError) as ei:
        fs.getxattr(none, b"security.selinux")
    assert ei.value.errno == errno.ENODATA  # the first question starts the scan: not known yet
    assert fs.xattr_names(30.0) == {b"security.capability", b"user.note"}
    for name, want in ((b"security.selinux", errno.EOPNOTSUPP), (b"security.SMACK64", errno.EOPNOTSUPP),
                       (b"security.capability", errno.ENODATA), (b"user.absent", errno.ENODATA),
                       (b"trusted.absent", errno.ENODATA)):
        with pytest.raises(FuseError) as ei:
            fs.getxattr(none, name)
        assert ei.value.errno == want, name
    assert fs.getxattr(_ino(fs, b"good"), b"security.capability") == CAPABILITY
    assert fs.name_scan_failures == 0
    fs.close()


def test_a_closed_filesystem_starts_no_scan(tmp_path: Path) -> None:
    fs = _fs(tmp_path, {"bad": {b"user.note": b"x"}}, 6)
    none = _ino(fs, b"none")
    fs.close()
    for _ in range(2):
        with pytest.raises(FuseError) as ei:
            fs.getxattr(none, b"security.selinux")
        assert ei.value.errno == errno.ENODATA
    assert fs.xattr_names(0.0) is None
