"""`nydusify-py copy` between two loopback docker-registries: the copy passes `check`, digests
are kept, a second copy uploads no blob (counted in the target registry's access log), and
--all-platforms / merged indexes come across whole."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.convert import oci
from tests.storage import registry_rig as rig

from . import ociimage as oi
from . import regpush
from .test_check import check, convert, nydusify, unique_source
from .test_convert_e2e import get_manifest
from .test_convert_flags import small_layers

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def other_registry(registry_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[rig.Registry]:
    reg = rig.plain_registry(registry_bin, tmp_path_factory.mktemp("other-registry"))
    yield reg
    reg.stop()


def uploads(reg: rig.Registry, repo: str) -> int:
    return reg.log_text().count(f'"POST /v2/{repo}/blobs/uploads/')


def copy(tmp: Path, *args: str) -> dict:
    out = tmp / "copy.json"
    r = nydusify("copy", "--plain-http", "--output-json", str(out), *args)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_copy_between_registries_passes_check_and_reuses_blobs(tmp_path, plain_registry, other_registry):
    _img, src = unique_source(plain_registry, "copy-src", 21)
    ny = f"{plain_registry.host}/copy/nydus:v1"
    convert(src, ny)
    dst = f"{other_registry.host}/copied/nydus:v1"
    first = copy(tmp_path, "--source", ny, "--target", dst)
    m = get_manifest(plain_registry, "copy/nydus", "v1")
    assert first["digest"] == first["manifests"][0]  # same bytes, same digest
    assert sorted(first["uploaded"]) == sorted([m["config"]["digest"], *(ly["digest"] for ly in m["layers"])])
    r = check("--source", src, "--target", dst)
    assert r.returncode == 0, r.stderr
    assert "paths equal to the source's layers" in r.stdout

    before = uploads(other_registry, "copied/nydus")
    second = copy(tmp_path, "--source", ny, "--target", dst)
    assert second["uploaded"] == [] and sorted(second["reused"]) == sorted(first["uploaded"])
    assert uploads(other_registry, "copied/nydus") == before  # not one upload started


def test_copy_merged_index_and_all_platforms(tmp_path, plain_registry, other_registry):
    _img, src = unique_source(plain_registry, "copy-merged", 22)
    merged = f"{plain_registry.host}/copy/merged:v1"
    convert(src, merged, "--merge-platform")
    res = copy(tmp_path, "--source", merged, "--target", f"{other_registry.host}/copied/merged:v1")
    idx = get_manifest(plain_registry, "copy/merged", "v1", oci.OCI_INDEX)
    assert len(res["manifests"]) == 2
    copied = get_manifest(other_registry, "copied/merged", "v1", oci.OCI_INDEX)
    assert copied == idx
    r = check("--source", src, "--target", f"{other_registry.host}/copied/merged:v1", "--multi-platform")
    assert r.returncode == 0, r.stderr

    images = {"amd64": oi.make_image(small_layers(31), "amd64"), "arm64": oi.make_image(small_layers(32), "arm64")}
    regpush.push_index(plain_registry.url, "copy/multi", "v1", images)
    multi = f"{plain_registry.host}/copy/multi-nydus:v1"
    convert(f"{plain_registry.host}/copy/multi:v1", multi, "--all-platforms")
    res = copy(tmp_path, "--source", multi, "--target", f"{other_registry.host}/copied/multi:v1", "--all-platforms")
    assert len(res["manifests"]) == 2
    assert get_manifest(other_registry, "copied/multi", "v1", oci.OCI_INDEX) == get_manifest(
        plain_registry, "copy/multi-nydus", "v1", oci.OCI_INDEX)
    for arch in ("amd64", "arm64"):
        r = check("--source", f"{plain_registry.host}/copy/multi:v1", "--target",
                  f"{other_registry.host}/copied/multi:v1", "--platform", f"linux/{arch}")
        assert r.returncode == 0, r.stderr
    # one platform of the index: a plain manifest under the tag
    res = copy(tmp_path, "--source", multi, "--target", f"{other_registry.host}/copied/multi:arm",
               "--platform", "linux/arm64")
    assert res["digest"] == res["manifests"][0]
    assert get_manifest(other_registry, "copied/multi", "arm")["mediaType"] == oci.OCI_MANIFEST


def test_push_chunk_size_uploads_in_patch_pieces(tmp_path, plain_registry, other_registry):
    """--push-chunk-size 64KiB: each blob goes up as PATCH requests of at most 64 KiB (counted in
    the target registry's access log), and the copy still passes `check`; garbage is one line."""
    _img, src = unique_source(plain_registry, "copy-chunked", 22)
    ny = f"{plain_registry.host}/copy/chunked:v1"
    convert(src, ny)
    m = get_manifest(plain_registry, "copy/chunked", "v1")
    sizes = [m["config"]["size"], *(ly["size"] for ly in m["layers"])]
    assert max(sizes) > 3 * 65536
    dst = f"{other_registry.host}/copied/chunked:v1"
    patches = other_registry.log_text().count('"PATCH /v2/copied/chunked/blobs/uploads/')
    copy(tmp_path, "--source", ny, "--target", dst, "--push-chunk-size", "64KiB")
    patches = other_registry.log_text().count('"PATCH /v2/copied/chunked/blobs/uploads/') - patches
    assert patches == sum(-(-s // 65536) for s in sizes if s)
    r = check("--source", src, "--target", dst)
    assert r.returncode == 0, r.stderr
    bad = nydusify("copy", "--plain-http", "--source", ny, "--target", dst, "--push-chunk-size", "ten")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--push-chunk-size" in bad.stderr, bad.stderr
