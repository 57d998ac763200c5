"""The `registry` backend: lazy blob reads from an OCI distribution registry."""

from . import lazy_cas  # noqa: F401  (first: aiohttp is imported there, its CA loading put off)
from .backend import RegistryBackend
from .client import Counters, RegistryClient
from .config import ProxyConfig, RegistryConfig, parse_registry_config

__all__ = ["Counters", "ProxyConfig", "RegistryBackend", "RegistryClient", "RegistryConfig", "parse_registry_config"]
