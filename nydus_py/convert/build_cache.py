"""nydusify's `--build-cache`: an image whose manifest maps source layers to converted ones.

The cache image has upstream nydusify's layout (`contrib/nydusify/pkg/cache`): an OCI manifest
whose layers are, per record, a gzip bootstrap layer annotated with the source layer's ChainID
(`containerd.io/snapshot/nydus-source-chainid`), its diff_id (`containerd.io/uncompressed`) and
`nydus-bootstrap: true`, followed by the Nydus blob that layer stored (`nydus-blob: true`, the
same ChainID; absent when the layer stored no new chunk). Blobs a record references from a chunk
dictionary are listed first without a ChainID and named in the bootstrap layer's
`nydus-reference-blob-ids`, as upstream does. The manifest carries the cache version
(`containerd.io/snapshot/nydus-cache`, `--build-cache-version`) and the fs version.

What differs from upstream (so the two must not share a cache tag):
* the cached bootstrap is the layer's own tree (whiteouts as entries), not the bootstrap of
  everything up to that layer, and the manifest says so (`ANNO_FORMAT`); a cache without that
  mark, or of another version, is not used (a warning, then a fresh cache);
* a record is keyed by the ChainID *and* the build parameters (`ANNO_PARAMS`: fs version,
  compressor, digester, chunk size, blob ToC, prefetch list, chunk dictionary), so records of
  other parameters are misses, not reused, and stay in the cache for the builds that use them.

The ChainID of a layer covers every layer under it, so a hit's blob was built against the same
lower layers: the conversion takes the cached layer exactly where it would have built it.
The record list is an LRU bounded by `max_records`: records this conversion used or made go
first, then the older ones.
"""

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..builder.options import BuildOptions
from . import oci

log = logging.getLogger(__name__)

ANNO_CACHE = "containerd.io/snapshot/nydus-cache"
ANNO_SOURCE_CHAINID = "containerd.io/snapshot/nydus-source-chainid"
ANNO_REFERENCE_BLOBS = "containerd.io/snapshot/nydus-reference-blob-ids"
ANNO_FORMAT = "io.nydus-py.build-cache"  # on the manifest: what the cached bootstraps are
ANNO_PARAMS = "io.nydus-py.build-params"  # on each record's layers: the build parameters
FORMAT = "layer-bootstrap/1"
DEFAULT_VERSION = "v1"
MAX_RECORDS = 200  # nydusify's cap on --build-cache-max-records


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class Record:
    chain_id: str
    params: str
    bootstrap: Blob  # the gzip bootstrap layer
    bootstrap_diff_id: str
    blob: Blob | None  # the Nydus blob the layer stored
    reference_blobs: tuple[str, ...] = ()  # hex ids of chunk-dictionary blobs it references

    @property
    def key(self) -> tuple[str, str]:
        return self.chain_id, self.params


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI ChainIDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def build_params(opts: BuildOptions, chunk_dict: str | None = None) -> str:
    """The parameters a converted layer depends on, as one comparable string."""
    prefetch = hashlib.sha256(b"\n".join(opts.prefetch_paths)).hexdigest()[:16] if opts.prefetch_paths else "-"
    return (f"fs={opts.fs_version};compressor={opts.compressor.name.lower()};digester={opts.digester.name.lower()};"
            f"chunk={opts.chunk_size:#x};toc={int(opts.blob_toc)};prefetch={prefetch};dict={chunk_dict or '-'}"
            + (";aligned=1" if opts.aligned_chunk and opts.fs_version == 5 else ""))


@dataclass
class BuildCache:
    version: str = DEFAULT_VERSION
    max_records: int = MAX_RECORDS
    fs_version: int = 6
    records: list[Record] = field(default_factory=list)  # most recently used first
    references: dict[str, Blob] = field(default_factory=dict)  # hex -> chunk-dictionary blob
    skipped: int = 0  # layers of the imported manifest that made no valid record

    def __post_init__(self) -> None:
        if not 1 <= self.max_records <= MAX_RECORDS:
            raise ValueError(f"--build-cache-max-records must be in 1..{MAX_RECORDS}")

    def lookup(self, chain_id: str, params: str) -> Record | None:
        for r in self.records:
            if r.key == (chain_id, params):
                return r
        return None

    def record(self, used: Iterable[Record]) -> None:
        """Put the records of this conversion (hits and new ones, in layer order) in front,
        then the older ones, cut to `max_records`."""
        front: list[Record] = []
        keys: set[tuple[str, str]] = set()
        for r in used:
            if r.key not in keys:
                keys.add(r.key)
                front.append(r)
        rest = [r for r in self.records if r.key not in keys]
        self.records = (front + rest)[:self.max_records]

    def add_reference(self, blob: Blob) -> None:
        self.references[blob.hex] = blob

    # -- the manifest ------------------------------------------------------------------------------

    def load(self, body: bytes) -> str | None:
        """Import the records of cache manifest `body`; a reason when it is not usable (then
        nothing is imported and the conversion starts a fresh cache)."""
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            annotations = doc.get("annotations") or {}
            layers = doc.get("layers") or []
            if not isinstance(annotations, dict) or not isinstance(layers, list):
                raise ValueError("bad annotations or layers")
        except ValueError as e:
            return f"the cache manifest is not valid JSON ({e})"
        version = annotations.get(ANNO_CACHE)
        if version != self.version:
            return f"cache version {version!r}, not {self.version!r}"
        if annotations.get(ANNO_FORMAT) != FORMAT:
            return f"cache format {annotations.get(ANNO_FORMAT)!r} (not written by nydus-py), not {FORMAT!r}"
        pending: dict[tuple[str, str], dict[str, Any]] = {}  # (chain, params) -> the fields seen so far
        order: list[tuple[str, str]] = []
        for layer in layers:
            if not self._take(layer, pending, order):
                self.skipped += 1
        seen: set[tuple[str, str]] = set()
        for key in order:
            if key in seen:
                continue
            seen.add(key)
            f = pending[key]
            if "bootstrap" in f:
                self.records.append(Record(key[0], key[1], f["bootstrap"], f["diff_id"], f.get("blob"),
                                           tuple(f.get("refs", ()))))
            else:
                self.skipped += 1
        if self.skipped:
            log.warning("build cache: %d layer(s) of the cache manifest made no valid record; ignored", self.skipped)
        return None

    def _take(self, layer: Any, pending: dict[tuple[str, str], dict[str, Any]], order: list[tuple[str, str]]) -> bool:
        """Fold one cache manifest layer into `pending`; False when it is not a valid one."""
        if not isinstance(layer, dict):
            return False
        ann = layer.get("annotations") or {}
        digest, size = layer.get("digest"), layer.get("size")
        if not (isinstance(ann, dict) and isinstance(digest, str) and _is_digest(digest)
                and isinstance(size, int) and size >= 0):
            return False
        chain = ann.get(ANNO_SOURCE_CHAINID)
        if chain is None:  # a chunk-dictionary blob the records reference
            if ann.get(oci.ANNO_NYDUS_BLOB) != "true":
                return False
            self.add_reference(Blob(digest, size))
            return True
        params = ann.get(ANNO_PARAMS)
        if not (isinstance(chain, str) and _is_digest(chain) and isinstance(params, str)):
            return False
        key = (chain, params)
        f = pending.setdefault(key, {})
        if ann.get(oci.ANNO_NYDUS_BOOTSTRAP) == "true":
            diff_id = ann.get(oci.ANNO_UNCOMPRESSED)
            if not (isinstance(diff_id, str) and _is_digest(diff_id)):
                return False
            refs: list[str] = []
            if ANNO_REFERENCE_BLOBS in ann:
                try:
                    refs = json.loads(ann[ANNO_REFERENCE_BLOBS])
                except ValueError:
                    return False
                if not isinstance(refs, list) or not all(isinstance(r, str) and _is_hex(r) for r in refs):
                    return False
            f.update(bootstrap=Blob(digest, size), diff_id=diff_id, refs=refs)
        elif ann.get(oci.ANNO_NYDUS_BLOB) == "true":
            f["blob"] = Blob(digest, size)
        else:
            return False
        order.append(key)
        return True

    def export(self, docker: bool = False) -> tuple[bytes, dict[str, Any], bytes, str]:
        """(config bytes, config descriptor, manifest bytes, manifest media type)."""
        layers: list[dict[str, Any]] = []
        refs_done: set[str] = set()
        for r in self.records:
            for h in r.reference_blobs:
                ref = self.references.get(h)
                if ref is not None and h not in refs_done:
                    refs_done.add(h)
                    layers.append({"mediaType": oci.NYDUS_BLOB, "digest": ref.digest, "size": ref.size,
                                   "annotations": {oci.ANNO_NYDUS_BLOB: "true"}})
        for r in self.records:
            ann = {oci.ANNO_NYDUS_BOOTSTRAP: "true", oci.ANNO_FS_VERSION: _fs_version(r.params, self.fs_version),
                   ANNO_SOURCE_CHAINID: r.chain_id, oci.ANNO_UNCOMPRESSED: r.bootstrap_diff_id, ANNO_PARAMS: r.params}
            if r.reference_blobs:
                ann[ANNO_REFERENCE_BLOBS] = json.dumps(list(r.reference_blobs))
            layers.append({"mediaType": oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP,
                           "digest": r.bootstrap.digest, "size": r.bootstrap.size, "annotations": ann})
            if r.blob is not None:
                layers.append({"mediaType": oci.NYDUS_BLOB, "digest": r.blob.digest, "size": r.blob.size,
                               "annotations": {oci.ANNO_NYDUS_BLOB: "true", ANNO_SOURCE_CHAINID: r.chain_id,
                                               ANNO_PARAMS: r.params}})
        diff_ids = [ly["digest"] if ly["mediaType"] == oci.NYDUS_BLOB else ly["annotations"][oci.ANNO_UNCOMPRESSED]
                    for ly in layers]
        config = oci.dumps({"architecture": "", "os": "", "config": {},
                            "rootfs": {"type": "layers", "diff_ids": diff_ids}})
        config_desc = {"mediaType": oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG,
                       "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)}
        mtype = oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST
        manifest = {"schemaVersion": 2, "mediaType": mtype, "config": config_desc, "layers": layers,
                    "annotations": {ANNO_CACHE: self.version, oci.ANNO_FS_VERSION: str(self.fs_version),
                                    ANNO_FORMAT: FORMAT}}
        return config, config_desc, oci.dumps(manifest), mtype


def _fs_version(params: str, default: int) -> str:
    for part in params.split(";"):
        if part.startswith("fs="):
            return part[3:]
    return str(default)


def _is_hex(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _is_digest(s: str) -> bool:
    return s.startswith("sha256:") and _is_hex(s[7:])
