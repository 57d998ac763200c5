"""Test rig for the v6 builder: read a directory into the build tree, mount images with the
kernel EROFS driver (file-backed, raw mount(2)), and compare two directory trees field by field.

The directory reader is the product's own (`nydus_py.builder.sources`), so the oracle covers
reading the source tree as well as writing the image.
"""

import ctypes
import ctypes.util
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from nydus_py.builder.sources import tree_from_directory

__all__ = ["compare_trees", "erofs_available", "erofs_mount", "tree_from_directory"]

MS_RDONLY = 1
MNT_DETACH = 2


def erofs_available() -> None:
    """Skip when this kernel has no EROFS driver or we cannot mount."""
    if os.geteuid() != 0:
        pytest.skip("kernel mounts need root")
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["erofs"] for line in f):
                pytest.skip("kernel has no erofs driver (CONFIG_EROFS_FS)")
    except OSError:
        pytest.skip("no /proc/filesystems")


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@contextmanager
def erofs_mount(bootstrap: str, devices: Sequence[str], target: str) -> Iterator[str]:
    """File-backed EROFS mount of `bootstrap` with one `device=` per blob view (spec 8/9)."""
    data = ",".join(f"device={d}" for d in devices).encode() or None
    rc = _libc.mount(os.fsencode(bootstrap), os.fsencode(target), b"erofs", MS_RDONLY, data)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount erofs {bootstrap} ({os.strerror(err)}); see dmesg")
    try:
        yield target
    finally:
        if _libc.umount2(os.fsencode(target), 0) != 0:
            _libc.umount2(os.fsencode(target), MNT_DETACH)


def _xattrs(p: bytes) -> dict[bytes, bytes]:
    return {
        os.fsencode(n): os.getxattr(p, n, follow_symlinks=False)
        for n in os.listxattr(p, follow_symlinks=False)
    }


def _file_digest(p: bytes) -> bytes:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.digest()


def compare_trees(src: str | bytes, mnt: str | bytes, *, check_owner: bool = True, without_sockets: bool = False) -> int:
    """Assert that `mnt` mirrors `src`: names, every stat field, xattrs, link targets, data and
    hard-link identity. Returns the number of entries compared. `without_sockets`: `src` sockets
    are expected to be absent (tar cannot hold them)."""
    src_b, mnt_b = os.fsencode(src), os.fsencode(mnt)
    groups_src: dict[tuple[int, int], bytes] = {}
    groups_mnt: dict[int, bytes] = {}
    count = 0
    stack = [b""]
    while stack:
        rel = stack.pop()
        a, b = src_b + rel, mnt_b + rel
        sa, sb = os.lstat(a), os.lstat(b)
        where = rel or b"/"
        count += 1
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), where
        assert sa.st_mode == sb.st_mode, (where, oct(sa.st_mode), oct(sb.st_mode))
        if check_owner:
            assert (sa.st_uid, sa.st_gid) == (sb.st_uid, sb.st_gid), where
        assert sa.st_mtime_ns == sb.st_mtime_ns, (where, sa.st_mtime_ns, sb.st_mtime_ns)
        assert _xattrs(a) == _xattrs(b), where
        if stat.S_ISDIR(sa.st_mode):
            na, nb = sorted(os.listdir(a)), sorted(os.listdir(b))
            if without_sockets:
                na = [n for n in na if not stat.S_ISSOCK(os.lstat(a + b"/" + n).st_mode)]
            assert na == nb, where
            subdirs = sum(1 for n in na if stat.S_ISDIR(os.lstat(a + b"/" + n).st_mode))
            assert sb.st_nlink == 2 + subdirs, where
            stack.extend(rel + b"/" + n for n in na)
            continue
        assert sa.st_nlink == sb.st_nlink, (where, sa.st_nlink, sb.st_nlink)
        assert sa.st_size == sb.st_size, (where, sa.st_size, sb.st_size)
        if sa.st_nlink > 1:
            first = groups_src.setdefault((sa.st_dev, sa.st_ino), rel)
            first_m = groups_mnt.setdefault(sb.st_ino, rel)
            assert first == first_m, (where, first, first_m)  # same link groups on both sides
        if stat.S_ISLNK(sa.st_mode):
            assert os.readlink(a) == os.readlink(b), where
        elif stat.S_ISREG(sa.st_mode):
            assert _file_digest(a) == _file_digest(b), where
        elif stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
            assert sa.st_rdev == sb.st_rdev, (where, sa.st_rdev, sb.st_rdev)
    return count


def mounts() -> list[str]:
    """The lines of /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


def erofs_at(path: str) -> bool:
    """Whether the kernel EROFS driver is mounted at `path`."""
    real = os.path.realpath(path)
    return any(line.split()[4] == real and line.split(" - ")[1].startswith("erofs ") for line in mounts())


def blob_view_mounts() -> set[str]:
    """Mountpoints of every blob-view FUSE mount (ours and other tests')."""
    return {line.split()[4] for line in mounts() if " - fuse nydus-blobview " in line}
