"""Images are mounted by digest: a tag resolved at pull time (`ctr-remote rpull` passes only the
tag) is recorded in the snapshot's store row, and a restarted snapshotter mounts that digest
again, even after the tag moved in the registry. Real registry, real `nydusd-py`."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

from nydus_py.snapshotter import labels as L
from nydus_py.snapshotter.errors import AlreadyExists
from nydus_py.snapshotter.main import _remount
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.snapshotter.snapshotter import Snapshotter
from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig

from .test_containerd_e2e import nydusify

pytestmark = [pytest.mark.slow, pytest.mark.root]
BIG = "usr/share/big.bin"


def settings() -> DaemonSettings:
    return DaemonSettings(command=[sys.executable, "-m", "nydus_py.cli.daemon"],
                          args=["--thread-num", "2", "--log-level", "info"], env={}, docker_config_paths=[],
                          recover_policy="restart")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_restart_remounts_the_digest_pulled_not_the_moved_tag(tmp_path: Path, plain_registry: rig.Registry,
                                                              skopeo: str) -> None:
    require_device("/dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    files = []
    for seed in (21, 22):
        img = oi.make_image(oi.sample_layers(seed=seed))
        src = f"{plain_registry.host}/pin/src{seed}:v1"
        oi.skopeo_push(skopeo, oi.write_layout(tmp_path / f"layout{seed}", "v1", img), "v1", src)
        files.append({e.name: e.data for layer in img.layers for e in layer.entries if e.kind == "file"})
    assert files[0][BIG] != files[1][BIG]
    tag = f"{plain_registry.host}/pin/app:latest-nydus"
    nydusify(f"{plain_registry.host}/pin/src21:v1", tag)

    state = str(tmp_path / "state")
    labels = {L.TARGET_REF: "sha256:chain", L.STARGZ_REFERENCE: tag, L.STARGZ_DIGEST: "sha256:boot",
              L.NYDUS_BOOTSTRAP: "true"}
    daemon = SharedDaemon(state, settings())
    sn = Snapshotter(state, daemon)
    try:
        with pytest.raises(AlreadyExists):  # a remote Prepare as containerd's unpacker makes it
            sn.prepare("default/1/extract sha256:chain", "", labels)
        (rec,) = sn.bootstrap_snapshots()
        assert rec.source.startswith(f"docker://{plain_registry.host}/pin/app@sha256:"), rec.source
        assert read(os.path.join(daemon.mount_dir(rec.id), BIG)) == files[0][BIG]
    finally:
        sn.close()
        daemon.stop()  # the node goes down: nothing of the old daemon is left to adopt
    assert not is_mountpoint(daemon.mnt)

    nydusify(f"{plain_registry.host}/pin/src22:v1", tag)  # the tag moves to another image

    daemon = SharedDaemon(state, settings())
    sn = Snapshotter(state, daemon)
    try:
        _remount(sn, daemon)  # what a restarted snapshotter does first
        (rec2,) = sn.bootstrap_snapshots()
        assert rec2.source == rec.source
        assert daemon.is_mounted(rec.id)
        assert read(os.path.join(daemon.mount_dir(rec.id), BIG)) == files[0][BIG]  # the original image
    finally:
        sn.close()
        daemon.stop()
        if is_mountpoint(daemon.mnt):
            with contextlib.suppress(OSError):
                os.system(f"umount -l {daemon.mnt}")
