"""A Nydus image from a registry, pulled through the snapshotter's gRPC API with a real shared
`nydusd-py` and `enable_nydus_overlayfs`, handed on both ways the container's mount can go:

* runc: the `nydus-overlayfs-py` helper drops the extraoption and mounts a plain overlay of the
  shared daemon's mount (the image's bytes there, writes in the snapshot's upper directory);
* Kata: a test-side runtime decodes the extraoption like Kata's (virtcontainers/nydusd.go),
  asks a `nydusd-py virtiofs` daemon over its HTTP API to mount `source` with `config` at
  `/rafs/<cid>/lowerdir`, and a QEMU guest (tests/transport/virtio_rig.py) mounts the virtio-fs
  share and reads the image's file there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nydus_py.snapshotter import extraoption as xo
from nydus_py.snapshotter import labels as L
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.transport.mount import MNT_DETACH, is_mountpoint, sys_umount
from tests.conftest import REPO, require_device, require_tool
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig

from .conftest import FakeMounter, Rig
from .test_containerd_e2e import manifest, nydusify
from .test_kata import mount_entry, start

pytestmark = [pytest.mark.slow, pytest.mark.root]
FILE = "etc/passwd"
BIG = "usr/share/big.bin"


def files_of(img: oi.OciImage) -> dict[str, bytes]:
    return {e.name: e.data for layer in img.layers for e in layer.entries if e.kind == "file"}


@pytest.fixture(scope="module")
def nydus_image(tmp_path_factory: pytest.TempPathFactory, plain_registry: rig.Registry,
                skopeo: str) -> tuple[str, str, dict[str, bytes]]:
    """(reference, bootstrap layer digest, files) of a Nydus image in a local registry."""
    require_device("/dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    work = tmp_path_factory.mktemp("kata-image")
    img = oi.make_image(oi.sample_layers(seed=31, big=1 << 20))
    src = f"{plain_registry.host}/kata/app:v1"
    oi.skopeo_push(skopeo, oi.write_layout(work / "layout", "v1", img), "v1", src)
    nydusify(src, src + "-nydus")
    layers = manifest(plain_registry, "kata/app", "v1-nydus")["layers"]
    (boot,) = [ly for ly in layers if ly.get("annotations", {}).get(L.NYDUS_BOOTSTRAP) == "true"]
    return src + "-nydus", boot["digest"], files_of(img)


@pytest.fixture
def pulled(tmp_path: Path, nydus_image: tuple[str, str, dict[str, bytes]]) -> Iterator[tuple[Rig, SharedDaemon]]:
    """A snapshotter (gRPC) on a real shared daemon, the image pulled, a container's snapshot made."""
    ref, digest, _ = nydus_image
    daemon = SharedDaemon(str(tmp_path / "state"), DaemonSettings(
        command=[sys.executable, "-m", "nydus_py.cli.daemon"], args=["--thread-num", "2", "--log-level", "info"],
        env={}, docker_config_paths=[]))
    r = start(tmp_path, FakeMounter(tmp_path / "unused"), nydus_overlayfs=True)
    r.snapshotter.mounter = daemon  # the real daemon behind the same gRPC service
    try:
        labels = {L.TARGET_REF: "sha256:chain", L.STARGZ_REFERENCE: ref, L.STARGZ_DIGEST: digest,
                  L.NYDUS_BOOTSTRAP: "true"}
        with pytest.raises(grpc.RpcError) as e:
            r.prepare("default/1/extract sha256:chain", "", labels)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
        yield r, daemon
    finally:
        r.stop()
        daemon.stop()
        if is_mountpoint(daemon.mnt):
            with contextlib.suppress(OSError):
                sys_umount(daemon.mnt, MNT_DETACH)


def test_runc_gets_a_plain_overlay_of_the_image(pulled: tuple[Rig, SharedDaemon], tmp_path: Path,
                                                nydus_image: tuple[str, str, dict[str, bytes]]) -> None:
    r, daemon = pulled
    files = nydus_image[2]
    (m,) = r.prepare("default/2/ctr", "sha256:chain")
    assert (m.type, m.source) == ("fuse.nydus-overlayfs", "overlay")
    opt = xo.find(m.options)
    assert opt is not None and opt.fs_version == "v6"
    assert opt.source == os.path.join(daemon.cache, nydus_image[1].split(":")[1] + ".image.boot")
    target = tmp_path / "rootfs"
    target.mkdir()
    # what mount.fuse runs for containerd: nydus-overlayfs <source> <target> -o <options>
    cmd = [sys.executable, "-m", "nydus_py.snapshotter.overlayfs_helper", m.source, str(target), "-o",
           ",".join(m.options)]
    res = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        entry = mount_entry(target)
        assert entry is not None and entry[0] == "overlay" and "extraoption" not in entry[1]
        assert (target / FILE).read_bytes() == files[FILE]
        assert hashlib.sha256((target / BIG).read_bytes()).digest() == hashlib.sha256(files[BIG]).digest()
        (target / "new.txt").write_text("runc\n")
        assert (r.fs("default/2/ctr") / "new.txt").read_text() == "runc\n"
    finally:
        sys_umount(str(target), MNT_DETACH)


KATA_SCRIPT = r"""
echo "##FILE"; cat rafs/c1/lowerdir/etc/passwd
echo "##SHA"; sha256sum rafs/c1/lowerdir/usr/share/big.bin | cut -d' ' -f1
"""


def test_kata_guest_reads_the_image_from_the_extraoption(pulled: tuple[Rig, SharedDaemon], tmp_path: Path,
                                                         nydus_image: tuple[str, str, dict[str, bytes]]) -> None:
    from tests.daemon.rig import Api, wait_state
    from tests.transport.test_virtiofs_guest import sections, start_daemon
    from tests.transport.virtio_rig import qemu_available, run_guest, stop_pid

    require_tool("qemu-system-x86_64")
    require_tool("busybox")
    assert qemu_available()
    r, _ = pulled
    files = nydus_image[2]
    (m,) = r.prepare("default/2/ctr", "sha256:chain")
    # the runtime's side, as Kata's shareRootFilesystemWithNydus: decode, then mount in its own daemon
    assert m.type.startswith("fuse.") and os.path.basename(m.type[len("fuse."):]).startswith("nydus-overlayfs")
    opt = xo.find(m.options)
    assert opt is not None
    assert sorted(os.listdir(opt.snapshotdir)) == ["fs", "work"]  # Kata's upper and work directories
    vm = tmp_path / "kata"
    vm.mkdir()
    apisock = str(vm / "api.sock")
    proc, sock = start_daemon(vm, "--apisock", apisock)
    api = Api(apisock)
    try:
        from tests.waiting import wait_until

        wait_until(lambda: os.path.exists(apisock), 15, f"the API socket {apisock}")
        wait_state(api, "RUNNING")
        resp = api.request("POST", "/api/v1/mount", {"mountpoint": "/rafs/c1/lowerdir"},
                           {"fs_type": "rafs", "source": opt.source, "config": opt.config})
        assert resp.status == 204, resp.body
        g = run_guest(sock, KATA_SCRIPT, vm / "vm", tag="kataShared", timeout=180, watch_pid=proc.pid)
    finally:
        api.close()
        stop_pid(proc)
    out = sections(g.check())
    assert out["FILE"].encode() == files[FILE]
    assert out["SHA"].strip() == hashlib.sha256(files[BIG]).hexdigest()
    assert json.loads(opt.config)["device"]["backend"]["config"]["repo"] == "kata/app"
