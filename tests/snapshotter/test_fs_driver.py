"""The snapshotter's `fs_driver` (`[daemon] fs_driver`, `--fs-driver`): the choice `auto`
makes and logs, the config forms, and the mount calls it makes to the shared daemon."""

import json
import logging
import os
from typing import Any

import pytest

from nydus_py.config.forms import parse_any
from nydus_py.snapshotter.fsdriver import resolve_fs_driver
from nydus_py.snapshotter.main import build_parser, settings_from
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.snapshotter.settings import ConfigError, load_file
from nydus_py.transport.erofs_mount import probe_file_backed
from nydus_py.transport.mount import is_mountpoint, sys_mount, sys_umount

REF = "registry.example.com/team/app@sha256:" + "a" * 64


class Probe:
    def __init__(self, answer: str | None) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.answer


def test_auto_is_erofs_where_file_backed_mounts_work(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nydus_py.snapshotter.fsdriver")
    yes = Probe(None)
    assert resolve_fs_driver("auto", yes) == "erofs" and yes.calls == 1
    assert "fs_driver auto: erofs" in caplog.text
    no = Probe("no CAP_SYS_ADMIN")
    assert resolve_fs_driver("auto", no) == "fusedev" and no.calls == 1
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "fusedev" in warned[0].getMessage() and "no CAP_SYS_ADMIN" in warned[0].getMessage()


def test_explicit_driver_is_kept_without_probing() -> None:
    never = Probe("must not be asked")
    assert resolve_fs_driver("fusedev", never) == "fusedev"
    assert resolve_fs_driver("erofs", never) == "erofs"
    assert never.calls == 0
    with pytest.raises(ValueError, match="fs_driver must be one of"):
        resolve_fs_driver("fscache", never)


def test_probe_on_this_host() -> None:
    """Root on a 6.12+ kernel with EROFS: the probe says yes and leaves nothing mounted."""
    if os.geteuid() != 0:
        assert probe_file_backed() == "no CAP_SYS_ADMIN"
        return
    with open("/proc/self/mountinfo") as f:
        before = f.read()
    assert probe_file_backed() is None
    with open("/proc/self/mountinfo") as f:
        assert f.read() == before


def test_config_daemon_table_and_flag(tmp_path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('root = "/r"\n[daemon]\nfs_driver = "auto"\n')
    assert load_file(str(toml)).fs_driver == "auto"
    conf = settings_from(build_parser().parse_args(["--config", str(toml)]))
    assert conf.fs_driver == "auto" and conf.root == "/r"
    conf = settings_from(build_parser().parse_args(["--config", str(toml), "--fs-driver", "erofs"]))
    assert conf.fs_driver == "erofs"  # the flag wins
    assert settings_from(build_parser().parse_args([])).fs_driver == "fusedev"
    toml.write_text('[daemon]\nfs_driver = "ext4"\n')
    with pytest.raises(ConfigError, match="daemon.fs_driver must be one of"):
        load_file(str(toml))


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []

    def call(self, method: str, path: str, query: dict[str, str] | None = None, body: Any = None) -> Any:
        self.calls.append((method, path, dict(query or {}), body))
        return None

    def close(self) -> None:
        pass


def running_daemon(tmp_path, driver: str, template: dict[str, Any] | None = None) -> tuple[SharedDaemon, FakeApi]:
    d = SharedDaemon(str(tmp_path / "root"), DaemonSettings(command=["nydusd-py"], env={}, docker_config_paths=[],
                                                             fs_driver=driver, config_template=template))
    api = FakeApi()
    d._api = api  # type: ignore[assignment]
    d.ensure_running = lambda: None  # type: ignore[method-assign]
    d._alive = lambda: True  # type: ignore[method-assign]
    return d, api


def test_erofs_mount_call_goes_to_a_host_directory(tmp_path) -> None:
    d, api = running_daemon(tmp_path, "erofs")
    d.mount("7", REF)
    host = os.path.join(d.root, "erofs", "7")
    assert d.mount_dir("7") == host and os.path.isdir(host)
    [(method, path, query, body)] = api.calls
    assert (method, path, query) == ("POST", "/api/v1/mount", {"mountpoint": host})
    assert body["fs_type"] == "rafs" and body["source"] == REF
    cfg = json.loads(body["config"])
    assert cfg["fs_driver"] == "erofs" and cfg["device"]["id"] == "/7"
    assert parse_any(body["config"]).fs_driver == "erofs"  # what the daemon will read
    d.umount("7")
    assert api.calls[-1][:3] == ("DELETE", "/api/v1/mount", {"mountpoint": host})
    assert not os.path.exists(host)


def test_fusedev_mount_call_is_unchanged(tmp_path) -> None:
    d, api = running_daemon(tmp_path, "fusedev", template={"fs_driver": "erofs", "mode": "direct"})
    d.mount("7", REF)
    [(method, path, query, body)] = api.calls
    assert (method, path, query) == ("POST", "/api/v1/mount", {"mountpoint": "/7"})
    assert "fs_driver" not in json.loads(body["config"])  # the snapshotter's driver wins over the template's
    assert d.mount_dir("7") == os.path.join(d.root, "mnt", "7")
    d.umount("7")
    assert api.calls[-1][:3] == ("DELETE", "/api/v1/mount", {"mountpoint": "/7"})


def test_stale_erofs_mounts_are_detached_before_a_new_daemon(tmp_path) -> None:
    """A daemon that died leaves its EROFS mounts (their blob views are dead): detached."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    d, _api = running_daemon(tmp_path, "erofs")
    stale = os.path.join(d.erofs_dir, "3")
    os.makedirs(stale)
    sys_mount("tmpfs", stale, "tmpfs", 0, "size=1m")
    try:
        d._clear_leftovers()
        assert not is_mountpoint(stale)
    finally:
        if is_mountpoint(stale):
            sys_umount(stale)


def test_failover_needs_fusedev(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """An EROFS mount cannot be handed to a new daemon: recover_policy failover is restart there."""
    caplog.set_level(logging.WARNING, "nydus_py.snapshotter.nydusd")
    fuse = SharedDaemon(str(tmp_path / "a"), DaemonSettings(command=["nydusd-py"], recover_policy="failover"))
    assert fuse.policy == "failover" and fuse.supervisor is not None
    assert fuse.argv()[-6:] == ["--id", "shared", "--supervisor", fuse.supervisor.path, "--failover-policy", "resend"]
    ero = SharedDaemon(str(tmp_path / "b"), DaemonSettings(command=["nydusd-py"], recover_policy="failover",
                                                           fs_driver="erofs"))
    assert ero.policy == "restart" and ero.supervisor is None and "--supervisor" not in ero.argv()
    assert "EROFS mounts cannot be handed over" in caplog.text
