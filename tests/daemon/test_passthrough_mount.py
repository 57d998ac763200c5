"""`fs_type=passthroughfs` mounted through the API into `nydusd-py fuse` (issue 16, item 8): real
reads through the kernel, beside a RAFS image on the same connection (which keeps the kernel
skipping OPEN), and the share stays read-only there."""

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import require_device
from tests.daemon.rig import (
    Api,
    DaemonProc,
    assert_error,
    cleanup_mount,
    make_image,
    make_tree,
    snapshotter_config,
    wait_state,
)

pytestmark = pytest.mark.slow
V1 = "/api/v1"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    require_device("/dev/fuse")
    for d in ("mnt", "sock"):
        (tmp_path / d).mkdir()
    (tmp_path / "sock").chmod(0o700)
    yield tmp_path
    cleanup_mount(str(tmp_path / "mnt"))


def read_tree(base: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        with open(os.path.join(base, rel), "rb") as f:
            assert f.read() == data, rel


def test_passthroughfs_api_mount_reads_and_stays_read_only(root: Path) -> None:
    share = root / "share"
    files = make_tree(str(share), seed=7, files=24)
    image = make_image(str(root / "work"), seed=3, files=8)
    sock, mnt = str(root / "sock/api.sock"), str(root / "mnt")
    d = DaemonProc(["fuse", "--thread-num", "2", "--mountpoint", mnt, "--apisock", sock, "--log-level", "info"],
                   str(root / "out.log"))
    api = Api(sock)
    try:
        d.wait_socket(sock)
        wait_state(api, "RUNNING")
        # the image first: its OPEN answers ENOSYS and the kernel stops sending OPEN at all
        r = api.request("POST", f"{V1}/mount", raw_query="mountpoint=/img",
                        body={"fs_type": "rafs", "source": image.boot, "config": snapshotter_config(image.blobs)})
        assert r.status == 204, r.body
        read_tree(os.path.join(mnt, "img"), image.files)
        r = api.request("POST", f"{V1}/mount", raw_query="mountpoint=/pt",
                        body={"fs_type": "passthroughfs", "source": str(share), "config": ""})
        assert r.status == 204, r.body
        pt = os.path.join(mnt, "pt")
        assert sorted(os.listdir(pt)) == sorted(os.listdir(share))
        read_tree(pt, files)
        read_tree(os.path.join(mnt, "img"), image.files)
        assert os.readlink(os.path.join(pt, "link")) == "id-7"
        with open(os.path.join(pt, "link"), "rb") as f:
            assert f.read() == files["id-7"]
        # positioned reads and a file read twice at once
        big = max(files, key=lambda k: len(files[k]))
        with open(os.path.join(pt, big), "rb") as a, open(os.path.join(pt, big), "rb") as b:
            assert os.pread(a.fileno(), 100, 70_000) == files[big][70_000:70_100]
            assert b.read() == files[big]
        target = share / "id-7"
        before = target.stat()
        # read-only through this daemon: writes, truncation and new names are refused
        victim = os.path.join(pt, "id-7")
        for attempt in (lambda: os.close(os.open(victim, os.O_RDWR)),
                        lambda: os.close(os.open(victim, os.O_WRONLY | os.O_TRUNC)),
                        lambda: os.close(os.open(victim, os.O_RDONLY | os.O_TRUNC)),
                        lambda: os.truncate(os.path.join(pt, "id-7"), 0),
                        lambda: os.mkdir(os.path.join(pt, "new")),
                        lambda: os.unlink(os.path.join(pt, "id-7"))):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        after = target.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        assert target.read_bytes() == files["id-7"]
        assert api.request("DELETE", f"{V1}/mount", raw_query="mountpoint=/pt").status == 204
        assert sorted(os.listdir(mnt)) == ["img"]
        assert_error(api.request("DELETE", f"{V1}/mount", raw_query="mountpoint=/pt"), 404)
        assert d.stop() == 0
    finally:
        api.close()
        d.kill()
