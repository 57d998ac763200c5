"""Passthrough READs answered without waiting (RWF_NOWAIT, virtio-fs's dispatcher): when a short
read means the end of the file."""

import mmap
import os
from pathlib import Path

import pytest

from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fuse.iovec import BufferDest

PAGE = mmap.PAGESIZE


def _read(fs: PassthroughFilesystem, ino: int, offset: int, size: int) -> bytes:
    buf = bytearray(size)
    n = fs.read_into(ino, 0, offset, size, BufferDest([memoryview(buf)], size), nowait=True)
    return bytes(buf[:n])


@pytest.fixture
def fs(tmp_path: Path) -> PassthroughFilesystem:
    (tmp_path / "small").write_bytes(b"00001\n")
    (tmp_path / "two-pages").write_bytes(b"p" * (2 * PAGE))
    f = PassthroughFilesystem(str(tmp_path), writable=False)
    if not f.nowait_supported:
        pytest.skip("no RWF_NOWAIT")
    return f


def test_a_small_files_read_ends_inside_a_page_without_an_fstat(fs: PassthroughFilesystem,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A cat of many small files: each READ asks for a page and gets the few bytes there are;
    a read that stopped inside a page stopped at the end of the file (no fstat per READ). One
    that stops on a page boundary short of the request is checked against the file's size."""
    small = fs.lookup(1, b"small").ino
    pages = fs.lookup(1, b"two-pages").ino
    fstats: list[int] = []
    real = os.fstat

    def counting(fd: int) -> os.stat_result:
        fstats.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fstat", counting)
    assert _read(fs, small, 0, 4096) == b"00001\n" and _read(fs, small, 2, 4096) == b"001\n"
    assert _read(fs, small, 6, 4096) == b"" and _read(fs, small, 100, 4096) == b""
    assert fstats == []
    assert _read(fs, pages, PAGE, 4 * PAGE) == b"p" * PAGE  # (on a page boundary: the size says it is the end)
    assert len(fstats) == 1
