"""nydusd config text in any of its forms -> RafsConfig, plus the views the API shows of it.

Parsing order as nydusd: JSON v2 (`"version": 2`), then TOML v2, then JSON v1 (the form the
snapshotter and Kata send). v2 is converted to v1 and parsed by `config.model.parse_config`, so
both forms go through the same checks. Keys this daemon does not know are ignored (the
snapshotter always sends some) and each unknown key path is logged once per process.
`redacted_v2()` is the converted v2 form with credentials removed: what DaemonInfo reports.
"""

import base64
import binascii
import copy
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any

from .model import ConfigError, RafsConfig, parse_config

log = logging.getLogger(__name__)

MAX_CONFIG_SIZE = 1 << 20
SECRET_KEYS = ("auth", "registry_token", "access_key_id", "access_key_secret", "encryption_key", "password")

_PROXY = {"url", "ping_url", "fallback", "check_interval", "use_http", "check_pause_elapsed",
          "dragonfly_scheduler_endpoint"}
_CONNECTION = {"skip_verify", "ca_cert_files", "timeout", "connect_timeout", "retry_limit", "proxy", "mirrors",
               "max_connections", "read_deadline"}
BACKEND_KEYS: dict[str, set[str]] = {
    "registry": {"scheme", "host", "repo", "auth", "registry_token", "blob_url_scheme", "blob_redirected_host",
                 *_CONNECTION},
    "localfs": {"blob_file", "dir", "alt_dirs"},
    "oss": {"scheme", "endpoint", "bucket_name", "object_prefix", "access_key_id", "access_key_secret",
            *_CONNECTION},
    "s3": {"scheme", "endpoint", "region", "bucket_name", "object_prefix", "access_key_id", "access_key_secret",
           *_CONNECTION},
    "localdisk": {"device_path", "disable_gpt"},
    "http-proxy": {"addr", "path", *_CONNECTION},
}
_V1_TOP = {"device", "mode", "digest_validate", "iostats_files", "enable_xattr", "access_pattern",
           "latest_read_files", "amplify_io", "fs_prefetch", "entry_timeout", "attr_timeout", "fs_driver",
           "fuse_io_uring", "case_insensitive", "chunk_cache_size"}
# how a mount is served: our FUSE filesystem, or the kernel's EROFS driver over blob views
FS_DRIVERS = ("fusedev", "erofs")
_V1_DEVICE = {"id", "backend", "cache", "external_backends"}
_V1_CACHE = {"type", "compressed", "validate", "config"}
_V1_CACHE_CONF = {"work_dir", "disable_indexed_map", "enable_encryption", "enable_convergent_encryption",
                  "encryption_key", "size_limit", "stream_size", "streams", "dense_ratio",
                  "read_around", "dir_around"}
_V1_PREFETCH = {"enable", "threads_count", "merging_size", "bandwidth_rate", "prefetch_all", "stream_prefetch"}

_logged: set[str] = set()
_logged_lock = threading.Lock()


def _note_unknown(obj: Any, known: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        return
    for key in obj:
        if key not in known:
            path = f"{where}{key}"
            with _logged_lock:
                if path in _logged:
                    continue
                _logged.add(path)
            log.info("config: ignoring unknown key %s", path)


def _check_unknown_v1(raw: dict[str, Any]) -> None:
    _note_unknown(raw, _V1_TOP, "")
    device = raw.get("device")
    if isinstance(device, dict):
        _note_unknown(device, _V1_DEVICE, "device.")
        backend = device.get("backend")
        if isinstance(backend, dict):
            _note_unknown(backend, {"type", "config"}, "device.backend.")
            known = BACKEND_KEYS.get(str(backend.get("type")))
            conf = backend.get("config")
            if known is not None:
                _note_unknown(conf, known, "device.backend.config.")
                if isinstance(conf, dict):
                    _note_unknown(conf.get("proxy"), _PROXY, "device.backend.config.proxy.")
        cache = device.get("cache")
        if isinstance(cache, dict):
            _note_unknown(cache, _V1_CACHE, "device.cache.")
            _note_unknown(cache.get("config"), _V1_CACHE_CONF, "device.cache.config.")
    _note_unknown(raw.get("fs_prefetch"), _V1_PREFETCH, "fs_prefetch.")


@dataclass
class ParsedConfig:
    rafs: RafsConfig
    v1: dict[str, Any]  # the v1 JSON object actually parsed (v2 converted), secrets included
    access_pattern: bool = False
    latest_read_files: bool = False
    fs_driver: str = "fusedev"  # the top-level "fs_driver" key (FS_DRIVERS)
    fuse_io_uring: bool = False  # serve FUSE over io_uring (transport/fuse_uring), else /dev/fuse reads

    @property
    def id(self) -> str:
        return self.rafs.device_id

    def redacted_v2(self) -> dict[str, Any]:
        return redact(v1_to_v2(self.v1))


def _prefetch_v2_to_v1(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v2, v1 in (("enable", "enable"), ("threads", "threads_count"), ("batch_size", "merging_size"),
                   ("bandwidth_limit", "bandwidth_rate"), ("prefetch_all", "prefetch_all"),
                   ("stream_prefetch", "stream_prefetch")):
        if v2 in p:
            out[v1] = p[v2]
    return out


def _obj(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key}: expected an object, got {type(value).__name__}")
    return value


def v2_to_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """The v1 object equivalent to a v2 config (the renames of nydusd's conversion, reversed)."""
    backend = _obj(raw, "backend", "")
    btype = backend.get("type")
    if not isinstance(btype, str) or not btype:
        raise ConfigError("backend.type: missing")
    bconf = backend.get(btype)
    if not isinstance(bconf, dict):
        raise ConfigError(f"backend.{btype}: missing (the body sits under a key named after the type)")
    _note_unknown(bconf, BACKEND_KEYS.get(btype, set(bconf)), f"backend.{btype}.")
    cache = _obj(raw, "cache", "")
    ctype = cache.get("type", "")
    _note_unknown(cache, {"type", "compressed", "validate", "filecache", "fscache", "prefetch"}, "cache.")
    cconf = cache.get("filecache") or cache.get("fscache") or {}
    device: dict[str, Any] = {
        "id": raw.get("id", ""),
        "backend": {"type": btype, "config": bconf},
        "cache": {"type": ctype, "compressed": cache.get("compressed", False),
                  "validate": cache.get("validate", False), "config": cconf},
    }
    rafs = _obj(raw, "rafs", "")
    out: dict[str, Any] = {"device": device}
    for v2, v1 in (("mode", "mode"), ("validate", "digest_validate"), ("enable_xattr", "enable_xattr"),
                   ("iostats_files", "iostats_files"), ("access_pattern", "access_pattern"),
                   ("latest_read_files", "latest_read_files"), ("batch_size", "amplify_io"),
                   ("case_insensitive", "case_insensitive"), ("chunk_cache_size", "chunk_cache_size")):
        if v2 in rafs:
            out[v1] = rafs[v2]
    for key in ("fs_driver", "fuse_io_uring"):
        if key in raw:
            out[key] = raw[key]
    prefetch = rafs.get("prefetch") if isinstance(rafs.get("prefetch"), dict) else cache.get("prefetch")
    if isinstance(prefetch, dict):
        out["fs_prefetch"] = _prefetch_v2_to_v1(prefetch)
    return out


def v1_to_v2(v1: dict[str, Any]) -> dict[str, Any]:
    """nydusd's v1 -> v2 conversion (§2.6), for reporting."""
    device = v1.get("device") or {}
    backend = device.get("backend") or {}
    cache = device.get("cache") or {}
    btype = backend.get("type", "")
    ctype = cache.get("type", "") or ""
    out: dict[str, Any] = {
        "version": 2,
        "id": device.get("id", ""),
        "backend": {"type": btype, btype: copy.deepcopy(backend.get("config") or {})},
        "cache": {"type": ctype, "compressed": bool(cache.get("compressed", False)),
                  "validate": bool(cache.get("validate", False))},
        "rafs": {"mode": v1.get("mode", "direct"), "validate": bool(v1.get("digest_validate", False)),
                 "enable_xattr": bool(v1.get("enable_xattr", False)),
                 "iostats_files": bool(v1.get("iostats_files", False)),
                 "access_pattern": bool(v1.get("access_pattern", False)),
                 "latest_read_files": bool(v1.get("latest_read_files", False)),
                 "batch_size": v1.get("amplify_io", 1 << 20)},
    }
    for key in ("fs_driver", "fuse_io_uring"):
        if key in v1:
            out[key] = v1[key]
    for key in ("case_insensitive", "chunk_cache_size"):
        if key in v1:
            out["rafs"][key] = v1[key]
    if ctype in ("blobcache", "filecache"):
        out["cache"]["filecache"] = {"work_dir": (cache.get("config") or {}).get("work_dir", ".")}
    elif ctype == "fscache":
        out["cache"]["fscache"] = {"work_dir": (cache.get("config") or {}).get("work_dir", ".")}
    p = v1.get("fs_prefetch")
    if isinstance(p, dict):
        out["rafs"]["prefetch"] = {"enable": bool(p.get("enable", False)), "threads": p.get("threads_count", 8),
                                   "batch_size": p.get("merging_size", 1 << 20),
                                   "bandwidth_limit": p.get("bandwidth_rate", 0),
                                   "prefetch_all": bool(p.get("prefetch_all", True))}
    return out


def redact(obj: Any) -> Any:
    """A copy with every credential nulled (auth, tokens) or emptied (object-store keys)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in SECRET_KEYS:
                out[k] = "" if k.startswith("access_key") else None
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _load_toml(text: str, json_err: json.JSONDecodeError) -> dict[str, Any]:
    import tomllib  # (here: ~2.5 ms of every start, for the configs that are not JSON)

    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError):  # TOMLDecodeError, too many digits, too deep nesting
        raise ConfigError(f"invalid JSON: {json_err}") from None
    if raw.get("version") != 2:
        raise ConfigError("TOML config must be version 2")
    return raw


def _load(text: str | bytes) -> dict[str, Any]:
    if len(text) > MAX_CONFIG_SIZE:
        raise ConfigError(f"config is larger than {MAX_CONFIG_SIZE} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise ConfigError(f"config is not UTF-8: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as json_err:
        raw = _load_toml(text, json_err)
    except (ValueError, RecursionError) as e:  # valid JSON syntax the decoder refuses to build
        raise ConfigError(f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("configuration must be a JSON object")
    return raw


def parse_any(text: str | bytes, *, pull_auth: str | None = None) -> ParsedConfig:
    """Parse v2 JSON/TOML or v1 JSON. `pull_auth` (IMAGE_PULL_AUTH) replaces the registry auth."""
    raw = _load(text)
    if "version" in raw:
        if raw["version"] != 2 or isinstance(raw["version"], bool):
            raise ConfigError(f"version: unsupported config version {raw['version']!r}")
        _note_unknown(raw, {"version", "id", "backend", "cache", "rafs", "overlay", "external_backends",
                            "metadata_path", "fs_driver", "fuse_io_uring"}, "")
        v1 = v2_to_v1(raw)
    else:
        _check_unknown_v1(raw)
        v1 = raw
    if pull_auth:
        v1 = apply_pull_auth(v1, pull_auth)
    rafs = parse_config(json.dumps(v1))
    flags = {k: v1.get(k, False) for k in ("access_pattern", "latest_read_files", "fuse_io_uring")}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise ConfigError(f"{k}: expected bool, got {type(v).__name__}")
    driver = v1.get("fs_driver", "fusedev")
    if driver not in FS_DRIVERS:
        raise ConfigError(f"fs_driver: expected one of {', '.join(FS_DRIVERS)}, got {driver!r}")
    return ParsedConfig(rafs, v1, **flags, fs_driver=driver)


def apply_pull_auth(v1: dict[str, Any], auth: str) -> dict[str, Any]:
    """IMAGE_PULL_AUTH: base64 `user:pass` that replaces the registry backend's `auth`."""
    try:
        decoded = base64.b64decode(auth, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigError("IMAGE_PULL_AUTH is not base64 of user:password") from None
    if ":" not in decoded:
        raise ConfigError("IMAGE_PULL_AUTH is not base64 of user:password")
    out = copy.deepcopy(v1)
    backend = (out.get("device") or {}).get("backend") or {}
    if backend.get("type") == "registry" and isinstance(backend.get("config"), dict):
        backend["config"]["auth"] = auth
    return out


def read_config_file(path: str) -> ParsedConfig:
    """`--config FILE`, with IMAGE_PULL_AUTH applied as nydusd does for the command-line config."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file")
    size = st.st_size
    if size > MAX_CONFIG_SIZE:
        raise ConfigError(f"{path}: config is larger than {MAX_CONFIG_SIZE} bytes")
    with open(path, "rb") as f:
        return parse_any(f.read(), pull_auth=os.environ.get("IMAGE_PULL_AUTH") or None)
