"""deploy/: every YAML/TOML/JSON file parses; the DaemonSet, its ConfigMap, the containerd and
Kata snippets refer to real flags of our console scripts (their `--help`, and their own parsers),
to each other's paths, and (containerd) to keys containerd 1.6 itself knows."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from nydus_py.cli.daemon_options import parse_args as nydusd_parse_args
from nydus_py.config.forms import parse_any
from nydus_py.snapshotter import main as snap_main
from nydus_py.snapshotter.nydusd import load_template
from nydus_py.snapshotter.settings import load_file
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


def script_help(name: str, *sub: str) -> str:
    """`<console script> [sub] --help`, run through the entry point pyproject.toml declares."""
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func} as f; sys.exit(f())"
    r = subprocess.run([sys.executable, "-c", code, *sub, "--help"], capture_output=True, text=True, timeout=60,
                       cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    return r.stdout


def flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))


def used_flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def load_all() -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for p in sorted(DEPLOY.rglob("*")):
        if p.suffix in (".yaml", ".yml"):
            out[p] = list(yaml.safe_load_all(p.read_text()))
        elif p.suffix == ".toml":
            out[p] = tomllib.loads(p.read_text())
        elif p.suffix == ".json":
            out[p] = json.loads(p.read_text())
    return out


def k8s_docs() -> list[dict]:
    return [d for d in load_all()[DEPLOY / "kubernetes" / "nydus-snapshotter-py.yaml"] if d]


def doc(kind: str) -> dict:
    (found,) = [d for d in k8s_docs() if d["kind"] == kind]
    return found


def test_every_file_parses():
    parsed = load_all()
    assert {p.relative_to(DEPLOY).as_posix() for p in parsed} >= {
        "kubernetes/nydus-snapshotter-py.yaml", "containerd/config.toml", "kata/configuration-qemu.toml",
        "kata/containerd-runtime.toml"}
    for path, content in parsed.items():
        assert content, path
    assert (DEPLOY / "README.md").read_text().count("nydus-snapshotter-py") > 3
    for d in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d


def test_configmap_is_what_the_snapshotter_and_daemon_accept(tmp_path, caplog):
    cm = doc("ConfigMap")
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(cm["data"]["config.toml"])
    with caplog.at_level(logging.INFO, logger="nydus_py.snapshotter"):
        conf = load_file(str(cfg_file))  # wrong types raise; unknown or unimplemented keys are logged
    noted = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()
             or "not implemented" in r.getMessage()]
    assert noted == [], noted
    args = snap_main.build_parser().parse_args(["--config", str(cfg_file)])
    eff = snap_main.settings_from(args)
    assert eff.address == conf.address and eff.root == conf.root
    # the daemon's argv as the snapshotter builds it parses with nydusd-py's own parser
    argv = ["fuse", "--mountpoint", f"{conf.root}/mnt", "--apisock", f"{conf.root}/nydusd/api.sock",
            *snap_main.daemon_args(conf)]
    nydusd_parse_args(argv)
    assert used_flags(argv) <= flags(script_help("nydusd-py", "fuse"))
    assert Path(conf.nydusd_path).name in SCRIPTS
    # the template: a registry config nydusd-py parses once host and repo are filled in
    tpl_name = Path(conf.nydusd_config).name
    tpl_file = tmp_path / tpl_name
    tpl_file.write_text(cm["data"][tpl_name])
    tpl = load_template(str(tpl_file))
    tpl["device"]["backend"]["config"].update(host="registry.example.com", repo="app")
    assert parse_any(json.dumps(tpl)).rafs.backend.type == "registry"


def test_daemonset_runs_the_snapshotter_with_what_it_needs():
    ds = doc("DaemonSet")
    cm = doc("ConfigMap")
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"][0] in SCRIPTS
    assert used_flags(c["command"]) <= flags(script_help(c["command"][0]))
    snap_main.build_parser().parse_args(c["command"][1:])  # the snapshotter's own parser accepts them
    assert c["securityContext"]["privileged"] is True
    assert ds["metadata"]["namespace"] == cm["metadata"]["namespace"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes.keys()
    conf = tomllib.loads(cm["data"]["config.toml"])
    # the root (with the FUSE root inside) propagates to the host, where containerd's overlays use it
    root = mounts[conf["root"]]
    assert root["mountPropagation"] == "Bidirectional"
    assert volumes[root["name"]]["hostPath"]["path"] == conf["root"]
    sock_dir = str(Path(conf["address"]).parent)
    assert volumes[mounts[sock_dir]["name"]]["hostPath"]["path"] == sock_dir
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    cfg_dir = str(Path(c["command"][c["command"].index("--config") + 1]).parent)
    assert volumes[mounts[cfg_dir]["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert str(Path(conf["nydusd_config"]).parent) == cfg_dir
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert volumes[mounts[env["DOCKER_CONFIG"]]["name"]]["secret"]["items"] == [
        {"key": ".dockerconfigjson", "path": "config.json"}]
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[-1] == conf["address"]


def test_containerd_snippet_points_at_the_snapshotter():
    cd = tomllib.loads((DEPLOY / "containerd" / "config.toml").read_text())
    conf = tomllib.loads(doc("ConfigMap")["data"]["config.toml"])
    (name, plugin), = cd["proxy_plugins"].items()
    assert plugin == {"type": "snapshot", "address": conf["address"]}
    cri = cd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == name and cri["disable_snapshot_annotations"] is False


def _leaves(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


@pytest.mark.parametrize("snippet", ["containerd/config.toml", "kata/containerd-runtime.toml"])
def test_containerd_knows_every_key(snippet):
    """`containerd config dump` drops keys it does not know: every key of the snippet must survive
    with its value (this is containerd 1.6 from Debian)."""
    containerd = require_tool("containerd")
    r = subprocess.run([containerd, "--config", str(DEPLOY / snippet), "config", "dump"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    dumped = _leaves(tomllib.loads(r.stdout))
    for key, value in _leaves(tomllib.loads((DEPLOY / snippet).read_text())).items():
        assert dumped.get(key) == value, f"{snippet}: {'.'.join(key)} = {value!r} not understood by containerd"


def test_kata_snippet_runs_our_virtiofs_daemon():
    kata = tomllib.loads((DEPLOY / "kata" / "configuration-qemu.toml").read_text())["hypervisor"]["qemu"]
    assert kata["shared_fs"] == "virtio-fs-nydus" and kata["virtio_fs_cache"] == "never"
    daemon = Path(kata["virtio_fs_daemon"])
    assert daemon.name in SCRIPTS and str(daemon) in kata["valid_virtio_fs_daemon_paths"]
    # what Kata's Go runtime and runtime-rs run (NYDUSD-CONTRACT.md 1.1), plus the extra args
    go = ["virtiofs", "--log-level", "info", "--apisock", "/run/kata/api.sock", "--sock", "/run/kata/vfs.sock",
          *kata["virtio_fs_extra_args"]]
    rs = ["virtiofs", "--hybrid-mode", "--log-level", "debug", "--apisock", "api.sock", "--sock", "vfs.sock",
          *kata["virtio_fs_extra_args"]]
    for argv in (go, rs):
        assert nydusd_parse_args(argv).command == "virtiofs"
        assert used_flags(argv) <= flags(script_help(daemon.name, "virtiofs"))
