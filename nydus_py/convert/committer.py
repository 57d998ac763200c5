"""`nydusify-py commit`: a new Nydus image from a containerd container's changes to its Nydus
image, as nydusify's committer does it.

1. `ctr` tells the container's image and its snapshot's overlay upper directory.
2. The image's bootstrap is pulled; `--maximum-times` is checked against the blobs earlier
   commits made (`containerd.io/snapshot/nydus-commit-blobs` on the bootstrap layer).
3. With the container's task paused (filesystems synced first; resumed whatever happens), the
   upper directory becomes one new layer over the image's tree, overlayfs whiteouts applied
   (0/0 character devices, `trusted.overlay.opaque`), built as `nydus-image create
   --parent-bootstrap --whiteout-spec overlayfs` would: a new blob with the upper data and a
   merged bootstrap whose other chunks stay in the image's blobs.
4. The image is pushed to the target (`convert/assemble.py`): the image's blobs (mounted or
   copied when the target is another repository), the new blob, the bootstrap layer annotated with
   the commit blobs, the config with one more history entry, the manifest.

Differences, by decision: `--with-path` (committing mounts inside the container through
nsenter) is refused; overlay internals (`trusted.overlay.*` xattrs) never reach the image, and an
upper directory that uses overlay's redirect_dir or metacopy is refused rather than committed
wrong; the commit-blobs annotation lists every commit's blob, not only the last one's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from ..builder.build import build_image
from ..builder.merge import merge_layers, tree_from_image
from ..builder.options import BuildOptions, BuildResult
from ..builder.packed import Tree, as_tree
from ..builder.sources import tree_from_directory
from ..rafs.loader import open_bootstrap
from ..storage.registry import RegistryClient
from . import oci
from .assemble import Assembly, push_assembly
from .containerd import Ctr
from .errors import ConvertError
from .pull import fetch_bootstrap
from .push_retry import PushRetry
from .reference import parse_reference
from .remote import Endpoint, RegistryFlags, transport_error
from .session import tool_session

log = logging.getLogger(__name__)

ANNO_COMMIT_BLOBS = "containerd.io/snapshot/nydus-commit-blobs"
OVERLAY_PREFIX = b"trusted.overlay."
KEEP = {b"trusted.overlay.opaque"}  # read by the overlayfs whiteout rule, then dropped by the merge
REFUSED = (b"trusted.overlay.redirect", b"trusted.overlay.metacopy")


@dataclass
class CommitOptions(RegistryFlags):
    container: str
    target: str
    containerd_address: str = "/run/containerd/containerd.sock"
    namespace: str = "default"
    maximum_times: int = 400
    piece_size: int = 8 << 20
    push_retry: PushRetry = field(default_factory=PushRetry)
    ctr: str | None = None  # the ctr binary (default: from PATH)


@dataclass
class CommitResult:
    container: str
    source: str  # the container's image
    target: str
    manifest_digest: str
    blob_id: str | None  # the new blob (None: the upper directory holds no file data)
    committed_layers: int  # commit blobs in the new image, this one included
    paused: bool
    blobs: dict[str, str] = field(default_factory=dict)
    push_retries: int = 0
    seconds: float = 0.0


def strip_overlay_internals(tree: Tree) -> int:
    """Drop overlayfs's own xattrs from an upper directory's tree (all but the opaque mark, which
    the whiteout rule reads); returns how many entries had some. Redirected or metacopy entries
    cannot be committed from the upper directory alone: ConvertError."""
    touched = 0
    for n in range(len(tree)):
        if not tree.xlen[n]:
            continue
        xattrs = tree.xattrs(n)
        bad = [k for k in xattrs if k.startswith(REFUSED)]
        if bad:
            raise ConvertError(f"{tree.path(n).decode(errors='replace')}: the upper directory uses overlay's "
                               f"{bad[0].decode()} (redirect_dir/metacopy), which commit cannot represent")
        kept = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_PREFIX) or k in KEEP}
        if len(kept) != len(xattrs):
            tree.set_xattrs(n, kept)
            touched += 1
    return touched


class Committer:
    def __init__(self, opts: CommitOptions) -> None:
        if opts.maximum_times < 1:
            raise ConvertError("--maximum-times must be at least 1")
        self.opts = opts
        self.dst_ref = parse_reference(opts.target)
        if self.dst_ref.digest:
            raise ConvertError(f"target {opts.target} must name a tag, not a digest")
        self.dst_ep = Endpoint("target", self.dst_ref, opts.target_insecure, opts.plain_http, opts.target_auth)
        self.ctr = Ctr(opts.containerd_address, opts.namespace, opts.ctr)

    async def run(self) -> CommitResult:
        t0 = time.monotonic()
        cid = self.ctr.resolve(self.opts.container)
        container = self.ctr.container(cid)
        upper = self.ctr.upper_dir(container)
        if not os.path.isdir(upper):
            raise ConvertError(f"container {cid}: upper directory {upper} is not here (another host's container?)")
        src_ref = parse_reference(container.image)
        src_ep = Endpoint("source", src_ref, self.opts.source_insecure, self.opts.plain_http, self.opts.source_auth)
        async with tool_session("nydusify-commit-", self.opts.work_dir, [src_ep], self.dst_ep, self.opts.push_retry,
                                self.opts.docker_config_paths) as ts:
            result = await self._commit(cid, container.image, upper, ts.sources[0], src_ep, ts.target, ts.work)
            result.push_retries = ts.retries.retried
        result.seconds = time.monotonic() - t0
        return result

    async def _commit(self, cid: str, image_ref: str, upper: str, src: RegistryClient, src_ep: Endpoint,
                      dst: RegistryClient, work: str) -> CommitResult:
        try:
            image = await fetch_bootstrap(src, src_ep.ref, os.path.join(work, "boot"))
            assert image.manifest is not None
            config = oci.parse_json(await src.get_blob(image.manifest.config.digest), "image config")
        except OSError as e:
            raise transport_error(src_ep, e) from None
        earlier = [b for b in image.bootstrap.annotations.get(ANNO_COMMIT_BLOBS, "").split(",") if b]
        if len(earlier) >= self.opts.maximum_times:
            raise ConvertError(f"image {image_ref} was committed {len(earlier)} times already; --maximum-times is "
                               f"{self.opts.maximum_times}")
        out_dir = os.path.join(work, "blobs")
        boot_out = os.path.join(work, "committed.boot")
        status = self.ctr.status(cid)
        paused = False
        await asyncio.to_thread(os.sync)  # what the container wrote reaches the upper directory
        if status == "RUNNING":
            self.ctr.pause(cid)
            paused = True
        try:
            built = await asyncio.to_thread(self._build, image.bootstrap_path, upper, boot_out, out_dir)
        finally:
            if paused:
                self.ctr.resume(cid)
        new_blobs = {built.blob_id: built.blob_path} if built.blob_id and built.blob_path else {}
        commits = earlier + [f"sha256:{b}" for b in new_blobs]
        pushed = await push_assembly(
            Assembly(image.manifest, config, built.blob_ids, new_blobs, boot_out, {ANNO_COMMIT_BLOBS: ",".join(commits)},
                     {"created_by": "nydusify-py commit", "comment": f"Nydus Commit Layer of container {cid}"}),
            src, src_ep, dst, self.dst_ep, self.dst_ref.reference, work, self.opts.piece_size)
        return CommitResult(container=cid, source=image_ref, target=str(self.dst_ref),
                            manifest_digest=pushed.manifest_digest, blob_id=built.blob_id,
                            committed_layers=len(commits), paused=paused, blobs=pushed.blobs)

    @staticmethod
    def _build(base_boot: str, upper: str, boot_out: str, blob_dir: str) -> BuildResult:
        with open_bootstrap(base_boot) as base:
            layer = as_tree(tree_from_directory(upper))
            stripped = strip_overlay_internals(layer)
            if stripped:
                log.info("commit: dropped overlayfs xattrs of %d entries", stripped)
            root = merge_layers([tree_from_image(base), layer], "overlayfs")
            opts = BuildOptions(fs_version=base.version, compressor=base.compressor, digester=base.digester,
                                chunk_size=base.chunk_size)
            return build_image(root, boot_out, blob_dir, opts)


def commit(opts: CommitOptions) -> CommitResult:
    """Run one commit to the end (its own event loop)."""
    return asyncio.run(Committer(opts).run())
