"""Config forms (v1/v2 JSON, TOML), the command line, --version, the state machine, logging."""

import base64
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.cli.daemon_options import parse_args
from nydus_py.config import ConfigError
from nydus_py.config.forms import _logged, parse_any, read_config_file, redact
from nydus_py.daemon.errors import UnexpectedEvent
from nydus_py.daemon.logsetup import EventRing, log_file_name, scrub
from nydus_py.daemon.state import TRANSITIONS, DaemonState, Event, StateMachine
from nydus_py.daemon.version import build_info, version_text
from tests.daemon.rig import REPO

SNAPSHOTTER_V1 = {
    "device": {"id": "/42",
               "backend": {"type": "registry", "config": {
                   "readahead": False, "host": "index.docker.io", "repo": "library/nginx", "auth": "dXNlcjpwYXNz",
                   "proxy": {"fallback": False}, "timeout": 5, "connect_timeout": 5, "retry_limit": 2}},
               "cache": {"type": "blobcache", "config": {"work_dir": "/var/cache/nydus", "disable_indexed_map": False}}},
    "mode": "direct", "digest_validate": False, "enable_xattr": True, "amplify_io": 1048576,
    "fs_prefetch": {"enable": True, "prefetch_all": True, "threads_count": 8, "merging_size": 1048576},
    "warmup": 0, "id_mapping": [0, 1000, 1],
}

V2_JSON = {
    "version": 2, "id": "/42",
    "backend": {"type": "registry", "registry": {"host": "index.docker.io", "repo": "library/nginx",
                                                 "auth": "dXNlcjpwYXNz"}},
    "cache": {"type": "blobcache", "filecache": {"work_dir": "/var/cache/nydus"}},
    "rafs": {"mode": "direct", "validate": False, "enable_xattr": True, "batch_size": 1048576,
             "prefetch": {"enable": True, "threads": 8, "batch_size": 1048576, "prefetch_all": True}},
}

V2_TOML = """
version = 2
id = "/42"
[backend]
type = "registry"
[backend.registry]
host = "index.docker.io"
repo = "library/nginx"
auth = "dXNlcjpwYXNz"
[cache]
type = "blobcache"
[cache.filecache]
work_dir = "/var/cache/nydus"
[rafs]
mode = "direct"
enable_xattr = true
batch_size = 1048576
[rafs.prefetch]
enable = true
threads = 8
batch_size = 1048576
prefetch_all = true
"""


def summary(p):  # noqa: ANN001, ANN201
    r = p.rafs
    return (r.device_id, r.backend.type, r.backend.config["host"], r.backend.config["repo"], r.cache.type,
            r.cache.work_dir, r.mode, r.enable_xattr, r.amplify_io, r.prefetch_enable, r.prefetch_threads,
            r.prefetch_all)


def test_v1_v2_and_toml_mean_the_same() -> None:
    a = parse_any(json.dumps(SNAPSHOTTER_V1))
    b = parse_any(json.dumps(V2_JSON))
    c = parse_any(V2_TOML)
    assert summary(a) == summary(b) == summary(c)
    assert summary(a) == ("/42", "registry", "index.docker.io", "library/nginx", "blobcache", "/var/cache/nydus",
                          "direct", True, 1048576, True, 8, True)


def test_unknown_keys_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    _logged.clear()
    with caplog.at_level(logging.INFO, logger="nydus_py.config.forms"):
        parse_any(json.dumps(SNAPSHOTTER_V1))
        parse_any(json.dumps(SNAPSHOTTER_V1))
    lines = [r.getMessage() for r in caplog.records]
    for key in ("warmup", "id_mapping", "device.backend.config.readahead"):
        assert sum(line.endswith(" " + key) for line in lines) == 1, (key, lines)


@pytest.mark.parametrize("text", [
    "", "[]", "{", json.dumps({"version": 3, "backend": {}}), json.dumps({"version": 2}),
    json.dumps({"version": 2, "backend": {"type": "localfs"}}), json.dumps({"device": {}}),
    json.dumps({**SNAPSHOTTER_V1, "mode": "lazy"}), json.dumps({**SNAPSHOTTER_V1, "enable_xattr": "yes"}),
    json.dumps({**SNAPSHOTTER_V1, "access_pattern": 1}), "version = 1\n", "x" * (1 << 20 | 1),
])
def test_bad_configs_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_any(text)


def test_redacted_v2_hides_credentials() -> None:
    p = parse_any(json.dumps(SNAPSHOTTER_V1))
    shown = p.redacted_v2()
    assert shown["backend"]["registry"]["auth"] is None and shown["id"] == "/42"
    assert "dXNlcjpwYXNz" not in json.dumps(shown)
    assert redact({"a": [{"access_key_secret": "k", "registry_token": "t", "x": 1}]}) == {
        "a": [{"access_key_secret": "", "registry_token": None, "x": 1}]}


def test_image_pull_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(SNAPSHOTTER_V1))
    auth = base64.b64encode(b"other:pw").decode()
    monkeypatch.setenv("IMAGE_PULL_AUTH", auth)
    assert read_config_file(str(cfg)).rafs.backend.config["auth"] == auth
    monkeypatch.setenv("IMAGE_PULL_AUTH", "not-base64!")
    with pytest.raises(ConfigError):
        read_config_file(str(cfg))


def test_state_machine_allows_exactly_the_upstream_transitions() -> None:
    for state in (DaemonState.INIT, DaemonState.READY, DaemonState.RUNNING, DaemonState.STOPPED):
        for event in Event:
            sm = StateMachine()
            sm._state = state
            if (state, event) in TRANSITIONS:
                assert sm.fire(event) == TRANSITIONS[(state, event)]
            else:
                with pytest.raises(UnexpectedEvent):
                    sm.fire(event)
                assert sm.state == state


def test_version_output_matches_the_api() -> None:
    out = subprocess.run([sys.executable, "-m", "nydus_py.cli.daemon", "--version"], capture_output=True,
                         cwd=str(REPO), check=True).stdout.decode()
    assert out == version_text() and out.startswith("nydusd \r")
    m = re.search(r"Git Commit:\s*(.+)", out)
    assert m and m.group(1) == build_info()["git_commit"] and re.fullmatch(r"[0-9a-f]{40}", m.group(1))
    for field in ("Version:\t", "Build Time:\t", "Profile:\t", "Rustc:\t\t"):
        assert field in out


def test_command_lines_of_the_snapshotter_and_kata_parse() -> None:
    a = parse_args(["fuse", "--thread-num", "4", "--id", "cq81", "--config", "/c.json", "--bootstrap", "/b",
                    "--mountpoint", "/m", "--apisock", "/s", "--log-level", "info", "--log-rotation-size", "100",
                    "--supervisor", "/sup", "--log-file", "/l", "--prefetch-files", "/p", "--backend-source",
                    "http://x/api/v1/daemons/cq81/backend", "--failover-policy", "resend"])
    assert (a.command, a.thread_num, a.id, a.supervisor, a.log_rotation_size, a.failover_policy) == (
        "fuse", 4, "cq81", "/sup", 100, "resend")
    b = parse_args(["virtiofs", "--hybrid-mode", "--log-level", "debug", "--apisock", "a.sock", "--sock", "v.sock",
                    "--threads", "4"])
    assert (b.command, b.sock, b.apisock, b.hybrid_mode) == ("virtiofs", "v.sock", "a.sock", "true")
    assert (b.threads, b.virtio_queues) == (4, 1)
    v = parse_args(["virtiofs", "--sock", "v.sock", "--virtio-workers", "8", "--virtio-queues", "2"])
    assert (v.threads, v.virtio_queues) == (8, 2)
    # global options after the subcommand and before it; legacy mode without subcommand
    c = parse_args(["--log-level", "warn", "fuse", "--mountpoint", "/m", "--upgrade"])
    assert (c.log_level, c.upgrade) == ("warn", True)
    d = parse_args(["--mountpoint", "/m", "--bootstrap", "/b", "--config", "/c"])
    assert d.command == "fuse" and d.bootstrap == "/b"
    s = parse_args(["singleton", "--fscache", "/cache", "--fscache-threads", "4", "--apisock", "/s"])
    assert s.fscache == "/cache"


@pytest.mark.parametrize("argv", [
    ["fuse"], ["fuse", "--mountpoint", "/m", "--id", "x"], ["fuse", "--mountpoint", "/m", "--supervisor", "/s"],
    ["fuse", "--mountpoint", "/m", "--thread-num", "1025"], ["fuse", "--mountpoint", "/m", "--failover-policy", "x"],
    ["fuse", "--mountpoint", "/m", "--prefetch-files", "/p"], ["fuse", "--mountpoint", "/m", "--log-level", "loud"],
    ["fuse", "--mountpoint", "/m", "--config", "/c", "--localfs-dir", "/d"], ["virtiofs"], ["bogus"],
    ["virtiofs", "--sock", "s", "--virtio-queues", "0"], ["virtiofs", "--sock", "s", "--virtio-workers", "0"],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_logging_helpers() -> None:
    assert log_file_name("/x/nydusd") == "/x/nydusd.log" and log_file_name("/x/n.txt") == "/x/n.txt"
    line = 'auth="dXNlcjpwYXNz" {"registry_token": "tok"} Authorization: Bearer abc.def.ghi registry_auth=zzz'
    clean = scrub(line)
    for secret in ("dXNlcjpwYXNz", '"tok"', "abc.def.ghi", "zzz"):
        assert secret not in clean, clean
    ring = EventRing()
    for i in range(600):
        ring.emit(logging.LogRecord("x", logging.ERROR, "f", 1, "error %d", (i,), None))
    j = ring.json()
    assert j["total_errors"] == 600 and len(j["errors"]) == 500 and j["errors"][-1].endswith("error 599")


def test_log_file_rotation(tmp_path: Path) -> None:
    from nydus_py.daemon.logsetup import setup_logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        setup_logging("info", str(tmp_path / "nydusd"), 1)
        lg = logging.getLogger("nydus_py.rotation")
        for i in range(2200):
            lg.info("line %05d %s", i, "x" * 600)
        for h in root.handlers:
            h.flush()
        names = sorted(p.name for p in tmp_path.iterdir())
        assert "nydusd.log" in names and "nydusd.log.1" in names, names
        assert all(p.stat().st_size <= (1 << 20) + 1024 for p in tmp_path.iterdir())
        assert "line 02199" in (tmp_path / "nydusd.log").read_text()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = saved
        root.setLevel(level)


def test_fuse_io_uring_from_config_and_command_line(caplog: pytest.LogCaptureFixture) -> None:
    """`"fuse_io_uring": true` (v1 or v2, a known key: not logged as unknown) and
    `nydusd-py fuse --io-uring` both ask for FUSE over io_uring; it is off by default."""
    _logged.clear()
    with caplog.at_level(logging.INFO, logger="nydus_py.config.forms"):
        v1 = parse_any(json.dumps({**SNAPSHOTTER_V1, "fuse_io_uring": True}))
        v2 = parse_any(json.dumps({**V2_JSON, "fuse_io_uring": True}))
    assert v1.fuse_io_uring and v2.fuse_io_uring
    assert not any("fuse_io_uring" in r.getMessage() for r in caplog.records)
    assert v2.redacted_v2()["fuse_io_uring"] is True
    assert not parse_any(json.dumps(SNAPSHOTTER_V1)).fuse_io_uring
    with pytest.raises(ConfigError):
        parse_any(json.dumps({**SNAPSHOTTER_V1, "fuse_io_uring": "yes"}))
    assert parse_args(["fuse", "--mountpoint", "/m", "--io-uring"]).io_uring
    assert not parse_args(["fuse", "--mountpoint", "/m"]).io_uring
