"""Backends, caches and prefetchers from a RAFS config: the one storage factory every daemon mode
and tool shares (as nydus's `storage/src/factory.rs`)."""

import logging

from ..config import CACHE_TYPES, ConfigError, RafsConfig
from ..rafs.chunkdata import BlobSource
from ..rafs.model import RafsImage
from .cache import BlobCacheManager
from .device import ChunkSource
from .localfs import LocalBlobDir, SingleBlobFile
from .prefetch import Prefetcher

log = logging.getLogger(__name__)


def make_backend(cfg: RafsConfig) -> BlobSource:
    """The configured backend alone (localfs or registry), without any cache."""
    conf = cfg.backend.config
    if cfg.backend.type == "localfs":
        if conf.get("blob_file"):
            return SingleBlobFile(str(conf["blob_file"]))
        return LocalBlobDir(str(conf["dir"]), alt_dirs=[str(d) for d in conf.get("alt_dirs") or []])
    if cfg.backend.type == "registry":
        # Imported on demand: aiohttp costs a localfs-only daemon ~10 MiB of RSS.
        from .registry import RegistryBackend, parse_registry_config

        return RegistryBackend(parse_registry_config(conf))
    raise ConfigError(f"backend {cfg.backend.type!r} is not available in this build")


def make_source(cfg: RafsConfig, backend: BlobSource | None = None) -> BlobSource | ChunkSource:
    """The backend (`backend`, else a new one), under the persistent blob cache when the config
    asks for one (`blobcache`/`filecache`; `fscache` and `dummycache` mean none here)."""
    if backend is None:
        backend = make_backend(cfg)
    if cfg.cache.type not in CACHE_TYPES:
        return backend
    if cfg.cache.compressed:
        log.warning("cache.compressed is not supported; caching uncompressed chunks (.blob.data)")
    return BlobCacheManager(cfg.cache.work_dir, backend, validate=cfg.cache.validate or cfg.digest_validate,
                            amplify_io=cfg.amplify_io, size_limit=cfg.cache.size_limit,
                            stream_size=cfg.cache.stream_size, streams=cfg.cache.streams,
                            dense_fraction=cfg.cache.dense_ratio, read_around=cfg.cache.read_around,
                            dir_around=cfg.cache.dir_around)


def make_prefetcher(cfg: RafsConfig, image: RafsImage, source: BlobSource | ChunkSource,
                    files: list[bytes] | None) -> Prefetcher | None:
    """A started prefetcher when fs_prefetch or a prefetch file list asks for one (and there is a
    cache to prefetch into)."""
    if not (cfg.prefetch_enable or files):
        return None
    if not isinstance(source, BlobCacheManager):
        log.warning("prefetch needs a blobcache; not prefetching")
        return None
    return Prefetcher(image, source, threads=cfg.prefetch_threads, bandwidth=cfg.prefetch_bandwidth,
                      merging_size=cfg.prefetch_merging_size or 1 << 20, files=files or None,
                      prefetch_all=cfg.prefetch_all and cfg.prefetch_enable).start()

