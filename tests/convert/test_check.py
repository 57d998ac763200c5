"""`nydusify-py check` against a loopback docker-registry: a good conversion passes every rule
(v5 and v6, and a merged index with --multi-platform); tampered targets fail with a line naming
the problem: a blob with wrong bytes, a missing blob, a removed annotation, a bootstrap whose
tree is another image's."""

import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from nydus_py.convert import oci
from tests.storage import registry_rig as rig

from . import ociimage as oi
from . import regpush
from .test_convert_e2e import REPO, env, get_manifest

pytestmark = [pytest.mark.slow]


def nydusify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", *args], capture_output=True, text=True,
                          timeout=300, env=env(), cwd=str(REPO))


def convert(src: str, dst: str, *extra: str) -> None:
    r = nydusify("convert", "-q", "--source", src, "--target", dst, "--plain-http", *extra)
    assert r.returncode == 0, r.stderr


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return nydusify("check", "--plain-http", *args)


def unique_source(reg: rig.Registry, name: str, seed: int) -> tuple[oi.OciImage, str]:
    """An image of its own (no blob shared with other tests, so tampering hurts no one else)."""
    rng = random.Random(seed)
    l1 = [oi.Entry("./", "dir", mode=0o755), oi.Entry("etc", "dir", mode=0o755),
          oi.Entry("etc/conf", data=rng.randbytes(5000), mode=0o600, uid=7, gid=8),
          oi.Entry("lib", "dir", mode=0o755), oi.Entry("lib/big", data=rng.randbytes(300_000)),
          oi.Entry("lib/old", data=b"old"), oi.Entry("lib/link", "symlink", target="big", mode=0o777),
          oi.Entry("lib/big-again", "link", target="lib/big")]
    l2 = [oi.Entry("lib/.wh.old"), oi.Entry("lib/new", data=rng.randbytes(2000), mode=0o755)]
    img = oi.make_image([oi.compress(oi.Layer(l1, "gzip")), oi.compress(oi.Layer(l2, "zstd"))])
    regpush.push_image(reg.url, f"check/{name}", "v1", img)
    return img, f"{reg.host}/check/{name}:v1"


def problems(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert "failed:" in lines[0], r.stderr
    return [ln.strip() for ln in lines[1:]]


@pytest.mark.parametrize("fs_version", ["5", "6"])
def test_good_conversion_passes(fs_version, plain_registry):
    img = oi.make_image(oi.sample_layers(seed=1))
    regpush.push_image(plain_registry.url, "check/sample", "v1", img)
    src = f"{plain_registry.host}/check/sample:v1"
    dst = f"{plain_registry.host}/check/sample-nydus:v{fs_version}"
    convert(src, dst, "--fs-version", fs_version, "--fs-chunk-size", "0x10000")
    r = check("--source", src, "--target", dst)
    assert r.returncode == 0, r.stderr
    assert f"RAFS v{fs_version}): OK" in r.stdout and "paths equal to the source's layers" in r.stdout, r.stdout


def test_merged_index_and_multi_platform(plain_registry):
    _img, src = unique_source(plain_registry, "merged", 11)
    dst = f"{plain_registry.host}/check/merged-nydus:v1"
    convert(src, dst, "--merge-platform")
    r = check("--source", src, "--target", dst, "--multi-platform")
    assert r.returncode == 0, r.stderr
    plain = f"{plain_registry.host}/check/merged-nydus:plain"
    convert(src, plain)
    assert any("not an index" in p for p in problems(check("--target", plain, "--multi-platform")))


def registry_blob_file(reg: rig.Registry, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return reg.data / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_blob_with_wrong_bytes_fails(plain_registry):
    _img, src = unique_source(plain_registry, "badbytes", 12)
    dst = f"{plain_registry.host}/check/badbytes-nydus:v1"
    convert(src, dst)
    blob = get_manifest(plain_registry, "check/badbytes-nydus", "v1")["layers"][0]
    path = registry_blob_file(plain_registry, blob["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    got = problems(check("--target", dst))
    assert got == [f"blobs: blob 1 {blob['digest'][:19]}: its bytes hash to "
                   f"sha256:{__import__('hashlib').sha256(data).hexdigest()[:12]}, not to its digest"], got


def test_missing_blob_fails(plain_registry):
    _img, src = unique_source(plain_registry, "missing", 13)
    dst = f"{plain_registry.host}/check/missing-nydus:v1"
    convert(src, dst)
    blob = get_manifest(plain_registry, "check/missing-nydus", "v1")["layers"][1]
    req = urllib.request.Request(f"{plain_registry.url}/v2/check/missing-nydus/blobs/{blob['digest']}",
                                 method="DELETE")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
    got = problems(check("--source", src, "--target", dst))
    assert f"blobs: blob 2 {blob['digest'][:19]} is missing from the target registry" in got, got
    assert "filesystem: not compared: some blobs are missing or wrong" in got, got


def test_removed_annotation_fails(plain_registry):
    _img, src = unique_source(plain_registry, "anno", 14)
    dst = f"{plain_registry.host}/check/anno-nydus:v1"
    convert(src, dst)
    m = get_manifest(plain_registry, "check/anno-nydus", "v1")
    assert check("--target", dst).returncode == 0
    del m["layers"][0]["annotations"][oci.ANNO_NYDUS_BLOB]
    regpush.push_manifest(plain_registry.url, "check/anno-nydus", "v1", json.dumps(m).encode(), oci.OCI_MANIFEST)
    got = problems(check("--target", dst))
    assert got == [f"manifest: layer 1 ({m['layers'][0]['digest'][:19]}): annotation "
                   f"{oci.ANNO_NYDUS_BLOB}=\"true\" is missing"], got
    del m["layers"][-1]["annotations"][oci.ANNO_NYDUS_BOOTSTRAP]
    regpush.push_manifest(plain_registry.url, "check/anno-nydus", "v1", json.dumps(m).encode(), oci.OCI_MANIFEST)
    assert any("so this is not a Nydus image" in p for p in problems(check("--target", dst)))


def test_bootstrap_of_another_image_fails_with_a_tree_diff(plain_registry):
    _img, src = unique_source(plain_registry, "tree-a", 15)
    _other, other_src = unique_source(plain_registry, "tree-b", 16)
    dst = f"{plain_registry.host}/check/tree-nydus:v1"
    convert(other_src, dst)  # another image's conversion under the target tag
    assert check("--target", dst).returncode == 0  # well formed by itself
    got = problems(check("--source", src, "--target", dst))
    # same paths, different bytes: every data file differs, and only those
    assert "filesystem: /etc/conf: size 5000 in the source, 5000 in the Nydus image" not in got
    diffs = sorted(p.split(":")[1].strip() for p in got if p.startswith("filesystem:"))
    assert diffs == ["/etc/conf", "/lib/big", "/lib/big-again", "/lib/new"], got
    assert all("sha256" in p for p in got), got
