"""`nydusify-py convert --chunk-dict` against loopback docker-registries: chunks a dictionary
image has are referenced from its blobs instead of stored again (fewer bytes stored), the image
lists the dictionary's blob (mounted into the target repository, or copied from another
registry), reads back byte-equal through `nydusify-py mount` (nydusd-py over both blobs), and
passes `check`; a dictionary built differently is one clear error."""

import hashlib
import io
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.convert import build_cache as bc
from nydus_py.convert import oci
from nydus_py.convert.layer import extract_bootstrap
from tests.conftest import require_device
from tests.storage import registry_rig as rig

from . import ociimage as oi
from . import regpush
from .test_check import check
from .test_convert_e2e import REPO, convert, env, get_manifest, http_get
from .test_mount import Mount

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def other_registry(registry_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[rig.Registry]:
    reg = rig.plain_registry(registry_bin, tmp_path_factory.mktemp("dict-registry"))
    yield reg
    reg.stop()


def images(seed: int) -> tuple[list[oi.Layer], list[oi.Layer], bytes]:
    """(the dictionary's layers, the new image's layers, the data they share)."""
    rng = random.Random(seed)
    shared = rng.randbytes(1_500_000)
    dict_layers = [oi.compress(oi.Layer([oi.Entry("./", "dir", mode=0o755), oi.Entry("lib", "dir", mode=0o755),
                                         oi.Entry("lib/libshared.so", data=shared),
                                         oi.Entry("lib/only-in-dict", data=rng.randbytes(100_000))], "gzip"))]
    app = [oi.compress(oi.Layer([oi.Entry("./", "dir", mode=0o755), oi.Entry("opt", "dir", mode=0o755),
                                 oi.Entry("opt/libshared-copy.so", data=shared),
                                 oi.Entry("opt/new.bin", data=rng.randbytes(200_000), mode=0o755)], "gzip")),
           oi.compress(oi.Layer([oi.Entry("etc", "dir", mode=0o755), oi.Entry("etc/app.conf", data=b"x=1\n")],
                                "zstd"))]
    return dict_layers, app, shared


def push(reg: rig.Registry, repo: str, layers: list[oi.Layer]) -> tuple[oi.OciImage, str]:
    img = oi.make_image(layers)
    regpush.push_image(reg.url, repo, "v1", img)
    return img, f"{reg.host}/{repo}:v1"


def blob_layers(m: dict) -> dict[str, int]:
    return {ly["digest"]: ly["size"] for ly in m["layers"] if ly["mediaType"] == oci.NYDUS_BLOB}


@pytest.mark.parametrize("fs_version", ["5", "6"])
def test_chunk_dict_stores_less_and_reads_back(fs_version: str, tmp_path: Path, plain_registry: rig.Registry) -> None:
    require_device("/dev/fuse")
    dict_layers, app_layers, shared = images(int(fs_version))
    flags = ("--fs-version", fs_version, "--fs-chunk-size", "0x10000")
    _d, dsrc = push(plain_registry, f"cd{fs_version}/dict-src", dict_layers)
    dict_ref = f"{plain_registry.host}/cd{fs_version}/dict:v1"
    convert(tmp_path, dsrc, dict_ref, *flags)
    dict_blobs = blob_layers(get_manifest(plain_registry, f"cd{fs_version}/dict", "v1"))

    app, src = push(plain_registry, f"cd{fs_version}/app", app_layers)
    plain = convert(tmp_path, src, f"{plain_registry.host}/cd{fs_version}/app-plain:v1", *flags)
    target = f"{plain_registry.host}/cd{fs_version}/app-dict:v1"
    res = convert(tmp_path, src, target, *flags, "--chunk-dict", f"bootstrap:registry:{dict_ref}")

    m = get_manifest(plain_registry, f"cd{fs_version}/app-dict", "v1")
    blobs = blob_layers(m)
    assert [f"sha256:{b}" for b in res["dict_blobs"]] == list(dict_blobs)  # the dictionary's blob is listed
    assert set(dict_blobs) <= set(blobs)
    assert res["mounted"] == list(dict_blobs)  # same registry: mounted, not uploaded
    own = sum(size for d, size in blobs.items() if d not in dict_blobs)
    assert own < plain["blob_bytes"] - 1_000_000, (own, plain["blob_bytes"])  # the 1.5 MB stayed in the dict
    assert res["uploaded_bytes"] < plain["uploaded_bytes"] - 1_000_000
    assert res["deduplicated"] > plain["deduplicated"]
    config = json.loads(http_get(f"{plain_registry.url}/v2/cd{fs_version}/app-dict/blobs/{m['config']['digest']}")[1])
    assert set(dict_blobs) <= set(config["rootfs"]["diff_ids"])

    r = check("--source", src, "--target", target)
    assert r.returncode == 0, r.stderr
    assert "paths equal to the source's layers" in r.stdout

    # with a build cache: the records name the dictionary blob they reference, as nydusify's do,
    # and a rerun takes every layer from the cache (the dictionary blob still in the image)
    cache = f"{plain_registry.host}/cd{fs_version}/cache:v1"
    dict_flag = ("--chunk-dict", f"bootstrap:registry:{dict_ref}")
    first = convert(tmp_path, src, f"{target}-c1", *flags, *dict_flag, "--build-cache", cache)
    again = convert(tmp_path, src, f"{target}-c2", *flags, *dict_flag, "--build-cache", cache)
    assert (first["layers_built"], again["layers_cached"], again["layers_built"]) == (2, 2, 0)
    assert first["manifest_digest"] == again["manifest_digest"] == res["manifest_digest"]
    cm = get_manifest(plain_registry, f"cd{fs_version}/cache", "v1")
    assert cm["layers"][0]["digest"] in dict_blobs and bc.ANNO_SOURCE_CHAINID not in cm["layers"][0]["annotations"]
    refs = [json.loads(ly["annotations"][bc.ANNO_REFERENCE_BLOBS]) for ly in cm["layers"]
            if bc.ANNO_REFERENCE_BLOBS in ly["annotations"]]
    assert refs == [res["dict_blobs"]]  # the first layer references it; the second has no shared chunk
    # another dictionary is another parameter set: no hit
    other = convert(tmp_path, src, f"{target}-c3", *flags, "--build-cache", cache)
    assert other["layers_cached"] == 0

    mnt = tmp_path / "mnt"
    mount = Mount(target, mnt, tmp_path)
    try:
        got = (mnt / "opt/libshared-copy.so").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(shared).digest()
        entries = {e.name: e for ly in app.layers for e in ly.entries}
        assert (mnt / "opt/new.bin").read_bytes() == entries["opt/new.bin"].data
        assert (mnt / "etc/app.conf").read_bytes() == b"x=1\n"
        assert not (mnt / "lib").exists()  # the dictionary's files are not the image's
    finally:
        mount.kill()


def test_chunk_dict_from_another_registry_and_local(tmp_path: Path, plain_registry: rig.Registry,
                                                    other_registry: rig.Registry) -> None:
    dict_layers, app_layers, _shared = images(7)
    _d, dsrc = push(other_registry, "cd/dict-src", dict_layers)
    dict_ref = f"{other_registry.host}/cd/dict:v1"
    convert(tmp_path, dsrc, dict_ref)
    dm = get_manifest(other_registry, "cd/dict", "v1")
    dict_blobs = blob_layers(dm)
    _a, src = push(plain_registry, "cd/app-x", app_layers)
    target = f"{plain_registry.host}/cd/app-x-nydus:v1"
    res = convert(tmp_path, src, target, "--chunk-dict", dict_ref, "--chunk-dict-insecure")
    assert res["copied"] == list(dict_blobs) and res["mounted"] == []
    assert check("--source", src, "--target", target).returncode == 0

    # a local bootstrap: its blobs must be in the target repository already (they are now)
    layer = http_get(f"{other_registry.url}/v2/cd/dict/blobs/{dm['layers'][-1]['digest']}")[1]
    boot = tmp_path / "dict.boot"
    with open(boot, "wb") as out:
        extract_bootstrap(io.BytesIO(layer), out)
    again = convert(tmp_path, src, f"{plain_registry.host}/cd/app-x-nydus:local", "--chunk-dict",
                    f"bootstrap:local:{boot}")
    assert again["manifest_digest"] == res["manifest_digest"] and again["copied"] == []
    elsewhere = subprocess.run(
        [sys.executable, "-m", "nydus_py.cli.nydusify", "convert", "-q", "--source", src, "--target",
         f"{plain_registry.host}/cd/elsewhere:v1", "--plain-http", "--chunk-dict", f"bootstrap=/{boot}"],
        capture_output=True, text=True, timeout=300, env=env(), cwd=str(REPO))
    assert elsewhere.returncode == 1 and elsewhere.stderr.count("\n") == 1, elsewhere.stderr
    assert "is not in the target repository" in elsewhere.stderr

    # built with another chunk size: one clear error, nothing pushed
    bad = subprocess.run(
        [sys.executable, "-m", "nydus_py.cli.nydusify", "convert", "-q", "--source", src, "--target",
         f"{plain_registry.host}/cd/bad:v1", "--plain-http", "--chunk-dict", dict_ref, "--fs-chunk-size", "0x10000"],
        capture_output=True, text=True, timeout=300, env=env(), cwd=str(REPO))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "chunk dict has chunk size 0x100000, the image uses 0x10000" in bad.stderr
