"""recover_policy and daemon_mode with real `nydusd-py` daemons serving a Nydus image from a
registry: kill -9 the daemon under a reader of the mounted image. With `failover` the reader sees
no error (the supervisor kept the /dev/fuse fd, a new daemon took over the same mount); with
`restart` a new daemon serves the image again at the same path. In dedicated mode each image has
its own daemon, and only the killed one is recovered."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.snapshotter.dedicated import DedicatedDaemons
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig
from tests.waiting import wait_until

from .test_containerd_e2e import nydusify

pytestmark = [pytest.mark.slow, pytest.mark.root]
BIG = "usr/share/big.bin"


def files_of(img: oi.OciImage) -> dict[str, bytes]:
    return {e.name: e.data for layer in img.layers for e in layer.entries if e.kind == "file"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, plain_registry: rig.Registry,
           skopeo: str) -> list[tuple[str, dict[str, bytes]]]:
    """Two Nydus images (docker:// source, files)."""
    require_device("/dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    work = tmp_path_factory.mktemp("recovery-images")
    out = []
    for seed in (11, 12):
        img = oi.make_image(oi.sample_layers(seed=seed))
        layout = oi.write_layout(work / f"layout{seed}", "v1", img)
        src = f"{plain_registry.host}/recovery/app{seed}:v1"
        oi.skopeo_push(skopeo, layout, "v1", src)
        nydusify(src, src + "-nydus")
        out.append(("docker://" + src + "-nydus", files_of(img)))
    return out


def settings(policy: str) -> DaemonSettings:
    return DaemonSettings(command=[sys.executable, "-m", "nydus_py.cli.daemon"],
                          args=["--thread-num", "2", "--log-level", "info"], env={}, docker_config_paths=[],
                          recover_policy=policy)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "r"
    yield root
    for mnt in sorted(root.glob("mnt*"), reverse=True) + sorted(root.glob("mnt/*")):
        if is_mountpoint(str(mnt)):
            with contextlib.suppress(OSError):
                os.system(f"umount -l {mnt}")


READER = """
import hashlib, sys
with open(sys.argv[1], "rb", buffering=0) as f:
    data = f.read(64 << 10)
    print("half", flush=True)
    sys.stdin.readline()
    f.seek(len(data))  # a range the kernel never had: it asks the daemon
    while chunk := f.read(256 << 10):
        data += chunk
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


class Reader:
    """A process (like a container's) that reads a file in two parts and waits for `go()`
    between them, with the file open and half read. (Not a thread of ours: a daemon started
    while this process had a FUSE file open would inherit it and hang closing it.)"""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", READER, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "half", self.proc.stderr

    def go(self) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the rest is read."""
        out, err = self.proc.communicate("go\n", timeout=120)
        return self.proc.returncode, out.strip(), err


def kill9(pid: int | None) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


def stopped(d: SharedDaemon | DedicatedDaemons) -> None:
    d.stop()


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_failover_reader_sees_no_error(root: Path, images, mode: str) -> None:
    (src, files), (src2, files2) = images
    mounter: SharedDaemon | DedicatedDaemons = (SharedDaemon(str(root), settings("failover")) if mode == "shared"
                                                else DedicatedDaemons(str(root), settings("failover")))
    try:
        mounter.mount("1", src)
        mounter.mount("2", src2)
        daemon = mounter if isinstance(mounter, SharedDaemon) else mounter.daemons["1"]
        other_pid = None if isinstance(mounter, SharedDaemon) else mounter.daemons["2"].pid
        assert daemon.supervisor is not None and daemon.supervisor.has_state
        reader = Reader(os.path.join(mounter.mount_dir("1"), BIG))
        before = daemon.pid
        kill9(before)
        status, out, err = reader.go()
        assert (status, err) == (0, "")
        assert out == f"{len(files[BIG])} {hashlib.sha256(files[BIG]).hexdigest()}"
        with daemon.recovered:
            assert daemon.recovered.wait_for(lambda: daemon.recoveries["failover"] == 1, 60), daemon.log_tail()
        assert daemon.pid != before and daemon.recoveries["restart"] == 0
        # the same mount keeps working, other files too, and the state was saved again for the next crash
        with open(os.path.join(mounter.mount_dir("1"), "etc/passwd"), "rb") as f:
            assert f.read() == files["etc/passwd"]
        assert daemon.supervisor.has_state
        if other_pid is not None:  # dedicated: the other image's daemon was never touched
            assert isinstance(mounter, DedicatedDaemons) and mounter.daemons["2"].pid == other_pid
            assert mounter.daemons["2"].recoveries == {}
        with open(os.path.join(mounter.mount_dir("2"), BIG), "rb") as f:
            assert f.read() == files2[BIG]
    finally:
        stopped(mounter)


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_restart_brings_the_mount_back(root: Path, images, mode: str) -> None:
    (src, files), _ = images
    mounter: SharedDaemon | DedicatedDaemons = (SharedDaemon(str(root), settings("restart")) if mode == "shared"
                                                else DedicatedDaemons(str(root), settings("restart")))
    try:
        mounter.mount("1", src)
        daemon = mounter if isinstance(mounter, SharedDaemon) else mounter.daemons["1"]
        assert daemon.supervisor is None
        path = os.path.join(mounter.mount_dir("1"), BIG)
        with open(path, "rb") as f:
            assert f.read(4096) == files[BIG][:4096]
        before = daemon.pid
        kill9(before)
        with daemon.recovered:
            assert daemon.recovered.wait_for(lambda: daemon.recoveries["restart"] == 1, 60), daemon.log_tail()
        assert daemon.pid not in (None, before) and daemon.is_mounted("1")
        with open(path, "rb") as f:  # a new open: the image is served again at the same path
            assert f.read() == files[BIG]
    finally:
        stopped(mounter)


def test_policy_none_leaves_the_daemon_dead_until_needed(root: Path, images) -> None:
    (src, files), _ = images
    d = SharedDaemon(str(root), settings("none"))
    try:
        d.mount("1", src)
        before = d.pid
        kill9(before)
        wait_until(lambda: d._proc is not None and d._proc.poll() is not None, 30, "the daemon to exit")
        assert d.recoveries == {} and not d.is_mounted("1")
        d.mount("1", src)  # the next mount starts one (today's lazy path)
        assert d.pid != before
        with open(os.path.join(d.mount_dir("1"), BIG), "rb") as f:
            assert f.read() == files[BIG]
    finally:
        d.stop()
