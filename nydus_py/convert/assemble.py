"""Push a Nydus image made from another one (`optimize`, `commit`): a new bootstrap and some new
blobs on top of the source manifest's blobs.

The manifest keeps the source's media type and fields; its layers are the blobs the new
bootstrap references (sizes from the source manifest, or the new files), then the bootstrap
layer (the source's annotations plus `annotations`); the config's diff_ids follow the layers.
Source blobs the target repository lacks are mounted (same registry) or copied, so the target
is complete in any repository; the manifest goes last, so a failed push never leaves a tag
naming a missing blob.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from ..storage.registry import RegistryClient
from . import oci
from .errors import ConvertError
from .layer import write_bootstrap_layer
from .remote import Endpoint, transport_error
from .reuse import RemoteBlob, place_blob
from .tasks import gather_or_cancel


@dataclass
class Assembly:
    manifest: oci.Manifest  # the source's
    config: dict[str, Any]  # the source's config
    blob_ids: list[str]  # the new bootstrap's blob table
    new_blobs: dict[str, str]  # blob id -> local file, for blobs made here
    bootstrap_path: str
    annotations: dict[str, str] = field(default_factory=dict)  # added to the bootstrap layer's
    history: dict[str, Any] | None = None  # appended to the config's history
    # where a source blob comes from when not from the one source (several source images)
    blob_sources: dict[str, tuple[RegistryClient, Endpoint]] = field(default_factory=dict)


@dataclass
class Pushed:
    manifest_digest: str
    blobs: dict[str, str]  # digest -> present / mounted / copied / uploaded


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_assembly(a: Assembly, src: RegistryClient, src_ep: Endpoint, dst: RegistryClient, dst_ep: Endpoint,
                        tag: str, work: str, piece_size: int) -> Pushed:
    sizes = {d.hex: d.size for d in a.manifest.layers}
    sizes.update({b: os.path.getsize(p) for b, p in a.new_blobs.items()})
    missing = [b for b in a.blob_ids if b not in sizes]
    if missing:
        raise ConvertError(f"the bootstrap references blob {missing[0][:12]}, which the source manifest does not list")
    bl_path = os.path.join(work, "bootstrap-layer.tar.gz")
    with open(a.bootstrap_path, "rb") as bf, open(bl_path, "wb") as out:
        bl_hex, bl_size, bl_diff = write_bootstrap_layer(bf, os.fstat(bf.fileno()).st_size, out)
    old_boot = oci.nydus_bootstrap(a.manifest)
    boot_desc = {"mediaType": old_boot.media_type, "digest": f"sha256:{bl_hex}", "size": bl_size,
                 "annotations": {**old_boot.annotations, oci.ANNO_UNCOMPRESSED: f"sha256:{bl_diff}", **a.annotations}}
    layers = [oci.blob_layer(b, sizes[b]) for b in a.blob_ids] + [boot_desc]
    config = dict(a.config)
    rootfs = dict(config.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = [f"sha256:{b}" for b in a.blob_ids] + [f"sha256:{bl_diff}"]
    config["rootfs"] = rootfs
    if a.history is not None:
        history = config.get("history")
        config["history"] = [*(history if isinstance(history, list) else []), a.history]
    config_bytes = oci.dumps(config)
    doc: dict[str, Any] = dict(a.manifest.raw)
    doc["config"] = {**a.manifest.config.raw, "digest": _sha(config_bytes), "size": len(config_bytes)}
    doc["layers"] = layers
    doc.pop("subject", None)
    manifest_bytes = oci.dumps(doc)
    status: dict[str, str] = {}

    async def one(b: str) -> None:
        digest = f"sha256:{b}"
        path = a.new_blobs.get(b)
        if path is not None:
            sent = await dst.push_blob_file(path, digest, piece=piece_size)
            status[digest] = "uploaded" if sent else "present"
        else:
            client, ep = a.blob_sources.get(b, (src, src_ep))
            status[digest] = await place_blob(dst, dst_ep, RemoteBlob(digest, sizes[b], client, ep), work, piece_size)

    try:
        await gather_or_cancel(one(b) for b in a.blob_ids)
        await dst.push_blob_file(bl_path, f"sha256:{bl_hex}", piece=piece_size)
        await dst.push_blob(config_bytes, _sha(config_bytes))
        await dst.push_manifest(tag, manifest_bytes, a.manifest.media_type)
    except OSError as e:
        raise transport_error(dst_ep, e, "pushing") from None
    return Pushed(_sha(manifest_bytes), status)
