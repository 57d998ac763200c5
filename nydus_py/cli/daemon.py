"""`nydusd-py`'s entry point and the backend factory every daemon mode shares (`make_source`).

The daemon itself (CLI, state machine, VFS, APIs) lives in `nydus_py.daemon`."""

import logging
import sys
from typing import Any

from ..daemon.config import ConfigError, RafsConfig
from ..rafs.chunkdata import BlobSource
from ..rafs.model import RafsImage
from ..storage.cache import BlobCacheManager
from ..storage.device import ChunkSource
from ..storage.localfs import LocalBlobDir, SingleBlobFile
from ..storage.prefetch import Prefetcher, read_prefetch_list

log = logging.getLogger("nydusd-py")


CACHE_TYPES = ("blobcache", "filecache")


def make_backend(cfg: RafsConfig) -> BlobSource:
    """The configured backend alone (localfs or registry), without any cache."""
    conf = cfg.backend.config
    if cfg.backend.type == "localfs":
        if conf.get("blob_file"):
            return SingleBlobFile(str(conf["blob_file"]))
        return LocalBlobDir(str(conf["dir"]), alt_dirs=[str(d) for d in conf.get("alt_dirs") or []])
    if cfg.backend.type == "registry":
        # Imported on demand: aiohttp costs a localfs-only daemon ~10 MiB of RSS.
        from ..storage.registry import RegistryBackend, parse_registry_config

        return RegistryBackend(parse_registry_config(conf))
    raise ConfigError(f"backend {cfg.backend.type!r} is not available in this build")


def make_source(cfg: RafsConfig) -> BlobSource | ChunkSource:
    """The backend, under the persistent blob cache when the config asks for one
    (`blobcache`/`filecache`; `fscache` and `dummycache` mean none here)."""
    backend = make_backend(cfg)
    if cfg.cache.type not in CACHE_TYPES:
        return backend
    if cfg.cache.compressed:
        log.warning("cache.compressed is not supported; caching uncompressed chunks (.blob.data)")
    return BlobCacheManager(cfg.cache.work_dir, backend, validate=cfg.cache.validate or cfg.digest_validate,
                            amplify_io=cfg.amplify_io, size_limit=cfg.cache.size_limit)


def make_prefetcher(cfg: RafsConfig, image: RafsImage, source: BlobSource | ChunkSource,
                    prefetch_files: str | None) -> Prefetcher | None:
    """A started prefetcher when fs_prefetch or --prefetch-files asks for one (and there is a
    cache to prefetch into)."""
    files = read_prefetch_list(prefetch_files) if prefetch_files else None
    if not (cfg.prefetch_enable or files):
        return None
    if not isinstance(source, BlobCacheManager):
        log.warning("prefetch needs a blobcache; not prefetching")
        return None
    return Prefetcher(image, source, threads=cfg.prefetch_threads, bandwidth=cfg.prefetch_bandwidth,
                      merging_size=cfg.prefetch_merging_size or 1 << 20, files=files,
                      prefetch_all=cfg.prefetch_all and cfg.prefetch_enable).start()


def storage_metrics(source: object) -> dict[str, Any]:
    """Counters of the backend and cache, for logs now and the metrics API later."""
    out: dict[str, Any] = {}
    if isinstance(source, BlobCacheManager):
        out["blobcache"] = source.snapshot()
        source = source.source
    counters = getattr(source, "counters", None)
    if counters is not None:
        out["backend"] = counters.snapshot()
    return out


def main(argv: list[str] | None = None) -> int:
    """`nydusd-py` (fuse | virtiofs | singleton, nydusd's flags): see nydus_py.daemon.main."""
    from ..daemon.main import main as daemon_main

    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main())
