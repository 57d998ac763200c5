"""`[remote.mirrors_config] dir` (containerd certs.d layout, upstream's selectMirrorHost): which
hosts.toml applies, mirror order and ping checks, and a real mount whose data comes through a
pull-through mirror."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from nydus_py.convert.reference import parse_reference
from nydus_py.snapshotter.mirrors import Mirror, load_mirrors, select_mirror
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.snapshotter.settings import ConfigError, load_file
from tests.conftest import require_device
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig

from .test_containerd_e2e import nydusify


def hosts(root: Path, name: str, text: str) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "hosts.toml").write_text(text)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections are refused


def test_which_hosts_toml_and_in_which_order(tmp_path: Path) -> None:
    hosts(tmp_path, "_default", '[host."http://fallback:5000"]\n')
    assert load_mirrors(str(tmp_path), "reg.example.com") == [Mirror("http", "fallback:5000")]
    hosts(tmp_path, "reg.example.com", '[host."z.mirror"]\nping_url = "http://z/ping"\n[host."http://a.mirror:80"]\n')
    assert load_mirrors(str(tmp_path), "reg.example.com") == [Mirror("https", "z.mirror", "http://z/ping"),
                                                              Mirror("http", "a.mirror:80")]  # file order, https default
    hosts(tmp_path, "reg.example.com_5000_", '[host."http://port.mirror"]\n')
    assert load_mirrors(str(tmp_path), "reg.example.com:5000") == [Mirror("http", "port.mirror")]
    assert load_mirrors(str(tmp_path / "nothing"), "reg.example.com") == []


def test_first_reachable_mirror_wins(tmp_path: Path, plain_registry: rig.Registry) -> None:
    dead = dead_port()
    hosts(tmp_path, "reg.example.com", f'[host."http://127.0.0.1:{dead}"]\nping_url = "http://127.0.0.1:{dead}/v2/"\n'
                                       f'[host."http://{plain_registry.host}"]\nping_url = "{plain_registry.url}/v2/"\n')
    assert select_mirror(str(tmp_path), "reg.example.com") == Mirror("http", plain_registry.host,
                                                                      f"{plain_registry.url}/v2/")
    hosts(tmp_path, "reg.example.com", f'[host."http://127.0.0.1:{dead}"]\nping_url = "http://127.0.0.1:{dead}/v2/"\n')
    assert select_mirror(str(tmp_path), "reg.example.com") is None  # none reachable: the origin


def test_config_dir_must_exist(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(f'version = 1\n[remote.mirrors_config]\ndir = "{tmp_path / "certs.d"}"\n')
    with pytest.raises(ConfigError, match="remote.mirrors_config.dir .* does not exist"):
        load_file(str(toml))
    (tmp_path / "certs.d").mkdir()
    assert load_file(str(toml)).mirrors_dir == str(tmp_path / "certs.d")


@pytest.mark.slow
@pytest.mark.root
def test_image_data_comes_through_the_mirror(tmp_path: Path, plain_registry: rig.Registry,
                                             mirror_registry: rig.Registry, skopeo: str) -> None:
    require_device("/dev/fuse")
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    img = oi.make_image(oi.sample_layers(seed=61))
    src = f"{plain_registry.host}/mirrored/src:v1"
    oi.skopeo_push(skopeo, oi.write_layout(tmp_path / "layout", "v1", img), "v1", src)
    ref = f"{plain_registry.host}/mirrored/app:v1-nydus"
    nydusify(src, ref)
    big = {e.name: e.data for layer in img.layers for e in layer.entries if e.kind == "file"}["usr/share/big.bin"]

    certs = tmp_path / "certs.d"
    hosts(certs, plain_registry.host.replace(":", "_") + "_",
          f'[host."http://{mirror_registry.host}"]\nping_url = "{mirror_registry.url}/v2/"\n')
    d = SharedDaemon(str(tmp_path / "root"), DaemonSettings(
        command=[sys.executable, "-m", "nydus_py.cli.daemon"], args=["--thread-num", "2"], env={},
        docker_config_paths=[], mirrors_dir=str(certs)))
    try:
        mirror = d.select_mirror(parse_reference(ref))
        conf = d.image_config(parse_reference(ref), "1", mirror)["device"]["backend"]["config"]
        assert (conf["host"], conf["scheme"], conf["repo"]) == (mirror_registry.host, "http", "mirrored/app")
        source = d.pin("docker://" + ref)  # through the mirror too
        d.mount("1", source)
        with open(os.path.join(d.mount_dir("1"), "usr/share/big.bin"), "rb") as f:
            assert f.read() == big
    finally:
        d.stop()
    mirror_log = mirror_registry.log_text()
    assert '"GET /v2/mirrored/app/blobs/sha256:' in mirror_log, "the mirror served no blob of the image"
    assert f'"GET /v2/mirrored/app/manifests/{source.split("@")[1]}' in mirror_log  # the mount's manifest too
