"""Registry side of reusing earlier work in a conversion: the build cache image
(`build_cache`), the chunk dictionary image, and getting a blob another repository holds into
the target (HEAD, cross-repository mount, else a copy through a temp file).

Nothing here fails a conversion for a cache problem: an unreadable cache, a record whose
bootstrap or blob is gone, is a miss (logged and counted in `CacheStats`). A chunk dictionary
that cannot be had is an error: the user asked for it.
"""

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field

from ..rafs.errors import FormatError
from ..storage.registry import RegistryClient
from . import oci
from .build_cache import BuildCache, Record
from .errors import ConvertError
from .layer import extract_bootstrap
from .pull import fetch_bootstrap
from .reference import ImageRef, parse_reference
from .remote import Endpoint, transport_error

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0  # layers taken from the cache
    misses: int = 0  # layers built (with a cache given)
    unusable: int = 0  # records found but not usable (bootstrap/blob gone, or not fitting the stack)
    records: int = 0  # records in the pushed cache
    discarded: str = ""  # why an existing cache image was not used


@dataclass
class RemoteBlob:
    """A blob in another repository (the cache's, the chunk dictionary's), or, with no client,
    one that must already be in the target (a local chunk dictionary's)."""

    digest: str
    size: int
    client: RegistryClient | None
    ep: Endpoint | None

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass
class Hit:
    record: Record
    bootstrap_path: str
    blob: RemoteBlob | None


@dataclass
class ChunkDict:
    bootstrap_path: str
    digest: str  # sha256 of the bootstrap file: identifies the dictionary in cache parameters
    blobs: dict[str, RemoteBlob] = field(default_factory=dict)  # hex -> where it is


def parse_chunk_dict(spec: str) -> tuple[str, str]:
    """nydusify's `bootstrap:registry:REF` / `bootstrap:local:PATH`, nydus-image's
    `bootstrap=PATH`, or a plain image reference: ("registry" | "local", REF or PATH)."""
    if spec.startswith("bootstrap="):
        return "local", spec[len("bootstrap="):]
    parts = spec.split(":", 2)
    if parts[0] == "bootstrap":
        if len(parts) == 3 and parts[1] in ("registry", "local"):
            return parts[1], parts[2]
        raise ConvertError(f"invalid --chunk-dict {spec!r}: expected bootstrap:registry:REF, bootstrap:local:PATH, "
                           "bootstrap=PATH or an image reference")
    return "registry", spec


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


async def load_chunk_dict(spec: str, client: RegistryClient | None, ep: Endpoint | None, work: str) -> ChunkDict:
    """The dictionary's bootstrap in `work` and where its blobs are."""
    kind, where = parse_chunk_dict(spec)
    if kind == "local":
        if not os.path.isfile(where):
            raise ConvertError(f"chunk dict {where}: no such file")
        return ChunkDict(where, file_digest(where))
    assert client is not None and ep is not None
    ref = ep.ref
    try:
        image = await fetch_bootstrap(client, ref, os.path.join(work, "chunk-dict"))
        got = await client.fetch_manifest(image.manifest_digest, oci.MANIFEST_TYPES)
    except OSError as e:
        raise transport_error(ep, e) from None
    if got is None:
        raise ConvertError(f"chunk dict {ref}: manifest {image.manifest_digest} vanished")
    doc = oci.parse_document(got[0], got[1], "chunk dict manifest")
    assert isinstance(doc, oci.Manifest)
    blobs = {d.hex: RemoteBlob(d.digest, d.size, client, ep) for d in doc.layers
             if d.media_type == oci.NYDUS_BLOB or d.annotations.get(oci.ANNO_NYDUS_BLOB) == "true"}
    return ChunkDict(image.bootstrap_path, file_digest(image.bootstrap_path), blobs)


async def load_cache(client: RegistryClient, ep: Endpoint, cache: BuildCache, stats: CacheStats) -> None:
    """Import the cache image's records into `cache` (none when it is missing or unusable)."""
    try:
        got = await client.fetch_manifest(ep.ref.reference, oci.MANIFEST_TYPES)
    except OSError as e:
        raise transport_error(ep, e, "reading the build cache") from None
    if got is None:
        log.info("build cache %s does not exist yet; it will be created", ep.ref)
        return
    why = cache.load(got[0])
    if why is not None:
        stats.discarded = why
        log.warning("build cache %s is not used: %s; a new one replaces it", ep.ref, why)


async def fetch_hit(client: RegistryClient, ep: Endpoint, record: Record, work: str, n: int) -> Hit | None:
    """The record's bootstrap extracted into `work`, and its blob checked present in the cache
    repository; None (logged) when either is not there or not right."""
    layer_path = os.path.join(work, f"cache-{n}.tar.gz")
    boot_path = os.path.join(work, f"cache-{n}.boot")
    try:
        with open(layer_path, "w+b") as f:
            got_hex, size = await client.download_blob(record.bootstrap.digest, f, limit=record.bootstrap.size)
            if (got_hex, size) != (record.bootstrap.hex, record.bootstrap.size):
                raise FormatError(f"bootstrap layer {record.bootstrap.digest[:19]} does not match its descriptor")
            f.seek(0)
            with open(boot_path, "wb") as out:
                extract_bootstrap(f, out)
        blob = None
        if record.blob is not None:
            if not await client.blob_exists(record.blob.digest):
                raise FormatError(f"blob {record.blob.digest[:19]} is gone from the cache repository")
            blob = RemoteBlob(record.blob.digest, record.blob.size, client, ep)
    except (OSError, FormatError) as e:
        log.warning("build cache: record for layer %d (%s) is not usable: %s", n + 1, record.chain_id[:19],
                    getattr(e, "strerror", None) or e)
        return None
    finally:
        if os.path.exists(layer_path):
            os.unlink(layer_path)
    return Hit(record, boot_path, blob)


async def place_blob(dst: RegistryClient, dst_ep: Endpoint, blob: RemoteBlob, work: str,
                     piece: int) -> str:
    """Get `blob` into the target repository: "present" (it was there), "mounted" (cross-repo
    mount, same registry) or "copied" (downloaded to a temp file, checked, uploaded)."""
    if await dst.blob_exists(blob.digest):
        return "present"
    if blob.client is None or blob.ep is None:
        raise ConvertError(f"blob {blob.digest[:19]} (of the chunk dictionary) is not in the target repository "
                           f"{dst_ep.ref.registry}/{dst_ep.ref.repository}; push the dictionary image there or use "
                           "--chunk-dict bootstrap:registry:REF")
    src_ref = blob.ep.ref
    if src_ref.host == dst_ep.ref.host and src_ref.repository != dst_ep.ref.repository:
        if await dst.mount_blob(blob.digest, src_ref.repository):
            return "mounted"
        log.warning("blob %s: %s did not mount it from %s; copying it", blob.digest[:19], dst_ep.ref.registry,
                    src_ref.repository)
    fd, tmp = tempfile.mkstemp(dir=work, prefix="blob-")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                got_hex, n = await blob.client.download_blob(blob.digest, f, limit=blob.size)
            except OSError as e:
                raise transport_error(blob.ep, e, f"blob {blob.digest[:19]}") from None
        if (got_hex, n) != (blob.hex, blob.size):
            raise ConvertError(f"{blob.ep.side} {src_ref}: blob {blob.digest[:19]} does not match its descriptor")
        await dst.push_blob_file(tmp, blob.digest, piece=piece)
    finally:
        os.unlink(tmp)
    return "copied"


def cache_ref_for(target: str, tag: str) -> str:
    """nydusify's --build-cache-tag: the target's repository with that tag."""
    ref = parse_reference(target)
    return f"{ref.registry}/{ref.repository}:{tag}"


def same_repo(a: ImageRef, b: ImageRef) -> bool:
    return (a.host, a.repository) == (b.host, b.repository)
