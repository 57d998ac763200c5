"""`nydusify-py copy`: an image (a Nydus one: manifest or index, bootstrap layer, blobs, config)
from one registry repository to another, byte for byte, so every digest stays the same.

Like nydusify's copier: from an index the entries for the platform (default this machine's;
`--platform a,b`; `--all-platforms` takes all) are copied. Entries of the same platform all come
along, so a merged index (original + Nydus manifest) stays one. One entry is pushed as a plain
manifest under the target tag; several as an index (the source index itself when nothing was
left out, so its digest is kept too).

Each blob is looked up (HEAD) in the target first and skipped when there; the others stream
through a temp file, checked against their digest and size before the upload. Manifests go
last, the tag last of all, so a failed copy never leaves a tag naming missing blobs.
"""

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from ..storage.registry import RegistryClient
from . import oci
from .converter import parse_platforms
from .errors import ConvertError
from .push_retry import chunked_pushes
from .reference import parse_reference
from .remote import Endpoint, RegistryFlags, endpoint_config, transport_error
from .tasks import gather_or_cancel


@dataclass
class CopyOptions(RegistryFlags):
    source: str
    target: str
    platform: str | None = None  # "os/arch[,os/arch]"; default this machine's
    all_platforms: bool = False
    jobs: int = 3
    piece_size: int = 8 << 20
    push_chunk_size: int = 0  # nydusify's --push-chunk-size: uploads as PATCH pieces of this size


@dataclass
class CopyResult:
    source: str
    target: str
    digest: str  # what the target tag names now
    manifests: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class _Doc:
    body: bytes
    media_type: str
    manifest: oci.Manifest


class Copier:
    def __init__(self, opts: CopyOptions) -> None:
        if opts.all_platforms and opts.platform:
            raise ConvertError("--all-platforms conflicts with --platform")
        self.opts = opts
        self.src_ref = parse_reference(opts.source)
        self.dst_ref = parse_reference(opts.target)
        if self.dst_ref.digest:
            raise ConvertError(f"target {opts.target} must name a tag, not a digest")
        self.platforms = parse_platforms(opts.platform) or [oci.host_platform()]
        self.src_ep = Endpoint("source", self.src_ref, opts.source_insecure, opts.plain_http, opts.source_auth)
        self.dst_ep = Endpoint("target", self.dst_ref, opts.target_insecure, opts.plain_http, opts.target_auth)

    async def run(self) -> CopyResult:
        t0 = time.monotonic()
        if self.opts.work_dir:
            os.makedirs(self.opts.work_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="nydusify-copy-", dir=self.opts.work_dir)
        src = RegistryClient(endpoint_config(self.src_ep, self.opts.docker_config_paths))
        dst = RegistryClient(endpoint_config(self.dst_ep, self.opts.docker_config_paths))
        chunked_pushes(dst, self.opts.push_chunk_size)
        try:
            await src.start()
            await dst.start()
            result = await self._copy(src, dst, work)
            result.seconds = time.monotonic() - t0
            return result
        finally:
            await src.close()
            await dst.close()
            shutil.rmtree(work, ignore_errors=True)

    def _wanted(self, index: oci.Index) -> list[oci.Descriptor]:
        out = []
        for d in index.manifests:
            if d.media_type not in oci.MANIFEST_TYPES:
                continue
            plat = oci.platform_of(d.platform)
            if self.opts.all_platforms or any(oci.platform_matches(w, plat) for w in self.platforms):
                out.append(d)
        if not out:
            offered = sorted({str(p) for d in index.manifests if (p := oci.platform_of(d.platform)) is not None})
            raise ConvertError(f"source image {self.src_ref}: no manifest for "
                               f"{', '.join(str(p) for p in self.platforms)} (it has: {', '.join(offered) or 'none'})")
        return out

    async def _copy(self, src: RegistryClient, dst: RegistryClient, work: str) -> CopyResult:
        try:
            got = await src.fetch_manifest(self.src_ref.reference, oci.ACCEPT)
        except OSError as e:
            raise transport_error(self.src_ep, e) from None
        if got is None:
            raise ConvertError(f"source image {self.src_ref} not found")
        body, ctype, _ = got
        if self.src_ref.digest and _sha(body) != self.src_ref.digest:
            raise ConvertError(f"source image {self.src_ref}: the manifest the registry sent hashes to {_sha(body)}")
        top = oci.parse_document(body, ctype, "source manifest")
        try:
            await dst.fetch_manifest(self.dst_ref.reference)  # reachable? settles scheme and auth first
        except OSError as e:
            raise transport_error(self.dst_ep, e) from None
        result = CopyResult(str(self.src_ref), str(self.dst_ref), "")
        if isinstance(top, oci.Manifest):
            docs = [_Doc(body, top.media_type, top)]
        else:
            docs = [await self._fetch_entry(src, d) for d in self._wanted(top)]
        for doc in docs:
            await self._copy_blobs(src, dst, doc.manifest, work, result)
        try:
            if isinstance(top, oci.Index) and len(docs) > 1:
                for doc in docs:
                    await dst.push_manifest(_sha(doc.body), doc.body, doc.media_type)
                    result.manifests.append(_sha(doc.body))
                if len(docs) == len(top.manifests):
                    index_body = body  # nothing left out: the same index, the same digest
                else:
                    keep = {_sha(d.body) for d in docs}
                    raw = dict(top.raw)
                    raw["manifests"] = [m for m in top.raw["manifests"] if m.get("digest") in keep]
                    index_body = oci.dumps(raw)
                result.digest = await dst.push_manifest(self.dst_ref.reference, index_body, top.media_type)
            else:
                doc = docs[0]
                result.manifests.append(_sha(doc.body))
                result.digest = await dst.push_manifest(self.dst_ref.reference, doc.body, doc.media_type)
        except OSError as e:
            raise transport_error(self.dst_ep, e, "pushing manifests") from None
        return result

    async def _fetch_entry(self, src: RegistryClient, d: oci.Descriptor) -> _Doc:
        try:
            got = await src.fetch_manifest(d.digest, oci.MANIFEST_TYPES)
        except OSError as e:
            raise transport_error(self.src_ep, e) from None
        if got is None:
            raise ConvertError(f"source image {self.src_ref}: the index names manifest {d.digest}, which is missing")
        if _sha(got[0]) != d.digest or len(got[0]) != d.size:
            raise ConvertError(f"source image {self.src_ref}: manifest {d.short} does not match its index entry")
        doc = oci.parse_document(got[0], got[1], f"manifest {d.short}")
        if not isinstance(doc, oci.Manifest):
            raise ConvertError(f"source image {self.src_ref}: manifest {d.short} is an index inside an index")
        return _Doc(got[0], d.media_type, doc)

    async def _copy_blobs(self, src: RegistryClient, dst: RegistryClient, m: oci.Manifest, work: str,
                          result: CopyResult) -> None:
        sem = asyncio.Semaphore(max(1, self.opts.jobs))
        todo: dict[str, oci.Descriptor] = {}
        for d in (m.config, *m.layers):
            if d.digest not in result.uploaded and d.digest not in result.reused:
                todo.setdefault(d.digest, d)

        async def one(d: oci.Descriptor) -> None:
            async with sem:
                try:
                    if await dst.blob_exists(d.digest):
                        result.reused.append(d.digest)
                        result.reused_bytes += d.size
                        return
                except OSError as e:
                    raise transport_error(self.dst_ep, e) from None
                path = os.path.join(work, d.hex)
                with open(path, "wb") as f:
                    try:
                        got_hex, n = await src.download_blob(d.digest, f, limit=d.size)
                    except OSError as e:
                        raise transport_error(self.src_ep, e, f"blob {d.short}") from None
                if n != d.size or got_hex != d.hex:
                    raise ConvertError(f"source blob {d.short}: the registry sent {n} bytes hashing to "
                                       f"sha256:{got_hex[:12]}, the descriptor says {d.size} bytes")
                try:
                    await dst.push_blob_file(path, d.digest, piece=self.opts.piece_size)
                except OSError as e:
                    raise transport_error(self.dst_ep, e, f"blob {d.short}") from None
                finally:
                    os.unlink(path)
                result.uploaded.append(d.digest)
                result.uploaded_bytes += d.size

        await gather_or_cancel(one(d) for d in todo.values())


def copy(opts: CopyOptions) -> CopyResult:
    """Run one copy to the end (its own event loop)."""
    return asyncio.run(Copier(opts).run())
