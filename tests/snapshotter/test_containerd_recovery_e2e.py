"""End to end with containerd 1.6: the snapshotter runs from an upstream-style config.toml
(`version = 1`, `daemon_mode = "dedicated"`, `recover_policy = "failover"`), the Nydus image is
pulled by tag (`ctr-remote images rpull`) and a container reads a file of it across a kill -9 of
the image's `nydusd-py`: the container sees no error and the right bytes, a new daemon took over
the same FUSE connection, and the snapshot's recorded source is the digest."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import require_device, require_tool
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig
from tests.waiting import wait_until

from .containerd_rig import SNAPSHOTTER, Containerd, SnapshotterProcess, log_tail
from .test_containerd_e2e import nydusify

pytestmark = [pytest.mark.slow, pytest.mark.root]
BIG = "usr/share/big.bin"
BB = "/bin/busybox"
# keeps the file open: the first 64 KiB before the kill, the rest after it
SCRIPT = (f"exec 3< /{BIG}; {BB} dd bs=65536 count=1 <&3 >/dev/null 2>&1; {BB} touch /flag/half; "
          f"while [ ! -e /flag/go ]; do {BB} sleep 0.05; done; {BB} cat <&3 | {BB} sha256sum")

CONFIG = """version = 1
root = "{root}"
address = "{sock}"
daemon_mode = "dedicated"
cleanup_on_close = true

[daemon]
nydusd_path = "{nydusd}"
fs_driver = "fusedev"
recover_policy = "failover"
failover_policy = "resend"
threads_number = 2

[log]
level = "debug"

[cgroup]
enable = false
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, plain_registry: rig.Registry, skopeo: str) -> tuple[str, bytes]:
    work = tmp_path_factory.mktemp("recovery-e2e-image")
    img = oi.make_image(oi.sample_layers(seed=41))
    src = f"{plain_registry.host}/e2e-recovery/app:v1"
    oi.skopeo_push(skopeo, oi.write_layout(work / "layout", "v1", img), "v1", src)
    nydusify(src, src + "-nydus")
    files = {e.name: e.data for layer in img.layers for e in layer.entries if e.kind == "file"}
    return src + "-nydus", files[BIG]


def test_dedicated_failover_under_a_running_container(tmp_path_factory: pytest.TempPathFactory,
                                                      image: tuple[str, bytes]) -> None:
    tmp_path = tmp_path_factory.mktemp("e2e")  # short: the daemons' sockets live under it
    require_device("/dev/fuse")
    for tool in ("containerd", "ctr", "ctr-remote", "runc"):
        require_tool(tool)
    ref, big = image
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.format(root=tmp_path / "snapshotter", sock=tmp_path / "snapshotter.sock",
                                 nydusd=f"{sys.executable} -m nydus_py.cli.daemon"))
    snap = SnapshotterProcess(tmp_path, "--config", str(cfg))
    (tmp_path / "cd").mkdir()
    cd = None
    try:
        cd = Containerd(require_tool("containerd"), require_tool("ctr"), tmp_path / "cd", snap.sock)
        cd.run(require_tool("ctr-remote"), "images", "rpull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
        flag = tmp_path / "flag"
        flag.mkdir()
        argv = [cd.ctr, "--address", cd.sock, "--namespace", "default", "run", "--snapshotter", SNAPSHOTTER, "--rm",
                "--runc-root", str(cd.runc_root), "--fifo-dir", str(cd.work / "fifo"),
                "--mount", f"type=bind,src={flag},dst=/flag,options=rbind:rw", ref, "reader", BB, "sh", "-c", SCRIPT]
        ctr = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: (flag / "half").exists() or ctr.poll() is not None, 120, "the container to read 64 KiB")
        assert ctr.poll() is None, ctr.communicate()
        pids = list((snap.root / "nydusd").glob("*/nydusd.pid"))
        assert len(pids) == 1, pids  # dedicated: the image's own daemon
        before = int(pids[0].read_text())
        os.kill(before, signal.SIGKILL)
        (flag / "go").touch()
        out, err = ctr.communicate(timeout=180)
        logs = f"{err}\nsnapshotter:\n{log_tail(snap.log)}\nnydusd:\n{log_tail(pids[0].parent / 'nydusd.log')}"
        assert ctr.returncode == 0, logs
        assert out.split() == [hashlib.sha256(big[65536:]).hexdigest(), "-"], logs
        wait_until(lambda: "failed over to pid" in snap.log.read_text(), 60, "the failover to be logged")
        after = int(pids[0].read_text())
        assert after != before
        assert "prepare default/" in snap.log.read_text() and "@sha256:" in snap.log.read_text()  # pinned at pull
        cd.run(cd.ctr, "images", "rm", "--sync", ref)
        wait_until(lambda: not list((snap.root / "nydusd").glob("*/nydusd.pid")), 60, "the daemon to be stopped")
    finally:
        if cd is not None:
            cd.stop()
        snap.stop()
