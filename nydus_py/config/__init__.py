"""nydusd's configuration: the RAFS v1 model every layer reads (`model`) and the v1/v2 JSON/TOML
forms the API and CLI accept (`forms`). The ground floor: it imports nothing else of nydus_py."""

from .forms import FS_DRIVERS, ParsedConfig, parse_any, read_config_file, redact
from .model import CACHE_TYPES, BackendConfig, CacheConfig, ConfigError, RafsConfig, parse_config

__all__ = ["CACHE_TYPES", "FS_DRIVERS", "BackendConfig", "CacheConfig", "ConfigError", "ParsedConfig", "RafsConfig",
           "parse_any", "parse_config", "read_config_file", "redact"]
