"""Push images to a plain-HTTP docker-registry with raw v2 API calls, for shapes skopeo will not
write from a layout as-is (Docker media types, multi-platform indexes)."""

import hashlib
import json
import urllib.request

from . import ociimage as oi

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _req(method: str, url: str, data: bytes | None = None, ctype: str = "") -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=data, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, dict(r.headers)


def push_blob(base: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _st, h = _req("POST", f"{base}/v2/{repo}/blobs/uploads/")
    loc = h["Location"]
    loc = loc if loc.startswith("http") else base + loc
    sep = "&" if "?" in loc else "?"
    _req("PUT", f"{loc}{sep}digest={digest}", data, "application/octet-stream")
    return digest


def push_manifest(base: str, repo: str, ref: str, body: bytes, media_type: str) -> str:
    _req("PUT", f"{base}/v2/{repo}/manifests/{ref}", body, media_type)
    return "sha256:" + hashlib.sha256(body).hexdigest()


def push_image(base: str, repo: str, ref: str, img: oi.OciImage, docker: bool = False) -> tuple[str, int, bytes]:
    """Layers, config and manifest (Docker media types when `docker`); (digest, size, manifest)."""
    for ly in img.layers:
        push_blob(base, repo, ly.blob)
    push_blob(base, repo, img.config)
    manifest = img.manifest
    mtype = "application/vnd.oci.image.manifest.v1+json"
    if docker:
        doc = json.loads(manifest)
        doc["mediaType"] = mtype = DOCKER_MANIFEST
        doc["config"]["mediaType"] = DOCKER_CONFIG
        for layer in doc["layers"]:
            assert layer["mediaType"].endswith("gzip"), "Docker layers are gzip here"
            layer["mediaType"] = DOCKER_LAYER
        manifest = json.dumps(doc).encode()
    digest = push_manifest(base, repo, ref, manifest, mtype)
    return digest, len(manifest), manifest


def push_index(base: str, repo: str, tag: str, images: dict[str, oi.OciImage]) -> str:
    """An OCI index of `images` (arch -> image, all linux) under `tag`."""
    entries = []
    for arch, img in images.items():
        digest, size, _m = push_image(base, repo, digest_tag(img), img)
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
                        "platform": {"architecture": arch, "os": "linux"}})
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    return push_manifest(base, repo, tag, body, OCI_INDEX)


def digest_tag(img: oi.OciImage) -> str:
    return img.manifest_digest
