"""ACLs from build sources: a directory (getxattr gives the kernel's binary form) and OCI layer
tars, which carry them as binary `SCHILY.xattr.system.posix_acl_*` (Go archive/tar, docker,
buildkit) or as text `SCHILY.acl.access` / `SCHILY.acl.default` (GNU tar --acls, star)."""

import grp
import io
import os
import pwd
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from nydus_py.builder.sources import SourceStats, tree_from_directory, tree_from_tar
from nydus_py.rafs.acl import ACL_ACCESS, ACL_DEFAULT, acl_from_text
from tests.builder.treeutil import lookup, make_tar, member

TEXT = "user::rw-,user:1000:r--,group::r--,mask::r--,other::---"
DEFAULT_TEXT = "user::rwx,user:1000:r-x,group::r-x,mask::r-x,other::---"


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl missing (scripts/install.sh)")
def test_directory_acls_are_kept_in_the_kernels_form(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    subprocess.run(["setfacl", "--set", TEXT, str(tmp_path / "d" / "f")], check=True)
    subprocess.run(["setfacl", "-d", "--set", DEFAULT_TEXT, str(tmp_path / "d")], check=True)
    root = tree_from_directory(tmp_path)
    assert lookup(root, "d/f").xattrs[ACL_ACCESS] == acl_from_text(TEXT)
    assert lookup(root, "d").xattrs[ACL_DEFAULT] == acl_from_text(DEFAULT_TEXT)


def test_tar_binary_acl_xattrs_are_kept() -> None:
    value = acl_from_text(TEXT)
    pax = {"SCHILY.xattr.system.posix_acl_access": value.decode("utf-8", "surrogateescape")}
    root = tree_from_tar(io.BytesIO(make_tar([member("f", data=b"x", pax=pax)])))
    assert lookup(root, "f").xattrs[ACL_ACCESS] == value


def test_tar_text_acls_become_acl_xattrs() -> None:
    pax = {"SCHILY.acl.access": TEXT, "SCHILY.acl.default": DEFAULT_TEXT.replace(",", "\n")}
    root = tree_from_tar(io.BytesIO(make_tar([member("d", tarfile.DIRTYPE, mode=0o755, pax=pax)])))
    xattrs = lookup(root, "d").xattrs
    assert xattrs.get(ACL_ACCESS) == acl_from_text(TEXT)
    assert xattrs.get(ACL_DEFAULT) == acl_from_text(DEFAULT_TEXT)


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("setfacl") is None, reason="GNU tar/setfacl missing")
def test_gnu_tar_writes_the_text_form(tmp_path: Path) -> None:
    """Why the text form matters: GNU tar --acls stores no binary ACL xattr, only text."""
    (tmp_path / "f").write_bytes(b"x")
    subprocess.run(["setfacl", "--set", TEXT, str(tmp_path / "f")], check=True)
    out = tmp_path / "l.tar"
    subprocess.run(["tar", "--acls", "--format=posix", "-cf", str(out), "-C", str(tmp_path), "f"], check=True)
    with tarfile.open(out) as t:
        pax = t.getmember("f").pax_headers
    assert "SCHILY.acl.access" in pax and not any(k.startswith("SCHILY.xattr.system.") for k in pax)
    # GNU tar writes names, also with --numeric-owner: they need a passwd to resolve them
    text = pax["SCHILY.acl.access"]
    users = {p.pw_name: p.pw_uid for p in pwd.getpwall()}
    want = os.getxattr(tmp_path / "f", ACL_ACCESS.decode())
    assert acl_from_text(text, user_id=users.__getitem__, group_id=lambda g: grp.getgrnam(g).gr_gid) == want
    if re.search(r"^user:[^:0-9][^:]*:", text, re.M):  # (uid 1000 has a name on this host)
        with pytest.raises(ValueError, match="a name"):
            acl_from_text(text)


def test_tar_text_acl_with_an_unknown_name_is_skipped_and_counted() -> None:
    """A name the build host cannot resolve loses that ACL (as `tar -x --acls` would), logged
    and counted; the entry and its other xattrs stay. A binary form beside the text wins."""
    stats = SourceStats()
    pax = {"SCHILY.acl.access": "user::rw-,user:no-such-user-xyz:r--,group::r--,mask::r--,other::---",
           "SCHILY.xattr.user.keep": "1"}
    root = tree_from_tar(io.BytesIO(make_tar([member("f", pax=pax)])), stats=stats)
    assert lookup(root, "f").xattrs == {b"user.keep": b"1"}
    assert stats.skipped_xattrs == 1 and ACL_ACCESS in stats.skipped_xattr_names
    binary = acl_from_text(TEXT)
    pax = {"SCHILY.acl.access": "user::---,group::---,other::---",
           "SCHILY.xattr.system.posix_acl_access": binary.decode("utf-8", "surrogateescape")}
    root = tree_from_tar(io.BytesIO(make_tar([member("g", pax=pax)])))
    assert lookup(root, "g").xattrs[ACL_ACCESS] == binary
