"""POSIX ACLs through `nydusd-py fuse` (real mounts): the image's ACLs read back as the source's,
the kernel enforces them (FUSE_POSIX_ACL), and caches them, so a warm `ls -l` sends no GETXATTR
for them any more."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builder.erofs_rig import erofs_available, erofs_mount
from tests.fs.mountrig import build, nydusd

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("setfacl") is None, reason="acl tools missing (scripts/install.sh)"),
]

OTHER_UID = 12345  # a user with no entry in the image but its ACLs
OTHER_GID = 23456
PLAIN_FILES = 24


def _setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True, capture_output=True)


def make_acl_tree(src: Path) -> None:
    """Access and default ACLs on directories, files readable only through an ACL, files an ACL
    keeps from a user the mode bits would let in, and plain files beside them."""
    src.mkdir()
    shared = src / "shared"
    shared.mkdir()
    _setfacl("-m", f"u:{OTHER_UID}:rx,g:2000:rwx", str(shared))
    _setfacl("-d", "-m", f"u:{OTHER_UID}:rx,g:2000:r-x,o::---", str(shared))
    granted = shared / "granted"  # 0640 root:root: only the ACL lets OTHER_UID read
    granted.write_bytes(b"granted\n")
    granted.chmod(0o640)
    _setfacl("-m", f"u:{OTHER_UID}:r", str(granted))
    denied = shared / "denied"  # 0644: the mode bits would let anyone read, the ACL says no
    denied.write_bytes(b"denied\n")
    denied.chmod(0o644)
    _setfacl("-m", f"u:{OTHER_UID}:---", str(denied))
    by_group = shared / "by-group"  # 0600: readable through a named group entry
    by_group.write_bytes(b"group\n")
    by_group.chmod(0o600)
    _setfacl("-m", f"g:{OTHER_GID}:r", str(by_group))
    masked = shared / "masked"  # the named entry grants rw, the mask only w
    masked.write_bytes(b"masked\n")
    _setfacl("-m", f"u:{OTHER_UID}:rw,m::w", str(masked))
    private = src / "private"  # 0700: only the ACL lets OTHER_UID through
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    _setfacl("-m", f"u:{OTHER_UID}:x", str(private))
    (private / "inside").write_bytes(b"inside\n")
    (private / "inside").chmod(0o644)
    closed = src / "closed"  # 0755, but an ACL shuts OTHER_UID out of it
    closed.mkdir()
    _setfacl("-m", f"u:{OTHER_UID}:---", str(closed))
    (closed / "inside").write_bytes(b"x\n")
    plain = src / "plain"
    plain.mkdir()
    for i in range(PLAIN_FILES):
        (plain / f"f{i:02d}").write_bytes(b"%d\n" % i)
    os.setxattr(plain / "f00", "user.note", b"an ordinary xattr beside the ACLs")
    (src / "readme").write_bytes(b"readme\n")
    (src / "readme").chmod(0o644)


@pytest.fixture(scope="module")
def acl_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("acl")
    src = work / "src"
    make_acl_tree(src)
    img = build(str(src), str(work / "img"))
    (work / "views.json").write_text(json.dumps(img.views))
    return src, work


def _getfacl(root: Path) -> dict[str, str]:
    """`getfacl -R` output per file (it walks in readdir order, which is the filesystem's)."""
    out = subprocess.run(["getfacl", "-R", "-n", "."], cwd=root, check=True, capture_output=True, text=True)
    blocks = [b for b in out.stdout.split("\n\n") if b.strip()]
    return {b.splitlines()[0]: b for b in blocks}


@pytest.mark.slow
def test_getfacl_through_the_mount_equals_the_source(acl_image: tuple[Path, Path]) -> None:
    src, work = acl_image
    img = work / "img"
    with nydusd(str(img / "boot"), str(img / "blobs"), str(work / "mnt-getfacl"), str(work)) as d:
        want, got = _getfacl(src), _getfacl(Path(d.mountpoint))
    text = "".join(want.values())
    assert "default:user:12345:r-x" in text and "user:12345:---" in text  # (the tree has both kinds)
    assert len(want) == 12 + PLAIN_FILES
    assert got == want


# The probe runs as OTHER_UID/OTHER_GID (no supplementary groups) in a child process, from an
# fd on the tree's root opened by root: the test's tmp directory itself is not traversable.
PROBE = r"""
import json, os, sys
fd = int(sys.argv[1])
os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[2]))
out = {}
for rel in sys.argv[4:]:
    try:
        f = os.open(rel, os.O_RDONLY, dir_fd=fd)
        os.read(f, 16)
        os.close(f)
        out[rel] = "ok"
    except OSError as e:
        out[rel] = os.strerror(e.errno)
print(json.dumps(out))
"""
PROBED = ["shared/granted", "shared/denied", "shared/by-group", "shared/masked", "private/inside", "closed/inside",
          "readme", "plain/f00"]


def _probe(root: str) -> dict[str, str]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, str(fd), str(OTHER_UID), str(OTHER_GID), *PROBED],
                             pass_fds=(fd,), check=True, capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_the_kernel_enforces_the_images_acls(acl_image: tuple[Path, Path]) -> None:
    src, work = acl_image
    img = work / "img"
    want = _probe(str(src))
    denied = os.strerror(errno.EACCES)
    assert want == {"shared/granted": "ok", "shared/denied": denied, "shared/by-group": "ok", "shared/masked": denied,
                    "private/inside": "ok", "closed/inside": denied, "readme": "ok", "plain/f00": "ok"}
    with nydusd(str(img / "boot"), str(img / "blobs"), str(work / "mnt-perm"), str(work)) as d:
        assert _probe(d.mountpoint) == want


@pytest.mark.slow
def test_kernel_erofs_reads_the_same_acls_from_the_bootstrap(acl_image: tuple[Path, Path]) -> None:
    """The kernel's own reader of the same v6 bootstrap is the oracle for how the ACLs are stored."""
    erofs_available()
    src, work = acl_image
    mnt = work / "mnt-erofs"
    mnt.mkdir(exist_ok=True)
    with erofs_mount(str(work / "img" / "boot"), json.loads((work / "views.json").read_text()), str(mnt)):
        assert _getfacl(mnt) == _getfacl(src)
        assert _probe(str(mnt)) == _probe(str(src))


_ACL_GETXATTR = re.compile(r"FUSE GETXATTR .*name=b'(system\.posix_acl_(?:access|default))'")


def _acl_getxattrs(log_text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in _ACL_GETXATTR.finditer(log_text):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


@pytest.mark.slow
def test_a_warm_ls_l_sends_no_acl_getxattr(acl_image: tuple[Path, Path]) -> None:
    """The daemon's debug log has one line per request, written before the reply: once `ls`
    returns, every request it caused is in the log."""
    _src, work = acl_image
    img = work / "img"
    with nydusd(str(img / "boot"), str(img / "blobs"), str(work / "mnt-count"), str(work), log_level="debug") as d:
        marks = []
        for _ in range(3):
            marks.append(len(d.log_text()))
            subprocess.run(["ls", "-l", "plain", "shared"], cwd=d.mountpoint, check=True, capture_output=True)
        text = d.log_text()
    first = _acl_getxattrs(text[marks[0] : marks[1]])
    second = _acl_getxattrs(text[marks[1] : marks[2]])
    third = _acl_getxattrs(text[marks[2] :])
    # the first pass asked for each file's ACL (the counting works) ...
    assert first.get("system.posix_acl_access", 0) >= PLAIN_FILES, first
    # ... and the kernel kept every answer, "no ACL" included
    assert second == {} and third == {}, (second, third)


@pytest.mark.slow
def test_shared_daemon_image_without_xattrs_beside_one_with_acls(acl_image: tuple[Path, Path]) -> None:
    """A shared daemon negotiates POSIX_ACL before any image is there; an image without xattrs
    asked first must not switch xattrs off for the connection (ENOSYS would)."""
    from tests.daemon.rig import Api, DaemonProc, cleanup_mount, make_image, snapshotter_config

    src, work = acl_image
    shared = work / "shared-daemon"
    shared.mkdir()
    bare = make_image(str(shared), seed=7, files=4)
    mnt, sock = shared / "mnt", str(shared / "api.sock")
    mnt.mkdir()
    d = DaemonProc(["fuse", "--mountpoint", str(mnt), "--apisock", sock], str(shared / "daemon.log"))
    api = Api(sock)
    try:
        d.wait_socket(sock)
        for name, boot, blobs in (("bare", bare.boot, bare.blobs),
                                  ("acl", str(work / "img" / "boot"), str(work / "img" / "blobs"))):
            body = {"fs_type": "rafs", "source": boot, "config": snapshotter_config(blobs, name)}
            r = api.request("POST", "/api/v1/mount", {"mountpoint": f"/{name}"}, body)
            assert r.status == 204, r.body
        subprocess.run(["ls", "-l", str(mnt / "bare")], check=True, capture_output=True)
        with pytest.raises(OSError) as ei:
            os.getxattr(mnt / "bare" / "id-7", "user.anything")
        assert ei.value.errno == errno.ENODATA  # the image has none, and xattrs stay on
        assert os.listxattr(mnt / "bare" / "id-7") == []
        assert os.getxattr(mnt / "acl" / "plain" / "f00", "user.note") == b"an ordinary xattr beside the ACLs"
        assert _probe(str(mnt / "acl")) == _probe(str(src))
        assert _getfacl(mnt / "acl") == _getfacl(src)
        assert d.stop() == 0
    finally:
        api.close()
        d.kill()
        cleanup_mount(str(mnt))
