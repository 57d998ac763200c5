"""`nydusify-py check`: is the Nydus image at TARGET well formed, complete, and (with SOURCE) the
same file tree as the image it was converted from?

Rules, as nydusify's checker has them, each adding readable problems instead of stopping at the
first one:

1. manifest: the Nydus conventions (the last layer is the annotated bootstrap with an fs-version,
   every other layer an annotated Nydus blob, config diff_ids matching the layers, the merged
   index's markers with `multi_platform`), and with a source the same image config;
2. bootstrap: the layer matches its descriptor and diff_id, the bootstrap parses, a full walk of
   every inode finds nothing wrong, and its blob table names exactly the manifest's blobs;
3. blobs: every blob is in the target registry with the digest and size its descriptor says,
   and every chunk the bootstrap references decodes to its digest;
4. filesystem (with a source, on by default like nydusify's): the source layers applied with
   overlay/whiteout semantics equal the tree the RAFS reader serves, on type, mode, owner, mtime,
   size, symlink target, device number, xattrs, link count and the sha256 of every file's data.

nydusify mounts the image with nydusd for rule 4; here the bootstrap is read through the same
reader and `BlobDevice` nydusd-py serves from (blobs from the downloaded copies), so no FUSE
mount or root is needed.
"""

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..builder.check import check_image
from ..builder.limits import ExpansionLimits
from ..rafs.errors import FormatError
from ..rafs.loader import open_bootstrap
from ..rafs.model import RafsImage
from ..storage.device import BlobDevice
from ..storage.localfs import LocalBlobDir
from ..storage.registry import RegistryClient
from . import oci, treediff
from .converter import parse_platforms, resolve_sources
from .errors import ConvertError
from .layer import decompress_to, extract_bootstrap
from .reference import ImageRef, parse_reference
from .remote import Endpoint, RegistryFlags, endpoint_config, transport_error


@dataclass
class CheckOptions(RegistryFlags):
    target: str
    source: str | None = None
    platform: str | None = None  # default: this machine's
    multi_platform: bool = False  # the target must be an index with the original and the Nydus manifest
    fs_check: bool = True  # rule 4 when a source is given


@dataclass
class CheckReport:
    target: str
    manifest_digest: str = ""
    fs_version: str = ""
    blobs: int = 0
    blob_bytes: int = 0
    inodes: int = 0
    chunks_verified: int = 0
    paths_compared: int = 0
    rules: list[str] = field(default_factory=list)  # rules that ran
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Target:
    """The Nydus manifest under check and how it was reached."""

    def __init__(self, body: bytes, doc: oci.Manifest, entry: oci.Descriptor | None) -> None:
        self.body = body
        self.doc = doc
        self.entry = entry  # its index entry, when the reference is an index


class Checker:
    def __init__(self, opts: CheckOptions) -> None:
        self.opts = opts
        self.dst_ref = parse_reference(opts.target)
        self.src_ref: ImageRef | None = parse_reference(opts.source) if opts.source else None
        plats = parse_platforms(opts.platform)
        if plats and len(plats) > 1:
            raise ConvertError("check takes one --platform")
        self.platform = plats[0] if plats else oci.host_platform()
        self.dst_ep = Endpoint("target", self.dst_ref, opts.target_insecure, opts.plain_http, opts.target_auth)
        self.src_ep = (Endpoint("source", self.src_ref, opts.source_insecure, opts.plain_http, opts.source_auth)
                       if self.src_ref else None)
        self.report = CheckReport(str(self.dst_ref))

    def problem(self, rule: str, text: str) -> None:
        self.report.problems.append(f"{rule}: {text}")

    async def run(self) -> CheckReport:
        if self.opts.work_dir:
            os.makedirs(self.opts.work_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="nydusify-check-", dir=self.opts.work_dir)
        dst = RegistryClient(endpoint_config(self.dst_ep, self.opts.docker_config_paths))
        src = (RegistryClient(endpoint_config(self.src_ep, self.opts.docker_config_paths))
               if self.src_ep else None)
        try:
            await dst.start()
            if src is not None:
                await src.start()
            await self._check(dst, src, work)
            return self.report
        finally:
            await dst.close()
            if src is not None:
                await src.close()
            shutil.rmtree(work, ignore_errors=True)

    async def _check(self, dst: RegistryClient, src: RegistryClient | None, work: str) -> None:
        try:
            target = await self._resolve_target(dst)
        except OSError as e:
            raise transport_error(self.dst_ep, e) from None
        if target is None:
            return
        self.report.manifest_digest = _sha(target.body)
        self.report.rules.append("manifest")
        config = await self._check_manifest(dst, target)
        source_cfg: dict[str, Any] | None = None
        if src is not None and self.src_ref is not None and self.src_ep is not None:
            try:
                sources, _ = await resolve_sources(src, self.src_ref, [self.platform])
            except OSError as e:
                raise transport_error(self.src_ep, e) from None
            source_cfg = sources[0].config
            if config is not None:
                self._compare_configs(source_cfg, config)
        boot_desc = target.doc.layers[-1] if target.doc.layers else None
        if boot_desc is None or boot_desc.annotations.get(oci.ANNO_NYDUS_BOOTSTRAP) != "true":
            return  # nothing to read the image with (reported by the manifest rule)
        self.report.rules.append("bootstrap")
        image = await self._check_bootstrap(dst, boot_desc, config, work)
        if image is not None:
            self.check_blob_table(image, target.doc)
        self.report.rules.append("blobs")
        blob_dir = os.path.join(work, "blobs")
        os.makedirs(blob_dir)
        blobs_ok = await self._check_blobs(dst, target.doc, blob_dir)
        if image is None:
            return
        try:
            if blobs_ok:
                chunks = check_image(image, blob_dir)
                self.report.chunks_verified = chunks.chunks_verified
                for err in chunks.errors:
                    self.problem("blobs", err)
            if src is not None and self.opts.fs_check:
                if not blobs_ok:
                    self.problem("filesystem", "not compared: some blobs are missing or wrong")
                    return
                self.report.rules.append("filesystem")
                await self._check_filesystem(src, image, blob_dir, work)
        finally:
            image.close()

    # -- rule 1 -------------------------------------------------------------------------------

    async def _resolve_target(self, dst: RegistryClient) -> _Target | None:
        got = await dst.fetch_manifest(self.dst_ref.reference, oci.ACCEPT)
        if got is None:
            raise ConvertError(f"target image {self.dst_ref} not found")
        body, ctype, _ = got
        doc = oci.parse_document(body, ctype, "target manifest")
        if isinstance(doc, oci.Manifest):
            if self.opts.multi_platform:
                self.problem("manifest", "--multi-platform: the target is a single manifest, not an index with "
                                         "the original and the Nydus manifest")
            return _Target(body, doc, None)
        entry: oci.Descriptor | None = None
        with contextlib.suppress(ConvertError):
            entry = oci.select_manifest(doc, self.platform, nydus=True)
        if self.opts.multi_platform:
            if entry is None:
                self.problem("manifest", f"the index has no Nydus manifest for {self.platform} (an entry with "
                                         f"artifactType {oci.NYDUS_ARTIFACT} or os.features {oci.NYDUS_OS_FEATURE})")
            try:
                oci.select_manifest(doc, self.platform, nydus=False)
            except ConvertError:
                self.problem("manifest", f"the index has no original (OCI) manifest for {self.platform}")
        if entry is None:
            try:
                entry = oci.select_manifest(doc, self.platform, nydus=False)
            except ConvertError as e:
                self.problem("manifest", str(e))
                return None
        got = await dst.fetch_manifest(entry.digest, oci.MANIFEST_TYPES)
        if got is None:
            self.problem("manifest", f"the index names manifest {entry.digest}, which the registry does not have")
            return None
        if _sha(got[0]) != entry.digest or len(got[0]) != entry.size:
            self.problem("manifest", f"manifest {entry.short} does not match its index entry")
        sub = oci.parse_document(got[0], got[1], f"manifest {entry.short}")
        if not isinstance(sub, oci.Manifest):
            self.problem("manifest", f"manifest {entry.short} is an index inside an index")
            return None
        return _Target(got[0], sub, entry)

    async def _check_manifest(self, dst: RegistryClient, t: _Target) -> dict[str, Any] | None:
        layers = t.doc.layers
        if not layers:
            self.problem("manifest", "no layers")
            return None
        boot = layers[-1]
        if boot.annotations.get(oci.ANNO_NYDUS_BOOTSTRAP) != "true":
            self.problem("manifest", f"the last layer {boot.short} lacks the annotation {oci.ANNO_NYDUS_BOOTSTRAP}="
                                     "\"true\", so this is not a Nydus image")
        if boot.media_type not in (oci.OCI_LAYER_GZIP, oci.DOCKER_LAYER_GZIP):
            self.problem("manifest", f"bootstrap layer {boot.short}: media type {boot.media_type!r}, "
                                     "expected a gzip layer")
        fsv = boot.annotations.get(oci.ANNO_FS_VERSION)
        self.report.fs_version = fsv or ""
        if fsv not in ("5", "6"):
            self.problem("manifest", f"bootstrap layer {boot.short}: annotation {oci.ANNO_FS_VERSION} is {fsv!r}, "
                                     "expected \"5\" or \"6\"")
        for i, d in enumerate(layers[:-1]):
            if d.media_type != oci.NYDUS_BLOB:
                self.problem("manifest", f"layer {i + 1} ({d.short}): media type {d.media_type!r}, expected "
                                         f"{oci.NYDUS_BLOB}")
            if d.annotations.get(oci.ANNO_NYDUS_BLOB) != "true":
                self.problem("manifest", f"layer {i + 1} ({d.short}): annotation {oci.ANNO_NYDUS_BLOB}=\"true\" "
                                         "is missing")
        if t.entry is not None and oci.is_nydus_entry(t.entry) and t.doc.config.media_type != oci.NYDUS_CONFIG:
            self.problem("manifest", f"the index marks the manifest as Nydus but its config media type is "
                                     f"{t.doc.config.media_type!r}, not {oci.NYDUS_CONFIG}")
        try:
            cbytes = await dst.get_blob(t.doc.config.digest)
        except OSError as e:
            self.problem("manifest", f"config {t.doc.config.short}: {e.strerror or e}")
            return None
        if len(cbytes) != t.doc.config.size:
            self.problem("manifest", f"config is {len(cbytes)} bytes, the manifest says {t.doc.config.size}")
        try:
            config = oci.parse_json(cbytes, "image config")
            diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        except (FormatError, AttributeError) as e:
            self.problem("manifest", f"config: {e}")
            return None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            n = len(diff_ids) if isinstance(diff_ids, list) else 0
            self.problem("manifest", f"config lists {n} diff_ids for {len(layers)} layers")
            return config
        for i, d in enumerate(layers[:-1]):
            if diff_ids[i] != d.digest:
                self.problem("manifest", f"layer {i + 1}: config diff_id {str(diff_ids[i])[:19]} differs from the "
                                         f"blob digest {d.short} (Nydus blobs are stored uncompressed)")
        return config

    def _compare_configs(self, source: dict[str, Any], target: dict[str, Any]) -> None:
        """nydusify compares the `config` section (ArgsEscaped aside) and we add the platform."""
        s = dict(source.get("config") or {})
        t = dict(target.get("config") or {})
        s.pop("ArgsEscaped", None)
        t.pop("ArgsEscaped", None)
        for key in sorted(s.keys() | t.keys()):
            if s.get(key) != t.get(key):
                self.problem("manifest", f"image config {key}: {s.get(key)!r} in the source, {t.get(key)!r} in the "
                                         "Nydus image")
        for key in ("os", "architecture", "variant"):
            if source.get(key) != target.get(key):
                self.problem("manifest", f"image config {key}: {source.get(key)!r} in the source, "
                                         f"{target.get(key)!r} in the Nydus image")

    # -- rule 2 -------------------------------------------------------------------------------

    async def _check_bootstrap(self, dst: RegistryClient, desc: oci.Descriptor, config: dict[str, Any] | None,
                               work: str) -> RafsImage | None:
        layer_path = os.path.join(work, "bootstrap-layer")
        boot_path = os.path.join(work, "image.boot")
        with open(layer_path, "w+b") as f:
            try:
                got_hex, n = await dst.download_blob(desc.digest, f, limit=desc.size)
            except OSError as e:
                self.problem("bootstrap", f"layer {desc.short}: {e.strerror or e}")
                return None
            if n != desc.size or got_hex != desc.hex:
                self.problem("bootstrap", f"layer {desc.short}: the registry has {n} bytes hashing to "
                                          f"sha256:{got_hex[:12]}, the descriptor says {desc.size} bytes")
                return None
            f.seek(0)
            diff_id = await asyncio.to_thread(_gunzip_sha, f)
            want = None
            if config is not None:
                ids = (config.get("rootfs") or {}).get("diff_ids") or []
                want = ids[-1] if ids else None
            if want is not None and diff_id != want:
                self.problem("bootstrap", f"layer {desc.short}: uncompressed it hashes to {diff_id[:19]}, the "
                                          f"config's diff_id is {str(want)[:19]}")
            f.seek(0)
            try:
                with open(boot_path, "wb") as out:
                    extract_bootstrap(f, out)
            except FormatError as e:
                self.problem("bootstrap", f"layer {desc.short}: {e}")
                return None
        try:
            image = open_bootstrap(boot_path)
        except (FormatError, OSError) as e:
            self.problem("bootstrap", f"does not parse: {e}")
            return None
        structure = await asyncio.to_thread(check_image, image)
        self.report.inodes = structure.inodes
        for err in structure.errors:
            self.problem("bootstrap", err)
        if structure.error_count > len(structure.errors):
            self.problem("bootstrap", f"... and {structure.error_count - len(structure.errors)} more")
        if self.report.fs_version and str(image.version) != self.report.fs_version:
            self.problem("bootstrap", f"RAFS v{image.version}, the manifest annotates fs-version "
                                      f"{self.report.fs_version}")
        return image

    # -- rule 3 -------------------------------------------------------------------------------

    async def _check_blobs(self, dst: RegistryClient, doc: oci.Manifest, blob_dir: str) -> bool:
        ok = True
        for i, d in enumerate(doc.layers[:-1]):
            self.report.blobs += 1
            self.report.blob_bytes += d.size
            with open(os.path.join(blob_dir, d.hex), "wb") as f:
                try:
                    got_hex, n = await dst.download_blob(d.digest, f, limit=d.size)
                except OSError as e:
                    ok = False
                    what = "is missing from the target registry" if e.errno == 2 else f"cannot be read: {e.strerror or e}"
                    self.problem("blobs", f"blob {i + 1} {d.short} {what}")
                    continue
            if n != d.size:
                ok = False
                more = "more than" if n > d.size else f"{n} bytes, not"
                self.problem("blobs", f"blob {i + 1} {d.short}: the registry has {more} the {d.size} bytes the "
                                      "manifest says")
            elif got_hex != d.hex:
                ok = False
                self.problem("blobs", f"blob {i + 1} {d.short}: its bytes hash to sha256:{got_hex[:12]}, not to "
                                      "its digest")
        return ok

    def check_blob_table(self, image: RafsImage, doc: oci.Manifest) -> None:
        in_boot = [b.blob_id for b in image.blobs]
        in_manifest = {d.hex for d in doc.layers[:-1]}
        for bid in in_boot:
            if bid not in in_manifest:
                self.problem("bootstrap", f"blob table names {bid[:12]}, which is not a layer of the manifest")
        for bid in sorted(in_manifest - set(in_boot)):
            self.problem("bootstrap", f"layer blob {bid[:12]} is not in the bootstrap's blob table")

    # -- rule 4 -------------------------------------------------------------------------------

    async def _check_filesystem(self, src: RegistryClient, image: RafsImage, blob_dir: str, work: str) -> None:
        assert self.src_ref is not None and self.src_ep is not None
        sources, _ = await resolve_sources(src, self.src_ref, [self.platform])
        source = sources[0]
        tree = treediff.OverlayTree()
        for i, d in enumerate(source.manifest.layers):
            path = os.path.join(work, f"layer-{i}")
            with open(path, "w+b") as f:
                try:
                    got_hex, n = await src.download_blob(d.digest, f, limit=d.size)
                except OSError as e:
                    raise transport_error(self.src_ep, e, f"layer {i + 1}") from None
                if n != d.size or got_hex != d.hex:
                    raise ConvertError(f"source layer {i + 1} ({d.short}) does not match its descriptor")
                f.seek(0)
                tar_path = path + ".tar"
                with open(tar_path, "w+b") as tar:
                    await asyncio.to_thread(decompress_to, f, tar, None, ExpansionLimits())
                    tar.seek(0)
                    try:
                        await asyncio.to_thread(tree.apply, tar)
                    except ValueError as e:
                        raise ConvertError(f"source layer {i + 1} ({d.short}): {e}") from None
                os.unlink(tar_path)
            os.unlink(path)
        local = LocalBlobDir(blob_dir)
        try:
            device = BlobDevice(image, local)
            try:
                nydus = await asyncio.to_thread(treediff.rafs_tree, image, device)
            except (FormatError, OSError) as e:
                self.problem("filesystem", f"reading the Nydus image failed: {e}")
                return
        finally:
            local.close()
        self.report.paths_compared = len(tree.nodes.keys() | nydus.keys())
        for line in treediff.diff(tree.nodes, nydus):
            self.problem("filesystem", line)


def _gunzip_sha(f: Any) -> str:
    """sha256 of a gzip stream's content (a bootstrap layer's diff_id)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    h = hashlib.sha256()
    while piece := f.read(1 << 20):
        h.update(d.decompress(piece))
    h.update(d.flush())
    return "sha256:" + h.hexdigest()


def check(opts: CheckOptions) -> CheckReport:
    """Run every rule (its own event loop); ConvertError when the check cannot even start."""
    return asyncio.run(Checker(opts).run())
