"""`nydusify-py chunkdict generate`: a chunk dictionary image from several Nydus images in
registries (`builder/chunkdict.py` picks the chunks), pushed as a Nydus image that
`nydusify-py convert --chunk-dict REF` and `nydus-image-py create --chunk-dict` take.

Its manifest lists the source blobs the dictionary references (mounted or copied into the target
repository, so builds there can reference them) and its bootstrap layer; its config is a minimal
one for this machine's platform. Upstream's command is experimental and keeps its chunk records in
SQLite; the image it pushes plays the same role.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field

from ..builder.chunkdict import generate_chunkdict
from ..rafs.loader import open_bootstrap
from ..rafs.model import RafsImage
from ..storage.registry import RegistryClient
from . import oci
from .assemble import Assembly, push_assembly
from .converter import parse_platforms
from .errors import ConvertError
from .pull import NydusImage, fetch_bootstrap
from .push_retry import PushRetry
from .reference import parse_reference
from .remote import Endpoint, RegistryFlags, transport_error
from .session import tool_session


@dataclass
class ChunkdictOptions(RegistryFlags):
    sources: list[str]
    target: str
    platform: str | None = None
    min_images: int = 2
    piece_size: int = 8 << 20
    push_retry: PushRetry = field(default_factory=PushRetry)


@dataclass
class ChunkdictImageResult:
    sources: list[str]
    target: str
    manifest_digest: str
    chunks: int
    distinct_chunks: int
    uncompressed_bytes: int
    per_image_kept: list[int]
    blobs: dict[str, str] = field(default_factory=dict)
    push_retries: int = 0
    seconds: float = 0.0


class ChunkdictGenerator:
    def __init__(self, opts: ChunkdictOptions) -> None:
        if len(opts.sources) < max(1, opts.min_images):
            raise ConvertError(f"--sources names {len(opts.sources)} images; a chunk shared by {opts.min_images} "
                               "needs at least that many")
        self.opts = opts
        self.src_refs = [parse_reference(s) for s in opts.sources]
        self.dst_ref = parse_reference(opts.target)
        if self.dst_ref.digest:
            raise ConvertError(f"target {opts.target} must name a tag, not a digest")
        plats = parse_platforms(opts.platform)
        if plats and len(plats) > 1:
            raise ConvertError("chunkdict generate takes one --platform")
        self.platform = plats[0] if plats else oci.host_platform()
        self.src_eps = [Endpoint(f"source {i + 1}", r, opts.source_insecure, opts.plain_http, opts.source_auth)
                        for i, r in enumerate(self.src_refs)]
        self.dst_ep = Endpoint("target", self.dst_ref, opts.target_insecure, opts.plain_http, opts.target_auth)

    async def run(self) -> ChunkdictImageResult:
        t0 = time.monotonic()
        async with tool_session("nydusify-chunkdict-", self.opts.work_dir, self.src_eps, self.dst_ep,
                                self.opts.push_retry, self.opts.docker_config_paths) as ts:
            result = await self._generate(ts.sources, ts.target, ts.work)
            result.push_retries = ts.retries.retried
        result.seconds = time.monotonic() - t0
        return result

    async def _generate(self, srcs: list[RegistryClient], dst: RegistryClient, work: str) -> ChunkdictImageResult:
        pulled: list[NydusImage] = []
        for i, (client, ep) in enumerate(zip(srcs, self.src_eps, strict=True)):
            try:
                pulled.append(await fetch_bootstrap(client, ep.ref, os.path.join(work, f"boot{i}"), self.platform))
            except OSError as e:
                raise transport_error(ep, e) from None
        boot_out = os.path.join(work, "chunkdict.boot")
        with contextlib.ExitStack() as stack:
            images: list[RafsImage] = [stack.enter_context(open_bootstrap(p.bootstrap_path)) for p in pulled]
            try:
                built = await asyncio.to_thread(generate_chunkdict, images, boot_out, os.path.join(work, "blobs"),
                                                self.opts.min_images)
            except ValueError as e:
                raise ConvertError(str(e)) from None
            fs_version = images[0].version
        where: dict[str, tuple[RegistryClient, Endpoint]] = {}
        layers: list[oci.Descriptor] = []
        for client, ep, p in zip(srcs, self.src_eps, pulled, strict=True):
            assert p.manifest is not None
            for d in p.manifest.layers[:-1]:
                if d.hex not in where:
                    where[d.hex] = (client, ep)
                    layers.append(d)
        boot_anno = {oci.ANNO_NYDUS_BOOTSTRAP: "true", oci.ANNO_FS_VERSION: str(fs_version)}
        layers.append(oci.Descriptor(oci.OCI_LAYER_GZIP, "sha256:" + "0" * 64, 0, boot_anno))
        base = oci.Manifest(oci.OCI_MANIFEST, oci.Descriptor(oci.OCI_CONFIG, "sha256:" + "0" * 64, 0,
                                                             raw={"mediaType": oci.OCI_CONFIG}),
                            layers, {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST})
        config = {"architecture": self.platform.architecture, "os": self.platform.os,
                  "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}
        pushed = await push_assembly(
            Assembly(base, config, built.blob_ids, {}, boot_out,
                     history={"created_by": "nydusify-py chunkdict generate",
                              "comment": f"chunk dictionary of {len(pulled)} images"},
                     blob_sources=where),
            srcs[0], self.src_eps[0], dst, self.dst_ep, self.dst_ref.reference, work, self.opts.piece_size)
        return ChunkdictImageResult(sources=[str(r) for r in self.src_refs], target=str(self.dst_ref),
                                    manifest_digest=pushed.manifest_digest, chunks=built.chunks,
                                    distinct_chunks=built.distinct_chunks,
                                    uncompressed_bytes=built.uncompressed_bytes,
                                    per_image_kept=built.per_image_kept, blobs=pushed.blobs)


def generate(opts: ChunkdictOptions) -> ChunkdictImageResult:
    return asyncio.run(ChunkdictGenerator(opts).run())
