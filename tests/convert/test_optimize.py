"""`nydusify-py optimize` against a real loopback docker-registry: a converted image gets the
listed files' data in one new blob (only their ranges fetched from the source), pushed to another
repository complete (old blobs mounted), and `nydusify-py check` finds it equal to the original
OCI image."""

import json
import random
import subprocess
import sys

import pytest

from nydus_py.convert import oci
from nydus_py.convert.optimizer import ANNO_PREFETCH_BLOB, merge_ranges
from tests.storage import registry_rig as rig

from . import ociimage as oi
from . import regpush
from .test_convert_e2e import REPO, env, get_manifest, http_get

pytestmark = [pytest.mark.slow]


def nydusify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", *args], capture_output=True, text=True,
                          timeout=300, env=env(), cwd=str(REPO))


def test_merge_ranges():
    assert merge_ranges([(100, 10), (0, 10), (10, 5), (5000, 1)], gap=0) == [(0, 15), (100, 10), (5000, 1)]
    assert merge_ranges([(100, 10), (0, 10), (5000, 1)], gap=100) == [(0, 110), (5000, 1)]
    assert merge_ranges([(0, 100), (10, 5)], gap=0) == [(0, 100)]


@pytest.fixture(scope="module")
def nydus_image(plain_registry: rig.Registry) -> tuple[str, str]:
    rng = random.Random(21)
    l1 = [oi.Entry("app", "dir", mode=0o755), oi.Entry("lib", "dir", mode=0o755)]
    l1 += [oi.Entry(f"lib/m{i}", data=rng.randbytes(40_000 + 999 * i)) for i in range(20)]
    l1 += [oi.Entry("app/main", data=rng.randbytes(30_000)), oi.Entry("app/conf", data=b"port=80\n")]
    l2 = [oi.Entry("app/extra", data=rng.randbytes(50_000)), oi.Entry("lib/.wh.m19")]
    img = oi.make_image([oi.compress(oi.Layer(l1, "gzip")), oi.compress(oi.Layer(l2, "gzip"))])
    regpush.push_image(plain_registry.url, "opt/src", "v1", img)
    src = f"{plain_registry.host}/opt/src:v1"
    nydus = f"{plain_registry.host}/opt/app:nydus"
    r = nydusify("convert", "-q", "--source", src, "--target", nydus, "--plain-http", "--fs-chunk-size", "0x4000")
    assert r.returncode == 0, r.stderr
    return src, nydus


def test_optimize_moves_the_listed_files_and_checks_equal(tmp_path, nydus_image, plain_registry):
    src, nydus = nydus_image
    hints = tmp_path / "hints.json"
    hints.write_text(json.dumps({"version": "v1", "files": [
        {"path": "/app/main"}, {"path": "/lib/m3", "ranges": [[0, 100]]}, {"path": "/app/extra"},
        {"path": "/lib/m19"}]}))
    target = f"{plain_registry.host}/opt/app-opt:v1"
    out = tmp_path / "r.json"
    patches = plain_registry.log_text().count('"PATCH /v2/opt/app-opt/blobs/uploads/')
    r = nydusify("optimize", "--source", nydus, "--target", target, "--plain-http", "--prefetch-files", str(hints),
                 "--output-json", str(out), "--push-chunk-size", "16KiB")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    # the new blob (7 chunks, over 16 KiB) and the bootstrap layer went up in 16 KiB PATCH pieces
    assert plain_registry.log_text().count('"PATCH /v2/opt/app-opt/blobs/uploads/') - patches >= 3
    assert res["files"] == 3 and res["skipped"] == ["/lib/m19: not in the image"]
    # main: 2 chunks of 16 KiB, m3's first chunk, extra: 4 chunks
    assert res["chunks_moved"] == 2 + 1 + 4
    src_manifest = get_manifest(plain_registry, "opt/app", "nydus")
    source_blob_bytes = sum(d["size"] for d in src_manifest["layers"][:-1])
    assert res["bytes_moved"] <= res["fetched_bytes"] < source_blob_bytes / 3
    m = get_manifest(plain_registry, "opt/app-opt", "v1")
    boot = m["layers"][-1]
    assert boot["annotations"][ANNO_PREFETCH_BLOB] == res["blob_id"]
    assert boot["annotations"][oci.ANNO_NYDUS_BOOTSTRAP] == "true"
    digests = [d["digest"] for d in m["layers"][:-1]]
    assert f"sha256:{res['blob_id']}" in digests and all(d["mediaType"] == oci.NYDUS_BLOB for d in m["layers"][:-1])
    assert res["blobs"][f"sha256:{res['blob_id']}"] == "uploaded"
    assert {v for k, v in res["blobs"].items() if k != f"sha256:{res['blob_id']}"} == {"mounted"}
    st, cfg = http_get(f"{plain_registry.url}/v2/opt/app-opt/blobs/{m['config']['digest']}")
    assert st == 200
    assert json.loads(cfg)["rootfs"]["diff_ids"] == digests + [boot["annotations"][oci.ANNO_UNCOMPRESSED]]
    # every blob there and right, every file equal to the original OCI image's
    r = nydusify("check", "--plain-http", "--source", src, "--target", target)
    assert r.returncode == 0, r.stderr
    assert "paths equal to the source's layers" in r.stdout, r.stdout


def test_optimize_errors(tmp_path, nydus_image, plain_registry):
    src, nydus = nydus_image
    hints = tmp_path / "hints.txt"
    hints.write_text("/nothing/here\n")
    r = nydusify("optimize", "--source", nydus, "--target", f"{plain_registry.host}/opt/x:v1", "--plain-http",
                 "--prefetch-files", str(hints))
    assert r.returncode == 1 and "nothing to optimize" in r.stderr, r.stderr
    assert http_get(f"{plain_registry.url}/v2/opt/x/manifests/v1", oci.OCI_MANIFEST)[0] == 404
    hints.write_text("/app/main\n")
    r = nydusify("optimize", "--source", src, "--target", f"{plain_registry.host}/opt/x:v1", "--plain-http",
                 "--prefetch-files", str(hints))
    assert r.returncode == 1 and "not a Nydus image" in r.stderr, r.stderr
    r = nydusify("optimize", "--source", nydus, "--target", f"{plain_registry.host}/opt/x:v1", "--plain-http",
                 "--prefetch-files", str(hints), "--policy", "other")
    assert r.returncode == 1 and "only separated-blob-with-prefetch-files" in r.stderr, r.stderr


def test_chunkdict_generate_then_convert_with_it(tmp_path, plain_registry):
    """`nydusify-py chunkdict generate` over two converted images that share files, then a third
    image converted with `--chunk-dict` that dictionary: it stores less, references the
    dictionary's blobs (present in its repository) and checks equal to its source."""
    rng = random.Random(33)
    shared = [oi.Entry("lib", "dir", mode=0o755)] + [oi.Entry(f"lib/s{i}", data=rng.randbytes(50_000 + i))
                                                   for i in range(4)]
    refs = []
    for name in ("one", "two", "three"):
        own = [oi.Entry(f"{name}.bin", data=rng.randbytes(40_000))]
        img = oi.make_image([oi.compress(oi.Layer(shared + own, "gzip"))])
        regpush.push_image(plain_registry.url, f"cd/{name}", "v1", img)
        refs.append(f"{plain_registry.host}/cd/{name}:v1")
    for ref in refs[:2]:
        r = nydusify("convert", "-q", "--source", ref, "--target", ref + "-nydus", "--plain-http",
                     "--fs-chunk-size", "0x4000")
        assert r.returncode == 0, r.stderr
    dict_ref = f"{plain_registry.host}/cd/dict:v1"
    out = tmp_path / "d.json"
    r = nydusify("chunkdict", "generate", "--sources", ",".join(x + "-nydus" for x in refs[:2]), "--target", dict_ref,
                 "--plain-http", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["chunks"] == sum(-(-(50_000 + i) // 0x4000) for i in range(4))
    assert set(res["blobs"].values()) == {"mounted"}
    m = get_manifest(plain_registry, "cd/dict", "v1")
    assert m["layers"][-1]["annotations"][oci.ANNO_NYDUS_BOOTSTRAP] == "true"
    third = f"{plain_registry.host}/cd/three:v1-nydus"
    plain, with_dict = tmp_path / "plain.json", tmp_path / "dict.json"
    for target, out_json, extra in ((third + "plain", plain, ()), (third, with_dict, ("--chunk-dict", dict_ref))):
        r = nydusify("convert", "-q", "--source", refs[2], "--target", target, "--plain-http",
                     "--fs-chunk-size", "0x4000", "--output-json", str(out_json), *extra)
        assert r.returncode == 0, r.stderr
    a, b = json.loads(plain.read_text()), json.loads(with_dict.read_text())
    assert b["dict_blobs"] and not a["dict_blobs"]
    assert b["uploaded_bytes"] < a["uploaded_bytes"] / 2  # the shared files' chunks are the dictionary's
    r = nydusify("check", "--plain-http", "--source", refs[2], "--target", third)
    assert r.returncode == 0, r.stderr
