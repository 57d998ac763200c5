"""`nydusify-py optimize`: a Nydus image in a registry, with the data of the files a workload
reads at start moved into one new blob (`builder/optimize.py`), pushed as a new image.

As nydusify's optimizer (policy "separated-blob-with-prefetch-files"): the source's bootstrap is
pulled and rebuilt; the new blob and bootstrap layer are pushed; the manifest lists the blobs the
new bootstrap references, then the bootstrap layer, annotated
`containerd.io/snapshot/nydus-separated-blob-with-prefetch-files: <new blob id>`; the config's
diff_ids follow the layers. Differences, by decision:

- only the stored ranges of the listed files' chunks are fetched from the source (ranged GETs,
  adjacent ones merged), not whole blobs;
- blobs the target repository lacks are mounted from the source repository (same registry) or
  copied, so the target is complete even in another repository (nydusify assumes they are there);
- the hint file is not packed into the bootstrap layer (the prefetch table carries the list).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from ..builder.optimize import PrefetchFile, optimize_image, parse_prefetch_files, planned_ranges
from ..rafs.loader import open_bootstrap
from ..storage.localfs import LocalBlobDir
from ..storage.registry import RegistryClient
from . import oci
from .assemble import Assembly, push_assembly
from .errors import ConvertError
from .pull import fetch_bootstrap
from .push_retry import PushRetry
from .remote import RegistryFlags, transport_error
from .session import one_image, tool_session
from .tasks import gather_or_cancel

log = logging.getLogger(__name__)

POLICY = "separated-blob-with-prefetch-files"
ANNO_PREFETCH_BLOB = "containerd.io/snapshot/nydus-separated-blob-with-prefetch-files"
_MERGE_GAP = 64 << 10  # fetch two stored ranges as one when at most this far apart
_FETCHES = 8


@dataclass
class OptimizeOptions(RegistryFlags):
    source: str
    target: str
    prefetch_files: bytes  # the hint file's content
    platform: str | None = None
    piece_size: int = 8 << 20
    push_chunk_size: int = 0  # nydusify's --push-chunk-size: uploads as PATCH pieces of this size
    push_retry: PushRetry = field(default_factory=PushRetry)


@dataclass
class OptimizeResult:
    source: str
    target: str
    manifest_digest: str
    blob_id: str  # the new blob
    files: int
    chunks_moved: int
    bytes_moved: int
    fetched_bytes: int  # what was read from the source's blobs
    skipped: list[str] = field(default_factory=list)
    blobs: dict[str, str] = field(default_factory=dict)  # digest -> present / mounted / copied / uploaded
    push_retries: int = 0
    seconds: float = 0.0


def merge_ranges(ranges: list[tuple[int, int]], gap: int = _MERGE_GAP) -> list[tuple[int, int]]:
    """Sorted (offset, size) ranges as fewer, larger ones (at most `gap` bytes between)."""
    out: list[tuple[int, int]] = []
    for off, size in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1] + gap:
            o, s = out[-1]
            out[-1] = (o, max(s, off + size - o))
        else:
            out.append((off, size))
    return out


class Optimizer:
    def __init__(self, opts: OptimizeOptions) -> None:
        self.opts = opts
        one = one_image(opts, "optimize")
        self.src_ref, self.dst_ref, self.platform = one.src_ref, one.dst_ref, one.platform
        self.src_ep, self.dst_ep = one.src_ep, one.dst_ep
        self.files: list[PrefetchFile] = parse_prefetch_files(opts.prefetch_files)
        if not self.files:
            raise ConvertError("the prefetch files list no absolute path; nothing to optimize")

    async def run(self) -> OptimizeResult:
        t0 = time.monotonic()
        async with tool_session("nydusify-optimize-", self.opts.work_dir, [self.src_ep], self.dst_ep,
                                self.opts.push_retry, self.opts.docker_config_paths,
                                self.opts.push_chunk_size) as ts:
            result = await self._optimize(ts.sources[0], ts.target, ts.work)
            result.push_retries = ts.retries.retried
        result.seconds = time.monotonic() - t0
        return result

    async def _optimize(self, src: RegistryClient, dst: RegistryClient, work: str) -> OptimizeResult:
        try:
            image = await fetch_bootstrap(src, self.src_ref, os.path.join(work, "boot"), self.platform)
            assert image.manifest is not None
            manifest = image.manifest
            config = oci.parse_json(await src.get_blob(manifest.config.digest), "image config")
        except OSError as e:
            raise transport_error(self.src_ep, e) from None
        src_dir, out_dir = os.path.join(work, "src"), os.path.join(work, "out")
        os.makedirs(src_dir)
        os.makedirs(out_dir)
        boot_out = os.path.join(work, "optimized.boot")
        with open_bootstrap(image.bootstrap_path) as img:
            need = planned_ranges(img, self.files)
            fetched = await self._fetch_ranges(src, need, src_dir)
            source = LocalBlobDir(src_dir)
            try:
                built = await asyncio.to_thread(optimize_image, img, self.files, boot_out, out_dir, source)
            finally:
                source.close()
        if built.blob_id is None or built.blob_path is None:
            raise ConvertError("none of the listed files has data in the image; nothing to optimize")
        pushed = await push_assembly(
            Assembly(manifest, config, built.blob_ids, {built.blob_id: built.blob_path}, boot_out,
                     {ANNO_PREFETCH_BLOB: built.blob_id}),
            src, self.src_ep, dst, self.dst_ep, self.dst_ref.reference, work, self.opts.piece_size)
        return OptimizeResult(source=str(self.src_ref), target=str(self.dst_ref), manifest_digest=pushed.manifest_digest,
                              blob_id=built.blob_id, files=built.files, chunks_moved=built.chunks_moved,
                              bytes_moved=built.bytes_moved, fetched_bytes=fetched, skipped=built.skipped,
                              blobs=pushed.blobs)

    async def _fetch_ranges(self, src: RegistryClient, need: dict[str, list[tuple[int, int]]], where: str) -> int:
        """Each blob's needed stored ranges, merged, fetched at once into a sparse file named by
        the blob id; returns the bytes fetched."""
        sem = asyncio.Semaphore(_FETCHES)
        total = 0

        async def one(blob_id: str, fd: int, off: int, size: int) -> None:
            nonlocal total
            async with sem:
                try:
                    data = await src.read_blob(blob_id, off, size)
                except OSError as e:
                    raise transport_error(self.src_ep, e, f"blob {blob_id[:12]}") from None
            os.pwrite(fd, data, off)
            total += len(data)

        fds = [(b, os.open(os.path.join(where, b), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)) for b in need]
        try:
            await gather_or_cancel(one(b, fd, off, size) for b, fd in fds for off, size in merge_ranges(need[b]))
        finally:
            for _b, fd in fds:
                os.close(fd)
        return total


def optimize(opts: OptimizeOptions) -> OptimizeResult:
    """Run one optimization to the end (its own event loop)."""
    return asyncio.run(Optimizer(opts).run())

