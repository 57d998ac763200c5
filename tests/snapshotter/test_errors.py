"""What a user sees when something is wrong: one line, naming the thing and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from nydus_py.snapshotter import labels as L
from nydus_py.snapshotter.errors import Unavailable
from nydus_py.snapshotter.main import main
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.snapshotter.snapshotter import Snapshotter


def last_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def run(tmp_path: Path, *argv: str) -> int:
    return main(["--root", str(tmp_path / "r"), "--address", str(tmp_path / "s.sock"), *argv])


def test_nydusd_not_found_is_reported_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "--nydusd-path", "/nonexistent/nydusd") == 2
    assert last_error(capsys) == ("nydus-snapshotter-py: error: nydusd not found: '/nonexistent/nydusd' is not an "
                                  "executable; set [daemon] nydusd_path (or --nydusd-path) to nydusd-py, e.g. "
                                  "\"python3 -m nydus_py.cli.daemon\"")
    assert not (tmp_path / "s.sock").exists()  # nothing started


def test_nydusd_config_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "--nydusd-config", str(tmp_path / "missing.json")) == 2
    assert last_error(capsys) == (f"nydus-snapshotter-py: error: nydusd_config {tmp_path / 'missing.json'}: "
                                  "No such file or directory")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run(tmp_path, "--nydusd-config", str(bad)) == 2
    assert last_error(capsys).startswith(f"nydus-snapshotter-py: error: nydusd_config {bad}: not a JSON nydusd config: ")


def test_root_too_long_for_daemon_sockets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = "/var/lib/" + "x" * 80
    assert main(["--root", root, "--address", str(tmp_path / "s.sock")]) == 2
    err = last_error(capsys)
    assert err.startswith(f"nydus-snapshotter-py: error: root {root} is too long (89 bytes): daemon sockets under it "
                          "would not fit a unix socket address; use a root of at most")


def test_daemon_mode_none_refuses_nydus_images_with_a_hint(tmp_path: Path) -> None:
    sn = Snapshotter(str(tmp_path / "state"), None)
    try:
        labels = {L.TARGET_REF: "sha256:c", L.STARGZ_REFERENCE: "registry.local/app:v1", L.NYDUS_BOOTSTRAP: "true"}
        with pytest.raises(Unavailable, match="daemon_mode none and cannot mount Nydus images; set daemon_mode to "
                                              "shared or dedicated"):
            sn.prepare("k", "", labels)
    finally:
        sn.close()


def test_a_daemon_binary_that_vanished_is_one_line(tmp_path: Path) -> None:
    d = SharedDaemon(str(tmp_path / "root"), DaemonSettings(command=["/nonexistent/nydusd-py"], env={},
                                                            docker_config_paths=[]))
    with pytest.raises(Unavailable) as e:
        d.ensure_running()
    assert str(e.value) == ("nydusd not found: /nonexistent/nydusd-py does not exist; set [daemon] nydusd_path "
                            "(or --nydusd-path) to nydusd-py")
