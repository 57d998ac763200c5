"""POSIX ACL xattr codec: the kernel (setfacl on the host filesystem, read back with getxattr) is
the oracle for the binary form, and for which values it accepts."""

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nydus_py.rafs.acl import (
    ACL_ACCESS,
    ACL_DEFAULT,
    GROUP,
    GROUP_OBJ,
    MASK,
    OTHER,
    USER,
    USER_OBJ,
    acl_entries,
    acl_from_text,
    acl_to_xattr,
    acl_xattr_problem,
)

needs_setfacl = pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl missing (scripts/install.sh)")

CASES = [  # (an ACL of only u/g/o is kept in the mode bits: the kernel stores no xattr for it)
    "user::rw-,user:1000:r--,group::r--,group:50:rw-,mask::rw-,other::r--",
    "u::rwx,u:70000:--x,u:3:rw,g::r-x,g:2:r,m::rwx,o::r-x",
]


def _kernel_value(tmp: Path, text: str, default: bool = False) -> bytes:
    p = tmp / "d"
    p.mkdir(exist_ok=True)
    args = ["-d", "--set", text] if default else ["--set", text]
    subprocess.run(["setfacl", *args, str(p)], check=True, capture_output=True)
    return os.getxattr(p, (ACL_DEFAULT if default else ACL_ACCESS).decode())


@needs_setfacl
@pytest.mark.parametrize("text", CASES)
def test_text_form_gives_the_kernels_bytes(tmp_path: Path, text: str) -> None:
    want = _kernel_value(tmp_path, text)
    assert acl_from_text(text) == want
    assert acl_xattr_problem(want) is None


@needs_setfacl
def test_default_acl_and_star_form(tmp_path: Path) -> None:
    want = _kernel_value(tmp_path, "u::rwx,u:1000:r-x,g::r-x,m::r-x,o::---", default=True)
    # star / GNU tar write "user:NAME:perm:ID" (name resolved at archive time, id authoritative),
    # newline separated with comments, in any order
    star = "# comment\nother::---\nuser:alice:r-x:1000\nuser::rwx\ngroup::r-x\nmask::r-x\n"
    assert acl_from_text(star) == want


def test_names_need_a_resolver() -> None:
    text = "u::rw,u:alice:r,g::r,g:staff:r,m::r,o::-"
    with pytest.raises(ValueError, match="a name"):
        acl_from_text(text)
    value = acl_from_text(text, user_id={"alice": 7}.__getitem__, group_id={"staff": 9}.__getitem__)
    assert [(t, i) for t, _, i in acl_entries(value) if t in (USER, GROUP)] == [(USER, 7), (GROUP, 9)]


def test_minimal_acl() -> None:
    assert acl_entries(acl_from_text("u::rw-,g::r--,o::---")) == [
        (USER_OBJ, 6, 0xFFFFFFFF), (GROUP_OBJ, 4, 0xFFFFFFFF), (OTHER, 0, 0xFFFFFFFF)]


def test_entries_roundtrip_in_canonical_order() -> None:
    value = acl_to_xattr([(OTHER, 4, 0), (GROUP, 6, 9), (USER, 1, 7), (USER, 2, 5), (MASK, 7, 0),
                          (GROUP_OBJ, 4, 0), (USER_OBJ, 6, 0)])
    assert [t for t, _, _ in acl_entries(value)] == [USER_OBJ, USER, USER, GROUP_OBJ, GROUP, MASK, OTHER]
    assert [i for t, _, i in acl_entries(value) if t == USER] == [5, 7]


@pytest.mark.parametrize("value, why", [
    (b"", "header"),
    (struct.pack("<I", 1) + struct.pack("<HHI", USER_OBJ, 6, 0), "version"),
    (struct.pack("<I", 2) + b"\x01\x00", "whole entries"),
    (struct.pack("<I", 2) + struct.pack("<HHI", 0x40, 6, 0), "tag"),
    (struct.pack("<I2HI2HI2HI", 2, USER_OBJ, 8, 0, GROUP_OBJ, 4, 0, OTHER, 4, 0), "rwx"),
    (struct.pack("<I2HI2HI", 2, GROUP_OBJ, 4, 0, USER_OBJ, 6, 0), "order"),
    (struct.pack("<I2HI2HI2HI2HI", 2, USER_OBJ, 6, 0, USER, 4, 5, GROUP_OBJ, 4, 0, OTHER, 4, 0), "mask"),
    (struct.pack("<I2HI2HI", 2, USER_OBJ, 6, 0, OTHER, 4, 0), "exactly one"),
])
def test_unusable_values_are_named(value: bytes, why: str) -> None:
    problem = acl_xattr_problem(value)
    assert problem is not None and why in problem


def test_empty_acl_is_valid() -> None:
    assert acl_xattr_problem(struct.pack("<I", 2)) is None


@pytest.mark.parametrize("text", ["user:alice:r--", "u::rw-,o::r--,bogus::r", "u::rq-,g::r,o::r", "m:1:r,u::r,g::r,o::r",
                                  "u::r,g::r"])
def test_bad_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        acl_from_text(text)

