"""`fs_driver: erofs` for images in a real registry (Debian's `docker-registry` on loopback),
mounted by reference (`--image REF`, `docker://` sources over the API): the bootstrap is fetched
at mount, the data blob is read lazily through the blob cache. A counting proxy in front of the
registry shows what each step fetched; the storage fault matrix runs through it too."""

import json
import os
import random
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.rafs.constants import Compressor
from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from nydus_py.transport.mount import is_mountpoint
from tests.builder.erofs_rig import compare_trees, erofs_available
from tests.daemon.rig import Api, DaemonProc, wait_state
from tests.storage import images
from tests.storage.conftest import plain_registry, registry_bin, registry_root  # noqa: F401
from tests.storage.fault_proxy import FaultProxy, Request

pytestmark = [pytest.mark.slow, pytest.mark.root]

REPO = "test/erofs-ref"
BULK = 6  # MiB of incompressible data beside the small files


@dataclass
class Pushed:
    image: images.BuiltImage
    boot_layer: str  # digest of the bootstrap layer
    registry_url: str

    @property
    def data_blob(self) -> str:
        return self.image.blob_id


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, plain_registry) -> Pushed:  # noqa: F811
    work = tmp_path_factory.mktemp("erofs-ref")
    src = work / "src"
    files = images.make_tree(src, seed=21)
    rng = random.Random(21)
    (src / "bulk").mkdir()
    for i in range(BULK):
        data = rng.randbytes(1 << 20)
        (src / "bulk" / f"b{i}").write_bytes(data)
        files[f"bulk/b{i}"] = data
    blob_dir = work / "blobs"
    result = build_image(tree_from_directory(src), str(work / "image.boot"), str(blob_dir),
                         BuildOptions(chunk_size=images.CHUNK, compressor=Compressor.ZSTD))
    img = images.BuiltImage(src, work / "image.boot", blob_dir, result, files)
    cfg = parse_registry_config(images.registry_config(plain_registry.host, REPO), env={}, docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, img, "v1")
        manifest = json.loads(b.get_manifest("v1")[0])
    return Pushed(img, manifest["layers"][-1]["digest"], plain_registry.url)


@pytest.fixture
def proxy(pushed: Pushed) -> Iterator[FaultProxy]:
    p = FaultProxy(pushed.registry_url, stall_seconds=10)
    yield p
    p.stop()


def config(proxy: FaultProxy, cache: str, **extra: object) -> dict[str, object]:
    backend = images.registry_config(proxy.host, REPO, timeout=1, read_deadline=3, retry_limit=3)
    return images.nydusd_config(backend, cache, amplify_io=128 << 10, **extra)


def _ranged_bytes(reqs: list[Request]) -> int:
    """Bytes asked for by ranged GETs (`Range: bytes=a-b`)."""
    total = 0
    for r in reqs:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", r.range or "")
        assert m, f"an unranged GET of the data blob: {r.target}"
        total += int(m.group(2)) - int(m.group(1)) + 1
    return total


def data_gets(proxy: FaultProxy, pushed: Pushed) -> list[Request]:
    return [r for r in proxy.blob_requests() if pushed.data_blob in r.path]


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


def _views() -> set[str]:
    return {line.split()[4] for line in _mounts() if " - fuse nydus-blobview " in line}


def erofs_at(path: str) -> bool:
    real = os.path.realpath(path)
    return any(line.split()[4] == real and line.split(" - ")[1].startswith("erofs ") for line in _mounts())


def _cleanup(paths: list[str], views_before: set[str]) -> None:
    """After a failed daemon test: detach what it left (its EROFS mounts, then its views)."""
    for p in paths:
        if is_mountpoint(p):
            subprocess.run(["umount", "-l", p], check=False, capture_output=True)
    for v in _views() - views_before:
        subprocess.run(["umount", "-l", v], check=False, capture_output=True)


def test_dedicated_by_reference_lazy_and_equal(tmp_path: Path, pushed: Pushed, proxy: FaultProxy) -> None:
    """`nydusd-py fuse --fs-driver erofs --image REF`: at mount only the manifest and the
    bootstrap layer are fetched; one small file costs a few chunks of a multi-MiB blob; the
    tree then compares equal to its source on every field."""
    erofs_available()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config(proxy, str(tmp_path / "cache"))))
    mnt, sock = tmp_path / "mnt", str(tmp_path / "api.sock")
    mnt.mkdir()
    views_before = _views()
    d = DaemonProc(["fuse", "--fs-driver", "erofs", "--image", f"{proxy.host}/{REPO}:v1", "--config", str(cfg),
                    "--mountpoint", str(mnt), "--apisock", sock], str(tmp_path / "d.log"))
    try:
        d.wait_socket(sock, 60)
        api = Api(sock)
        wait_state(api, "RUNNING")
        assert erofs_at(str(mnt)), d.log_text()
        blob_gets = proxy.blob_requests()
        assert [r.path.rsplit("/", 1)[1] for r in blob_gets] == [pushed.boot_layer], \
            [r.target for r in proxy.requests]
        assert any("/manifests/v1" in r.path for r in proxy.requests)
        # metadata never leaves the kernel: a walk of every inode fetches nothing
        n = sum(len(dirs) + len(names) for _, dirs, names in os.walk(mnt))
        assert n > 40 and data_gets(proxy, pushed) == []
        assert (mnt / "etc" / "motd").read_bytes() == pushed.image.files["etc/motd"]
        fetched = _ranged_bytes(data_gets(proxy, pushed))
        blob = len(pushed.image.blob_bytes())
        assert 0 < fetched <= 256 << 10, f"one small file fetched {fetched} bytes of a {blob}-byte blob"
        assert blob > 12 * fetched
        assert compare_trees(str(pushed.image.src), str(mnt)) > 40
        m = api.get("/api/v1/metrics/blobcache").json()
        assert m["erofs"]["kernel_reads"] > 0 and m["erofs"]["backend_bytes"] > 0, m
        api.close()
        assert d.stop(signal.SIGTERM) == 0, d.log_text()
        assert not is_mountpoint(str(mnt)) and _views() == views_before, d.log_text()
    finally:
        d.kill()
        _cleanup([str(mnt)], views_before)


def test_shared_api_mount_of_docker_source(tmp_path: Path, pushed: Pushed, proxy: FaultProxy) -> None:
    """`POST /api/v1/mount` of a `docker://` source whose config says `"fs_driver": "erofs"`:
    EROFS at the host path, equal to the source; umount leaves nothing mounted."""
    erofs_available()
    fuse_mnt, host, sock = tmp_path / "fuse", tmp_path / "host", str(tmp_path / "api.sock")
    fuse_mnt.mkdir()
    host.mkdir()
    views_before = _views()
    d = DaemonProc(["fuse", "--mountpoint", str(fuse_mnt), "--apisock", sock], str(tmp_path / "d.log"))
    try:
        d.wait_socket(sock, 60)
        api = Api(sock)
        wait_state(api, "RUNNING")
        body = {"fs_type": "rafs", "source": f"docker://{proxy.host}/{REPO}:v1",
                "config": json.dumps(config(proxy, str(tmp_path / "cache"), fs_driver="erofs"))}
        r = api.request("POST", "/api/v1/mount", {"mountpoint": str(host)}, body)
        assert r.status == 204, (r.status, r.body, d.log_text())
        assert erofs_at(str(host)) and data_gets(proxy, pushed) == []
        assert compare_trees(str(pushed.image.src), str(host)) > 40
        assert data_gets(proxy, pushed)
        r = api.request("DELETE", "/api/v1/mount", {"mountpoint": str(host)})
        assert r.status == 204, r.body
        assert not is_mountpoint(str(host)) and _views() == views_before
        api.close()
        assert d.stop(signal.SIGTERM) == 0, d.log_text()
    finally:
        d.kill()
        _cleanup([str(host), str(fuse_mnt)], views_before)
