"""`[remote.auth]` kubelet credential provider plugins, which need no cluster: kubelet's
matchImages rules, the exec protocol against a real basic-auth registry, caching, and the order
(docker config.json first)."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

from nydus_py.convert.reference import parse_reference
from nydus_py.snapshotter.errors import Unavailable
from nydus_py.snapshotter.kubelet_auth import (
    KubeletProvider,
    ProviderConfigError,
    image_matches,
    parse_duration,
)
from nydus_py.snapshotter.main import build_mounter
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.snapshotter.settings import ConfigError, load_file
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig

from .test_containerd_e2e import nydusify

PLUGIN = """#!{python}
import json, sys
req = json.load(sys.stdin)
assert req["kind"] == "CredentialProviderRequest" and req["apiVersion"] == "credentialprovider.kubelet.k8s.io/v1"
with open({log!r}, "a") as f:
    f.write(req["image"] + " " + " ".join(sys.argv[1:]) + "\\n")
host = req["image"].split("/")[0]
json.dump({{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderResponse",
           "cacheKeyType": "Registry", "cacheDuration": "1h",
           "auth": {{host: {{"username": {user!r}, "password": {password!r}}}}}}}, sys.stdout)
"""


def provider_files(tmp_path: Path, match: str, user: str = rig.USER,
                   password: str = rig.PASSWORD) -> tuple[str, str, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "plugin.log"
    plugin = bin_dir / "fake-provider"
    plugin.write_text(PLUGIN.format(python=sys.executable, log=str(log), user=user, password=password))
    plugin.chmod(0o755)
    cfg = tmp_path / "providers.yaml"
    cfg.write_text(f"apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n"
                   f"  - name: fake-provider\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
                   f"    matchImages: [\"{match}\"]\n    defaultCacheDuration: 10m\n    args: [\"--verbose\"]\n")
    return str(cfg), str(bin_dir), log


@pytest.mark.parametrize("pattern,image,ok", [
    ("*.registry.io", "foo.registry.io/app", True),
    ("*.registry.io", "registry.io/app", False),  # same number of labels
    ("*.*.registry.io", "a.b.registry.io/x/y", True),
    ("registry.io:8080/path", "registry.io:8080/path/app", True),
    ("registry.io:8080/path", "registry.io:9090/path/app", False),
    ("registry.io/team", "registry.io/other/app", False),
    ("127.0.0.1:*", "127.0.0.1:5000/app", False),  # a port is compared, not globbed
    ("127.0.0.1", "127.0.0.1:5000/app", True),
])
def test_match_images_like_kubelet(pattern: str, image: str, ok: bool) -> None:
    assert image_matches(pattern, image) is ok


def test_durations_and_bad_configs(tmp_path: Path) -> None:
    assert (parse_duration("1h30m"), parse_duration("0s"), parse_duration("250ms")) == (5400, 0, 0.25)
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"providers": [{"name": "x", "apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1",
                                              "matchImages": ["*"], "defaultCacheDuration": "1m"}]}))
    with pytest.raises(ProviderConfigError, match="provider x: unsupported apiVersion"):
        KubeletProvider(str(cfg), str(tmp_path))
    toml = tmp_path / "c.toml"
    toml.write_text("version = 1\n[remote.auth]\nenable_kubelet_credential_providers = true\n")
    with pytest.raises(ConfigError, match="needs credential_provider_config and credential_provider_bin_dir"):
        load_file(str(toml))


def test_provider_credentials_reach_a_basic_auth_registry(tmp_path: Path, plain_registry: rig.Registry,
                                                          basic_registry: rig.Registry, skopeo: str) -> None:
    img = oi.make_image(oi.sample_layers(seed=51, big=1 << 16))
    src = f"{plain_registry.host}/kubelet/src:v1"
    oi.skopeo_push(skopeo, oi.write_layout(tmp_path / "layout", "v1", img), "v1", src)
    dst = f"{basic_registry.host}/kubelet/app:v1-nydus"
    nydusify(src, dst, "--target-auth", f"{rig.USER}:{rig.PASSWORD}")

    cfg, bin_dir, log = provider_files(tmp_path, basic_registry.host)
    toml = tmp_path / "config.toml"
    toml.write_text(f'version = 1\nroot = "{tmp_path / "root"}"\n[remote.auth]\n'
                    f'enable_kubelet_credential_providers = true\ncredential_provider_config = "{cfg}"\n'
                    f'credential_provider_bin_dir = "{bin_dir}"\n')
    mounter = build_mounter(load_file(str(toml)))  # the wiring from the config file
    assert isinstance(mounter, SharedDaemon) and mounter.settings.credential_provider is not None
    provider = mounter.settings.credential_provider

    def daemon(docker_config_paths: list[str], credential_provider=None) -> SharedDaemon:
        return SharedDaemon(str(tmp_path / "root"), DaemonSettings(command=["nydusd-py"], env={},
                                                                   docker_config_paths=docker_config_paths,
                                                                   credential_provider=credential_provider))

    with pytest.raises(Unavailable, match="cannot resolve the tag"):  # no credentials: 401
        daemon(docker_config_paths=[]).pin("docker://" + dst)
    d = daemon(docker_config_paths=[], credential_provider=provider)
    pinned = d.pin("docker://" + dst)
    assert pinned.startswith(f"docker://{basic_registry.host}/kubelet/app@sha256:")
    assert d.pin("docker://" + dst) == pinned
    assert log.read_text() == f"{basic_registry.host}/kubelet/app --verbose\n"  # once: cached per registry for 1h
    cfg_auth = d.image_config(parse_reference(dst), "1")["device"]["backend"]["config"]["auth"]
    assert base64.b64decode(cfg_auth).decode() == f"{rig.USER}:{rig.PASSWORD}"  # what the daemon gets

    # docker config.json comes first (upstream's order): the plugin is not asked
    docker = tmp_path / "docker.json"
    docker.write_text(json.dumps({"auths": {basic_registry.host: {"auth": rig.basic_auth()}}}))
    (tmp_path / "second").mkdir()
    cfg2, bin2, log2 = provider_files(tmp_path / "second", basic_registry.host)
    d2 = daemon(docker_config_paths=[str(docker)], credential_provider=KubeletProvider(cfg2, bin2).credentials)
    assert d2.pin("docker://" + dst) == pinned
    assert not log2.exists()
