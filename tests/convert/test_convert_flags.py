"""nydusify's own flag names on `nydusify-py convert` (--fs-chunk-size, --plain-http, --oci,
--all-platforms, --target-suffix) against a real loopback docker-registry, and the one-line hint
a plain-HTTP registry reached over HTTPS gets instead of aiohttp's SSL error text."""

import json
import random

import pytest

from nydus_py.convert import oci
from tests.storage import registry_rig as rig

from . import ociimage as oi
from . import regpush
from .test_convert_e2e import get_manifest, http_get, nydusify

pytestmark = [pytest.mark.slow]


def small_layers(seed: int) -> list[oi.Layer]:
    rng = random.Random(seed)
    files = [oi.Entry("data", "dir", mode=0o755)]
    files += [oi.Entry(f"data/f{i}", data=rng.randbytes(3000 + i)) for i in range(4)]
    files.append(oi.Entry("data/dup", data=files[1].data))
    return [oi.compress(oi.Layer(files, "gzip")), oi.compress(oi.Layer([oi.Entry("x.txt", data=b"x" * 70000)], "gzip"))]


@pytest.fixture(scope="module")
def small_image(plain_registry: rig.Registry) -> tuple[oi.OciImage, str]:
    img = oi.make_image(small_layers(3))
    regpush.push_image(plain_registry.url, "flags/src", "v1", img)
    return img, f"{plain_registry.host}/flags/src:v1"


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nydusify-py: error: "), stderr
    return lines[0]


def test_plain_http_registry_without_flag_is_one_line_hint(small_image, plain_registry):
    _img, src = small_image
    target = f"{plain_registry.host}/flags/out:v1"
    r = nydusify("--source", src, "--target", target)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "plain-HTTP registry" in line and "--source-insecure or --plain-http" in line, line
    assert "SSL" not in line and "ClientConnector" not in line and "WRONG_VERSION" not in line.upper(), line
    # the source is fine, the target is the plain one: the hint names the target's flag
    r = nydusify("--source", src, "--target", target, "--source-insecure")
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "target " in line and "--target-insecure or --plain-http" in line, line
    # nothing listens: said plainly, once
    r = nydusify("--source", src, "--target", "127.0.0.1:9/x:y", "--plain-http")
    assert one_error_line(r.stderr) == "nydusify-py: error: target 127.0.0.1:9/x:y: cannot connect to 127.0.0.1:9: " \
                                       "connection refused"


def test_plain_http_fs_chunk_size_and_target_suffix(tmp_path, small_image, plain_registry):
    _img, src = small_image
    out = tmp_path / "a.json"
    r = nydusify("--source", src, "--target-suffix=-nydus", "--plain-http", "--fs-chunk-size", "0x4000",
                 "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["target"] == f"{plain_registry.host}/flags/src:v1-nydus"
    m = get_manifest(plain_registry, "flags/src", "v1-nydus")
    assert m["layers"][-1]["annotations"][oci.ANNO_NYDUS_BOOTSTRAP] == "true"
    # --chunk-size is the same option: same bytes, same manifest; the default chunk size differs
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/flags/b:v1", "--plain-http",
                 "--chunk-size", "0x4000", "--output-json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b.json").read_text())["manifest_digest"] == res["manifest_digest"]
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/flags/c:v1", "--plain-http",
                 "--output-json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "c.json").read_text())["manifest_digest"] != res["manifest_digest"]
    r = nydusify("--source", src + "@sha256:" + "0" * 64, "--target-suffix=-x", "--plain-http")
    assert r.returncode == 1 and "--target-suffix needs a tagged source" in one_error_line(r.stderr)


def test_docker_source_keeps_docker_media_types_unless_oci(tmp_path, plain_registry):
    img = oi.make_image(small_layers(4))
    regpush.push_image(plain_registry.url, "flags/docker", "v1", img, docker=True)
    src = f"{plain_registry.host}/flags/docker:v1"
    for flag, want_m, want_c, want_b in (
            ((), regpush.DOCKER_MANIFEST, regpush.DOCKER_CONFIG, regpush.DOCKER_LAYER),
            (("--oci",), oci.OCI_MANIFEST, oci.OCI_CONFIG, oci.OCI_LAYER_GZIP)):
        tag = "oci" if flag else "docker"
        r = nydusify("--source", src, "--target", f"{plain_registry.host}/flags/docker-nydus:{tag}", "--plain-http",
                     *flag)
        assert r.returncode == 0, r.stderr
        m = get_manifest(plain_registry, "flags/docker-nydus", tag, f"{oci.OCI_MANIFEST}, {regpush.DOCKER_MANIFEST}")
        assert (m["mediaType"], m["config"]["mediaType"], m["layers"][-1]["mediaType"]) == (want_m, want_c, want_b)
        assert all(ly["mediaType"] == oci.NYDUS_BLOB for ly in m["layers"][:-1])
        assert m["layers"][-1]["annotations"][oci.ANNO_NYDUS_BOOTSTRAP] == "true"


def test_all_platforms_and_platform_list(tmp_path, plain_registry):
    images = {"amd64": oi.make_image(small_layers(5), "amd64"), "arm64": oi.make_image(small_layers(6), "arm64")}
    regpush.push_index(plain_registry.url, "flags/multi", "v1", images)
    src = f"{plain_registry.host}/flags/multi:v1"
    out = tmp_path / "all.json"
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/flags/multi-nydus:all", "--plain-http",
                 "--all-platforms", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [p["platform"] for p in res["platforms"]] == ["linux/amd64", "linux/arm64"]
    idx = get_manifest(plain_registry, "flags/multi-nydus", "all", oci.OCI_INDEX)
    assert idx["mediaType"] == oci.OCI_INDEX
    assert [e["platform"]["architecture"] for e in idx["manifests"]] == ["amd64", "arm64"]
    for e, plat in zip(idx["manifests"], res["platforms"], strict=True):
        assert e["digest"] == plat["manifest_digest"]
        m = get_manifest(plain_registry, "flags/multi-nydus", e["digest"])
        assert m["layers"][-1]["annotations"][oci.ANNO_NYDUS_BOOTSTRAP] == "true"
        st, cfg = http_get(f"{plain_registry.url}/v2/flags/multi-nydus/blobs/{m['config']['digest']}")
        assert json.loads(cfg)["architecture"] == e["platform"]["architecture"]
    # an explicit list picks those platforms only, in that order; one platform is one manifest
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/flags/multi-nydus:two", "--plain-http",
                 "--platform", "linux/arm64,linux/amd64")
    assert r.returncode == 0, r.stderr
    idx = get_manifest(plain_registry, "flags/multi-nydus", "two", oci.OCI_INDEX)
    assert [e["platform"]["architecture"] for e in idx["manifests"]] == ["arm64", "amd64"]
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/flags/multi-nydus:arm", "--plain-http",
                 "--platform", "linux/arm64", "--output-json", str(tmp_path / "arm.json"))
    assert r.returncode == 0, r.stderr
    m = get_manifest(plain_registry, "flags/multi-nydus", "arm", oci.OCI_MANIFEST)
    assert m["mediaType"] == oci.OCI_MANIFEST and json.loads((tmp_path / "arm.json").read_text())["platform"] == "linux/arm64"
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/flags/multi-nydus:x", "--plain-http",
                 "--all-platforms", "--platform", "linux/amd64")
    assert r.returncode == 1 and "conflicts" in one_error_line(r.stderr)
