"""abi.py against the kernel's own header: constants parsed from it, layouts measured by gcc."""

import re
import subprocess
from pathlib import Path

import pytest

from nydus_py.fuse import abi
from nydus_py.fuse.abi import FOpenFlags, InitFlags, Opcode

from ..conftest import require_tool

HEADER = Path("/usr/include/linux/fuse.h")


def header_text() -> str:
    if not HEADER.exists():
        pytest.skip(f"missing {HEADER} (Debian package linux-libc-dev)")
    return HEADER.read_text()


def test_opcodes_match_header() -> None:
    body = header_text().split("enum fuse_opcode {", 1)[1].split("};", 1)[0]
    found = dict(re.findall(r"^\s*(FUSE_\w+|CUSE_INIT)\s*=\s*(\d+)", body, re.M))
    found = {k: v for k, v in found.items() if "BSWAP" not in k}
    assert len(found) >= 48
    for name, value in found.items():
        assert Opcode[name.removeprefix("FUSE_")] == int(value), name


def test_init_and_open_flags_match_header() -> None:
    text = header_text()
    defs = re.findall(r"#define\s+(FUSE_\w+|FOPEN_\w+)\s+\(1U?(?:LL|ULL)?\s*<<\s*(\d+)\)", text)
    init_names = set(InitFlags.__members__)
    checked = 0
    for name, bit in defs:
        short = name.removeprefix("FUSE_").removeprefix("FOPEN_")
        if name.startswith("FOPEN_"):
            assert FOpenFlags[short] == 1 << int(bit), name
            checked += 1
        elif short in init_names:
            assert InitFlags[short] == 1 << int(bit), name
            checked += 1
    assert checked >= 40
    minor = int(re.search(r"FUSE_KERNEL_MINOR_VERSION\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    assert minor <= abi.KERNEL_MINOR_VERSION


def _offsets(st: object) -> tuple[int, list[int]]:
    """Byte offsets of the non-padding fields of a '<'-format struct.Struct."""
    fmt = st.format  # type: ignore[attr-defined]
    sizes = {"B": 1, "b": 1, "H": 2, "h": 2, "I": 4, "i": 4, "Q": 8, "q": 8}
    pos, offs = 0, []
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
        n = int(count or 1)
        if code == "x":
            pos += n
            continue
        for _ in range(n):
            offs.append(pos)
            pos += sizes[code]
    return pos, offs


ATTR_FIELDS = ["ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec", "ctimensec",
               "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags"]
READ_FIELDS = ["fh", "offset", "size", "read_flags", "lock_owner", "flags", "padding"]
# (C struct, our Struct, C member for each of our non-padding fields)
LAYOUTS = [
    ("fuse_in_header", abi.IN_HEADER,
     ["len", "opcode", "unique", "nodeid", "uid", "gid", "pid", "total_extlen", "padding"]),
    ("fuse_out_header", abi.OUT_HEADER, ["len", "error", "unique"]),
    ("fuse_attr", abi.ATTR, ATTR_FIELDS),
    ("fuse_entry_out", abi.ENTRY_OUT,
     ["nodeid", "generation", "entry_valid", "attr_valid", "entry_valid_nsec", "attr_valid_nsec"]
     + [f"attr.{f}" for f in ATTR_FIELDS]),
    ("fuse_attr_out", abi.ATTR_OUT, ["attr_valid", "attr_valid_nsec", "dummy"] + [f"attr.{f}" for f in ATTR_FIELDS]),
    ("fuse_getattr_in", abi.GETATTR_IN, ["getattr_flags", "dummy", "fh"]),
    ("fuse_open_in", abi.OPEN_IN, ["flags", "open_flags"]),
    ("fuse_open_out", abi.OPEN_OUT, ["fh", "open_flags", "padding"]),
    ("fuse_read_in", abi.READ_IN, READ_FIELDS),
    ("fuse_write_in", abi.WRITE_IN, ["fh", "offset", "size", "write_flags", "lock_owner", "flags", "padding"]),
    ("fuse_write_out", abi.WRITE_OUT, ["size", "padding"]),
    ("fuse_release_in", abi.RELEASE_IN, ["fh", "flags", "release_flags", "lock_owner"]),
    ("fuse_flush_in", abi.FLUSH_IN, ["fh", "unused", "padding", "lock_owner"]),
    ("fuse_fsync_in", abi.FSYNC_IN, ["fh", "fsync_flags", "padding"]),
    ("fuse_getxattr_in", abi.GETXATTR_IN, ["size", "padding"]),
    ("fuse_getxattr_out", abi.GETXATTR_OUT, ["size", "padding"]),
    ("fuse_setxattr_in", abi.SETXATTR_IN, ["size", "flags", "setxattr_flags", "padding"]),
    ("fuse_access_in", abi.ACCESS_IN, ["mask", "padding"]),
    ("fuse_kstatfs", abi.KSTATFS, ["blocks", "bfree", "bavail", "files", "ffree", "bsize", "namelen", "frsize"]),
    ("fuse_init_in", abi.INIT_IN, ["major", "minor", "max_readahead", "flags", "flags2"]),
    ("fuse_init_out", abi.INIT_OUT,
     ["major", "minor", "max_readahead", "flags", "max_background", "congestion_threshold", "max_write",
      "time_gran", "max_pages", "map_alignment", "flags2", "unused[0]", "unused[1]"]),
    ("fuse_interrupt_in", abi.INTERRUPT_IN, ["unique"]),
    ("fuse_forget_in", abi.FORGET_IN, ["nlookup"]),
    ("fuse_forget_one", abi.FORGET_ONE, ["nodeid", "nlookup"]),
    ("fuse_batch_forget_in", abi.BATCH_FORGET_IN, ["count", "dummy"]),
    ("fuse_lseek_in", abi.LSEEK_IN, ["fh", "offset", "whence", "padding"]),
    ("fuse_lseek_out", abi.LSEEK_OUT, ["offset"]),
    ("fuse_poll_in", abi.POLL_IN, ["fh", "kh", "flags", "events"]),
    ("fuse_poll_out", abi.POLL_OUT, ["revents", "padding"]),
    ("fuse_ioctl_in", abi.IOCTL_IN, ["fh", "flags", "cmd", "arg", "in_size", "out_size"]),
    ("fuse_ioctl_out", abi.IOCTL_OUT, ["result", "flags", "in_iovs", "out_iovs"]),
    ("fuse_bmap_in", abi.BMAP_IN, ["block", "blocksize", "padding"]),
    ("fuse_lk_in", abi.LK_IN, ["fh", "owner", "lk.start", "lk.end", "lk.type", "lk.pid", "lk_flags", "padding"]),
    ("fuse_lk_out", abi.LK_OUT, ["lk.start", "lk.end", "lk.type", "lk.pid"]),
    ("fuse_fallocate_in", abi.FALLOCATE_IN, ["fh", "offset", "length", "mode", "padding"]),
    ("fuse_copy_file_range_in", abi.COPY_FILE_RANGE_IN,
     ["fh_in", "off_in", "nodeid_out", "fh_out", "off_out", "len", "flags"]),
    ("fuse_setattr_in", abi.SETATTR_IN,
     ["valid", "padding", "fh", "size", "lock_owner", "atime", "mtime", "ctime", "atimensec", "mtimensec",
      "ctimensec", "mode", "unused4", "uid", "gid", "unused5"]),
    ("fuse_mknod_in", abi.MKNOD_IN, ["mode", "rdev", "umask", "padding"]),
    ("fuse_mkdir_in", abi.MKDIR_IN, ["mode", "umask"]),
    ("fuse_rename2_in", abi.RENAME2_IN, ["newdir", "flags", "padding"]),
    ("fuse_create_in", abi.CREATE_IN, ["flags", "mode", "umask", "open_flags"]),
    ("fuse_setupmapping_in", abi.SETUPMAPPING_IN, ["fh", "foffset", "len", "flags", "moffset"]),
    ("fuse_dirent", abi.DIRENT, ["ino", "off", "namelen", "type"]),
    ("fuse_direntplus", abi.DIRENTPLUS,
     ["entry_out.nodeid", "entry_out.generation", "entry_out.entry_valid", "entry_out.attr_valid",
      "entry_out.entry_valid_nsec", "entry_out.attr_valid_nsec"]
     + [f"entry_out.attr.{f}" for f in ATTR_FIELDS]
     + ["dirent.ino", "dirent.off", "dirent.namelen", "dirent.type"]),
    ("fuse_notify_inval_inode_out", abi.NOTIFY_INVAL_INODE_OUT, ["ino", "off", "len"]),
    ("fuse_notify_inval_entry_out", abi.NOTIFY_INVAL_ENTRY_OUT, ["parent", "namelen", "flags"]),
    ("fuse_notify_delete_out", abi.NOTIFY_DELETE_OUT, ["parent", "child", "namelen", "padding"]),
]


def test_struct_layouts_match_gcc(tmp_path: Path) -> None:
    header_text()
    gcc = require_tool("gcc")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/fuse.h>", "int main(void) {"]
    for cname, _st, fields in LAYOUTS:
        offs = " ".join("%zu" for _ in fields)
        args = ", ".join(f"offsetof(struct {cname}, {f})" for f in fields)
        lines.append(f'printf("{cname} %zu {offs}\\n", sizeof(struct {cname}), {args});')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    measured = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out}
    for cname, st, _fields in LAYOUTS:
        size, offs = _offsets(st)
        c_size, *c_offs = measured[cname]
        if cname == "fuse_direntplus":  # sizeof includes nothing of the name; ours neither
            assert size == c_size == 152
        else:
            assert size == c_size, cname
        assert offs == c_offs, cname


def test_sizes_beyond_the_installed_header() -> None:
    # 7.39 statx: struct fuse_statx is 256 bytes, fuse_statx_out 288 (fuse.h of 6.18)
    assert abi.STATX.size == 256
    assert abi.STATX_OUT_HEAD.size + abi.STATX.size == 288
    assert abi.STATX_IN.size == 24
    assert abi.COPY_FILE_RANGE_OUT.size == 8
    assert abi.INIT_OUT.size == 64 and abi.INIT_IN.size == 64


def test_record_sizes() -> None:
    assert [abi.dirent_size(n) for n in (1, 8, 9, 255)] == [32, 32, 40, 280]
    assert [abi.direntplus_size(n) for n in (1, 8, 9)] == [160, 160, 168]
    assert [abi.init_out_size(m) for m in (4, 5, 22, 23, 45)] == [8, 24, 24, 64, 64]
