"""`nydusify-py convert --reverse`: a Nydus image in a registry back to an OCI image.

The image's merged bootstrap and blobs are pulled, its tree is written as one gzip tar layer
(`builder.export.write_tar`: hard links, xattrs, exact times, devices), and an OCI manifest is
pushed with the Nydus image's config (its `rootfs.diff_ids` now that one layer, one history entry
added). Decision: upstream (experimental) unpacks each Nydus layer separately from the layer
bootstrap packed inside each blob; the blobs made here do not carry one, and a merged bootstrap
no longer knows which layer deleted what, so the result is the flattened root filesystem.
Sockets cannot be put in a tar and are skipped with a warning, as `nydus-image unpack` does.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..builder.export import write_tar
from ..builder.merge import tree_from_image
from ..rafs.loader import open_bootstrap
from ..storage.registry import RegistryClient
from . import oci
from .errors import ConvertError
from .pull import fetch_bootstrap
from .push_retry import PushRetry
from .remote import RegistryFlags, transport_error
from .session import one_image, tool_session
from .tasks import gather_or_cancel

log = logging.getLogger(__name__)

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_PIECE = 8 << 20


@dataclass
class ReverseOptions(RegistryFlags):
    source: str
    target: str
    platform: str | None = None
    compress_level: int = 6
    push_retry: PushRetry = field(default_factory=PushRetry)


@dataclass
class ReverseResult:
    source: str
    target: str
    manifest_digest: str
    layer_digest: str
    layer_bytes: int
    tar_bytes: int
    entries: int
    skipped: list[str] = field(default_factory=list)
    fetched_bytes: int = 0
    push_retries: int = 0
    seconds: float = 0.0


class _Hashing:
    """A file being written, hashed and counted on the way (the compressed or the tar stream)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return int(self.out.write(data) or len(data))

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.out.flush()


def write_layer(bootstrap: str, blob_dir: str, path: str, level: int) -> tuple[_Hashing, _Hashing, int, list[str]]:
    """The image's tree as a gzip tar at `path`: (compressed stream, tar stream, entries, skipped)."""
    with open_bootstrap(bootstrap) as img, open(path, "wb") as f:
        root = tree_from_image(img, blob_dir, rewrite=True)
        packed = _Hashing(f)
        with gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=level, mtime=0) as gz:
            tar = _Hashing(gz)
            stats = write_tar(root, tar)  # type: ignore[arg-type]
    return packed, tar, stats.entries, [p.decode("utf-8", "replace") for p in stats.skipped]


class Reverser:
    def __init__(self, opts: ReverseOptions) -> None:
        self.opts = opts
        one = one_image(opts, "--reverse")
        self.src_ref, self.dst_ref, self.platform = one.src_ref, one.dst_ref, one.platform
        self.src_ep, self.dst_ep = one.src_ep, one.dst_ep

    async def run(self) -> ReverseResult:
        t0 = time.monotonic()
        log.warning("conversion from Nydus to OCI is experimental (as in nydusify); the layers are flattened")
        async with tool_session("nydusify-reverse-", self.opts.work_dir, [self.src_ep], self.dst_ep,
                                self.opts.push_retry, self.opts.docker_config_paths) as ts:
            result = await self._reverse(ts.sources[0], ts.target, ts.work)
            result.push_retries = ts.retries.retried
        result.seconds = time.monotonic() - t0
        return result

    async def _reverse(self, src: RegistryClient, dst: RegistryClient, work: str) -> ReverseResult:
        blob_dir = os.path.join(work, "blobs")
        os.makedirs(blob_dir)
        try:
            image = await fetch_bootstrap(src, self.src_ref, os.path.join(work, "boot"), self.platform)
            assert image.manifest is not None
            config = oci.parse_json(await src.get_blob(image.manifest.config.digest), "image config")
            sizes = {d.hex: d.size for d in image.manifest.layers}
            fetched: list[int] = []
            await gather_or_cancel(self._fetch(src, bid, sizes.get(bid), blob_dir, fetched) for bid in image.blob_ids)
        except OSError as e:
            raise transport_error(self.src_ep, e) from None
        layer_path = os.path.join(work, "layer.tar.gz")
        packed, tar, entries, skipped = await asyncio.to_thread(
            write_layer, image.bootstrap_path, blob_dir, layer_path, self.opts.compress_level)
        for p in skipped:
            log.warning("%s: socket not representable in tar, skipped", p)
        layer_digest, diff_id = f"sha256:{packed.hash.hexdigest()}", f"sha256:{tar.hash.hexdigest()}"
        config = dict(config)
        config["rootfs"] = {"type": "layers", "diff_ids": [diff_id]}
        history = config.get("history")
        config["history"] = [*(history if isinstance(history, list) else []),
                             {"created_by": f"nydusify-py convert --reverse {self.src_ref}", "comment": "flattened"}]
        config_bytes = oci.dumps(config)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                               "size": len(config_bytes)},
                    "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": packed.size}]}
        manifest_bytes = oci.dumps(manifest)
        try:
            await dst.push_blob_file(layer_path, layer_digest, piece=_PIECE)
            await dst.push_blob(config_bytes, config_digest)
            await dst.push_manifest(self.dst_ref.reference, manifest_bytes, oci.OCI_MANIFEST)
        except OSError as e:
            raise transport_error(self.dst_ep, e, "pushing") from None
        return ReverseResult(str(self.src_ref), str(self.dst_ref), "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
                             layer_digest, packed.size, tar.size, entries, skipped, sum(fetched))

    async def _fetch(self, src: RegistryClient, bid: str, size: int | None, blob_dir: str, done: list[int]) -> None:
        if size is None:
            raise ConvertError(f"the bootstrap references blob {bid[:12]}, which the manifest does not list")
        path = os.path.join(blob_dir, bid)
        with open(path, "wb") as out:
            got_hex, n = await src.download_blob(f"sha256:{bid}", out, limit=size, piece=_PIECE)
        if got_hex != bid or n != size:
            raise ConvertError(f"blob {bid[:12]}: the registry sent {n} bytes hashing to sha256:{got_hex[:12]}")
        done.append(n)


def reverse_convert(opts: ReverseOptions) -> ReverseResult:
    return asyncio.run(Reverser(opts).run())
