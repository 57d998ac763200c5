"""The config the snapshotter sends with each image mount: registry, credentials found on this
host (never from containerd), insecure registries, the shared cache, a user template."""

import base64
import json

import pytest

from nydus_py.config.forms import parse_any
from nydus_py.convert.reference import parse_reference
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon, load_template


def daemon(tmp_path, **kw) -> SharedDaemon:
    kw.setdefault("env", {})
    kw.setdefault("docker_config_paths", [])
    return SharedDaemon(str(tmp_path / "root"), DaemonSettings(command=["nydusd-py"], **kw))


def test_default_config_is_a_valid_registry_config(tmp_path):
    d = daemon(tmp_path)
    cfg = d.image_config(parse_reference("registry.example.com/team/app:v1"), "7")
    assert cfg["device"]["id"] == "/7"
    assert cfg["device"]["backend"] == {"type": "registry", "config": {
        "host": "registry.example.com", "repo": "team/app", "timeout": 30, "connect_timeout": 10}}
    assert cfg["device"]["cache"] == {"type": "blobcache", "config": {"work_dir": d.cache}}
    parsed = parse_any(json.dumps(cfg))  # what nydusd-py will parse
    assert parsed.rafs.backend.type == "registry"
    # background completion of the image, capped (the daemon's own default leaves it off)
    assert parsed.rafs.prefetch_enable and parsed.rafs.prefetch_all
    assert 0 < parsed.rafs.prefetch_bandwidth <= 32 << 20
    assert d.argv() == ["nydusd-py", "fuse", "--mountpoint", d.mnt, "--apisock", d.sock,
                        "--thread-num", "4", "--log-level", "info"]


def test_credentials_come_from_this_host(tmp_path):
    conf = tmp_path / "docker"
    conf.mkdir()
    good = base64.b64encode(b"alice:pw").decode()
    (conf / "config.json").write_text(json.dumps({"auths": {"registry.example.com": {"auth": good}}}))
    d = daemon(tmp_path, docker_config_paths=[str(conf / "config.json")])
    cfg = d.image_config(parse_reference("registry.example.com/app:v1"), "1")
    assert cfg["device"]["backend"]["config"]["auth"] == good
    other = d.image_config(parse_reference("other.example.com/app:v1"), "2")
    assert "auth" not in other["device"]["backend"]["config"]
    env_auth = base64.b64encode(b"bob:pw2").decode()
    d = daemon(tmp_path, docker_config_paths=[str(conf / "config.json")], env={"IMAGE_PULL_AUTH": env_auth})
    assert d.image_config(parse_reference("registry.example.com/app:v1"), "1")["device"]["backend"]["config"][
        "auth"] == env_auth


def test_insecure_and_loopback_registries_skip_tls_checks(tmp_path):
    d = daemon(tmp_path, insecure_registries=("insecure.example:5000",))
    for ref, insecure in [("insecure.example:5000/a:1", True), ("127.0.0.1:5000/a:1", True),
                          ("localhost:5000/a:1", True), ("secure.example/a:1", False)]:
        conf = d.image_config(parse_reference(ref), "1")["device"]["backend"]["config"]
        assert conf.get("skip_verify", False) is insecure, ref


def test_template_is_kept_and_filled(tmp_path):
    tpl = tmp_path / "tpl.json"
    tpl.write_text(json.dumps({
        "device": {"backend": {"type": "registry", "config": {"timeout": 7, "retry_limit": 3, "host": "x", "repo": "y"}},
                   "cache": {"type": "blobcache", "config": {"work_dir": "/custom/cache"}}},
        "mode": "direct", "digest_validate": True, "fs_prefetch": {"enable": True, "threads_count": 2}}))
    d = daemon(tmp_path, config_template=load_template(str(tpl)))
    cfg = d.image_config(parse_reference("reg.example/team/app:v1"), "3")
    conf = cfg["device"]["backend"]["config"]
    assert (conf["host"], conf["repo"], conf["timeout"], conf["retry_limit"]) == ("reg.example", "team/app", 7, 3)
    assert cfg["device"]["cache"]["config"]["work_dir"] == "/custom/cache"
    assert cfg["digest_validate"] is True and cfg["fs_prefetch"]["threads_count"] == 2
    assert load_template(str(tpl))["device"]["backend"]["config"]["host"] == "x"  # the template is not modified
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {}}}}))
    with pytest.raises(ValueError, match="registry"):
        load_template(str(bad))
