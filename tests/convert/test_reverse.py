"""`nydusify-py convert --reverse`: a Nydus image back to an OCI image (one flattened layer) in a
real docker-registry; `nydusify-py check` then compares every file of the Nydus image with the
reversed image's layer."""

import json
import subprocess

import pytest

from . import ociimage as oi
from .test_check import check
from .test_convert_e2e import get_manifest, nydusify

pytestmark = [pytest.mark.slow, pytest.mark.root]


def test_reverse_gives_the_same_tree_as_one_oci_layer(plain_registry, skopeo, tmp_path):
    layout = oi.write_layout(tmp_path / "layout", "v1", oi.make_image(oi.sample_layers(seed=9)))
    src = f"{plain_registry.host}/reverse/app:v1"
    oi.skopeo_push(skopeo, layout, "v1", src)
    nydus = f"{plain_registry.host}/reverse/app:v1-nydus"
    r = nydusify("--source", src, "--target", nydus, "--plain-http")
    assert r.returncode == 0, r.stderr
    back = f"{plain_registry.host}/reverse/app:v1-oci"
    out = tmp_path / "reverse.json"
    r = nydusify("--source", nydus, "--target", back, "--plain-http", "--reverse", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    assert "experimental" in r.stderr and "reversed" in r.stdout
    result = json.loads(out.read_text())
    m = get_manifest(plain_registry, "reverse/app", "v1-oci")
    assert [ly["mediaType"] for ly in m["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    assert m["layers"][0]["digest"] == result["layer_digest"] and result["entries"] > 20
    original = get_manifest(plain_registry, "reverse/app", "v1")
    assert result["fetched_bytes"] > 0 and len(original["layers"]) == 3
    # the Nydus image's files are those of the reversed image, field by field and byte for byte
    c = check("--source", back, "--target", nydus)
    assert c.returncode == 0, c.stdout + c.stderr
    assert "paths equal" in c.stdout
    # and the reversed image runs through skopeo like any OCI image
    inspect = subprocess.run([skopeo, "inspect", "--tls-verify=false", f"docker://{back}"], capture_output=True,
                             text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stderr


def test_reverse_of_an_oci_image_is_one_clear_error(plain_registry, skopeo, tmp_path):
    layout = oi.write_layout(tmp_path / "layout", "v1", oi.make_image(oi.sample_layers(seed=2)))
    src = f"{plain_registry.host}/reverse/plain:v1"
    oi.skopeo_push(skopeo, layout, "v1", src)
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/reverse/plain:v2", "--plain-http", "--reverse")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "nydus" in lines[0].lower(), r.stderr
