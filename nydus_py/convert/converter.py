"""`nydusify-py convert`: an OCI/Docker image in a registry -> a Nydus image in a registry.

Order of work, chosen so that bad input pushes nothing and a failure never leaves a manifest
pointing at missing blobs:

1. resolve the source (index -> the platform's manifest), fetch and check the config;
2. pull the layers (a few at a time) into temp files, hashing while writing, and compare size and
   digest with the manifest; unpack each one (checking its diff_id) and build its RAFS blob, lowest
   layer first, in a build thread while later layers download;
3. merge the bootstrap and write the bootstrap layer and the Nydus config;
4. only now push: blobs the target already has (HEAD) are skipped, the others are uploaded from
   their files in pieces; then every blob the manifest names is checked to be present, and the
   manifest (and with `merge_platform` the index) is pushed last.

Memory stays flat with layer size: layers stream to disk, decompression and the build read 1 MiB
at a time, uploads send one piece (8 MiB by default) at a time. Everything goes under one temp
directory that is removed at the end.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..builder.limits import ExpansionLimits
from ..builder.options import BuildOptions
from ..rafs.constants import Compressor
from ..rafs.errors import FormatError
from ..storage.registry import RegistryClient, RegistryConfig, parse_registry_config
from ..storage.registry.auth import decode_basic
from . import oci
from .errors import ConvertError
from .layer import decompress_to, write_bootstrap_layer
from .progress import Bar, Progress, human
from .reference import ImageRef, parse_reference
from .stack import LayerResult, LayerStack


@dataclass
class ConvertOptions:
    source: str
    target: str
    source_insecure: bool = False
    target_insecure: bool = False
    source_auth: str | None = None  # "user:password" or base64 of it
    target_auth: str | None = None
    platform: str | None = None  # default: this machine's
    fs_version: int = 6
    compressor: str = "zstd"
    chunk_size: int = 1 << 20
    merge_platform: bool = False
    work_dir: str | None = None
    docker_config_paths: list[str] | None = None  # None: $DOCKER_CONFIG / ~/.docker/config.json
    jobs: int = 3  # concurrent downloads, and concurrent uploads
    piece_size: int = 8 << 20  # upload piece
    # absolute paths (files or directories) read at startup, in reading order (nydusify's
    # --prefetch-patterns): first and contiguous in each layer's blob, and the prefetch table
    prefetch_patterns: list[bytes] = field(default_factory=list)
    # caps on how far one layer may expand (decompression bombs); None: no caps
    expansion_limits: ExpansionLimits | None = field(default_factory=ExpansionLimits)


@dataclass
class ConvertResult:
    source: str
    target: str
    platform: str
    manifest_digest: str
    index_digest: str | None
    layers: int
    source_bytes: int  # compressed layer bytes pulled
    tar_bytes: int  # uncompressed layer tars
    file_bytes: int  # regular-file bytes chunked
    chunks: int  # chunk references in all layers
    deduplicated: int  # references served by an identical chunk stored earlier
    blob_bytes: int  # RAFS blobs of the image
    bootstrap_bytes: int
    bootstrap_layer_bytes: int
    uploaded: list[str] = field(default_factory=list)  # digests sent
    reused: list[str] = field(default_factory=list)  # digests the target already had
    uploaded_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0

    @property
    def dedup_ratio(self) -> float:
        """Share of chunk references that did not need storing again."""
        return self.deduplicated / self.chunks if self.chunks else 0.0


def normalize_auth(value: str) -> str:
    """base64 `user:pass` from either `user:pass` or its base64; ConvertError otherwise."""
    v = value.strip()
    if ":" in v:
        return base64.b64encode(v.encode()).decode()
    try:
        decode_basic(v)
    except (ValueError, binascii.Error):
        raise ConvertError("credentials must be USER:PASSWORD or base64 of it") from None
    return v


def registry_config(ref: ImageRef, insecure: bool, auth: str | None,
                    docker_config_paths: list[str] | None, scheme: str = "https") -> RegistryConfig:
    """The storage backend's registry config for `ref`: same auth rules (explicit, else docker
    config.json); `insecure` skips certificate checks (and the client's sticky HTTPS->HTTP fallback reaches a plain registry)."""
    conf: dict[str, Any] = {"host": ref.host, "repo": ref.repository, "scheme": scheme,
                            "skip_verify": insecure, "timeout": 30, "connect_timeout": 10}
    if auth:
        conf["auth"] = normalize_auth(auth)
    try:
        return parse_registry_config(conf, env={}, docker_config_paths=docker_config_paths, where="")
    except ValueError as e:
        raise ConvertError(f"{ref}: {e}") from None


@dataclass
class _Fetched:
    path: str  # the compressed layer (removed after unpacking unless the original is copied too)
    tar_path: str
    tar_size: int
    kind: str  # gzip | zstd | tar
    diff_id: str  # sha256 hex of the tar


@dataclass
class _Source:
    manifest: oci.Manifest
    manifest_bytes: bytes
    manifest_desc: dict[str, Any]
    config: dict[str, Any]
    config_bytes: bytes
    diff_ids: list[str]
    platform: oci.Platform


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def resolve_source(client: RegistryClient, ref: ImageRef, platform: str | None) -> _Source:
    """The manifest, config and platform of the image to convert."""
    want = oci.parse_platform(platform) if platform else oci.host_platform()
    got = await client.fetch_manifest(ref.reference, oci.ACCEPT)
    if got is None:
        raise ConvertError(f"source image {ref} not found")
    body, ctype, _ = got
    if ref.digest and _sha(body) != ref.digest:
        raise ConvertError(f"source image {ref}: the manifest the registry sent hashes to {_sha(body)}")
    doc = oci.parse_document(body, ctype, "source manifest")
    from_index = isinstance(doc, oci.Index)
    if isinstance(doc, oci.Index):
        desc = oci.select_manifest(doc, want)
        got = await client.fetch_manifest(desc.digest, oci.MANIFEST_TYPES)
        if got is None:
            raise ConvertError(f"source image {ref}: the index names manifest {desc.digest}, which is missing")
        body = got[0]
        if _sha(body) != desc.digest or len(body) != desc.size:
            raise ConvertError(f"source image {ref}: manifest {desc.short} does not match its index entry")
        sub = oci.parse_document(body, got[1], f"manifest {desc.short}")
        if not isinstance(sub, oci.Manifest):
            raise FormatError(f"manifest {desc.short}: an index inside an index is not supported")
        doc = sub
        mdesc = {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
    else:
        mdesc = {"mediaType": doc.media_type, "digest": _sha(body), "size": len(body)}
    if doc.config.size > oci.MAX_DOCUMENT:
        raise FormatError(f"image config of {doc.config.size} bytes is too large")
    try:
        cbytes = await client.get_blob(doc.config.digest)
    except OSError as e:
        raise ConvertError(f"source image {ref}: cannot fetch its config {doc.config.short}: {e.strerror or e}") from None
    if len(cbytes) != doc.config.size:
        raise ConvertError(f"source image {ref}: config is {len(cbytes)} bytes, the manifest says {doc.config.size}")
    config = oci.parse_json(cbytes, "image config")
    have = oci.config_platform(config)
    if platform and not from_index and have is not None and not oci.platform_matches(want, have):
        raise ConvertError(f"source image {ref} is for {have}, not {want}")
    diff_ids = oci.check_source(doc, config)
    return _Source(doc, body, mdesc, config, cbytes, diff_ids, have or want)


def build_options(opts: ConvertOptions) -> BuildOptions:
    try:
        comp = Compressor.from_name(opts.compressor)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    bo = BuildOptions(fs_version=opts.fs_version, compressor=comp, chunk_size=opts.chunk_size,
                      prefetch_paths=list(opts.prefetch_patterns))
    from ..builder.build import check_options

    try:
        check_options(bo)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    return bo


class Converter:
    def __init__(self, opts: ConvertOptions, progress: Progress | None = None) -> None:
        self.opts = opts
        self.progress = progress or Progress(quiet=True)
        self.src_ref = parse_reference(opts.source)
        self.dst_ref = parse_reference(opts.target)
        if self.dst_ref.digest:
            raise ConvertError(f"target {opts.target} must name a tag, not a digest")
        self.build_opts = build_options(opts)
        self.src_cfg = registry_config(self.src_ref, opts.source_insecure, opts.source_auth, opts.docker_config_paths)
        self.dst_cfg = registry_config(self.dst_ref, opts.target_insecure, opts.target_auth, opts.docker_config_paths)
        self.copy_original = opts.merge_platform and (self.src_ref.host, self.src_ref.repository) != (
            self.dst_ref.host, self.dst_ref.repository)

    async def run(self) -> ConvertResult:
        t0 = time.monotonic()
        if self.opts.work_dir:
            os.makedirs(self.opts.work_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="nydusify-", dir=self.opts.work_dir)
        src = RegistryClient(self.src_cfg)
        dst = RegistryClient(self.dst_cfg)
        builder = ThreadPoolExecutor(1, thread_name_prefix="nydusify-build")
        unpacker = ThreadPoolExecutor(1, thread_name_prefix="nydusify-unpack")
        try:
            await src.start()
            await dst.start()
            result = await self._convert(src, dst, work, builder, unpacker)
            result.seconds = time.monotonic() - t0
            return result
        finally:
            unpacker.shutdown(wait=True, cancel_futures=True)
            builder.shutdown(wait=True, cancel_futures=True)
            await src.close()
            await dst.close()
            shutil.rmtree(work, ignore_errors=True)

    async def _convert(self, src: RegistryClient, dst: RegistryClient, work: str,
                       builder: ThreadPoolExecutor, unpacker: ThreadPoolExecutor) -> ConvertResult:
        ui = self.progress
        source = await resolve_source(src, self.src_ref, self.opts.platform)
        # one request to the target before any concurrent ones: it fails fast when the target is
        # unreachable, and settles its scheme (HTTP fallback) and auth while nothing else is in flight
        try:
            await dst.fetch_manifest(self.dst_ref.reference)
        except OSError as e:
            raise ConvertError(f"target {self.dst_ref}: {e.strerror or e}") from None
        layers = source.manifest.layers
        ui.log(f"source {self.src_ref} ({source.platform}): {len(layers)} layers, "
               f"{human(sum(d.size for d in layers))} compressed")
        blob_dir = os.path.join(work, "blobs")
        dl_dir = os.path.join(work, "layers")
        os.makedirs(blob_dir)
        os.makedirs(dl_dir)
        stack = LayerStack(self.build_opts, blob_dir)
        bars = [ui.bar(f"layer {i + 1}/{len(layers)} {d.short}") for i, d in enumerate(layers)]
        sem = asyncio.Semaphore(max(1, self.opts.jobs))
        # pull + unpack (a few layers at a time) run ahead of the build, which goes in layer order
        downloads: dict[str, asyncio.Task[_Fetched]] = {}
        for i, d in enumerate(layers):
            if d.digest not in downloads:
                downloads[d.digest] = asyncio.create_task(self._fetch(src, i, d, dl_dir, bars[i], sem, unpacker))
        last_use = {d.digest: i for i, d in enumerate(layers)}
        loop = asyncio.get_running_loop()
        results: list[LayerResult] = []
        tar_bytes = 0
        try:
            for i, d in enumerate(layers):
                got = await downloads[d.digest]
                if f"sha256:{got.diff_id}" != source.diff_ids[i]:
                    raise FormatError(f"layer {i + 1} ({d.short}): the uncompressed {got.kind} does not match the "
                                      f"config's diff_id {source.diff_ids[i][:19]} (it hashes to "
                                      f"sha256:{got.diff_id[:12]})")
                res = await loop.run_in_executor(builder, self._build_layer, stack, i, d, got, bars[i])
                results.append(res)
                tar_bytes += got.tar_size
                if last_use[d.digest] == i:
                    os.unlink(got.tar_path)
        except BaseException:
            for t in downloads.values():
                t.cancel()
            await asyncio.gather(*downloads.values(), return_exceptions=True)
            raise
        boot_path = os.path.join(work, "image.boot")
        bl_path = os.path.join(work, "bootstrap-layer.tar.gz")
        merged = await loop.run_in_executor(builder, stack.finish, boot_path)
        with open(boot_path, "rb") as bf, open(bl_path, "wb") as out:
            bl_hex, bl_size, bl_diff = write_bootstrap_layer(bf, os.fstat(bf.fileno()).st_size, out)
        boot_size = os.path.getsize(boot_path)
        blob_files = [(bid, os.path.join(blob_dir, bid)) for bid in merged.blob_ids]
        blob_layers = [oci.blob_layer(bid, os.path.getsize(p)) for bid, p in blob_files]
        config = oci.nydus_config(source.config, [f"sha256:{bid}" for bid, _ in blob_files], f"sha256:{bl_diff}")
        config_bytes = oci.dumps(config)
        config_desc = {"mediaType": oci.OCI_CONFIG, "digest": _sha(config_bytes), "size": len(config_bytes)}
        layer_descs = [*blob_layers, oci.bootstrap_layer(f"sha256:{bl_hex}", bl_size, f"sha256:{bl_diff}",
                                                         self.build_opts.fs_version)]
        manifest = oci.nydus_manifest(config_desc, layer_descs, merged=self.opts.merge_platform)
        manifest_bytes = oci.dumps(manifest)
        ui.log(f"built {len(blob_files)} blobs ({human(sum(d['size'] for d in blob_layers))}) and a "
               f"{human(boot_size)} bootstrap; pushing to {self.dst_ref}")

        result = ConvertResult(
            source=str(self.src_ref), target=str(self.dst_ref), platform=str(source.platform),
            manifest_digest=_sha(manifest_bytes), index_digest=None, layers=len(layers),
            source_bytes=sum(d.size for d in layers), tar_bytes=tar_bytes,
            file_bytes=sum(r.file_bytes for r in results), chunks=sum(r.chunks for r in results),
            deduplicated=sum(r.deduplicated for r in results), blob_bytes=sum(d["size"] for d in blob_layers),
            bootstrap_bytes=boot_size, bootstrap_layer_bytes=bl_size)

        files: list[tuple[str, str, int, str]] = [  # digest, path, size, label
            *((f"sha256:{bid}", p, os.path.getsize(p), f"blob {bid[:12]}") for bid, p in blob_files),
            (f"sha256:{bl_hex}", bl_path, bl_size, "bootstrap layer"),
        ]
        small: list[tuple[str, bytes]] = [(_sha(config_bytes), config_bytes)]
        if self.copy_original:
            seen: set[str] = set()
            for i, d in enumerate(layers):
                if d.digest not in seen:
                    seen.add(d.digest)
                    files.append((d.digest, downloads[d.digest].result().path, d.size, f"original layer {i + 1}"))
            small.append((source.manifest.config.digest, source.config_bytes))
        await self._push_all(dst, files, small, result)

        needed = [d for d, *_ in files] + [d for d, _ in small]
        missing = [d for d in needed if not await dst.blob_exists(d)]
        if missing:
            raise ConvertError(f"the target does not have {len(missing)} blob(s) after the push "
                               f"({', '.join(m[:19] for m in missing)}); no manifest was pushed")
        if self.opts.merge_platform:
            if self.copy_original:
                await dst.push_manifest(source.manifest_desc["digest"], source.manifest_bytes,
                                        source.manifest_desc["mediaType"])
            await dst.push_manifest(result.manifest_digest, manifest_bytes, oci.OCI_MANIFEST)
            nydus_desc = {"mediaType": oci.OCI_MANIFEST, "digest": result.manifest_digest,
                          "size": len(manifest_bytes)}
            index_bytes = oci.dumps(oci.merged_index(source.manifest_desc, nydus_desc, source.platform))
            result.index_digest = await dst.push_manifest(self.dst_ref.reference, index_bytes, oci.OCI_INDEX)
        else:
            await dst.push_manifest(self.dst_ref.reference, manifest_bytes, oci.OCI_MANIFEST)
        ui.close()
        return result

    async def _fetch(self, src: RegistryClient, i: int, d: oci.Descriptor, dl_dir: str, bar: Bar,
                     sem: asyncio.Semaphore, unpacker: ThreadPoolExecutor) -> "_Fetched":
        """Download layer `d` (checked against its size and digest), then unpack it to a tar file."""
        where = f"layer {i + 1} ({d.short})"
        async with sem:
            path = os.path.join(dl_dir, d.hex)
            bar.phase("pull", d.size)
            with open(path, "wb") as f:
                try:
                    got_hex, n = await src.download_blob(d.digest, f, limit=d.size, progress=bar.advance)
                except OSError as e:
                    raise ConvertError(f"{where}: {e.strerror or e}") from None
            if n != d.size:
                more = "more than" if n > d.size else f"{n} bytes, not"
                raise ConvertError(f"{where}: the registry sent {more} the {d.size} bytes the manifest says")
            if got_hex != d.hex:
                raise ConvertError(f"{where}: content does not match its digest (it hashes to sha256:{got_hex})")
            bar.finish(f"pulled {human(n)}")
        fetched = await asyncio.get_running_loop().run_in_executor(unpacker, self._unpack, where, d, path, bar)
        if not self.copy_original:
            os.unlink(path)
        return fetched

    def _unpack(self, where: str, d: oci.Descriptor, path: str, bar: Bar) -> "_Fetched":
        """Decompress the layer next to it (inside the work dir, removed with it)."""
        tar_path = path + ".tar"
        try:
            with open(path, "rb") as comp, open(tar_path, "wb") as tar:
                bar.phase("unpack", d.size)
                dhex, tsize, kind = decompress_to(comp, tar, bar.advance, self.opts.expansion_limits)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tar_path)  # free the disk now, not when the work dir goes
            if isinstance(e, FormatError):
                raise type(e)(f"{where}: {e}") from None
            raise
        bar.finish(f"unpacked {human(tsize)} of {kind}")
        return _Fetched(path, tar_path, tsize, kind, dhex)

    def _build_layer(self, stack: LayerStack, i: int, d: oci.Descriptor, got: "_Fetched", bar: Bar) -> LayerResult:
        with open(got.tar_path, "rb") as tar:
            bar.phase("build", got.tar_size)
            try:
                res = stack.add_layer(tar, bar.advance)
            except FormatError as e:
                raise FormatError(f"layer {i + 1} ({d.short}): {e}") from None
        blob = f"blob {res.blob.blob_id[:12]} {human(res.blob.compressed_size)}" if res.blob else "no new data"
        bar.close(f"{human(d.size)} {got.kind} -> {human(got.tar_size)} tar -> {blob} "
                  f"({res.new_chunks} new chunks, {res.deduplicated} deduplicated)")
        return res

    async def _push_all(self, dst: RegistryClient, files: list[tuple[str, str, int, str]],
                        small: list[tuple[str, bytes]], result: ConvertResult) -> None:
        sem = asyncio.Semaphore(max(1, self.opts.jobs))

        async def one(digest: str, path: str, size: int, label: str) -> None:
            async with sem:
                bar = self.progress.bar(label)
                bar.phase("push", size)
                sent = await dst.push_blob_file(path, digest, piece=self.opts.piece_size, progress=bar.advance)
                self._account(result, digest, size, sent)
                bar.close(f"pushed {human(size)}" if sent else f"already in the target ({human(size)})")

        async def one_small(digest: str, data: bytes) -> None:
            async with sem:
                exists = await dst.blob_exists(digest)
                if not exists:
                    await dst.push_blob(data, digest)
                self._account(result, digest, len(data), not exists)

        tasks = [asyncio.create_task(one(*f)) for f in files]
        tasks += [asyncio.create_task(one_small(d, b)) for d, b in small]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    @staticmethod
    def _account(result: ConvertResult, digest: str, size: int, sent: bool) -> None:
        if sent:
            result.uploaded.append(digest)
            result.uploaded_bytes += size
        else:
            result.reused.append(digest)
            result.reused_bytes += size


def convert(opts: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Run one conversion to the end (its own event loop)."""
    return asyncio.run(Converter(opts, progress).run())
