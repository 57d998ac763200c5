"""Manifest/index parsing of untrusted registry answers, platform choice, and the Nydus
documents (NYDUSD-CONTRACT.md 7)."""

import json

import pytest

from nydus_py.convert import oci
from nydus_py.convert.errors import ConvertError
from nydus_py.rafs.errors import FormatError

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def desc(mt: str = oci.OCI_LAYER_GZIP, digest: str = D1, size: int = 10, **kw: object) -> dict:
    return {"mediaType": mt, "digest": digest, "size": size, **kw}


def manifest(layers: list[dict], mt: str | None = oci.OCI_MANIFEST) -> bytes:
    doc: dict = {"schemaVersion": 2, "config": desc(oci.OCI_CONFIG, D3, 5), "layers": layers}
    if mt:
        doc["mediaType"] = mt
    return json.dumps(doc).encode()


def test_parse_manifest_and_index():
    m = oci.parse_document(manifest([desc(), desc(digest=D2, size=7)]), "")
    assert isinstance(m, oci.Manifest) and [d.size for d in m.layers] == [10, 7] and m.config.digest == D3
    # media type from the Content-Type, or from the shape
    m = oci.parse_document(manifest([desc()], None), "application/vnd.docker.distribution.manifest.v2+json; x=y")
    assert isinstance(m, oci.Manifest) and m.media_type == oci.DOCKER_MANIFEST
    idx = json.dumps({"schemaVersion": 2, "manifests": [desc(oci.OCI_MANIFEST, platform={"os": "linux",
                                                                                           "architecture": "amd64"})]})
    i = oci.parse_document(idx.encode(), "")
    assert isinstance(i, oci.Index) and i.manifests[0].platform == {"os": "linux", "architecture": "amd64"}


@pytest.mark.parametrize("body,match", [
    (b"not json", "not JSON"),
    (b"[1]", "expected a JSON object"),
    (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "schema 1"),
    (json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode(), "neither"),
    (json.dumps({"schemaVersion": 3, "layers": []}).encode(), "schemaVersion"),
    (manifest([desc(digest="sha512:" + "0" * 128)]), "only algorithm"),
    (manifest([desc(digest="sha256:XYZ")]), "digest"),
    (manifest([desc(size=-1)]), "size"),
    (manifest([desc(size=True)]), "size"),
    (manifest([{"digest": D1, "size": 1}]), "mediaType"),
    (manifest([desc(annotations={"a": 1})]), "annotations"),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "layers": "x", "config": desc()}).encode(),
     "must be a list"),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": {}}).encode(), "must be a list"),
    (b" " * (oci.MAX_DOCUMENT + 1), "more than"),
])
def test_parse_rejects(body, match):
    with pytest.raises(FormatError, match=match):
        oci.parse_document(body, "")


def test_platforms():
    assert oci.parse_platform("linux/amd64") == oci.Platform("linux", "amd64")
    assert oci.parse_platform("Linux/aarch64/v8") == oci.Platform("linux", "arm64", "v8")
    for bad in ("linux", "linux/", "a/b/c/d", "linux/am d64"):
        with pytest.raises(ConvertError, match="invalid platform"):
            oci.parse_platform(bad)
    arm64 = oci.Platform("linux", "arm64")
    assert oci.platform_matches(oci.Platform("linux", "arm64", "v8"), arm64)
    assert oci.platform_matches(arm64, oci.Platform("linux", "arm64", "v8"))
    assert not oci.platform_matches(oci.Platform("linux", "arm", "v7"), oci.Platform("linux", "arm", "v6"))
    assert not oci.platform_matches(arm64, None)


def _index(*entries: dict) -> oci.Index:
    doc = oci.parse_document(json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
                                         "manifests": list(entries)}).encode(), "")
    assert isinstance(doc, oci.Index)
    return doc


def test_select_manifest():
    amd = desc(oci.OCI_MANIFEST, D1, platform={"os": "linux", "architecture": "amd64"})
    ny = desc(oci.OCI_MANIFEST, D2, platform={"os": "linux", "architecture": "amd64",
                                             "os.features": [oci.NYDUS_OS_FEATURE]})
    att = desc(oci.OCI_MANIFEST, D3, platform={"os": "unknown", "architecture": "unknown"})
    idx = _index(att, ny, amd)
    want = oci.Platform("linux", "amd64")
    assert oci.select_manifest(idx, want).digest == D1
    assert oci.select_manifest(idx, want, nydus=True).digest == D2
    ny2 = desc(oci.OCI_MANIFEST, D3, platform={"os": "linux", "architecture": "amd64"},
               artifactType=oci.NYDUS_ARTIFACT)
    assert oci.select_manifest(_index(ny2), want, nydus=True).digest == D3
    with pytest.raises(ConvertError, match=r"no manifest for platform linux/arm64 .*has: linux/amd64\)"):
        oci.select_manifest(idx, oci.Platform("linux", "arm64"))


def test_check_source():
    m = oci.parse_document(manifest([desc(), desc(digest=D2)]), "")
    assert isinstance(m, oci.Manifest)
    cfg = {"rootfs": {"type": "layers", "diff_ids": [D1, D2]}}
    assert oci.check_source(m, cfg) == [D1, D2]
    with pytest.raises(FormatError, match="2 layers"):
        oci.check_source(m, {"rootfs": {"diff_ids": [D1]}})
    with pytest.raises(FormatError, match="diff_ids"):
        oci.check_source(m, {"rootfs": {"diff_ids": "x"}})
    ny = oci.parse_document(manifest([desc(oci.NYDUS_BLOB)]), "")
    assert isinstance(ny, oci.Manifest)
    with pytest.raises(ConvertError, match="already a Nydus image"):
        oci.check_source(ny, {"rootfs": {"diff_ids": [D1]}})
    odd = oci.parse_document(manifest([desc("application/x-foo")]), "")
    assert isinstance(odd, oci.Manifest)
    with pytest.raises(ConvertError, match="not an image layer"):
        oci.check_source(odd, {"rootfs": {"diff_ids": [D1]}})
    empty = oci.parse_document(manifest([]), "")
    assert isinstance(empty, oci.Manifest)
    with pytest.raises(ConvertError, match="no layers"):
        oci.check_source(empty, {"rootfs": {"diff_ids": []}})


def test_nydus_documents():
    src = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
           "rootfs": {"type": "layers", "diff_ids": [D1]}, "history": [{"created_by": "x"}]}
    cfg = oci.nydus_config(src, [D2], D3)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [D2, D3]} and cfg["config"] == {"Cmd": ["sh"]}
    assert cfg["history"][-1]["comment"] == "Nydus Bootstrap Layer" and len(cfg["history"]) == 2
    assert src["rootfs"]["diff_ids"] == [D1]  # the source is not modified
    layers = [oci.blob_layer("2" * 64, 100), oci.bootstrap_layer(D1, 50, D3, 6)]
    assert layers[0]["annotations"][oci.ANNO_NYDUS_BLOB] == "true" and layers[0]["digest"] == D2
    assert layers[1]["annotations"][oci.ANNO_NYDUS_BOOTSTRAP] == "true"
    assert layers[1]["annotations"][oci.ANNO_FS_VERSION] == "6"
    man = oci.nydus_manifest({"mediaType": "x", "digest": D3, "size": 1}, layers)
    parsed = oci.parse_document(oci.dumps(man), "")
    assert isinstance(parsed, oci.Manifest) and parsed.config.media_type == oci.OCI_CONFIG
    assert oci.nydus_bootstrap(parsed).digest == D1 and oci.nydus_blob_ids(parsed) == ["2" * 64]
    merged = oci.nydus_manifest({"mediaType": "x", "digest": D3, "size": 1}, layers, merged=True)
    assert merged["config"]["mediaType"] == oci.NYDUS_CONFIG and merged["artifactType"] == oci.NYDUS_ARTIFACT
    idx = oci.merged_index(desc(oci.OCI_MANIFEST, D1), desc(oci.OCI_MANIFEST, D2), oci.Platform("linux", "arm64", "v8"))
    pi = oci.parse_document(oci.dumps(idx), "")
    assert isinstance(pi, oci.Index)
    assert not oci.is_nydus_entry(pi.manifests[0]) and oci.is_nydus_entry(pi.manifests[1])
    assert oci.select_manifest(pi, oci.Platform("linux", "arm64"), nydus=True).digest == D2
    plain = oci.parse_document(manifest([desc()]), "")
    assert isinstance(plain, oci.Manifest)
    with pytest.raises(ConvertError, match="not a Nydus image"):
        oci.nydus_bootstrap(plain)
