"""The snapshotter's own Prometheus endpoint (`[metrics] address`): snapshots by kind, Nydus
images, daemons, mounts, daemon recoveries, and pull/mount latency histograms, scraped over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nydus_py.snapshotter import labels as L
from nydus_py.snapshotter.errors import AlreadyExists
from nydus_py.snapshotter.grpc_gen import snapshots_pb2 as pb
from nydus_py.snapshotter.grpc_gen import snapshots_pb2_grpc as pb_grpc
from nydus_py.snapshotter.metrics import SnapshotterMetrics
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.snapshotter.snapshotter import Snapshotter
from tests.conftest import require_device
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig
from tests.waiting import wait_until

from .containerd_rig import SnapshotterProcess
from .test_containerd_e2e import nydusify


def scrape(url: str) -> dict[str, float]:
    """{'name{label="v"}': value} of every sample."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lab = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{lab}}}" if lab else "")] = s.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_address_from_the_config(tmp_path: Path) -> None:
    """The real command line: upstream's [metrics] table, daemon_mode none, an ordinary Prepare."""
    port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'version = 1\ndaemon_mode = "none"\nuid = 1234\ngid = 2345\n[metrics]\n'
                   f'address = "127.0.0.1:{port}"\nhung_io_interval = "10s"\n')
    snap = SnapshotterProcess(tmp_path, "--config", str(cfg))
    try:
        st = os.stat(snap.sock)  # upstream's uid/gid: the socket's owner
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 2345, 0o660)
        url = f"http://127.0.0.1:{port}/metrics"
        m = scrape(url)
        assert m['nydus_snapshotter_snapshots{kind="active"}'] == 0 and m["nydus_snapshotter_daemons"] == 0
        with grpc.insecure_channel("unix://" + snap.sock) as ch:
            pb_grpc.SnapshotsStub(ch).Prepare(pb.PrepareSnapshotRequest(key="k1"), timeout=30)
        m = scrape(url)
        assert m['nydus_snapshotter_snapshots{kind="active"}'] == 1
        assert m["nydus_snapshotter_pull_duration_seconds_count"] == 0
    finally:
        snap.stop()


def test_bad_metrics_address_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('version = 1\ndaemon_mode = "none"\n[metrics]\naddress = "localhost"\n')
    r = subprocess.run([sys.executable, "-m", "nydus_py.snapshotter", "--config", str(cfg), "--root",
                        str(tmp_path / "root"), "--address", str(tmp_path / "s.sock")], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("nydus-snapshotter-py: error: [metrics] address localhost: metrics "
                                                 "address 'localhost' must be HOST:PORT or :PORT")


@pytest.mark.slow
@pytest.mark.root
def test_pull_mount_and_recovery_are_counted(tmp_path: Path, plain_registry: rig.Registry, skopeo: str) -> None:
    require_device("/dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    img = oi.make_image(oi.sample_layers(seed=31))
    src = f"{plain_registry.host}/metrics/src:v1"
    oi.skopeo_push(skopeo, oi.write_layout(tmp_path / "layout", "v1", img), "v1", src)
    nydusify(src, src + "-nydus")

    metrics = SnapshotterMetrics()
    state = str(tmp_path / "state")
    daemon = SharedDaemon(state, DaemonSettings(command=[sys.executable, "-m", "nydus_py.cli.daemon"],
                                                args=["--thread-num", "2"], env={}, docker_config_paths=[],
                                                recover_policy="restart", on_mount=metrics.mount.observe))
    sn = Snapshotter(state, daemon)
    sn.on_pull = metrics.pull.observe
    metrics.watch(sn, daemon)
    host, port = metrics.serve("127.0.0.1:0")
    url = f"http://{host}:{port}/metrics"
    try:
        labels = {L.TARGET_REF: "sha256:c", L.STARGZ_REFERENCE: src + "-nydus", L.NYDUS_BOOTSTRAP: "true"}
        with pytest.raises(AlreadyExists):
            sn.prepare("default/1/extract sha256:c", "", labels)
        sn.prepare("ctr", "sha256:c", {})
        m = scrape(url)
        assert m['nydus_snapshotter_snapshots{kind="committed"}'] == 1
        assert m['nydus_snapshotter_snapshots{kind="active"}'] == 1
        assert m["nydus_snapshotter_nydus_images"] == 1
        assert (m["nydus_snapshotter_daemons"], m["nydus_snapshotter_mounts"]) == (1, 1)
        assert m["nydus_snapshotter_pull_duration_seconds_count"] == 1
        assert m["nydus_snapshotter_mount_duration_seconds_count"] == 1
        assert m['nydus_snapshotter_daemon_recoveries_total{result="restart"}'] == 0
        assert 0 < m["nydus_snapshotter_mount_duration_seconds_sum"] <= m["nydus_snapshotter_pull_duration_seconds_sum"]

        pid = daemon.pid
        assert pid is not None
        os.kill(pid, 9)
        wait_until(lambda: scrape(url)['nydus_snapshotter_daemon_recoveries_total{result="restart"}'] == 1, 60,
                   "the restart to be counted")
        m = scrape(url)
        assert m["nydus_snapshotter_mount_duration_seconds_count"] == 2  # the remount after the restart
        assert (m["nydus_snapshotter_daemons"], m["nydus_snapshotter_mounts"]) == (1, 1)
    finally:
        metrics.close()
        sn.close()
        daemon.stop()
