"""nydusd's RAFS configuration (v1 JSON, as nydus-snapshotter and Kata write it).

Only what this daemon acts on is modelled; unknown keys are accepted and ignored like nydusd
does (the snapshotter always sends some), wrong types are a ConfigError naming the key.
"""

import json
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """The configuration is not valid nydusd JSON."""


# cache types backed by the persistent blob cache (`fscache` and `dummycache` mean none here)
CACHE_TYPES = ("blobcache", "filecache")


@dataclass
class BackendConfig:
    type: str
    config: dict[str, Any]


@dataclass
class CacheConfig:
    type: str = ""
    compressed: bool = False
    validate: bool = False
    work_dir: str = "."
    # bytes on disk before least-recently-used blobs are evicted; 0 = no cap (nydusd has none)
    size_limit: int = 0
    # adaptive fetching (this daemon's keys): a blob whose on-demand fetches took `dense_ratio` of
    # its chunks within seconds streams the rest in `streams` ranges of >= `stream_size` bytes (0: off)
    stream_size: int = 8 << 20
    streams: int = 4
    dense_ratio: float = 0.15
    # read-around of a random miss (this daemon's key): bytes after it taken along, within a
    # budget of unused bytes (storage/cache/blobcache); 0: off
    read_around: int = 64 << 10
    # directory-aware read-around (this daemon's key): a cold read of a file takes the following
    # files of its directory stored right after it, up to these bytes, while their record allows; 0: off
    dir_around: int = 256 << 10


@dataclass
class RafsConfig:
    backend: BackendConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    device_id: str = ""
    mode: str = "direct"
    digest_validate: bool = False
    enable_xattr: bool = False
    iostats_files: bool = False
    amplify_io: int = 1 << 20
    entry_timeout: float = 86400.0
    attr_timeout: float = 86400.0
    prefetch_enable: bool = False
    prefetch_threads: int = 8
    prefetch_all: bool = False
    prefetch_bandwidth: int = 0  # bytes/s, 0 = unlimited (fs_prefetch.bandwidth_rate)
    prefetch_merging_size: int = 1 << 20  # fs_prefetch.merging_size
    # LOOKUP falls back to a case-folded match (Windows guests; fs.casefold). v1: top-level
    # "case_insensitive", v2: rafs.case_insensitive. Not a nydusd key.
    case_insensitive: bool = False
    # bytes of decoded chunks held in memory without a blob cache (storage.cache.chunk_cache):
    # random readers re-decode a chunk whenever it fell out. One budget for all mounts of a
    # daemon: the largest chunk_cache_size of its mounted images. v1: top-level
    # "chunk_cache_size", v2: rafs.chunk_cache_size. Not a nydusd key.
    chunk_cache_size: int = 128 << 20


def _get(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any, where: str) -> Any:
    if key not in obj or obj[key] is None:
        return default
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}{key}: expected {getattr(typ, '__name__', typ)}, got {type(value).__name__}")
    return value


def parse_config(text: str | bytes) -> RafsConfig:
    """Parse nydusd v1 JSON; ConfigError with the offending key on anything invalid."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # also too deep nesting and too many digits
        raise ConfigError(f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("configuration must be a JSON object")
    device = _get(raw, "device", dict, None, "")
    if device is None:
        raise ConfigError("device: missing")
    backend = _get(device, "backend", dict, None, "device.")
    if backend is None:
        raise ConfigError("device.backend: missing")
    btype = _get(backend, "type", str, None, "device.backend.")
    if not btype:
        raise ConfigError("device.backend.type: missing")
    if btype not in ("localfs", "registry"):
        raise ConfigError(f"device.backend.type: unsupported backend {btype!r} (localfs, registry)")
    bconf = _get(backend, "config", dict, None, "device.backend.")
    if bconf is None:
        raise ConfigError("device.backend.config: missing")
    if btype == "localfs" and not (bconf.get("dir") or bconf.get("blob_file")):
        raise ConfigError("device.backend.config: localfs needs 'dir' or 'blob_file'")
    cache_raw = _get(device, "cache", dict, {}, "device.")
    cache_conf = _get(cache_raw, "config", dict, {}, "device.cache.")
    cache = CacheConfig(
        type=_get(cache_raw, "type", str, "", "device.cache."),
        compressed=_get(cache_raw, "compressed", bool, False, "device.cache."),
        validate=_get(cache_raw, "validate", bool, False, "device.cache."),
        work_dir=_get(cache_conf, "work_dir", str, ".", "device.cache.config."),
        size_limit=_get(cache_conf, "size_limit", int, 0, "device.cache.config."),
        stream_size=_get(cache_conf, "stream_size", int, 8 << 20, "device.cache.config."),
        streams=_get(cache_conf, "streams", int, 4, "device.cache.config."),
        dense_ratio=float(_get(cache_conf, "dense_ratio", (int, float), 0.15, "device.cache.config.")),
        read_around=_get(cache_conf, "read_around", int, 64 << 10, "device.cache.config."),
        dir_around=_get(cache_conf, "dir_around", int, 256 << 10, "device.cache.config."),
    )
    if cache.type in ("blobcache", "filecache") and not cache.work_dir:
        raise ConfigError("device.cache.config.work_dir: blobcache needs a work_dir")
    if cache.size_limit < 0:
        raise ConfigError("device.cache.config.size_limit: must be >= 0")
    if not 0 <= cache.read_around <= 1 << 20:
        raise ConfigError("device.cache.config.read_around: must be 0..1 MiB (0: off)")
    if not 0 <= cache.dir_around <= 4 << 20:
        raise ConfigError("device.cache.config.dir_around: must be 0..4 MiB (0: off)")
    if cache.stream_size < 0 or not 1 <= cache.streams <= 64 or not 0 < cache.dense_ratio <= 1:
        raise ConfigError("device.cache.config: stream_size must be >= 0 (0: no streams), streams 1..64, "
                          "dense_ratio in (0, 1]")
    mode = _get(raw, "mode", str, "direct", "")
    if mode not in ("direct", "cached"):
        raise ConfigError(f"mode: expected 'direct' or 'cached', got {mode!r}")
    prefetch = _get(raw, "fs_prefetch", dict, None, "")
    cfg = RafsConfig(
        backend=BackendConfig(btype, bconf),
        cache=cache,
        device_id=_get(device, "id", str, "", "device."),
        mode=mode,
        digest_validate=_get(raw, "digest_validate", bool, False, ""),
        enable_xattr=_get(raw, "enable_xattr", bool, False, ""),
        iostats_files=_get(raw, "iostats_files", bool, False, ""),
        amplify_io=_get(raw, "amplify_io", int, 1 << 20, ""),
        entry_timeout=float(_get(raw, "entry_timeout", (int, float), 86400.0, "")),
        attr_timeout=float(_get(raw, "attr_timeout", (int, float), 86400.0, "")),
        case_insensitive=_get(raw, "case_insensitive", bool, False, ""),
        chunk_cache_size=_get(raw, "chunk_cache_size", int, 128 << 20, ""),
    )
    if cfg.chunk_cache_size < 0:
        raise ConfigError(f"chunk_cache_size: {cfg.chunk_cache_size} is negative")
    if prefetch is not None:
        cfg.prefetch_enable = _get(prefetch, "enable", bool, False, "fs_prefetch.")
        cfg.prefetch_threads = _get(prefetch, "threads_count", int, 8, "fs_prefetch.")
        cfg.prefetch_all = _get(prefetch, "prefetch_all", bool, True, "fs_prefetch.")
        cfg.prefetch_bandwidth = _get(prefetch, "bandwidth_rate", int, 0, "fs_prefetch.")
        cfg.prefetch_merging_size = _get(prefetch, "merging_size", int, 1 << 20, "fs_prefetch.")
        if cfg.prefetch_enable and not 1 <= cfg.prefetch_threads <= 1024:
            raise ConfigError("fs_prefetch.threads_count: must be 1..1024")
        if cfg.prefetch_bandwidth < 0 or not 0 <= cfg.prefetch_merging_size <= 0x10000000:
            raise ConfigError("fs_prefetch: bandwidth_rate must be >= 0 and merging_size 0..0x10000000")
    return cfg
