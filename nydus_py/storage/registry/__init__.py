"""The `registry` backend: lazy blob reads from an OCI distribution registry."""

from .backend import RegistryBackend
from .client import Counters, RegistryClient
from .config import ProxyConfig, RegistryConfig, parse_registry_config

__all__ = ["Counters", "ProxyConfig", "RegistryBackend", "RegistryClient", "RegistryConfig", "parse_registry_config"]
