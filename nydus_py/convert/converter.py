"""`nydusify-py convert`: an OCI/Docker image in a registry -> a Nydus image in a registry.

Order of work, chosen so that a failure never leaves a manifest pointing at missing blobs, and so
that downloading, building and uploading overlap:

1. resolve the source (index -> the platform's manifest), fetch and check the config;
2. pull the layers, each when its build starts (one per core at once, lowest layer first),
   handed to the build in memory (`TarPipe`: no tar file), whose thread inflates the pieces as
   it reads them (`_InflateSink.pull`) while the next ones download, and chunks the files as they come;
   each is checked against its size and digest (and its diff_id when build-cache records are
   written: they are keyed by diff_ids); its blob is pushed while it is written
   (`stream_push`: one PATCH following the file, then PUT ?digest=) or once built (HEAD first: a blob the target
   has is skipped; a re-conversion into an existing tag, a failed stream), while later layers build;
3. merge the bootstrap and write the bootstrap layer and the Nydus config, push them;
4. check that every blob the manifest names is present, and only then push the manifest (and
   with `merge_platform` the index).

Bad input in the first layer pushes nothing; bad input in a later layer can leave the blobs of
the layers below it in the target, unreferenced (no manifest names them), as nydusify does.

With `build_cache` (see `build_cache`), layers whose ChainID and build parameters have a record
are neither pulled nor prepared: their cached layer bootstrap joins the stack where their commit
would be (the layers above, prepared meanwhile, find its chunks from then on, as they do a
committed layer's) and their blob is mounted (same registry) or copied into the target with the
last pushes; the record of each layer built is written on a builder thread from that layer's tree:
at once when a layer above it is built (beside that build), else once the merged bootstrap is
written (beside the bootstrap layer's gzip and the pushes), and is complete before the manifest is
pushed. The cache's new blobs and config go up beside the last image's own pushes, the cache
manifest after the image's: a cache push that failed fails the command then.
With `chunk_dict`, chunks the dictionary image has are referenced from its blobs, which then
join the image (mounted or copied into the target like cached blobs).

Memory stays flat with layer size: a layer's tar is at most a few MiB ahead of its build (or
streams to disk when the original layers are pushed too), the build reads 1 MiB at a time,
uploads send one piece (1 MiB by default) at a time. Everything goes under one temp
directory that is removed at the end.
"""

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from ..builder.chunk_dict import ChunkDictError
from ..builder.limits import ExpansionLimits
from ..builder.options import BuildOptions
from ..builder.packed import Tree
from ..builder.sources import Growth, Restarted, TarPipe
from ..rafs.constants import Compressor
from ..rafs.errors import FormatError
from ..rafs.loader import open_bootstrap
from ..storage.registry import RegistryClient
from . import oci
from .build_cache import DEFAULT_VERSION, MAX_RECORDS, Blob, BuildCache, Record, build_params, chain_ids
from .errors import ConvertError
from .layer import Inflater, write_bootstrap_layer
from .layout_archive import LayoutArchiveSource, LayoutArchiveTarget
from .memory import release_free_memory
from .progress import Bar, Progress, human
from .push_retry import PushRetry, RetryStats, retry_pushes
from .reference import ImageRef, parse_reference
from .remote import Endpoint, RegistryFlags, endpoint_config, transport_error
from .reuse import (
    CacheStats,
    ChunkDict,
    Hit,
    RemoteBlob,
    fetch_hit,
    load_cache,
    load_chunk_dict,
    parse_chunk_dict,
    place_blob,
    same_repo,
)
from .stack import CacheMismatch, LayerResult, LayerStack, PreparedLayer
from .stream_push import PATCH_PIECE, BlobStream, StreamRefused, StreamStats, Target
from .tasks import gather_or_cancel

log = logging.getLogger(__name__)

_PULL_PIECE = 256 << 10  # download piece handed to the inflating (up to `_InflateSink.ahead` queued per layer)


@dataclass
class ConvertOptions(RegistryFlags):
    source: str
    target: str
    platform: str | None = None  # default: this machine's
    fs_version: int = 6
    compressor: str = "zstd"
    chunk_size: int = 1 << 20
    merge_platform: bool = False
    jobs: int = 3  # concurrent uploads; layers downloaded and built at once (at most one per core)
    piece_size: int = 1 << 20  # upload read size (one streamed PUT per blob)
    # absolute paths (files or directories) read at startup, in reading order (nydusify's
    # --prefetch-patterns): first and contiguous in each layer's blob, and the prefetch table
    prefetch_patterns: list[bytes] = field(default_factory=list)
    # caps on how far one layer may expand (decompression bombs); None: no caps
    expansion_limits: ExpansionLimits | None = field(default_factory=ExpansionLimits)
    oci: bool = False  # nydusify's --oci: OCI media types even for a Docker source
    all_platforms: bool = False  # every platform of a source index -> an index of Nydus manifests
    build_cache: str | None = None  # nydusify's --build-cache REF (a tag)
    build_cache_insecure: bool = False
    build_cache_version: str = DEFAULT_VERSION
    build_cache_max_records: int = MAX_RECORDS
    chunk_dict: str | None = None  # --chunk-dict: bootstrap:registry:REF | bootstrap:local:PATH | REF
    chunk_dict_insecure: bool = False
    push_retry: PushRetry = field(default_factory=PushRetry)  # --push-retry-count/--push-retry-delay
    with_referrer: bool = False  # nydusify's --with-referrer: the manifest's `subject` is the source's
    fs_align_chunk: bool = False  # nydusify's --fs-align-chunk: 4 KiB-aligned chunks (v6 always is)
    source_archive: str | None = None  # --source-archive: the source image from an OCI layout tar
    # each layer's blob uploaded while it is written (one PATCH following the file, or PATCHes of
    # `stream_piece` bytes, see `stream_push`); False: one PUT once it is complete
    stream_push: bool = True
    stream_piece: int = PATCH_PIECE
    target_archive: str | None = None  # --target-archive: the Nydus image into an OCI layout tar


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
    platforms: list["ConvertResult"] = field(default_factory=list)  # per platform, for several
    layers_built: int = 0  # layers pulled and converted here
    layers_cached: int = 0  # layers taken from the build cache
    mounted: list[str] = field(default_factory=list)  # digests mounted from another repository
    copied: list[str] = field(default_factory=list)  # digests copied from another repository
    dict_blobs: list[str] = field(default_factory=list)  # chunk-dictionary blobs the image references
    build_cache: dict[str, Any] = field(default_factory=dict)  # CacheStats, with a cache
    push_retries: int = 0  # uploads tried again after a 502-504 or a connection failure
    stream_push: dict[str, int] = field(default_factory=dict)  # StreamStats: blobs pushed while written

    @property
    def dedup_ratio(self) -> float:
        """Share of chunk references that did not need storing again."""
        return self.deduplicated / self.chunks if self.chunks else 0.0


@dataclass
class _Fetched:
    path: str  # the compressed layer (removed after unpacking unless the original is copied too)
    tar_path: str  # "" when the tar went to the build in memory
    tar_size: int
    kind: str  # gzip | zstd | tar
    diff_id: str  # sha256 hex of the tar ("" when not hashed: `_checks_diff_ids`)


class _InflateSink:
    """`stream_blob`'s sink for a layer: the pieces are inflated (`layer.Inflater`) off the event
    loop, in order, while the loop reads the next ones; the loop never hashes or decompresses.

    When the tar goes to its build in memory (a `TarPipe`), the build's thread inflates the
    pieces itself as it reads (`pull`, the pipe's `source`): the loop queues a piece and tells the
    pipe (`arrived`), which wakes the reader only if it is waiting for bytes. A thread between
    them cost a wake-up each way per piece (loop to inflater, inflater to build, and the build
    waking the inflater when the pipe had room), each a futex call and a GIL hand-off; under
    CFS each preemption of a thread holding the GIL stalled the others (about 5,600 preemptions
    per conversion of the benchmark's image). Once the build lets the pipe go (`reader_gone`:
    done or failed), the rest is inflated in `pool`, as for a tar file.

    With a tar file, the pieces go through a queue of at most `ahead` bytes (one 256 KiB piece
    beside the one being inflated, as the old sink held: 512 KiB was ~20 ms faster in a 0.73 s
    rebuild but peaked ~6 MiB higher in a first conversion, median of 5): the loop waits only when
    the queue is full, and one pool job inflates every piece queued while it runs. (A round trip
    per piece, the loop waiting for each piece's inflate before handing over the next, cost a
    thread wake-up each way per 256 KiB: the worker waited for the loop and the loop for the
    worker, and under GIL contention each wake-up waited for a switch interval.) A piped tar's
    queue holds up to `PULL_AHEAD` (the pipe itself then holds little: what one pull inflates)."""

    PULL_AHEAD = 1 << 20

    def __init__(self, pool: ThreadPoolExecutor, tar_path: str, keep_path: str | None, size: int,
                 limits: ExpansionLimits | None, growth: Growth | None = None, ahead: int | None = None,
                 diff_id: bool = True) -> None:
        self.pool = pool
        self.size = size
        self.limits = limits
        self.growth = growth
        self.diff_id = diff_id  # hash the tar (`Inflater`'s diff_id)
        self.tar: _GrowingFile | _PipeWriter
        self._pipe: TarPipe | None = None
        if isinstance(growth, TarPipe):  # the build reads the tar from memory: no file
            self.tar = _PipeWriter(growth)
            self._pipe = growth
        else:  # unbuffered, so that what `growth` announces is in the file for a reader that follows it
            self.tar = _GrowingFile(open(tar_path, "wb", buffering=0), growth)  # noqa: SIM115 (closed in close)
        self.ahead = ahead if ahead is not None else self.PULL_AHEAD if self._pipe is not None else 256 << 10
        self.keep = open(keep_path, "wb") if keep_path else None  # noqa: SIM115
        self.inflater: Inflater | None = None
        self._lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in the queue or being fed
        self._running = False  # a thread is feeding the inflater (a pool job, or the reader's pull)
        self._pulling = self._pipe is not None  # the pipe's reader inflates (no pool job)
        self._steps: Iterator[None] | None = None  # the piece a pull is inflating (`Inflater.steps`)
        self._steps_size = 0  # its size (in `_queued` until it is done)
        self._idle_wanted = False  # the loop waits for no thread to be feeding (`_drop_queued`)
        self._error: BaseException | None = None  # what a feed raised (the rest of the queue dropped)
        self._waiter: asyncio.Future[None] | None = None  # the loop waiting for room or for the end
        self._loop: asyncio.AbstractEventLoop | None = None
        self.jobs = 0  # pool jobs started (one per run of pieces, not one per piece)
        if self._pipe is not None:
            self._pipe.attach(self)

    async def restart(self) -> None:
        await self._drop_queued()  # (what the failed attempt left queued is of no use)
        if self.growth is not None:  # (first: a build reading a cut-short tar then knows why)
            self.growth.restart()
        for f in (self.tar, self.keep):
            if f is not None:
                f.seek(0)
                f.truncate()
        self.inflater = Inflater(self.tar, self.limits, self.size, self.keep,  # type: ignore[arg-type]
                                 diff_id=self.diff_id)

    async def write(self, data: bytes) -> None:
        """Queue the next piece; wait only while more than `ahead` bytes are queued."""
        assert self.inflater is not None
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self._raise_locked()
            self._queue.append(data)
            self._queued += len(data)
            start = not self._running and not self._pulling
            if start:
                self._running = True
        if start:
            self.jobs += 1
            self.pool.submit(self._drain)
        elif self._pipe is not None:
            self._pipe.arrived()
        while True:
            with self._lock:
                self._raise_locked()
                if self._queued <= self.ahead:
                    return
                waiter = self._waiter = self._loop.create_future()
            await waiter

    async def settle(self) -> None:
        """Wait until every piece queued is inflated (the error of one that failed is raised)."""
        while True:
            with self._lock:
                if not self._running and ((not self._queue and self._steps is None) or self._error is not None):
                    self._raise_locked()
                    return
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    async def _drop_queued(self) -> None:
        """Drop the pieces not started (and a piece a pull left half done), once no thread feeds."""
        while True:
            with self._lock:
                self._queued -= sum(len(p) for p in self._queue)
                self._queue.clear()
                if not self._running:
                    if self._steps is not None:
                        self._steps = None
                        self._queued -= self._steps_size
                    self._idle_wanted = False
                    self._raise_locked()
                    return
                self._idle_wanted = True  # (a pull wakes the loop after its step, not only after a piece)
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    def pull(self) -> bool:
        """`PipeSource.pull`, on the build's thread: one step of inflating into the pipe (at
        most 256 KiB of gzip output: `Inflater.steps`), from the piece being inflated or the next
        one queued."""
        with self._lock:
            if self._running or self._error is not None:
                return False
            steps = self._steps
            if steps is None:
                if not self._queue:
                    return False
                data = self._queue.popleft()
                assert self.inflater is not None
                steps = self._steps = self.inflater.steps(data)
                self._steps_size = len(data)
            self._running = True
        try:
            more = next(steps, _DONE) is not _DONE
        except BaseException as e:  # (a write error: the loop raises it, the download stops)
            with self._lock:
                self._fail_locked(e)
                self._running = False
                self._wake_locked()
            return False
        with self._lock:
            self._running = False
            if not more:
                self._steps = None
                self._queued -= self._steps_size
            # room again (or all inflated: a settle goes on), or a restart/close waits for no feeder
            if (not more and self._queued <= self.ahead // 2) or self._idle_wanted:
                self._wake_locked()
        return True

    def reader_gone(self) -> None:
        """`PipeSource.reader_gone`: the pieces still queued and to come are inflated in the pool."""
        with self._lock:
            self._pulling = False
            start = (bool(self._queue) or self._steps is not None) and not self._running and self._error is None
            if start:
                self._running = True
        if start:
            self.jobs += 1
            self.pool.submit(self._drain)

    def _raise_locked(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """Pool job: feed the queued pieces in order until the queue is empty (first the rest of
        a piece a reader that went away was inflating)."""
        assert self.inflater is not None
        while True:
            with self._lock:
                if self._error is not None or (self._steps is None and not self._queue):
                    self._running = False
                    self._wake_locked()
                    return
                if self._steps is None:
                    data = self._queue.popleft()
                    self._steps, self._steps_size = self.inflater.steps(data), len(data)
                steps = self._steps
            try:
                for _ in steps:
                    pass
            except BaseException as e:  # (a write error of the tar file: the download stops with it)
                with self._lock:
                    self._fail_locked(e)
                continue
            with self._lock:
                self._steps = None
                self._queued -= self._steps_size
                if self._queued <= self.ahead // 2:  # room again: the loop goes on reading
                    self._wake_locked()

    def _fail_locked(self, e: BaseException) -> None:
        """(lock held) A feed failed: keep its error for the loop, drop what is queued."""
        self._error = e
        self._queue.clear()
        self._queued = 0
        self._steps = None

    def _wake_locked(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    def finish(self) -> tuple[str, int, str]:
        """The tar's (diff_id, size, kind) once settled; the FormatError of bad data."""
        assert self.inflater is not None and not self._running
        return self.inflater.finish()

    def layer_hex(self) -> str:
        assert self.inflater is not None
        return self.inflater.layer_hash.hexdigest()

    async def close(self) -> None:
        """Wait for the worker (also after an error or a cancel: it must not write to a closed
        file; the pieces it has not started are dropped), then close the files."""
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._drop_queued())
        self.tar.close()
        if self.keep is not None:
            self.keep.close()


_DONE = object()  # (`next`'s default: a piece's steps are over)


def _resolve(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _nothing() -> None:
    """No build cache to load."""


class _PipeWriter:
    """The layer tar handed to the build in memory (`TarPipe`): what the inflater writes is fed
    to it (waiting while the build is far behind)."""

    def __init__(self, pipe: TarPipe) -> None:
        self.pipe = pipe

    def write(self, data: "bytes | bytearray | memoryview") -> int:
        self.pipe.feed(data if isinstance(data, bytes) else bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def seek(self, pos: int) -> int:
        return pos  # (a restart: the pipe dropped what it held)

    def truncate(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _GrowingFile:
    """The layer tar being written: each write is announced to `growth` (a build following it)."""

    def __init__(self, raw: Any, growth: Growth | None) -> None:
        self.raw = raw
        self.growth = growth
        self.pos = 0

    def write(self, data: "bytes | bytearray | memoryview") -> int:
        view = memoryview(data)
        while view:
            n = self.raw.write(view)
            view = view[n:]
        self.pos += len(data)
        if self.growth is not None:
            self.growth.grew(self.pos)
        return len(data)

    def flush(self) -> None:
        pass

    def seek(self, pos: int) -> int:
        self.pos = self.raw.seek(pos)
        return self.pos

    def truncate(self) -> int:
        return int(self.raw.truncate())

    def close(self) -> None:
        self.raw.close()


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


async def _manifest_source(client: RegistryClient, ref: ImageRef, body: bytes, doc: oci.Manifest,
                           mdesc: dict[str, Any], want: oci.Platform | None, from_index: bool) -> _Source:
    """The config and diff_ids of one source manifest (`want`: the platform asked for, if any)."""
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
    if want is not None and not from_index and have is not None and not oci.platform_matches(want, have):
        raise ConvertError(f"source image {ref} is for {have}, not {want}")
    diff_ids = oci.check_source(doc, config)
    return _Source(doc, body, mdesc, config, cbytes, diff_ids, have or want or oci.host_platform())


async def _index_entry(client: RegistryClient, ref: ImageRef, desc: oci.Descriptor,
                       want: oci.Platform | None) -> _Source:
    got = await client.fetch_manifest(desc.digest, oci.MANIFEST_TYPES)
    if got is None:
        raise ConvertError(f"source image {ref}: the index names manifest {desc.digest}, which is missing")
    body = got[0]
    if _sha(body) != desc.digest or len(body) != desc.size:
        raise ConvertError(f"source image {ref}: manifest {desc.short} does not match its index entry")
    sub = oci.parse_document(body, got[1], f"manifest {desc.short}")
    if not isinstance(sub, oci.Manifest):
        raise FormatError(f"manifest {desc.short}: an index inside an index is not supported")
    mdesc = {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
    src = await _manifest_source(client, ref, body, sub, mdesc, want, True)
    entry = oci.platform_of(desc.platform)
    if entry is not None:
        src.platform = entry
    return src


def _all_entries(index: oci.Index) -> list[oci.Descriptor]:
    """Every image of an index worth converting: manifests with a real platform, not Nydus ones
    (attestation manifests say `unknown/unknown`)."""
    out = []
    for d in index.manifests:
        plat = oci.platform_of(d.platform)
        if d.media_type in oci.MANIFEST_TYPES and not oci.is_nydus_entry(d) and (plat is None or plat.os != "unknown"):
            out.append(d)
    if not out:
        raise ConvertError("the source index lists no image manifest to convert")
    return out


async def resolve_sources(client: RegistryClient, ref: ImageRef, platforms: list[oci.Platform] | None,
                          all_platforms: bool = False) -> tuple[list[_Source], str | None]:
    """The images to convert and, when they came from an index, its media type.

    `platforms` None means this machine's; `all_platforms` takes every image of an index (a plain
    manifest is then converted as it is, whatever its platform)."""
    got = await client.fetch_manifest(ref.reference, oci.ACCEPT)
    if got is None:
        raise ConvertError(f"source image {ref} not found")
    body, ctype, _ = got
    if ref.digest and _sha(body) != ref.digest:
        raise ConvertError(f"source image {ref}: the manifest the registry sent hashes to {_sha(body)}")
    doc = oci.parse_document(body, ctype, "source manifest")
    if isinstance(doc, oci.Index):
        if all_platforms:
            return [await _index_entry(client, ref, d, None) for d in _all_entries(doc)], doc.media_type
        wants = platforms or [oci.host_platform()]
        descs = [oci.select_manifest(doc, w) for w in wants]
        return [await _index_entry(client, ref, d, w) for d, w in zip(descs, wants, strict=True)], doc.media_type
    if platforms and len(platforms) > 1:
        raise ConvertError(f"source image {ref} is one manifest, not an index: it has one platform, "
                           f"not {len(platforms)}")
    mdesc = {"mediaType": doc.media_type, "digest": _sha(body), "size": len(body)}
    want = None if all_platforms or not platforms else platforms[0]
    src = await _manifest_source(client, ref, body, doc, mdesc, want, False)
    return [src], None


async def resolve_source(client: RegistryClient, ref: ImageRef, platform: str | None) -> _Source:
    """The manifest, config and platform of the one image to convert."""
    sources, _ = await resolve_sources(client, ref, [oci.parse_platform(platform)] if platform else None)
    return sources[0]


def parse_platforms(text: str | None) -> list[oci.Platform] | None:
    """nydusify's `--platform linux/amd64,linux/arm64`; None when not given."""
    if not text:
        return None
    out = [oci.parse_platform(p) for p in text.split(",") if p.strip()]
    if not out:
        raise ConvertError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT][,...]")
    return out


def build_options(opts: ConvertOptions) -> BuildOptions:
    try:
        comp = Compressor.from_name(opts.compressor)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    bo = BuildOptions(fs_version=opts.fs_version, compressor=comp, chunk_size=opts.chunk_size,
                      prefetch_paths=list(opts.prefetch_patterns), aligned_chunk=opts.fs_align_chunk)
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
        if opts.all_platforms and opts.platform:
            raise ConvertError("--all-platforms conflicts with --platform")
        self.platforms = parse_platforms(opts.platform)
        self.build_opts = build_options(opts)
        self.src_ep = Endpoint("source", self.src_ref, opts.source_insecure, opts.plain_http, opts.source_auth)
        self.dst_ep = Endpoint("target", self.dst_ref, opts.target_insecure, opts.plain_http, opts.target_auth)
        self.src_cfg = endpoint_config(self.src_ep, opts.docker_config_paths)
        self.dst_cfg = endpoint_config(self.dst_ep, opts.docker_config_paths)
        self.copy_original = opts.merge_platform and (self.src_ref.host, self.src_ref.repository) != (
            self.dst_ref.host, self.dst_ref.repository)
        self.cache_ep: Endpoint | None = None
        self.cache = BuildCache(opts.build_cache_version, opts.build_cache_max_records, opts.fs_version) \
            if opts.build_cache else None
        self.cache_stats = CacheStats()
        self.build_restarts = 0  # builds that followed a download which then restarted
        # the target repository had images before this run (the tag, or any: their blobs may be
        # those of layers converted here; unknown counts as yes)
        self.target_has_images = False
        self.stream_target = Target()  # refused: the target refused a PATCH upload, blobs go up whole
        self.stream_skip_logged = False
        self.stream_stats = StreamStats()
        self.cache_used: list[Record] = []  # records this run hit or made, in layer order
        # the build cache's blobs and config, pushed beside the last image's own pushes (its
        # manifest goes after the image's): the export to push with the cache manifest
        self.cache_push: asyncio.Task[tuple[bytes, str]] | None = None
        self.cache_new: dict[str, str] = {}  # digest -> local file of what new records need pushed
        # records made in this run: (record, its layer bootstrap, its blob file), for later platforms
        self.cache_made: dict[tuple[str, str], tuple[Record, str, str | None]] = {}
        if opts.build_cache:
            cref = parse_reference(opts.build_cache)
            if cref.digest:
                raise ConvertError(f"build cache {opts.build_cache} must name a tag, not a digest")
            if same_repo(cref, self.dst_ref) and cref.reference == self.dst_ref.reference:
                raise ConvertError(f"build cache {cref} is the target itself; give it another tag")
            # on the target's registry, the cache goes the way the target does
            same = cref.host == self.dst_ref.host
            self.cache_ep = Endpoint("build-cache", cref, opts.build_cache_insecure or (same and opts.target_insecure),
                                     opts.plain_http, opts.target_auth if same else None)
        self.dict_ep: Endpoint | None = None
        self.chunk_dict: ChunkDict | None = None
        if opts.chunk_dict:
            kind, where = parse_chunk_dict(opts.chunk_dict)
            if kind == "registry":
                dref = parse_reference(where)
                same = dref.host == self.dst_ref.host
                self.dict_ep = Endpoint("chunk-dict", dref, opts.chunk_dict_insecure or (same and opts.target_insecure),
                                        opts.plain_http, opts.target_auth if same else None)

    async def run(self) -> ConvertResult:
        t0 = time.monotonic()
        if self.opts.work_dir:
            os.makedirs(self.opts.work_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="nydusify-", dir=self.opts.work_dir)
        src: Any = (LayoutArchiveSource(self.opts.source_archive, self.src_ref, work) if self.opts.source_archive
                    else RegistryClient(self.src_cfg))
        dst: Any = (LayoutArchiveTarget(self.opts.target_archive, self.dst_ref, work) if self.opts.target_archive
                    else RegistryClient(self.dst_cfg))
        retries = RetryStats()
        retry_pushes(dst, self.opts.push_retry, retries)
        extra = {ep.side: RegistryClient(endpoint_config(ep, self.opts.docker_config_paths))
                 for ep in (self.cache_ep, self.dict_ep) if ep is not None}
        for c in extra.values():
            retry_pushes(c, self.opts.push_retry, retries)
        # layers are prepared (parsed, chunked, compressed) a few at once; the extra thread commits
        # them in order (and writes the bootstrap), never waiting behind a prepare
        builder = ThreadPoolExecutor(self._build_jobs() + 1, thread_name_prefix="nydusify-build")
        # inflating + hashing + writing the tars of the layers being downloaded: one per core
        unpacker = ThreadPoolExecutor(self._build_jobs(), thread_name_prefix="nydusify-unpack")
        try:
            await src.start()
            await dst.start()
            for c in extra.values():
                await c.start()
            self.cache_client = extra.get("build-cache")
            if self.opts.chunk_dict:
                self.chunk_dict = await load_chunk_dict(self.opts.chunk_dict, extra.get("chunk-dict"), self.dict_ep,
                                                        work)
            if self.cache is not None and self.cache_client is not None and self.cache_ep is not None:
                cache_load = load_cache(self.cache_client, self.cache_ep, self.cache, self.cache_stats)
            else:
                cache_load = _nothing()
            try:
                result = await self._convert(src, dst, work, builder, unpacker, cache_load)
            except BaseException:
                if self.cache_push is not None:
                    await _cancel_all([self.cache_push])
                raise
            if self.cache is not None:
                await self._push_cache(dst)
                result.build_cache = dataclasses.asdict(self.cache_stats)
            if isinstance(dst, LayoutArchiveTarget):
                await asyncio.to_thread(dst.finish)
            result.seconds = time.monotonic() - t0
            result.push_retries = retries.retried
            result.stream_push = dataclasses.asdict(self.stream_stats)
            return result
        finally:
            unpacker.shutdown(wait=True, cancel_futures=True)
            builder.shutdown(wait=True, cancel_futures=True)
            await src.close()
            await dst.close()
            for c in extra.values():
                await c.close()
            shutil.rmtree(work, ignore_errors=True)

    async def _convert(self, src: RegistryClient, dst: RegistryClient, work: str,
                       builder: ThreadPoolExecutor, unpacker: ThreadPoolExecutor,
                       cache_load: Awaitable[None]) -> ConvertResult:
        async def resolve() -> tuple[list[_Source], str | None]:
            try:
                return await resolve_sources(src, self.src_ref, self.platforms, self.opts.all_platforms)
            except OSError as e:
                raise transport_error(self.src_ep, e) from None

        async def probe() -> None:
            # one request to the target before any concurrent ones to it: it fails fast when the target
            # is unreachable, and settles its scheme (HTTP fallback) and auth while nothing else is in flight
            try:
                self.target_has_images = await dst.fetch_manifest(self.dst_ref.reference) is not None
            except OSError as e:
                raise transport_error(self.dst_ep, e) from None
            if not self.target_has_images and self.opts.stream_push and isinstance(dst, RegistryClient):
                try:  # (only streamed pushes ask)
                    self.target_has_images = await dst.has_tags()
                except OSError as e:
                    log.info("target %s: listing its tags failed (%s); taken as a repository with images",
                             self.dst_ref, e)
                    self.target_has_images = True

        # the build cache's records, the source image and the target probe at once (each its own
        # client): three round trips in the time of one, before any layer can start; a failure
        # is raised in that order whatever finished first
        got = await asyncio.gather(cache_load, resolve(), probe(), return_exceptions=True)
        for r in got:
            if isinstance(r, BaseException):
                raise r
        sources, index_type = cast(tuple[list[_Source], str | None], got[1])
        if index_type is None or (len(sources) == 1 and not self.opts.all_platforms):
            result, _ = await self._convert_one(sources[0], src, dst, work, builder, unpacker, tagged=True, last=True)
            self.progress.close()
            return result
        # several images: each Nydus manifest by digest, then one index under the tag
        results: list[ConvertResult] = []
        entries: list[dict[str, Any]] = []
        for n, source in enumerate(sources):
            sub = os.path.join(work, f"platform-{n}")
            os.makedirs(sub)
            res, nydus_desc = await self._convert_one(source, src, dst, sub, builder, unpacker, tagged=False,
                                                      last=n == len(sources) - 1)
            results.append(res)
            if self.opts.merge_platform:
                entries += oci.merged_index(source.manifest_desc, nydus_desc, source.platform)["manifests"]
            else:
                entries.append({**nydus_desc, "platform": oci.platform_dict(source.platform)})
        docker = index_type == oci.DOCKER_LIST and not self.opts.oci and not self.opts.merge_platform
        index_type = oci.DOCKER_LIST if docker else oci.OCI_INDEX
        index_bytes = oci.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
        try:
            digest = await dst.push_manifest(self.dst_ref.reference, index_bytes, index_type)
        except OSError as e:
            raise transport_error(self.dst_ep, e, "pushing the index") from None
        self.progress.close()
        return combine(results, digest)

    async def _convert_one(self, source: _Source, src: RegistryClient, dst: RegistryClient, work: str,
                           builder: ThreadPoolExecutor, unpacker: ThreadPoolExecutor,
                           tagged: bool, last: bool) -> tuple[ConvertResult, dict[str, Any]]:
        """Convert one source image and push it; its manifest goes under the target tag when
        `tagged` (or, with merge_platform, an index of the original and it), else by digest only.
        With a build cache, the `last` image of the run starts the cache's pushes (all but its
        manifest) beside its own (`self.cache_push`).
        Returns the result and the Nydus manifest's descriptor."""
        ui = self.progress
        layers = source.manifest.layers
        ui.log(f"source {self.src_ref} ({source.platform}): {len(layers)} layers, "
               f"{human(sum(d.size for d in layers))} compressed")
        blob_dir = os.path.join(work, "blobs")
        dl_dir = os.path.join(work, "layers")
        os.makedirs(blob_dir)
        os.makedirs(dl_dir)
        cpus = os.cpu_count() or 1
        # blobs are uploaded and deleted, not kept: no fsync (durable=False)
        stack = LayerStack(self.build_opts, blob_dir, workers=max(1, cpus // self._build_jobs()), durable=False)
        loop = asyncio.get_running_loop()
        remote: dict[str, RemoteBlob] = {}  # blob hex -> where a blob not built here is
        dict_ids: set[str] = set()
        if self.chunk_dict is not None:  # its chunks are in the dedup map before any prepare starts
            dict_ids = await loop.run_in_executor(builder, self._add_dict, stack)
            remote.update(self.chunk_dict.blobs)
        chains = chain_ids(source.diff_ids)
        params = build_params(self.build_opts, self.chunk_dict.digest if self.chunk_dict else None)
        candidates = {i: r for i, c in enumerate(chains) if (r := self._cache_lookup(c, params))}
        bars = [ui.bar(f"layer {i + 1}/{len(layers)} {d.short}") for i, d in enumerate(layers)]
        sem = asyncio.Semaphore(max(1, self.opts.jobs))
        push_sem = asyncio.Semaphore(max(1, self.opts.jobs))
        # pull + unpack (a few layers at a time) run ahead of the build, which goes in layer
        # order; each layer's blob is pushed as soon as it is built, while later layers build
        downloads: dict[str, asyncio.Task[_Fetched]] = {}

        growths: dict[str, Growth] = {}  # how far each download's tar has got (its build follows it)

        def download(i: int, d: oci.Descriptor) -> asyncio.Task[_Fetched]:
            """The download of layer `i`. When the original layers are pushed too, shared by the
            layers of that digest (its tar in a file that their builds follow); else the layer's own,
            started by its build, its tar piped to that build in memory (`TarPipe`)."""
            key = _download_key(i, d, self.copy_original)
            piped = not self.copy_original
            if key not in downloads:
                growth = growths[key] = TarPipe() if piped else Growth()
                if not piped:
                    open(os.path.join(dl_dir, d.hex) + ".tar", "wb").close()  # there for a build to follow
                task = asyncio.create_task(self._fetch(src, i, d, dl_dir, bars[i], sem, unpacker, growth))
                # however the download ends (also cancelled before it ran), a build following it stops waiting
                task.add_done_callback(functools.partial(_end_growth, growth))
                downloads[key] = task
            return downloads[key]

        # the original layers are pushed too: downloaded at once, kept (and their tars in files);
        # else each layer downloads once its build starts, the tar going to it in memory
        for i, d in enumerate(layers):
            if self.copy_original:
                download(i, d)
        results: list[LayerResult] = []
        pushes: dict[str, tuple[asyncio.Task[bool], int]] = {}  # digest -> (sent? , size)
        tar_bytes = 0
        boot_path = os.path.join(work, "image.boot")
        bl_path = os.path.join(work, "bootstrap-layer.tar.gz")
        uses: dict[str, int] = {}  # layers still to prepare from each download (its tar goes after the last)
        slots = asyncio.Semaphore(self._build_jobs())
        # set when a layer got its prepare slot, or, for a layer the build cache serves, once it
        # joined the stack (not prepared)
        started = [asyncio.Event() for _ in layers]
        preps: dict[int, asyncio.Task[tuple[_Fetched, PreparedLayer]]] = {}
        # each layer's blob pushed while it is written: the stream of its latest build attempt,
        # and every stream task (an attempt that restarted drops its stream, which ends itself)
        streams: dict[int, tuple[BlobStream, asyncio.Task[bool | None]]] = {}
        stream_tasks: list[asyncio.Task[bool | None]] = []
        taken: set[asyncio.Task[bool | None]] = set()  # the streams a push took over

        def new_stream(i: int, d: oci.Descriptor) -> BlobStream | None:
            if not self._stream_pushes(dst):
                return None
            stream = BlobStream(loop, f"layer {i + 1} ({d.short}) blob", self.opts.stream_piece,
                                target=self.stream_target)
            task = asyncio.create_task(stream.run(dst))
            streams[i] = (stream, task)
            stream_tasks.append(task)
            return stream

        def checked(i: int, d: oci.Descriptor, got: _Fetched) -> _Fetched:
            if self._checks_diff_ids() and f"sha256:{got.diff_id}" != source.diff_ids[i]:
                raise FormatError(f"layer {i + 1} ({d.short}): the uncompressed {got.kind} does not match the "
                                  f"config's diff_id {source.diff_ids[i][:19]} (it hashes to "
                                  f"sha256:{got.diff_id[:12]})")
            return got

        async def prepare(i: int, d: oci.Descriptor) -> tuple[_Fetched, PreparedLayer]:
            tar_path = os.path.join(dl_dir, d.hex) + ".tar"
            # slots go in layer order: a lower layer prepared first is committed first, and the
            # layers above then find its chunks while preparing. Layers the build cache may serve
            # above a layer built here are not waited for (one that turns out unusable is
            # prepared after it then). When every layer below may come from the cache (a
            # rebuild whose base is cached), they join the stack first: joined while this layer
            # downloads and builds, their Python work held the GIL against the whole pipeline
            # (download, inflate, parse: ~100 ms more for a 100 MiB layer above 4 cached ones),
            # and a chunk they share stored here before they joined dropped its streamed push
            below = [j for j in range(i) if j not in candidates]
            if below:
                await started[below[-1]].wait()
            elif i > 0:
                await started[i - 1].wait()
            async with slots:
                started[i].set()
                task = download(i, d)  # (piped: starts now)
                growth = growths[_download_key(i, d, self.copy_original)]
                piped = isinstance(growth, TarPipe)
                while True:
                    follow = piped or not task.done()  # build while it downloads, from the tar as it grows
                    if not follow:
                        checked(i, d, task.result())
                    try:
                        prepared = await loop.run_in_executor(builder, self._prepare_layer, stack, i, d,
                                                              None if piped else tar_path,
                                                              growth if follow else None, bars[i], new_stream(i, d))
                    except Restarted:  # the download started again: so does the build
                        self.build_restarts += 1
                        log.info("layer %d (%s): its download restarted, and so does its build", i + 1, d.short)
                        continue
                    except BaseException:
                        if isinstance(growth, TarPipe):  # nobody reads it now: the download goes on to its end
                            growth.release()
                        if follow:  # a download that failed (or bad bytes) explains bad data best
                            checked(i, d, await task)
                        raise
                    break
            got = checked(i, d, await task)
            if not piped:
                uses[d.digest] -= 1
                if not uses[d.digest]:
                    os.unlink(got.tar_path)
            return got, prepared

        def start_prepare(i: int, d: oci.Descriptor) -> None:
            task = downloads.get(d.digest)
            if not uses.get(d.digest) and task is not None and task.done() and not task.cancelled() \
                    and task.exception() is None and not os.path.exists(task.result().tar_path):
                del downloads[d.digest]  # the layers that used it are prepared and let go of its tar: pull again
            if self.copy_original:  # (a piped download is its layer's own: not counted)
                uses[d.digest] = uses.get(d.digest, 0) + 1
            preps[i] = asyncio.create_task(prepare(i, d))

        hits: dict[int, Hit] = {}
        # the build cache records of this image in layer order: hits, and the records of the layers
        # built here, each written on a builder thread off the commit path (it only reads its layer's
        # tree). One with a layer built above it is written at once (beside that build); the others
        # wait until the merged bootstrap is written: both are Python work that holds the GIL, side
        # by side they only take turns (and starve the event loop), while after it the record runs
        # beside the bootstrap layer's gzip and the pushes, which mostly wait
        used: list[Record | asyncio.Future[Record] | functools.partial[Record]] = []
        records: asyncio.Task[None] | None = None  # all of them made (self.cache_used extended)
        try:
            for i, d in enumerate(layers):  # prepared while the records are fetched (above cached ones: once they joined)
                if i not in candidates:
                    start_prepare(i, d)
            hits = await self._cache_hits(candidates, work, blob_dir)
            for i, d in enumerate(layers):
                if i in candidates and i not in hits:  # a record that was not usable: the layer is converted
                    start_prepare(i, d)
            for i, d in enumerate(layers):
                if results:  # the layers below join the image tree now, not all at the end
                    await loop.run_in_executor(builder, stack.merge_committed)
                hit = hits.get(i)
                if hit is not None:  # joins the stack where its commit would be
                    try:
                        res = await loop.run_in_executor(builder, self._cached_layer, stack, i, hit, bars[i])
                    except CacheMismatch as e:
                        self.cache_stats.unusable += 1
                        ui.log(f"layer {i + 1} ({d.short}): build cache record not usable ({e}); converting it")
                        start_prepare(i, d)
                    else:
                        started[i].set()
                        self.cache_stats.hits += 1
                        used.append(hit.record)
                        if hit.blob is not None:
                            remote[hit.blob.hex] = hit.blob
                        results.append(res)
                        continue
                got, prepared = await preps[i]
                res = await loop.run_in_executor(builder, self._commit_layer, stack, i, d, got, prepared, bars[i])
                results.append(res)
                tar_bytes += got.tar_size
                if res.blob is not None and res.blob_path is not None:  # (before the cache record: the
                    bid = res.blob.blob_id  # last blob's push is what a conversion ends waiting for)
                    digest, label = f"sha256:{bid}", f"blob {bid[:12]}"
                    streamed = streams.pop(i, None)
                    if streamed is not None and not prepared.streamed:  # (its stream ended: closed(None))
                        self.stream_stats.whole += 1
                        streamed = None
                    if streamed is not None:
                        taken.add(streamed[1])
                    push = (self._push_streamed(dst, *streamed, digest, res.blob_path, label, push_sem)
                            if streamed is not None else self._push_file(dst, digest, res.blob_path, label, push_sem))
                    pushes[digest] = (asyncio.create_task(push), os.path.getsize(res.blob_path))
                if self.cache is not None:  # the record of the layer just committed (the stack's top)
                    self.cache_stats.misses += 1
                    make = functools.partial(self._cache_record, stack, stack.top(), chains[i], params, res,
                                             dict_ids, work, i)
                    built_above = any(j not in hits for j in range(i + 1, len(layers)))
                    used.append(loop.run_in_executor(builder, make) if built_above else make)
                _raise_failed(t for t, _ in pushes.values())
                _raise_failed(r for r in used if isinstance(r, asyncio.Future))
            merged = await loop.run_in_executor(builder, stack.finish, boot_path)
            used = [loop.run_in_executor(builder, r) if isinstance(r, functools.partial) else r for r in used]
            if self.cache is not None:
                records = asyncio.create_task(self._collect_records(used))
            bl_hex, bl_size, bl_diff = await loop.run_in_executor(builder, _bootstrap_layer, boot_path, bl_path)
            for bid in merged.blob_ids:  # a local chunk dictionary's blobs: in the target already, or an error
                if bid in dict_ids and bid not in remote and not os.path.exists(os.path.join(blob_dir, bid)):
                    remote[bid] = await self._dict_blob_in_target(dst, bid)
        except BaseException:  # the layer blobs being pushed stop too
            await _cancel_all([*preps.values(), *downloads.values(), *(t for t, _ in pushes.values()), *stream_tasks,
                               *(r for r in used if isinstance(r, asyncio.Future)), *([records] if records else [])])
            raise
        try:
            # streams no push took over: layers that stored nothing (no file, no session) and build
            # attempts that restarted (their blob dropped: they end by themselves)
            await _cancel_all([t for t in stream_tasks if t not in taken])
            boot_size = os.path.getsize(boot_path)
            blob_files = [(bid, os.path.join(blob_dir, bid)) for bid in merged.blob_ids
                          if os.path.exists(os.path.join(blob_dir, bid))]
            elsewhere = [remote[bid] for bid in merged.blob_ids if (bid, os.path.join(blob_dir, bid)) not in blob_files]
            sizes = {**{bid: os.path.getsize(p) for bid, p in blob_files}, **{r.hex: r.size for r in elsewhere}}
            missing_here = [bid for bid in merged.blob_ids if bid not in sizes]
            if missing_here:  # a blob neither built nor known remotely: a bug, not bad input
                raise AssertionError(f"blobs {missing_here} of the image are nowhere")
            blob_layers = [oci.blob_layer(bid, sizes[bid]) for bid in merged.blob_ids]
            # nydusify keeps a Docker source's media types unless --oci (an index entry with
            # artifactType, as --merge-platform writes, needs OCI ones)
            docker = source.manifest.media_type == oci.DOCKER_MANIFEST and not self.opts.oci and not self.opts.merge_platform
            config = oci.nydus_config(source.config, [f"sha256:{bid}" for bid in merged.blob_ids], f"sha256:{bl_diff}")
            config_bytes = oci.dumps(config)
            config_desc = {"mediaType": oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG, "digest": _sha(config_bytes),
                           "size": len(config_bytes)}
            layer_descs = [*blob_layers, oci.bootstrap_layer(f"sha256:{bl_hex}", bl_size, f"sha256:{bl_diff}",
                                                             self.build_opts.fs_version, docker=docker)]
            manifest = oci.nydus_manifest(config_desc, layer_descs, merged=self.opts.merge_platform, docker=docker,
                                          subject=source.manifest_desc if self.opts.with_referrer else None)
            manifest_bytes = oci.dumps(manifest)
            ui.log(f"{len(blob_layers)} blobs ({human(sum(d['size'] for d in blob_layers))}, {len(blob_files)} built here) and a "
                   f"{human(boot_size)} bootstrap; pushing to {self.dst_ref}")

            result = ConvertResult(
                source=str(self.src_ref), target=str(self.dst_ref), platform=str(source.platform),
                manifest_digest=_sha(manifest_bytes), index_digest=None, layers=len(layers),
                source_bytes=sum(d.size for d in layers), tar_bytes=tar_bytes,
                file_bytes=sum(r.file_bytes for r in results), chunks=sum(r.chunks for r in results),
                deduplicated=sum(r.deduplicated for r in results), blob_bytes=sum(d["size"] for d in blob_layers),
                bootstrap_bytes=boot_size, bootstrap_layer_bytes=bl_size,
                layers_built=sum(not r.cached for r in results), layers_cached=sum(r.cached for r in results),
                dict_blobs=[bid for bid in merged.blob_ids if bid in dict_ids])

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
            if records is not None and last:  # (the cache's content, once the records are made)
                self.cache_push = asyncio.create_task(self._push_cache_content(dict(pushes), records))
            try:
                await self._push_rest(dst, pushes, files, small, push_sem, result, elsewhere, work)
                needed = [d for d, *_ in files] + [d for d, _ in small] + [r.digest for r in elsewhere]
                present: dict[str, bool] = {}

                async def check(digest: str) -> None:
                    present[digest] = await dst.blob_exists(digest)

                await gather_or_cancel(check(d) for d in needed)  # at once, not one after another
                missing = [d for d in needed if not present[d]]
            except OSError as e:
                raise transport_error(self.dst_ep, e, "pushing") from None
            if missing:
                raise ConvertError(f"the target does not have {len(missing)} blob(s) after the push "
                                   f"({', '.join(m[:19] for m in missing)}); no manifest was pushed")
            nydus_desc = {"mediaType": manifest["mediaType"], "digest": result.manifest_digest,
                          "size": len(manifest_bytes)}
            if records is not None:  # (a record that failed leaves no manifest)
                await records
            try:
                if self.opts.merge_platform:
                    if self.copy_original:
                        await dst.push_manifest(source.manifest_desc["digest"], source.manifest_bytes,
                                                source.manifest_desc["mediaType"])
                    await dst.push_manifest(result.manifest_digest, manifest_bytes, manifest["mediaType"])
                    if tagged:
                        index_bytes = oci.dumps(oci.merged_index(source.manifest_desc, nydus_desc, source.platform))
                        result.index_digest = await dst.push_manifest(self.dst_ref.reference, index_bytes, oci.OCI_INDEX)
                else:
                    await dst.push_manifest(self.dst_ref.reference if tagged else result.manifest_digest, manifest_bytes,
                                            manifest["mediaType"])
            except OSError as e:
                raise transport_error(self.dst_ep, e, "pushing the manifest") from None
            return result, nydus_desc
        except BaseException:
            if records is not None:  # (a record failed, or the pushes did: it stops too)
                await _cancel_all([records])
            raise

    async def _collect_records(self, used: list[Any]) -> None:
        """Wait for this image's build cache records (futures of those made here), then add them
        all to `cache_used` in layer order."""
        got = [await r if isinstance(r, asyncio.Future) else r for r in used]
        self.cache_used.extend(got)


    async def _fetch(self, src: RegistryClient, i: int, d: oci.Descriptor, dl_dir: str, bar: Bar,
                     sem: asyncio.Semaphore, unpacker: ThreadPoolExecutor, growth: Growth | None = None) -> "_Fetched":
        """Download layer `d` and decompress it to a tar file (or into the `TarPipe` `growth`)
        as it arrives (the pieces are inflated in `unpacker` while the next ones download), then
        check its size and digest.
        The compressed layer is kept on disk only when it is pushed too (`copy_original`)."""
        where = f"layer {i + 1} ({d.short})"
        path = os.path.join(dl_dir, d.hex)
        tar_path = "" if isinstance(growth, TarPipe) else path + ".tar"
        async with sem:
            bar.phase("pull", d.size)
            sink = _InflateSink(unpacker, tar_path, path if self.copy_original else None, d.size,
                                self.opts.expansion_limits, growth, diff_id=self._checks_diff_ids())
            try:
                try:
                    n, (dhex, tsize, kind) = await self._pull(src, d, where, sink, bar)
                finally:
                    await sink.close()
            except BaseException:
                if tar_path:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tar_path)  # free the disk now, not when the work dir goes
                raise
            bar.finish(f"pulled {human(n)}, unpacked {human(tsize)} of {kind}")
        return _Fetched(path, tar_path, tsize, kind, dhex)

    @staticmethod
    async def _pull(src: RegistryClient, d: oci.Descriptor, where: str, sink: "_InflateSink",
                    bar: Bar) -> tuple[int, tuple[str, int, str]]:
        """Stream layer `d` into `sink`; (bytes received, the tar's (diff_id, size, kind)) once its
        size and digest are checked (those errors first: bad bytes from a registry explain bad data)."""
        try:
            n = await src.stream_blob(d.digest, sink, limit=d.size, progress=bar.advance, piece=_PULL_PIECE)
            await sink.settle()
        except OSError as e:
            raise ConvertError(f"{where}: {e.strerror or e}") from None
        if n != d.size:
            more = "more than" if n > d.size else f"{n} bytes, not"
            raise ConvertError(f"{where}: the registry sent {more} the {d.size} bytes the manifest says")
        got_hex = sink.layer_hex()
        if got_hex != d.hex:
            raise ConvertError(f"{where}: content does not match its digest (it hashes to sha256:{got_hex})")
        try:
            return n, sink.finish()
        except FormatError as e:
            raise type(e)(f"{where}: {e}") from None

    def _checks_diff_ids(self) -> bool:
        """Whether each layer's tar is hashed and checked against the config's diff_id: only
        when build-cache records are written. They are keyed by the ChainID of those diff_ids,
        so a config that lies about a layer would file its blob under another image's layers.
        Otherwise nothing uses the source's diff_ids (the Nydus config lists the new blobs),
        and the layer's digest, which is checked, already fixes every byte of its tar; the
        hash would be a sha256 pass over the uncompressed bytes, about a tenth of the
        conversion's CPU. (nydusify does not check them either.)"""
        return self.cache is not None

    def _build_jobs(self) -> int:
        """Layers prepared at once: one per core (processes would not pay here: most of the work
        is zstd, blake3, sha256 and I/O, which run outside the GIL), at most `jobs`."""
        return max(1, min(self.opts.jobs, os.cpu_count() or 1))

    def _prepare_layer(self, stack: LayerStack, i: int, d: oci.Descriptor, tar_path: str | None, growth: Growth | None,
                       bar: Bar, watch: BlobStream | None = None) -> PreparedLayer:
        """Build layer `i` from its tar; with `growth`, while the tar is still being downloaded
        (the bar then shows the download); with no `tar_path`, from the `TarPipe` `growth`."""
        if tar_path is None:
            try:
                prepared = stack.prepare_layer(None, position=i, growth=growth, watch=watch)
            except FormatError as e:
                raise FormatError(f"layer {i + 1} ({d.short}): {e}") from None
            release_free_memory()
            return prepared
        with open(tar_path, "rb") as tar:
            if growth is None:
                bar.phase("build", os.fstat(tar.fileno()).st_size)
            try:
                prepared = stack.prepare_layer(tar, None if growth is not None else bar.advance, position=i,
                                               growth=growth, watch=watch)
            except FormatError as e:
                raise FormatError(f"layer {i + 1} ({d.short}): {e}") from None
        release_free_memory()
        return prepared

    @staticmethod
    def _commit_layer(stack: LayerStack, i: int, d: oci.Descriptor, got: "_Fetched", prepared: PreparedLayer,
                      bar: Bar) -> LayerResult:
        res = stack.commit_layer(prepared)
        release_free_memory()  # that layer's buffers are gone: keep the peak RSS near what is in use
        blob = f"blob {res.blob.blob_id[:12]} {human(res.blob.compressed_size)}" if res.blob else "no new data"
        bar.close(f"{human(d.size)} {got.kind} -> {human(got.tar_size)} tar -> {blob} "
                  f"({res.new_chunks} new chunks, {res.deduplicated} deduplicated)")
        return res

    async def _push_file(self, dst: RegistryClient, digest: str, path: str, label: str,
                         sem: asyncio.Semaphore) -> bool:
        """Upload one blob file unless the target has it; True when it was sent."""
        async with sem:
            size = os.path.getsize(path)
            bar = self.progress.bar(label)
            bar.phase("push", size)
            try:
                sent = await dst.push_blob_file(path, digest, piece=self.opts.piece_size, progress=bar.advance)
            except OSError as e:
                raise transport_error(self.dst_ep, e, "pushing") from None
            bar.close(f"pushed {human(size)}" if sent else f"already in the target ({human(size)})")
            return sent

    def _stream_pushes(self, dst: Any) -> bool:
        """Whether layer blobs go up while they are written (before their digest is known, so
        before a HEAD could find them in the target). Not into a repository that has images
        already (a re-conversion, or another image sharing layers: their blobs may be there, and
        the HEAD before a whole push skips them) unless a build cache with records says which
        layers are new (those it lacks); not after the registry refused a PATCH upload; not into
        an archive."""
        if not self.opts.stream_push or self.stream_target.refused or not isinstance(dst, RegistryClient):
            return False
        if self.target_has_images and (self.cache is None or not self.cache.records):
            if not self.stream_skip_logged:
                self.stream_skip_logged = True
                log.info("target repository %s has images: layer blobs are pushed once built (HEAD first), "
                         "not while written", self.dst_ref)
            return False
        return True

    async def _push_streamed(self, dst: RegistryClient, stream: BlobStream, task: "asyncio.Task[bool | None]",
                             digest: str, path: str, label: str, sem: asyncio.Semaphore) -> bool:
        """The push of a blob that was uploaded while written (`task`): its outcome; if it did not
        complete (refused, failed, the blob written again at its commit), the whole file pushed
        now the usual way (HEAD, one PUT, retried as `push_retry` says), logged and counted."""
        stats = self.stream_stats
        try:
            got = await task
        except StreamRefused as e:
            stats.refused += 1  # (the next layers are pushed whole at once)
            log.warning("%s: %s; pushing it whole instead (and the next blobs too)", label, e)
        except Exception as e:  # noqa: BLE001 - any failure of the stream: the file is pushed whole
            stats.failed += 1
            log.warning("%s: its upload while it was written failed (%s); pushing it whole instead", label, e)
        else:
            if got is not None and stream.blob_id == digest.removeprefix("sha256:"):
                if got:
                    stats.streamed += 1
                else:
                    stats.existed += 1
                size = os.path.getsize(path)
                pieces = f" ({stream.patches} pieces)" if stream.piece > 0 else ""
                self.progress.bar(label).close(f"pushed {human(size)} while written{pieces}"
                                               if got else f"already in the target ({human(size)})")
                return got
            stats.dropped += 1
            log.info("%s: the blob streamed while written was written again at its commit; pushing it whole", label)
        return await self._push_file(dst, digest, path, label, sem)

    async def _push_rest(self, dst: RegistryClient, pushes: dict[str, tuple["asyncio.Task[bool]", int]],
                         files: list[tuple[str, str, int, str]], small: list[tuple[str, bytes]],
                         sem: asyncio.Semaphore, result: ConvertResult, elsewhere: list[RemoteBlob],
                         work: str) -> None:
        """Push what the layer loop did not (bootstrap layer, config, originals), get the blobs
        built elsewhere (build cache, chunk dictionary) into the target (mounted or copied), wait
        for every upload, and account for them. A layer blob that the merged image does not use
        (all its files whited out above) was pushed already: it is counted, and left unreferenced."""
        used = {digest for digest, *_ in files}
        for digest, path, size, label in files:
            if digest not in pushes:
                pushes[digest] = (asyncio.create_task(self._push_file(dst, digest, path, label, sem)), size)
        for digest in pushes:
            if digest not in used:
                log.info("blob %s was pushed but the merged image does not use it", digest)

        async def one_small(digest: str, data: bytes) -> None:
            async with sem:
                exists = await dst.blob_exists(digest)
                if not exists:
                    await dst.push_blob(data, digest)
                self._account(result, digest, len(data), not exists)

        async def one_remote(blob: RemoteBlob) -> None:
            async with sem:
                how = await place_blob(dst, self.dst_ep, blob, work, self.opts.piece_size)
                if how == "present":
                    self._account(result, blob.digest, blob.size, False)
                elif how == "mounted":
                    result.mounted.append(blob.digest)
                else:
                    result.copied.append(blob.digest)
                    self._account(result, blob.digest, blob.size, True)

        tasks = [t for t, _ in pushes.values()]
        try:
            await gather_or_cancel([_wait(t) for t in tasks] + [one_small(d, b) for d, b in small]
                                   + [one_remote(b) for b in elsewhere])
        except BaseException:
            await _cancel_all(tasks)
            raise
        for digest, (task, size) in pushes.items():
            self._account(result, digest, size, task.result())

    def _add_dict(self, stack: LayerStack) -> set[str]:
        """Seed `stack` with the chunk dictionary; the dictionary's blob ids."""
        assert self.chunk_dict is not None
        try:
            image = open_bootstrap(self.chunk_dict.bootstrap_path)
            n = stack.add_dict(image)
        except ChunkDictError as e:
            raise ConvertError(f"--chunk-dict: {e}") from None
        except FormatError as e:
            raise FormatError(f"chunk dict bootstrap: {e}") from None
        ids = {b.blob_id for b in image.blobs}
        self.progress.log(f"chunk dict: {n} chunks in {len(ids)} blobs")
        return ids

    async def _dict_blob_in_target(self, dst: RegistryClient, bid: str) -> RemoteBlob:
        try:
            size = await dst.blob_size(bid)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise ConvertError(f"chunk dict blob {bid[:12]} is not in the target repository "
                                   f"{self.dst_ref.registry}/{self.dst_ref.repository}; push the dictionary image "
                                   "there or give it as --chunk-dict bootstrap:registry:REF") from None
            raise transport_error(self.dst_ep, e) from None
        return RemoteBlob(f"sha256:{bid}", size, None, None)

    def _cache_lookup(self, chain: str, params: str) -> Record | None:
        """A record made earlier in this run (another platform), else one of the cache image."""
        if self.cache is None:
            return None
        made = self.cache_made.get((chain, params))
        return made[0] if made is not None else self.cache.lookup(chain, params)

    async def _cache_hits(self, candidates: dict[int, Record], work: str, blob_dir: str) -> dict[int, Hit]:
        """The layers the build cache has records for, their bootstraps fetched (a few at a
        time); a record that turns out unusable is left out (the layer is then converted).
        Records made earlier in this run are at hand: their blob is linked into `blob_dir`."""
        if not candidates or self.cache_client is None or self.cache_ep is None:
            return {}
        client, ep = self.cache_client, self.cache_ep
        sem = asyncio.Semaphore(max(1, self.opts.jobs))
        hits: dict[int, Hit] = {}
        remote: dict[int, Record] = {}
        for i, rec in candidates.items():
            made = self.cache_made.get(rec.key)
            if made is None:
                remote[i] = rec
                continue
            _rec, boot, blob_path = made
            if blob_path is not None and rec.blob is not None:
                with contextlib.suppress(FileExistsError):
                    os.link(blob_path, os.path.join(blob_dir, rec.blob.hex))
            hits[i] = Hit(rec, boot, None)

        async def one(i: int, rec: Record) -> None:
            async with sem:
                hit = await fetch_hit(client, ep, rec, work, i)
            if hit is not None:
                hits[i] = hit

        await gather_or_cancel([one(i, r) for i, r in remote.items()])
        self.cache_stats.unusable += len(candidates) - len(hits)
        return hits

    def _cached_layer(self, stack: LayerStack, i: int, hit: Hit, bar: Bar) -> LayerResult:
        image = open_bootstrap(hit.bootstrap_path)
        try:
            res = stack.add_cached_layer(image, hit.record.blob.hex if hit.record.blob else None)
        except FormatError as e:
            raise CacheMismatch(str(e)) from None
        bar.close(f"from the build cache ({res.chunks} chunks" +
                  (f", blob {hit.record.blob.hex[:12]})" if hit.record.blob else ")"))
        return res

    def _cache_record(self, stack: LayerStack, layer: Tree, chain: str, params: str, res: LayerResult,
                      dict_ids: set[str], work: str, i: int) -> Record:
        """The build cache record of layer `i` (its tree `layer`), built here: its own bootstrap,
        as a layer."""
        boot = os.path.join(work, f"layer-{i}.boot")
        tgz = os.path.join(work, f"layer-{i}.boot.tar.gz")
        used = stack.write_layer_bootstrap(boot, layer)
        with open(boot, "rb") as bf, open(tgz, "wb") as out:
            hexd, size, diff = write_bootstrap_layer(bf, os.fstat(bf.fileno()).st_size, out)
        self.cache_new[f"sha256:{hexd}"] = tgz
        blob = None
        if res.blob is not None and res.blob_path is not None:
            blob = Blob(f"sha256:{res.blob.blob_id}", os.path.getsize(res.blob_path))
            self.cache_new[blob.digest] = res.blob_path
        refs = tuple(b for b in used if b in dict_ids)
        if self.cache is not None and self.chunk_dict is not None:
            for h in refs:
                where = self.chunk_dict.blobs.get(h)
                if where is not None:
                    self.cache.add_reference(Blob(where.digest, where.size))
        rec = Record(chain, params, Blob(f"sha256:{hexd}", size), f"sha256:{diff}", blob, refs)
        self.cache_made[rec.key] = (rec, boot, res.blob_path if blob is not None else None)
        return rec

    async def _push_cache(self, dst: RegistryClient) -> None:
        """The cache manifest, once the image is pushed, after the cache's blobs and config
        (`cache_push`, started beside the last image's pushes)."""
        assert self.cache_client is not None and self.cache_ep is not None
        if self.cache_push is None:  # (no image got to its pushes: not reached in a run that ends well)
            self.cache_push = asyncio.create_task(self._push_cache_content({}, None))
        manifest, mtype = await self.cache_push
        try:
            await self.cache_client.push_manifest(self.cache_ep.ref.reference, manifest, mtype)
        except OSError as e:
            raise transport_error(self.cache_ep, e, "the image is pushed, but pushing the build cache failed") from None

    async def _push_cache_content(self, image_pushes: dict[str, tuple["asyncio.Task[bool]", int]],
                                  records: "asyncio.Task[None] | None") -> tuple[bytes, str]:
        """The blobs of new records, the dictionary blobs they reference and the cache config,
        once the last image's `records` are made; returns the cache manifest and its media type.
        A record's blob that the image pushes (`image_pushes`) is waited for first, so that it
        is found there (or mounted from there), not uploaded twice. Runs beside the image's last
        pushes; an error in it is raised once the image is pushed (`_push_cache`), as when it ran
        after them."""
        assert self.cache is not None and self.cache_client is not None and self.cache_ep is not None
        if records is not None:
            await asyncio.shield(records)  # (the image's to report if it fails; cancelled, not cancelling)
        cache, client, ep = self.cache, self.cache_client, self.cache_ep
        cache.record(self.cache_used)
        self.cache_stats.records = len(cache.records)
        # what this run made, and the dictionary blobs its records reference (records kept from
        # before were complete when they were pushed)
        wanted = {b.digest: b for r in self.cache_used for b in (r.bootstrap, r.blob)
                  if b is not None and b.digest in self.cache_new}
        wanted.update({cache.references[h].digest: cache.references[h] for r in self.cache_used
                       for h in r.reference_blobs if h in cache.references})
        sem = asyncio.Semaphore(max(1, self.opts.jobs))

        mountable = ep.ref.host == self.dst_ref.host and not same_repo(ep.ref, self.dst_ref)
        same = ep.ref.host == self.dst_ref.host and same_repo(ep.ref, self.dst_ref)

        async def one(digest: str, blob: Blob) -> None:
            image_push = image_pushes.get(digest)
            if image_push is not None and (mountable or same):
                with contextlib.suppress(Exception):  # (its failure is the image's to report)
                    await asyncio.shield(image_push[0])
            async with sem:
                path = self.cache_new.get(digest)
                if path is not None and not mountable:  # (its HEAD skips a blob the cache has)
                    await client.push_blob_file(path, digest, piece=self.opts.piece_size)
                    return
                if await client.blob_exists(digest):
                    return
                if mountable and await client.mount_blob(digest, self.dst_ref.repository):
                    return
                if path is None:
                    if self.chunk_dict is not None and blob.hex in self.chunk_dict.blobs:
                        src = self.chunk_dict.blobs[blob.hex]
                        await place_blob(client, ep, src, os.path.dirname(self.chunk_dict.bootstrap_path),
                                         self.opts.piece_size)
                        return
                    raise ConvertError(f"build cache {ep.ref}: blob {digest[:19]} of a kept record is gone")
                await client.push_blob_file(path, digest, piece=self.opts.piece_size)

        try:
            # `jobs` at once, as the image's blobs (one after another, ~25 round trips for a
            # 5-layer image's records took 59 ms of a first conversion's tail)
            await gather_or_cancel(one(d, b) for d, b in wanted.items())
            config, config_desc, manifest, mtype = cache.export()
            await client.push_blob(config, config_desc["digest"])
        except OSError as e:
            raise transport_error(ep, e, "the image is pushed, but pushing the build cache failed") from None
        return manifest, mtype

    @staticmethod
    def _account(result: ConvertResult, digest: str, size: int, sent: bool) -> None:
        if sent:
            result.uploaded.append(digest)
            result.uploaded_bytes += size
        else:
            result.reused.append(digest)
            result.reused_bytes += size


def _bootstrap_layer(boot_path: str, bl_path: str) -> tuple[str, int, str]:
    with open(boot_path, "rb") as bf, open(bl_path, "wb") as out:
        return write_bootstrap_layer(bf, os.fstat(bf.fileno()).st_size, out)


def _download_key(i: int, d: oci.Descriptor, shared: bool) -> str:
    """A download shared by the layers of a digest, or layer `i`'s own (piped to its build)."""
    return d.digest if shared else f"{d.digest}#{i}"


def _end_growth(growth: Growth, task: "asyncio.Task[Any]") -> None:
    growth.close(failed=task.cancelled() or task.exception() is not None)


def _raise_failed(tasks: Iterable["asyncio.Future[Any]"]) -> None:
    """Raise the error of the first finished task that failed (a push that failed early stops
    the conversion at once, not after the last layer)."""
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            t.result()


async def _cancel_all(tasks: Sequence["asyncio.Future[Any]"]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _wait(task: "asyncio.Task[Any]") -> None:
    await task


def combine(results: list[ConvertResult], index_digest: str) -> ConvertResult:
    """One result for a multi-platform conversion: the sums, each platform's own under `platforms`."""
    first = results[0]
    out = ConvertResult(
        source=first.source, target=first.target, platform=",".join(r.platform for r in results),
        manifest_digest=index_digest, index_digest=index_digest, layers=sum(r.layers for r in results),
        source_bytes=sum(r.source_bytes for r in results), tar_bytes=sum(r.tar_bytes for r in results),
        file_bytes=sum(r.file_bytes for r in results), chunks=sum(r.chunks for r in results),
        deduplicated=sum(r.deduplicated for r in results), blob_bytes=sum(r.blob_bytes for r in results),
        bootstrap_bytes=sum(r.bootstrap_bytes for r in results),
        bootstrap_layer_bytes=sum(r.bootstrap_layer_bytes for r in results))
    for r in results:
        out.uploaded += r.uploaded
        out.reused += r.reused
        out.uploaded_bytes += r.uploaded_bytes
        out.reused_bytes += r.reused_bytes
    out.platforms = results
    return out


def convert(opts: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Run one conversion to the end (its own event loop)."""
    return asyncio.run(Converter(opts, progress).run())
