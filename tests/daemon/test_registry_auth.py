"""`PUT /api/v1/config` registry_auth: new credentials reach a mounted registry image at run time
(the snapshotter's credential renewal, §3.5 H), against a real htpasswd-protected registry."""

import errno
import json
from pathlib import Path

import pytest

from nydus_py.daemon.service import DaemonOptions, DaemonService
from nydus_py.fuse.api import FuseError
from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from tests.api.test_http import Client, serving
from tests.storage import images as timg
from tests.storage import registry_rig as rig
from tests.storage.conftest import basic_registry, registry_bin, registry_root  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def test_registry_auth_reload(basic_registry: rig.Registry, tmp_path: Path,  # noqa: F811
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGE_PULL_AUTH", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    image = timg.build(tmp_path / "img", seed=11)
    good = rig.basic_auth()
    with RegistryBackend(parse_registry_config(timg.registry_config(basic_registry.host, "demo/auth", auth=good),
                                               env={})) as pusher:
        timg.push_image(pusher, image, "v1")
    wrong = rig.basic_auth(rig.USER, "not-the-password")
    cfg = timg.nydusd_config(timg.registry_config(basic_registry.host, "demo/auth", auth=wrong, retry_limit=0),
                             None)
    svc = DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path)))

    def read_motd() -> bytes:
        root = svc.vfs.lookup(1, b"img")
        etc = svc.vfs.lookup(root.ino, b"etc")
        motd = svc.vfs.lookup(etc.ino, b"motd")
        return bytes(svc.vfs.read(motd.ino, 0, 0, 4096))

    def go(c: Client) -> None:
        body = {"fs_type": "rafs", "source": str(image.boot), "config": json.dumps(cfg)}
        assert c.post("/api/v1/mount?mountpoint=/img", json=body).status == 204
        with pytest.raises(FuseError) as e:
            read_motd()
        assert e.value.errno == errno.EIO
        bad = c.put("/api/v1/config", params={"id": "/img"}, json={"registry_auth": "%%%"})
        assert bad.status == 400
        r = c.put("/api/v1/config", params={"id": "/test"}, json={"registry_auth": good})  # by device.id
        assert r.status == 204
        assert read_motd() == image.files["etc/motd"]
        shown = c.get("/api/v1/config").body.decode()
        assert good not in shown
        info = c.get("/api/v1/daemon").body.decode()
        assert good not in info and wrong not in info

    try:
        with serving(svc, str(tmp_path / "api.sock")) as client:
            go(client)
    finally:
        svc.close_all()
