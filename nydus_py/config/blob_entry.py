"""nydus's `BlobCacheEntry`: one blob (a bootstrap or a data blob) and the storage config that
reaches it, as `nydus-image export --config` reads it (upstream's `api/src/config.rs`).

Both of upstream's forms are taken: `config_v2` (a v2 config: backend, cache, `metadata_path`)
and the legacy `config` (`backend_type`/`backend_config`, `cache_type`/`cache_config`,
`metadata_path`), which is turned into the same thing.
"""

import json
from dataclasses import dataclass
from typing import Any

from .forms import ParsedConfig, parse_any
from .model import ConfigError

BLOB_TYPES = ("bootstrap", "datablob")
MAX_ENTRY_SIZE = 0x10_0000  # upstream refuses larger configuration files


@dataclass(frozen=True)
class BlobCacheEntry:
    blob_type: str
    blob_id: str
    domain_id: str
    config: ParsedConfig
    metadata_path: str | None  # the bootstrap file, for a "bootstrap" entry


def _legacy_to_v2(legacy: Any) -> dict[str, Any]:
    if not isinstance(legacy, dict):
        raise ConfigError("config: expected an object")
    for key in ("backend_type", "cache_type"):
        if not isinstance(legacy.get(key), str):
            raise ConfigError(f"config.{key}: expected a string")
    backend_type, cache_type = legacy["backend_type"], legacy["cache_type"]
    v2: dict[str, Any] = {"version": 2, "id": legacy.get("id", ""),
                          "backend": {"type": backend_type, backend_type: legacy.get("backend_config") or {}},
                          "cache": {"type": cache_type, cache_type: legacy.get("cache_config") or {}}}
    if legacy.get("metadata_path") is not None:
        v2["metadata_path"] = legacy["metadata_path"]
    return v2


def parse_blob_cache_entry(text: str | bytes) -> BlobCacheEntry:
    """The entry in `text` (JSON), checked as upstream checks it; `ConfigError` says what is wrong."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"blob cache entry: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError("blob cache entry: expected a JSON object")
    blob_type, blob_id = raw.get("type"), raw.get("id")
    if blob_type not in BLOB_TYPES:
        raise ConfigError(f"type: expected one of {', '.join(BLOB_TYPES)}, got {blob_type!r}")
    if not isinstance(blob_id, str) or not blob_id:
        raise ConfigError("id: expected a non-empty string")
    domain = raw.get("domain_id", "")
    if not isinstance(domain, str):
        raise ConfigError("domain_id: expected a string")
    v2 = raw.get("config_v2")
    if v2 is None:
        if raw.get("config") is None:
            raise ConfigError("blob cache entry: neither config_v2 nor config is given")
        v2 = _legacy_to_v2(raw["config"])
    if not isinstance(v2, dict):
        raise ConfigError("config_v2: expected an object")
    if v2.get("version") != 2:
        raise ConfigError(f"config_v2.version: expected 2, got {v2.get('version')!r}")
    if not isinstance(v2.get("backend"), dict):
        raise ConfigError("config_v2.backend: a backend is needed to reach the blobs")
    meta = v2.get("metadata_path")
    if meta is not None and (not isinstance(meta, str) or not meta):
        raise ConfigError("config_v2.metadata_path: expected a non-empty string")
    return BlobCacheEntry(blob_type, blob_id, domain, parse_any(json.dumps(v2)), meta)


def read_blob_cache_entry(path: str) -> BlobCacheEntry:
    with open(path, "rb") as f:
        text = f.read(MAX_ENTRY_SIZE + 1)
    if len(text) > MAX_ENTRY_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_ENTRY_SIZE} bytes")
    try:
        return parse_blob_cache_entry(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
