"""The Linux EROFS driver as an independent oracle: it must see the same tree as V6Image.

The test encoder's bootstrap is mounted file-backed (raw mount(2), `device=` the uncompressed
blob view built from the reader's own chunk table), then every path is compared: stat fields,
st_ino == nid, listings, symlinks, xattrs and file contents.
"""

import ctypes
import os
import stat
from pathlib import Path

import pytest

from nydus_py.rafs.chunkdata import decode_chunk, read_file_range
from nydus_py.rafs.v6 import V6Image

from ..conftest import require_device
from .v6_encode import encode, sample_tree
from .walk import MemBlobs

pytestmark = pytest.mark.slow


def erofs_available() -> None:
    require_device("/proc/filesystems")
    if "erofs" not in Path("/proc/filesystems").read_text():
        pytest.skip("missing kernel erofs support (device)")


def cache_view(img: V6Image, blob: bytes) -> bytes:
    """The uncompressed, 4K-aligned view of the blob the kernel reads through a device slot."""
    [info] = img.blobs
    view = bytearray(info.uncompressed_size)
    for i in range(img.chunk_table_len()):
        c = img.chunk_record(i)
        data = decode_chunk(blob[c.compressed_offset : c.compressed_offset + c.compressed_size], c, info)
        view[c.uncompressed_offset : c.uncompressed_offset + len(data)] = data
    return bytes(view)


@pytest.mark.parametrize("compact", [False, True])
def test_kernel_sees_the_same_tree(tmp_path: Path, compact: bool) -> None:
    erofs_available()
    b = encode(sample_tree(), compact=compact, build_time=1_000_000 if compact else 0)
    img = V6Image(b.bootstrap)
    boot, view, mnt = tmp_path / "boot", tmp_path / "view", tmp_path / "mnt"
    boot.write_bytes(b.bootstrap)
    view.write_bytes(cache_view(img, b.blob))
    mnt.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(str(boot).encode(), str(mnt).encode(), b"erofs", 1, f"device={view}".encode())  # MS_RDONLY
    if rc != 0:
        err = ctypes.get_errno()
        pytest.fail(f"mount failed: {os.strerror(err)}")
    try:
        src = MemBlobs({b.blob_id: b.blob})
        checked = 0
        for path, ino in img.walk():
            real = mnt / path.decode()[1:] if path != b"/" else mnt
            st = os.lstat(real)
            a = img.getattr(ino)
            assert st.st_ino == ino, path
            assert (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size) == (
                a.mode,
                a.nlink,
                a.uid,
                a.gid,
                a.size,
            ), path
            assert (st.st_mtime_ns, st.st_rdev) == (a.mtime * 10**9 + a.mtime_nsec, a.rdev), path
            assert sorted(os.listxattr(real, follow_symlinks=False)) == sorted(n.decode() for n in img.listxattr(ino))
            for n in img.listxattr(ino):
                assert os.getxattr(real, n, follow_symlinks=False) == img.getxattr(ino, n)
            if stat.S_ISDIR(a.mode):
                assert sorted(os.listdir(real)) == [e.name.decode() for e in img.readdir(ino)]
            elif stat.S_ISLNK(a.mode):
                assert os.readlink(real).encode() == img.readlink(ino)
            elif stat.S_ISREG(a.mode):
                assert real.read_bytes() == read_file_range(src, img, ino, 0, a.size)
            checked += 1
        assert checked == len(b.nids)
    finally:
        libc.umount2(str(mnt).encode(), 0)
