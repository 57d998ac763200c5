"""A filesystem instance the daemon mounts in its VFS, from nydusd's mount command.

`MountCmd` is the body of `POST /api/v1/mount` (and of the gRPC Mount call); `create_instance()`
turns it into a running filesystem: a RAFS image over its backend (through the single backend
factory `nydus_py.storage.factory`), or another type registered with `register_fs_type()`
(passthrough, added by the virtio-fs side). Every instance carries the counters its metrics
endpoints read.
"""

import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, ParsedConfig, RafsConfig, parse_any
from ..fs.rafs_fs import RafsFilesystem
from ..fuse.api import Filesystem
from ..metrics.backend import BackendStats, instrument, unwrap
from ..metrics.fsstats import FsStats
from ..rafs import FormatError, open_bootstrap
from ..rafs.chunkdata import BlobSource
from ..rafs.model import RafsImage
from ..storage.cache import BlobCacheManager
from ..storage.cache.chunk_cache import ChunkCache
from ..storage.device import BlobDevice, ChunkSource
from ..storage.factory import make_backend, make_prefetcher, make_source
from ..storage.prefetch import Prefetcher
from .errors import BadRequest, InternalError, Unsupported
from .image_ref import is_image_source, plan_image_mount, prepare_image_mount

if TYPE_CHECKING:  # imported where used: only `fs_driver: erofs` mounts load the EROFS code
    from ..fs.erofs_serve import ErofsServe

log = logging.getLogger(__name__)

RAFS_TYPES = ("rafs",)
PASSTHROUGH_TYPES = ("passthrough", "passthroughfs", "passthrough_fs")


@dataclass
class MountCmd:
    fs_type: str
    source: str
    config: str
    prefetch_files: list[str] | None = None
    # set by the command line of a dedicated daemon (`--fs-driver`, `--mountpoint`), never by
    # the API: there the driver comes from the config and the target is the mountpoint
    fs_driver: str = ""
    target: str = ""
    # case-insensitive LOOKUP for Windows guests (`--case-insensitive`, or the body's
    # "case_insensitive": true); a RAFS config's "case_insensitive" key turns it on as well
    case_insensitive: bool = False

    @classmethod
    def from_json(cls, body: Any) -> "MountCmd":
        """Validate a decoded request body; BadRequest names the offending field."""
        if not isinstance(body, dict):
            raise BadRequest("mount body must be a JSON object")
        for key in ("fs_type", "source", "config"):
            if key not in body:
                raise BadRequest(f"missing field {key!r}")
            if not isinstance(body[key], str):
                raise BadRequest(f"field {key!r} must be a string")
        pf = body.get("prefetch_files")
        files: list[str] | None
        if pf is None:
            files = None
        elif isinstance(pf, list) and all(isinstance(p, str) for p in pf):
            files = list(pf)
        elif isinstance(pf, str):
            files = [line for line in pf.splitlines() if line.strip()]
        else:
            raise BadRequest("field 'prefetch_files' must be a list of paths")
        if not body["fs_type"]:
            raise BadRequest("field 'fs_type' must not be empty")
        if not body["source"]:
            raise BadRequest("field 'source' must not be empty")
        ci = body.get("case_insensitive", False)
        if not isinstance(ci, bool):
            raise BadRequest("field 'case_insensitive' must be a boolean")
        return cls(body["fs_type"], body["source"], body["config"], files, case_insensitive=ci)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"fs_type": self.fs_type, "source": self.source, "config": self.config}
        if self.prefetch_files is not None:
            d["prefetch_files"] = self.prefetch_files
        if self.fs_driver:
            d["fs_driver"] = self.fs_driver
        if self.case_insensitive:
            d["case_insensitive"] = True
        return d


@dataclass(eq=False)
class Instance:
    """One mounted filesystem and everything it owns."""

    mountpoint: str
    cmd: MountCmd
    fs: Filesystem
    backend_type: str  # "Rafs" | "PassthroughFs" (DaemonInfo.backend_collection)
    stats: FsStats
    parsed: ParsedConfig | None = None
    image: RafsImage | None = None
    source: BlobSource | ChunkSource | None = None
    device: BlobDevice | None = None
    backend_stats: BackendStats | None = None
    prefetcher: Prefetcher | None = None
    erofs: "ErofsServe | None" = None  # served by the kernel EROFS driver (not in the VFS)
    mounted_time: float = field(default_factory=time.time)
    index: int = -1

    @property
    def blobcache_id(self) -> str:
        """The key of this instance's blob-cache metrics: the config id (`device.id`)."""
        return self.parsed.id if self.parsed is not None and self.parsed.id else self.mountpoint

    def close(self) -> None:
        """Stop background work and release files; the VFS no longer routes to it. An EROFS
        instance unmounts its EROFS mount and blob views first."""
        if self.prefetcher is not None:
            with contextlib.suppress(Exception):
                self.prefetcher.stop()
        if self.erofs is not None:
            try:
                self.erofs.close()
            except Exception:
                log.exception("unmounting the EROFS serving of %s failed", self.mountpoint)
        close_fs = getattr(self.fs, "close", None)
        if callable(close_fs):
            close_fs()
        close_src = getattr(self.source, "close", None)
        if callable(close_src):
            try:
                close_src()
            except Exception:
                log.exception("closing the backend of %s failed", self.mountpoint)
        if self.device is not None:
            self.device.cache.close()  # (its share of the daemon's decoded-chunk budget)
        if self.image is not None:
            try:
                self.image.close()
            except BufferError:
                log.warning("%s: bootstrap still referenced, leaving it to the garbage collector", self.mountpoint)

    def activity(self) -> int:
        """A number that changes whenever a FUSE request reaches this mount (the idle trimmer's)."""
        return sum(self.stats.hits)

    def trim(self) -> bool:
        """Give back what an idle mount can rebuild on demand: the bootstrap's mapped pages and
        the filesystem's kept listings and walk predictions, and its decoded chunks in the
        daemon's shared cache and warmed files."""
        fs_trim = getattr(self.fs, "trim", None)
        listings = bool(fs_trim()) if callable(fs_trim) else False
        pages = self.image.trim() if self.image is not None else False
        chunks = False
        if self.device is not None:
            chunks = self.device.cache.held > 0
            self.device.cache.clear()
            chunks = self.device.warmed.clear() or chunks
        return pages or listings or chunks

    # -- views --------------------------------------------------------------------------------
    def collection_entry(self) -> dict[str, Any]:
        return {
            "backend_type": self.backend_type,
            "mountpoint": self.mountpoint,
            "mounted_time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.mounted_time))
            + f".{int(self.mounted_time % 1 * 1e9):09d} +00:00:00",
            "config": self.parsed.redacted_v2() if self.parsed is not None else {},
        }

    def superblock(self) -> dict[str, Any]:
        """`GET /api/v1/daemon/backend`: the RAFS superblock facts this reader knows."""
        img = self.image
        if img is None:
            return {"backend_type": self.backend_type, "mountpoint": self.mountpoint}
        return {
            "magic": 0x52414653 if img.version == 5 else 0xE0F5E1E2,
            "version": img.version,
            "sb_size": 8192 if img.version == 5 else 128,
            "root_inode": img.root_ino,
            "chunk_size": img.chunk_size,
            "batch_size": 0,
            "inodes_count": img.superblock_inodes(),  # as nydusd: counting would walk the tree
            "flags": int(img.flags),
            "blobs": [b.blob_id for b in img.blobs],
            "attr_timeout": self.parsed.rafs.attr_timeout if self.parsed else 0,
            "entry_timeout": self.parsed.rafs.entry_timeout if self.parsed else 0,
            "is_chunk_dict": False,
        }

    def blobcache(self) -> dict[str, Any]:
        """nydusd's BlobcacheMetrics for this instance (zeros when there is no cache)."""
        out: dict[str, Any] = {
            "underlying_files": [], "store_path": "", "partial_hits": 0, "whole_hits": 0, "total": 0,
            "entries_count": 0, "prefetch_data_amount": 0, "prefetch_requests_count": 0, "prefetch_workers": 0,
            "prefetch_unmerged_chunks": 0, "prefetch_cumulative_time_millis": 0, "prefetch_begin_time_secs": 0,
            "prefetch_begin_time_millis": 0, "prefetch_end_time_secs": 0, "prefetch_end_time_millis": 0,
            "buffered_backend_size": 0, "data_all_ready": False,
        }
        if isinstance(self.source, BlobCacheManager):
            s = self.source.snapshot()
            for k in out:
                if k in s and isinstance(s[k], type(out[k])):
                    out[k] = s[k]
            c = s["cache"]  # (beyond nydusd's fields) bytes by how they came, adaptive fetching's streams
            out["fetched_bytes"] = {"ondemand": c["ondemand_bytes"], "stream": c["stream_bytes"],
                                    "prefetch": c["prefetch_data_amount"]}
            out["streams"] = {k: c[k] for k in ("stream_switches", "stream_reads", "streamed_chunks",
                                                "stream_skipped_bytes", "stream_failures")}
            # on-demand amplification: how misses took their neighbours along, and what that cost;
            # `waited`: chunks a read waited for while another read or a prefetch fetched them
            out["amplification"] = {k: c[k] for k in ("backend_reads", "waited", "sequential_misses",
                                                      "amplified_chunks", "followed_chunks", "around_chunks",
                                                      "around_refused", "dir_guesses", "dir_chunks",
                                                      "dir_bytes", "dir_used_bytes", "dir_refused",
                                                      "demand_bytes", "ahead_bytes", "ahead_used_bytes")}
        if self.erofs is not None:  # kernel reads through the blob views, and what they fetched
            ev = self.erofs.snapshot()
            if self.backend_stats is not None:
                b = self.backend_stats.json()
                ev["backend_reads"], ev["backend_bytes"] = b["read_count"], b["read_amount_total"]
                ev["prefetch_backend_reads"] = self.backend_stats.prefetch_reads
                ev["prefetch_backend_bytes"] = self.backend_stats.prefetch_bytes
            out["erofs"] = ev
        p = self.prefetcher
        if p is not None:
            out["prefetch_workers"] = p.threads
            begin, end = p.started_at, p.finished_at
            if begin:
                out["prefetch_begin_time_secs"] = int(begin)
                out["prefetch_begin_time_millis"] = int(begin * 1000) % 1000
            if end:
                out["prefetch_end_time_secs"] = int(end)
                out["prefetch_end_time_millis"] = int(end * 1000) % 1000
                out["prefetch_cumulative_time_millis"] = int((end - begin) * 1000)
        return out

    def casefold_counters(self) -> dict[str, int] | None:
        """Case-insensitive lookup counters (fs.casefold), None when the option is off."""
        folder = getattr(self.fs, "casefold", None)
        return folder.snapshot() if folder is not None else None

    def backend_counters(self) -> dict[str, Any]:
        """The backend's own counters (registry: requests, statuses, retries, fallbacks...)."""
        counters = getattr(unwrap(self.source), "counters", None)
        snap = getattr(counters, "snapshot", None)
        return snap() if callable(snap) else {}


InstanceFactory = Callable[[str, MountCmd, "ParsedConfig | None"], Instance]
_FACTORIES: dict[str, InstanceFactory] = {}


def register_fs_type(names: tuple[str, ...], factory: InstanceFactory) -> None:
    """Make `fs_type` values in `names` mountable (e.g. passthrough for virtio-fs)."""
    for n in names:
        _FACTORIES[n] = factory


def create_instance(mountpoint: str, cmd: MountCmd, default_config: ParsedConfig | None = None) -> Instance:
    factory = _FACTORIES.get(cmd.fs_type)
    if factory is None:
        if cmd.fs_type in PASSTHROUGH_TYPES:
            raise Unsupported(f"fs_type {cmd.fs_type!r}: passthrough filesystems are not available in this build")
        raise BadRequest(f"unknown fs_type {cmd.fs_type!r} (rafs, passthrough_fs)")
    return factory(mountpoint, cmd, default_config)


def _parse_config(cmd: MountCmd, default_config: ParsedConfig | None) -> ParsedConfig:
    if not cmd.config.strip():
        if default_config is None:
            raise BadRequest("a rafs mount needs a config")
        return default_config
    try:
        return parse_any(cmd.config)
    except ConfigError as e:
        raise BadRequest(f"config: {e}") from None


def fs_driver_of(cmd: MountCmd, default_config: ParsedConfig | None) -> str:
    """The driver a mount asks for: the command line's, else its config's (a config that does not
    parse is reported by the mount itself)."""
    if cmd.fs_driver:
        return cmd.fs_driver
    if cmd.fs_type not in RAFS_TYPES:
        return "fusedev"
    if cmd.config.strip():
        try:
            return parse_any(cmd.config).fs_driver
        except ConfigError:
            return "fusedev"
    return default_config.fs_driver if default_config is not None else "fusedev"


def create_rafs(mountpoint: str, cmd: MountCmd, default_config: ParsedConfig | None = None) -> Instance:
    driver = fs_driver_of(cmd, default_config)
    if is_image_source(cmd.source):  # docker://REGISTRY/REPO:TAG (see daemon.image_ref)
        return _create_image_rafs(mountpoint, cmd, default_config, driver)
    parsed = _parse_config(cmd, default_config)
    return _create_rafs(mountpoint, cmd, parsed, cmd.source, driver)


def _create_image_rafs(mountpoint: str, cmd: MountCmd, default_config: ParsedConfig | None,
                       driver: str) -> Instance:
    """An image by reference: the registry backend first, then the manifest and the bootstrap
    through its client (one connection and one auth for everything), and the blob cache made
    while they come."""
    plan = plan_image_mount(cmd.source, cmd.config, default_config)
    cfg = plan.parsed.rafs
    source: BlobSource | ChunkSource | None = None
    try:
        try:
            backend = make_backend(cfg)
        except ConfigError as e:
            raise BadRequest(f"config: {e}") from None
        source = backend
        from ..storage.registry import RegistryBackend  # (loaded by make_backend)

        assert isinstance(backend, RegistryBackend), backend  # (image_config asks for one)
        fut = plan.start_fetch(backend)
        source = make_source(cfg, backend)
        fetched = plan.finish(fut)
    except BaseException:
        plan.cleanup()
        close = getattr(source, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        raise
    try:
        # A fetched bootstrap in a temp dir is dropped once mapped, and with fs_driver erofs
        # once the kernel has opened it too (it keeps its own reference to the file).
        return _create_rafs(mountpoint, cmd, plan.parsed, fetched.path, driver, source=source)
    finally:
        fetched.release()


def restore_erofs(mountpoint: str, cmd: MountCmd, default_config: ParsedConfig | None, saved: dict[str, Any],
                  fd: int) -> Instance:
    """A predecessor's `fs_driver: erofs` mount, taken over: the same image and backend, its
    EROFS mount and blob views adopted as they are (`saved`: `ErofsServe.handover_state`), the
    views' `fd` (owned from here on, closed on failure) served from `ErofsServe.resume`.
    ErofsGone when the mount is no longer there."""
    cmd = MountCmd(cmd.fs_type, cmd.source, cmd.config, cmd.prefetch_files, fs_driver=cmd.fs_driver,
                   target=str(saved["target"]))
    try:
        fetched = None
        if is_image_source(cmd.source):
            fetched, parsed = prepare_image_mount(cmd.source, cmd.config, default_config)
            boot = fetched.path
        else:
            parsed = _parse_config(cmd, default_config)
            boot = cmd.source
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    try:
        return _create_rafs(mountpoint, cmd, parsed, boot, "erofs", adopt=(saved, fd))
    finally:
        if fetched is not None:
            fetched.release()


def _create_rafs(mountpoint: str, cmd: MountCmd, parsed: ParsedConfig, boot: str, driver: str,
                 adopt: tuple[dict[str, Any], int] | None = None,
                 source: BlobSource | ChunkSource | None = None) -> Instance:
    """`adopt`: (saved state, views fd) of an EROFS mount to take over; the fd is ours. `source`:
    the backend (under its cache) made already, ours to close on failure."""
    cfg = parsed.rafs
    if driver == "erofs" and (cmd.case_insensitive or cfg.case_insensitive):
        if adopt is not None and adopt[1] >= 0:
            os.close(adopt[1])
        raise BadRequest("case_insensitive needs fs_driver fusedev (the kernel's EROFS driver looks names up itself)")
    try:
        image = open_bootstrap(boot)  # (non-blocking open, fstat: a FIFO is refused at once)
    except (FormatError, OSError) as e:
        if adopt is not None and adopt[1] >= 0:
            os.close(adopt[1])
        close = getattr(source, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        detail = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise BadRequest(f"bootstrap {cmd.source}: {detail}") from None
    try:
        if source is None:
            try:
                source = make_source(cfg)
            except ConfigError as e:
                raise BadRequest(f"config: {e}") from None
        source, bstats = instrument(source, cfg.backend.type)
        device = BlobDevice(image, source, validate=cfg.digest_validate or cfg.cache.validate,
                            cache=ChunkCache.shared(cfg.chunk_cache_size), amplify_io=cfg.amplify_io)
        if driver == "erofs":
            saved, fd = adopt if adopt is not None else (None, -1)
            adopt = None  # (the fd is _erofs_instance's from here on)
            return _erofs_instance(mountpoint, cmd, parsed, boot, image, source, bstats, device, saved, fd)
        fs = RafsFilesystem(image, device, entry_timeout=cfg.entry_timeout, attr_timeout=cfg.attr_timeout,
                            enable_xattr=cfg.enable_xattr,
                            case_insensitive=cmd.case_insensitive or cfg.case_insensitive)
        stats = FsStats(mountpoint, files=cfg.iostats_files, access_pattern=parsed.access_pattern,
                        latest=parsed.latest_read_files)
        inst = Instance(mountpoint, cmd, fs, "Rafs", stats, parsed=parsed, image=image, source=source,
                        device=device, backend_stats=bstats)
        files = [os.fsencode(p) for p in cmd.prefetch_files or ()]
        inst.prefetcher = _prefetcher(cfg, image, source, files)
        return inst
    except BaseException as e:
        if adopt is not None and adopt[1] >= 0:
            os.close(adopt[1])
        close = getattr(source, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        image.close()
        if isinstance(e, (BadRequest, Unsupported)) or _erofs_gone(e):
            raise
        if isinstance(e, Exception):
            raise InternalError(f"mount {mountpoint}: {e}") from e
        raise


def _prefetcher(cfg: RafsConfig, image: RafsImage, source: BlobSource | ChunkSource,
                files: list[bytes]) -> Prefetcher | None:
    """The started prefetcher, or None when it would have nothing to do: fs_prefetch on, but no
    files given, no prefetch_all and an empty prefetch table (no threads per mount for nothing)."""
    if cfg.prefetch_enable and not files and not cfg.prefetch_all and not image.prefetch_table():
        log.debug("fs_prefetch: the image has no prefetch table and no files are given; not prefetching")
        return None
    return make_prefetcher(cfg, image, source, files)


def _erofs_gone(e: BaseException) -> bool:
    """`e` is fs.erofs_serve.ErofsGone (the module not loaded: it cannot be)."""
    mod = sys.modules.get("nydus_py.fs.erofs_serve")
    return mod is not None and isinstance(e, mod.ErofsGone)


def _erofs_instance(mountpoint: str, cmd: MountCmd, parsed: ParsedConfig, boot: str, image: RafsImage,
                    source: BlobSource | ChunkSource, bstats: BackendStats, device: BlobDevice,
                    saved: dict[str, Any] | None = None, fd: int = -1) -> Instance:
    """The image served by the kernel EROFS driver at `cmd.target` (dedicated mode) or at the
    mountpoint itself, a host path (shared mode); its blob views over a private FUSE mount.
    `boot` is the bootstrap file: `cmd.source`, or the one fetched for a `docker://` source.
    With `saved` (a takeover), the predecessor's mounts are adopted through `fd` instead."""
    from ..fs.erofs_serve import ErofsServe
    from ..transport.erofs_mount import ErofsImageError, ErofsUnavailable

    target = cmd.target or mountpoint
    try:
        serve = ErofsServe(image, device, boot, target, local_blobs=parsed.rafs.backend.type == "localfs")
    except ErofsImageError as e:
        if fd >= 0:
            os.close(fd)
        raise BadRequest(f"fs_driver erofs: {e}") from None
    if saved is not None:
        serve.adopt(saved, fd)  # (ErofsGone, ValueError: the caller reports it)
        return _erofs_wrap(mountpoint, cmd, parsed, image, source, bstats, device, serve)
    try:
        serve.start()
    except ErofsUnavailable as e:
        raise Unsupported(f"fs_driver erofs: {e.strerror or e}") from None
    except OSError as e:
        raise BadRequest(f"fs_driver erofs: mount at {target}: {e.strerror or e}") from None
    return _erofs_wrap(mountpoint, cmd, parsed, image, source, bstats, device, serve)


def _erofs_wrap(mountpoint: str, cmd: MountCmd, parsed: ParsedConfig, image: RafsImage,
                source: BlobSource | ChunkSource, bstats: BackendStats, device: BlobDevice,
                serve: "ErofsServe") -> Instance:
    cfg = parsed.rafs
    inst = Instance(mountpoint, cmd, serve.fs, "Rafs", FsStats(mountpoint), parsed=parsed, image=image,
                    source=source, device=device, backend_stats=bstats, erofs=serve)
    try:
        files = [os.fsencode(p) for p in cmd.prefetch_files or ()]
        inst.prefetcher = _prefetcher(cfg, image, source, files)
    except BaseException:
        if serve.adopted:
            serve.release()  # a failed takeover leaves the mounts as they are, for another
        else:
            serve.close()
        raise
    return inst


def create_passthrough(mountpoint: str, cmd: MountCmd, default_config: ParsedConfig | None = None) -> Instance:
    """A host directory (Kata's `/containers` share), when the passthrough filesystem is built in."""
    from ..fs.passthrough import PassthroughFilesystem

    if not os.path.isdir(cmd.source):
        raise BadRequest(f"passthrough source {cmd.source} is not a directory")
    fs = PassthroughFilesystem(cmd.source, case_insensitive=cmd.case_insensitive or _passthrough_ci(cmd.config))
    return Instance(mountpoint, cmd, fs, "PassthroughFs", FsStats(mountpoint))


def _passthrough_ci(config: str) -> bool:
    """"case_insensitive" of a passthrough mount's config, a JSON object whose other keys are
    ignored (as is a config that is not a JSON object: passthrough mounts never needed one)."""
    if not config.strip():
        return False
    try:
        raw = json.loads(config)
    except ValueError:
        log.info("passthrough mount: config is not JSON; ignored")
        return False
    if not isinstance(raw, dict):
        return False
    value = raw.get("case_insensitive", False)
    if not isinstance(value, bool):
        raise BadRequest("config case_insensitive: expected a boolean")
    return value


register_fs_type(RAFS_TYPES, create_rafs)
# optional (the virtio-fs side provides it), and imported by its first mount: a daemon serving
# images only never loads it
if importlib.util.find_spec("nydus_py.fs.passthrough") is not None:
    register_fs_type(PASSTHROUGH_TYPES, create_passthrough)
