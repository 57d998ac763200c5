"""The `registry` backend body of a nydusd config, checked once at start-up.

Field names and defaults are nydusd's (NYDUSD-CONTRACT.md section 2.2); `read_deadline` and
`max_connections` are this daemon's additions. Unknown keys are ignored, wrong types are a
ConfigError naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import ConfigError
from .auth import resolve_credentials

HEADER_ENV_PREFIX = "NYDUS_HEADER_"


@dataclass(frozen=True)
class ProxyConfig:
    url: str = ""
    ping_url: str = ""
    fallback: bool = True
    check_interval: float = 5.0
    use_http: bool = False


@dataclass(frozen=True)
class RegistryConfig:
    host: str
    repo: str
    scheme: str = "https"
    auth: str | None = None  # base64 user:pass, after IMAGE_PULL_AUTH / docker config.json
    registry_token: str | None = None
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    timeout: float = 5.0  # whole request; 0 = none
    connect_timeout: float = 5.0
    retry_limit: int = 0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    blob_url_scheme: str = ""
    blob_redirected_host: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    read_deadline: float = 0.0  # 0 = derived from timeout and retries
    max_connections: int = 16

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def retries(self) -> int:
        """Retries of one read after its first attempt: `retry_limit` when set, else 3 (nydusd HEAD)."""
        return self.retry_limit if self.retry_limit > 0 else 3

    @property
    def deadline(self) -> float:
        """Seconds one blob read may take, retries included, before the reader gets EIO."""
        if self.read_deadline > 0:
            return self.read_deadline
        per_try = self.timeout if self.timeout > 0 else 30.0
        return min(120.0, per_try * (self.retries + 1) + 2.0)


def _get(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...], default: Any, where: str) -> Any:
    if key not in obj or obj[key] is None:
        return default
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        name = getattr(typ, "__name__", None) or "/".join(t.__name__ for t in typ)  # type: ignore[union-attr]
        raise ConfigError(f"{where}{key}: expected {name}, got {type(value).__name__}")
    return value


def _seconds(obj: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = float(_get(obj, key, (int, float), default, where))
    if value < 0 or value > 86400:
        raise ConfigError(f"{where}{key}: {value} is not a number of seconds in 0..86400")
    return value


def parse_registry_config(conf: Mapping[str, Any], env: Mapping[str, str] | None = None,
                          docker_config_paths: list[str] | None = None,
                          where: str = "device.backend.config.") -> RegistryConfig:
    """RegistryConfig from a backend `config` object; ConfigError on anything unusable."""
    env = os.environ if env is None else env
    host = _get(conf, "host", str, "", where)
    repo = _get(conf, "repo", str, "", where)
    if not host:
        raise ConfigError(f"{where}host: registry needs a host")
    if not repo:
        raise ConfigError(f"{where}repo: registry needs a repo")
    if "/" in host or "://" in host or any(c.isspace() for c in host):
        raise ConfigError(f"{where}host: expected host[:port], got {host!r}")
    if repo.startswith("/") or repo.endswith("/") or ".." in repo.split("/") or any(c.isspace() for c in repo):
        raise ConfigError(f"{where}repo: invalid repository name {repo!r}")
    scheme = "http" if _get(conf, "scheme", str, "https", where) == "http" else "https"
    try:
        auth = resolve_credentials(host, _get(conf, "auth", str, "", where) or None, env, docker_config_paths)
    except ValueError as e:
        raise ConfigError(f"{where}auth: {e}") from None
    retry_limit = _get(conf, "retry_limit", int, 0, where)
    if not 0 <= retry_limit <= 100:
        raise ConfigError(f"{where}retry_limit: {retry_limit} is not in 0..100")
    max_conn = _get(conf, "max_connections", int, 16, where)
    if not 1 <= max_conn <= 1024:
        raise ConfigError(f"{where}max_connections: {max_conn} is not in 1..1024")
    p = _get(conf, "proxy", dict, {}, where)
    pw = where + "proxy."
    proxy_url = _get(p, "url", str, "", pw)
    if proxy_url and not proxy_url.startswith(("http://", "https://")):
        raise ConfigError(f"{pw}url: expected an http(s) URL, got {proxy_url!r}")
    proxy = ProxyConfig(
        url=proxy_url,
        ping_url=_get(p, "ping_url", str, "", pw),
        fallback=_get(p, "fallback", bool, True, pw),
        check_interval=max(0.05, _seconds(p, "check_interval", 5.0, pw)),
        use_http=_get(p, "use_http", bool, False, pw),
    )
    cas = _get(conf, "ca_cert_files", list, [], where)
    if not all(isinstance(c, str) for c in cas):
        raise ConfigError(f"{where}ca_cert_files: expected a list of paths")
    headers = tuple(sorted((k[len(HEADER_ENV_PREFIX):], v) for k, v in env.items()
                           if k.startswith(HEADER_ENV_PREFIX) and len(k) > len(HEADER_ENV_PREFIX)))
    return RegistryConfig(
        host=host,
        repo=repo,
        scheme=scheme,
        auth=auth,
        registry_token=_get(conf, "registry_token", str, "", where) or None,
        skip_verify=_get(conf, "skip_verify", bool, False, where),
        ca_cert_files=tuple(cas),
        timeout=_seconds(conf, "timeout", 5.0, where),
        connect_timeout=_seconds(conf, "connect_timeout", 5.0, where),
        retry_limit=retry_limit,
        proxy=proxy,
        blob_url_scheme=_get(conf, "blob_url_scheme", str, "", where),
        blob_redirected_host=_get(conf, "blob_redirected_host", str, "", where),
        headers=headers,
        read_deadline=_seconds(conf, "read_deadline", 0.0, where),
        max_connections=max_conn,
    )
