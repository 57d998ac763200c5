"""Start-up of `nydusd-py fuse --image REF` (issue 12): the requests it makes to a token-auth
registry before the mount and for the first read, counted in the registry's access log and the
token server's log. The manifest and the bootstrap go through the backend's own client, so the
first blob read reuses its connection and its token: one 401, one token, no second ping or
manifest. A request that comes back (a second client, a redundant HEAD or manifest) fails here."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.storage import images
from tests.storage import registry_rig as rig
from tests.storage.conftest import registry_bin, registry_root, token_registry, token_server  # noqa: F401
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root]
REPO = Path(__file__).resolve().parents[2]
_REQ = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (/v2/[^ ]*) HTTP/1\.1" (\d+)')


def access_log(reg: rig.Registry, offset: int) -> list[tuple[str, str, int]]:
    text = reg.log_path.read_bytes()[offset:].decode(errors="replace")
    return [(m.group(1), m.group(2), int(m.group(3))) for m in _REQ.finditer(text)]


def kind(path: str) -> str:
    return "manifest" if "/manifests/" in path else "blob" if "/blobs/" in path else path


def test_image_start_makes_no_redundant_request(tmp_path: Path, token_registry: rig.Registry,  # noqa: F811
                                                token_server: rig.TokenServer) -> None:  # noqa: F811
    require_device("/dev/fuse")
    img = images.build(tmp_path / "img")
    auth = rig.basic_auth()
    reg_cfg = images.registry_config(token_registry.host, "private/start", auth=auth)
    with RegistryBackend(parse_registry_config(reg_cfg, env={})) as b:
        images.push_image(b, img, "v1")
    config = images.nydusd_config(reg_cfg, None)
    del config["device"]["id"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "nydusd.log"
    tokens_before, offset = len(token_server.requests), token_registry.log_path.stat().st_size
    env = {**images.env_without_auth(), "PYTHONPATH": str(REPO), "NYDUS_PY_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--image",
                             f"{token_registry.host}/private/start:v1", "--config", str(tmp_path / "config.json"),
                             "--mountpoint", str(mnt), "--log-level", "info", "--log-file", str(log)],
                            env=env, cwd=str(REPO))
    try:
        def mounted() -> bool:
            assert proc.poll() is None, log.read_text()
            return is_mountpoint(str(mnt))

        wait_until(mounted, 30, lambda: f"the daemon to mount:\n{log.read_text()}")
        # before the first read: the manifest and the bootstrap, each asked once (one 401 on the first)
        wait_until(lambda: len(access_log(token_registry, offset)) >= 3, 10, "the access log lines")
        to_mount = [(m, kind(p), s) for m, p, s in access_log(token_registry, offset)]
        assert to_mount == [("GET", "manifest", 401), ("GET", "manifest", 200), ("GET", "blob", 200)], to_mount
        assert (mnt / "etc" / "motd").read_bytes() == img.files["etc/motd"]
        wait_until(lambda: len(access_log(token_registry, offset)) >= 4, 10, "the access log lines")
        first_read = [(m, kind(p), s) for m, p, s in access_log(token_registry, offset)][3:]
        # the chunk reads ride on the same client: its token, no new 401, no manifest again
        assert first_read and all(m == "GET" and k == "blob" and s in (200, 206) for m, k, s in first_read), first_read
        assert len(token_server.requests) - tokens_before == 1, token_server.requests[tokens_before:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        if is_mountpoint(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
