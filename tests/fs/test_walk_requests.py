"""How many FUSE requests the kernel sends through `nydusd-py fuse` for a walk (real mounts),
counted per opcode by the daemon's own metrics (Prometheus `/metrics` on its API socket).

Round trips are what a metadata walk costs through FUSE, and on a loaded machine each one also
waits for a CPU: these counts are the stable measure of the request path's cost."""

import errno
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.daemon.rig import Api
from tests.fs.mountrig import Daemon, build, nydusd
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("ls") is None, reason="needs ls"),
]

FILES = 40
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
_SAMPLE = re.compile(r'^nydusd_fuse_requests_total\{mountpoint="[^"]*",op="(\w+)"\} (\S+)$', re.M)


def requests(api: Api) -> dict[str, int]:
    """FUSE requests answered so far, per opcode name."""
    r = api.request("GET", "/metrics")
    assert r.status == 200, r.body
    out: dict[str, int] = {}
    for op, v in _SAMPLE.findall(r.body.decode()):
        out[op] = out.get(op, 0) + int(float(v))
    return out


def counted(api: Api, fn: object, *args: object) -> dict[str, int]:
    """Requests by opcode that one call of `fn` caused (every request `ls` caused is answered,
    and so counted, before it returns)."""
    before = requests(api)
    fn(*args)  # type: ignore[operator]
    after = requests(api)
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def ls_l(root: str) -> None:
    subprocess.run(["ls", "-lR"], cwd=root, check=True, capture_output=True)


@pytest.fixture(scope="module")
def xattr_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FILES files in two directories; one carries security.capability, one a user xattr."""
    work = tmp_path_factory.mktemp("walk")
    src = work / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        for i in range(FILES // 2):
            (src / d / f"f{i:02d}").write_bytes(b"%d\n" % i)
    os.setxattr(src / "a" / "f00", "security.capability", CAPABILITY)
    os.setxattr(src / "b" / "f01", "user.note", b"note")
    build(str(src), str(work / "img"), views=False)
    return work


def _scanned(d: Daemon) -> bool:
    text = d.log_text()
    assert "xattr name scan failed" not in text, text[-2000:]
    return "xattr names scanned" in text


@pytest.mark.slow
def test_warm_ls_l_of_an_image_with_xattrs_asks_for_no_label_per_file(xattr_image: Path) -> None:
    """`ls -l` asks each file for security.selinux, and the kernel caches no such answer: with
    ENODATA every warm `ls -lR` cost one GETXATTR per entry. The image carries no SELinux label,
    so the probe answers EOPNOTSUPP and ls stops asking after the first file."""
    work = xattr_image
    img = work / "img"
    sock = str(work / "api-labels.sock")
    with nydusd(str(img / "boot"), str(img / "blobs"), str(work / "mnt-labels"), str(work),
                args=("--apisock", sock)) as d:
        api = Api(sock)
        wait_until(lambda: os.path.exists(sock), 10, "the API socket")
        try:
            cold = counted(api, ls_l, d.mountpoint)
            # the counting works: the cold pass asked every entry (labels before the scan, ACLs)
            assert cold.get("getxattr", 0) >= FILES, cold
            wait_until(lambda: _scanned(d), 30, "the xattr name scan")
            warm = [counted(api, ls_l, d.mountpoint) for _ in range(2)]
        finally:
            api.close()
        mnt = Path(d.mountpoint)
        assert os.getxattr(mnt / "a" / "f00", "security.capability") == CAPABILITY
        assert os.getxattr(mnt / "b" / "f01", "user.note") == b"note"
        for path, name, err in ((mnt / "a" / "f01", "security.selinux", errno.EOPNOTSUPP),
                                (mnt / "a" / "f01", "security.capability", errno.ENODATA),
                                (mnt / "a" / "f01", "user.note", errno.ENODATA)):
            with pytest.raises(OSError) as ei:
                os.getxattr(path, name)
            assert ei.value.errno == err, (path, name)
    for w in warm:
        # one label probe per `ls` (the first file), the ACLs cached by the kernel, nothing else
        assert w == {"getxattr": 1}, warm


def _run(cmd: list[str], cwd: str) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


@pytest.mark.slow
def test_cold_walks_send_one_round_trip_per_directory_piece_and_per_file(xattr_image: Path) -> None:
    """A cold `find`: READDIRPLUS fills every dentry (no LOOKUP, no GETATTR after it), then one
    empty READDIR ends each directory; OPENDIR and OPEN answer ENOSYS once and are never sent
    again, nor RELEASE(DIR); reading every file: one LOOKUP per name and one READ per small
    file, FLUSH answered ENOSYS once."""
    work = xattr_image
    img = work / "img"
    sock = str(work / "api-walk.sock")
    dirs, files = 3, FILES
    with nydusd(str(img / "boot"), str(img / "blobs"), str(work / "mnt-walk"), str(work),
                args=("--apisock", sock)) as d:
        api = Api(sock)
        wait_until(lambda: os.path.exists(sock), 10, "the API socket")
        try:
            find = counted(api, _run, ["find", ".", "-type", "f"], d.mountpoint)
            again = counted(api, _run, ["find", ".", "-type", "f"], d.mountpoint)
        finally:
            api.close()
    with nydusd(str(img / "boot"), str(img / "blobs"), str(work / "mnt-walk"), str(work),
                args=("--apisock", sock)) as d:
        api = Api(sock)
        wait_until(lambda: os.path.exists(sock), 10, "the API socket")
        try:
            names = [f"{p}/f{i:02d}" for p in ("a", "b") for i in range(FILES // 2)]
            cat = counted(api, _run, ["cat", *names], d.mountpoint)
        finally:
            api.close()
    statfs = find.pop("statfs", 0)
    assert statfs <= 1 and find.pop("opendir", 0) <= 1, find
    assert find == {"readdirplus": dirs, "readdir": dirs}, find
    assert set(again) <= {"statfs"}, again  # everything cached: entries, attributes, listings
    assert cat.pop("open", 0) <= 1 and cat.pop("flush", 0) <= 1, cat
    assert cat == {"lookup": 2 + files, "read": files}, cat
