"""OCI/Docker image documents, platforms, and the Nydus image conventions (NYDUSD-CONTRACT.md 7).

Pure functions over bytes and dicts: parsing checks every field conversion relies on (a registry's
answer is untrusted input) and raises FormatError naming it; the builders produce what nydusify
pushes, so nydus-snapshotter takes the result for a Nydus image:

* data blob layers `application/vnd.oci.image.layer.nydus.blob.v1`, annotated
  `containerd.io/snapshot/nydus-blob: "true"`, digest = sha256:<blob id>;
* then, always last, the bootstrap layer: a gzip tar holding `image/image.boot`, annotated
  `nydus-bootstrap: "true"` and `nydus-fs-version`;
* the image config with `rootfs.diff_ids` = the blob digests + the bootstrap tar's digest and a
  "Nydus Bootstrap Layer" history entry;
* with `--merge-platform`, an index holding the original and the Nydus manifest; the Nydus entry
  carries `artifactType` and `platform.os.features: ["nydus.remoteimage.v1"]`, and its config
  media type is the Nydus one so plain containerd never picks it.
"""

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from ..rafs.errors import FormatError
from .errors import ConvertError
from .reference import DIGEST

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
NYDUS_CONFIG = "application/vnd.nydus.image.config.v1+json"
NYDUS_ARTIFACT = "application/vnd.nydus.image.manifest.v1+json"
NYDUS_OS_FEATURE = "nydus.remoteimage.v1"

NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    OCI_LAYER_GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

ANNO_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNO_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNO_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANNO_UNCOMPRESSED = "containerd.io/uncompressed"
ANNO_SOURCE_DIGEST = "containerd.io/snapshot/nydus-source-digest"
BOOTSTRAP_NAME = "image/image.boot"
LEGACY_BOOTSTRAP_NAME = "image.boot"

MAX_DOCUMENT = 4 << 20  # manifests, indexes and configs larger than this are refused
MAX_LAYERS = 1000


# -- descriptors and documents ------------------------------------------------------------------


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    artifact_type: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def short(self) -> str:
        return self.digest[:19]


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_descriptor(value: Any, where: str) -> Descriptor:
    d = _obj(value, where)
    mt, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(mt, str) or not mt:
        raise FormatError(f"{where}: mediaType missing")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise FormatError(f"{where}: digest {digest!r} is not sha256:<64 hex digits> (the only algorithm supported)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size >= 1 << 50:
        raise FormatError(f"{where}: size {size!r} is not a byte count")
    ann = d.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise FormatError(f"{where}: annotations must map strings to strings")
    plat = d.get("platform")
    if plat is not None:
        plat = _obj(plat, f"{where}.platform")
    art = d.get("artifactType") or ""
    if not isinstance(art, str):
        raise FormatError(f"{where}: artifactType must be a string")
    return Descriptor(mt, digest, size, dict(ann), plat, art, dict(d))


@dataclass
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    raw: dict[str, Any]


@dataclass
class Index:
    media_type: str
    manifests: list[Descriptor]
    raw: dict[str, Any]


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_DOCUMENT:
        raise FormatError(f"{what}: {len(body)} bytes, more than the {MAX_DOCUMENT} a document may have")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what}: not JSON ({e})") from None
    return _obj(doc, what)


def parse_document(body: bytes, content_type: str, what: str = "manifest") -> Manifest | Index:
    """A manifest or an index, told apart by `mediaType` (else the Content-Type, else the shape)."""
    doc = parse_json(body, what)
    if doc.get("schemaVersion") == 1 or "signatures" in doc or "fsLayers" in doc:
        raise FormatError(f"{what}: Docker schema 1 manifests are not supported")
    mt = doc.get("mediaType")
    if not isinstance(mt, str) or not mt:
        mt = content_type.split(";", 1)[0].strip()
    if mt not in ACCEPT:
        if "manifests" in doc:
            mt = OCI_INDEX
        elif "layers" in doc:
            mt = OCI_MANIFEST
        else:
            raise FormatError(f"{what}: media type {mt or '(none)'!r} is neither an image manifest nor an index")
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"{what}: schemaVersion {doc.get('schemaVersion')!r}, expected 2")
    if mt in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise FormatError(f"{what}: 'manifests' must be a list")
        if len(entries) > MAX_LAYERS:
            raise FormatError(f"{what}: {len(entries)} manifests is too many")
        return Index(mt, [parse_descriptor(e, f"{what}.manifests[{i}]") for i, e in enumerate(entries)], doc)
    config = parse_descriptor(doc.get("config"), f"{what}.config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{what}: 'layers' must be a list")
    if len(layers) > MAX_LAYERS:
        raise FormatError(f"{what}: {len(layers)} layers is too many")
    return Manifest(mt, config, [parse_descriptor(e, f"{what}.layers[{i}]") for i, e in enumerate(layers)], doc)


# -- platforms --------------------------------------------------------------------------------------

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm",
                 "i386": "386", "i686": "386"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platform(text: str) -> Platform:
    """`os/arch[/variant]`; ConvertError when it is not that."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(p and p.replace("_", "").replace("-", "").isalnum() for p in parts):
        raise ConvertError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    arch = _ARCH_ALIASES.get(parts[1], parts[1])
    return Platform(parts[0], arch, parts[2] if len(parts) == 3 else "")


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    return Platform("linux", _ARCH_ALIASES.get(machine, machine))


def _norm_variant(arch: str, variant: str) -> str:
    if arch == "arm64" and variant in ("", "v8"):
        return "v8"
    return variant


def platform_of(plat: dict[str, Any] | None) -> Platform | None:
    if not plat:
        return None
    os_, arch, var = plat.get("os"), plat.get("architecture"), plat.get("variant") or ""
    if not isinstance(os_, str) or not isinstance(arch, str) or not isinstance(var, str):
        return None
    return Platform(os_.lower(), _ARCH_ALIASES.get(arch.lower(), arch.lower()), var.lower())


def platform_matches(want: Platform, have: Platform | None) -> bool:
    if have is None or have.os != want.os or have.architecture != want.architecture:
        return False
    if not want.variant:
        return True
    return _norm_variant(want.architecture, want.variant) == _norm_variant(have.architecture, have.variant)


def is_nydus_entry(d: Descriptor) -> bool:
    """An index entry pointing at a Nydus manifest (either marker nydus-snapshotter accepts)."""
    feats = (d.platform or {}).get("os.features") or []
    return d.artifact_type == NYDUS_ARTIFACT or (isinstance(feats, list) and NYDUS_OS_FEATURE in feats)


def select_manifest(index: Index, want: Platform, nydus: bool = False) -> Descriptor:
    """The index entry for `want` (a Nydus entry when `nydus`, else an ordinary one);
    ConvertError listing what the index offers when nothing matches."""
    candidates = [d for d in index.manifests if d.media_type in MANIFEST_TYPES and is_nydus_entry(d) == nydus]
    for d in candidates:
        if platform_matches(want, platform_of(d.platform)):
            return d
    offered = sorted({str(p) for d in index.manifests if (p := platform_of(d.platform)) is not None
                      and p.os != "unknown"})
    kind = "Nydus manifest" if nydus else "manifest"
    raise ConvertError(f"no {kind} for platform {want} in the index (it has: {', '.join(offered) or 'none'})")


# -- source checks ------------------------------------------------------------------------------------


def check_source(manifest: Manifest, config: dict[str, Any]) -> list[str]:
    """The diff_ids of an image we can convert; ConvertError/FormatError otherwise."""
    if not manifest.layers:
        raise ConvertError("the source image has no layers")
    for i, layer in enumerate(manifest.layers):
        if layer.media_type == NYDUS_BLOB or ANNO_NYDUS_BOOTSTRAP in layer.annotations:
            raise ConvertError("the source is already a Nydus image")
        if layer.media_type not in LAYER_TYPES:
            raise ConvertError(f"layer {i + 1} ({layer.short}): media type {layer.media_type!r} is not an image layer")
    rootfs = _obj(config.get("rootfs"), "config.rootfs")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and DIGEST.fullmatch(d) for d in diff_ids):
        raise FormatError("config.rootfs.diff_ids must be a list of sha256 digests")
    if len(diff_ids) != len(manifest.layers):
        raise FormatError(f"config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
    return list(diff_ids)


def config_platform(config: dict[str, Any]) -> Platform | None:
    return platform_of({"os": config.get("os"), "architecture": config.get("architecture"),
                        "variant": config.get("variant") or ""})


# -- Nydus documents ----------------------------------------------------------------------------------


def blob_layer(blob_id: str, size: int) -> dict[str, Any]:
    digest = f"sha256:{blob_id}"
    return {"mediaType": NYDUS_BLOB, "digest": digest, "size": size,
            "annotations": {ANNO_NYDUS_BLOB: "true", ANNO_UNCOMPRESSED: digest}}


def bootstrap_layer(digest: str, size: int, diff_id: str, fs_version: int, *, docker: bool = False) -> dict[str, Any]:
    return {"mediaType": DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP, "digest": digest, "size": size,
            "annotations": {ANNO_NYDUS_BOOTSTRAP: "true", ANNO_FS_VERSION: str(fs_version),
                            ANNO_UNCOMPRESSED: diff_id}}


def nydus_config(source: dict[str, Any], blob_digests: list[str], bootstrap_diff_id: str) -> dict[str, Any]:
    """The source config with Nydus's diff_ids and one more history entry."""
    out = dict(source)
    out["rootfs"] = {"type": "layers", "diff_ids": [*blob_digests, bootstrap_diff_id]}
    history = source.get("history")
    history = list(history) if isinstance(history, list) else []
    history.append({"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"})
    out["history"] = history
    return out


def nydus_manifest(config: dict[str, Any], layers: list[dict[str, Any]], *, merged: bool = False,
                   annotations: dict[str, str] | None = None, docker: bool = False,
                   subject: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Nydus manifest; `docker` keeps a Docker source's media types (nydusify without --oci).
    `subject` (--with-referrer) is the source manifest's descriptor, without `platform` as
    nydus-snapshotter's converter leaves it (some registries refuse it there)."""
    cfg = dict(config)
    cfg["mediaType"] = NYDUS_CONFIG if merged else DOCKER_CONFIG if docker else OCI_CONFIG
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
                           "config": cfg, "layers": layers}
    if merged:
        doc["artifactType"] = NYDUS_ARTIFACT
    if subject is not None:
        doc["subject"] = {k: v for k, v in subject.items() if k != "platform"}
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def platform_dict(platform: Platform) -> dict[str, Any]:
    """An index entry's `platform`."""
    plat: dict[str, Any] = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        plat["variant"] = platform.variant
    return plat


def merged_index(original: dict[str, Any], nydus: dict[str, Any], platform: Platform) -> dict[str, Any]:
    """An index with the original manifest and the Nydus one for the same platform."""
    plat = platform_dict(platform)
    orig = {**original, "platform": dict(plat)}
    orig.pop("annotations", None)
    ny = {**nydus, "platform": {**plat, "os.features": [NYDUS_OS_FEATURE]}, "artifactType": NYDUS_ARTIFACT}
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [orig, ny]}


def dumps(doc: dict[str, Any]) -> bytes:
    """Canonical-enough JSON bytes (stable key order, no spaces): what gets hashed and pushed."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()


# -- reading a Nydus manifest ------------------------------------------------------------------------


def nydus_bootstrap(manifest: Manifest) -> Descriptor:
    """The bootstrap layer of a Nydus manifest (the last layer, annotated); ConvertError when the
    manifest is not a Nydus image."""
    if not manifest.layers:
        raise ConvertError("the image has no layers, so it is not a Nydus image")
    last = manifest.layers[-1]
    if last.annotations.get(ANNO_NYDUS_BOOTSTRAP) != "true":
        raise ConvertError("the image is not a Nydus image (its last layer has no "
                           f"{ANNO_NYDUS_BOOTSTRAP} annotation); convert it with `nydusify-py convert`")
    return last


def nydus_blob_ids(manifest: Manifest) -> list[str]:
    return [d.hex for d in manifest.layers if d.media_type == NYDUS_BLOB or d.annotations.get(ANNO_NYDUS_BLOB) == "true"]
