"""Registry endpoints of the image tools (convert, check, copy, mount): one place that turns the
command-line switches (`--*-insecure`, `--plain-http`, `--*-auth`) into a storage `RegistryConfig`,
and a transport failure into one line a person can act on.

A plain-HTTP registry reached over HTTPS answers the TLS hello with HTTP bytes, which OpenSSL
reports as `WRONG_VERSION_NUMBER`; users see that only as a hint to pass `--plain-http` (or the
side's `--*-insecure`), never as an aiohttp traceback text.
"""

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from ..storage.registry import RegistryConfig, parse_registry_config
from ..storage.registry.auth import decode_basic
from .errors import ConvertError
from .reference import ImageRef

_PLAIN_HTTP_SIGNS = ("wrong version number", "wrong_version_number", "record layer failure")
_CERT_SIGNS = ("certificate verify failed", "certificate_verify_failed", "self-signed", "self signed")


@dataclass(kw_only=True)
class RegistryFlags:
    """The registry flags every nydusify tool takes (`--source-insecure`, `--plain-http`,
    `--*-auth`, `--work-dir`), as keyword fields of its options."""

    source_insecure: bool = False
    target_insecure: bool = False
    plain_http: bool = False
    source_auth: str | None = None  # "user:password" or base64 of it
    target_auth: str | None = None
    work_dir: str | None = None
    docker_config_paths: list[str] | None = None  # None: $DOCKER_CONFIG / ~/.docker/config.json


@dataclass(frozen=True)
class Endpoint:
    """How to reach one side: `side` names it in messages and in the flag hints."""

    side: str  # "source" | "target"
    ref: ImageRef
    insecure: bool = False  # skip certificate checks; the HTTPS->HTTP fallback reaches a plain registry
    plain_http: bool = False  # talk plain HTTP from the first request (nydusify's --plain-http)
    auth: str | None = None  # "user:password" or base64 of it


def normalize_auth(value: str) -> str:
    """base64 `user:pass` from either `user:pass` or its base64; ConvertError otherwise."""
    v = value.strip()
    if ":" in v:
        return base64.b64encode(v.encode()).decode()
    try:
        decode_basic(v)
    except (ValueError, binascii.Error):
        raise ConvertError("credentials must be USER:PASSWORD or base64 of it") from None
    return v


def registry_config(ref: ImageRef, insecure: bool, auth: str | None,
                    docker_config_paths: list[str] | None, scheme: str = "https") -> RegistryConfig:
    """The storage backend's registry config for `ref`: explicit auth, else docker config.json;
    `insecure` skips certificate checks (and the client's sticky HTTPS->HTTP fallback reaches a
    plain registry)."""
    conf: dict[str, Any] = {"host": ref.host, "repo": ref.repository, "scheme": scheme,
                            "skip_verify": insecure, "timeout": 30, "connect_timeout": 10}
    if auth:
        conf["auth"] = normalize_auth(auth)
    try:
        return parse_registry_config(conf, env={}, docker_config_paths=docker_config_paths, where="")
    except ValueError as e:
        raise ConvertError(f"{ref}: {e}") from None


def endpoint_config(ep: Endpoint, docker_config_paths: list[str] | None) -> RegistryConfig:
    return registry_config(ep.ref, ep.insecure, ep.auth, docker_config_paths,
                           scheme="http" if ep.plain_http else "https")


def transport_error(ep: Endpoint, e: OSError, what: str = "") -> ConvertError:
    """One readable line for a failure talking to `ep`'s registry: a TLS handshake against a
    plain-HTTP registry, or a certificate check, becomes a hint naming the flag that helps."""
    text = str(e.strerror or e)
    low = text.lower()
    where = f"{ep.side} {ep.ref}" + (f": {what}" if what else "")
    host = ep.ref.registry
    if not ep.plain_http and any(s in low for s in _PLAIN_HTTP_SIGNS):
        return ConvertError(f"{where}: {host} answered HTTPS with plain HTTP; it is a plain-HTTP registry: "
                            f"pass --{ep.side}-insecure or --plain-http")
    if not ep.insecure and any(s in low for s in _CERT_SIGNS):
        return ConvertError(f"{where}: the TLS certificate of {host} is not trusted; pass --{ep.side}-insecure "
                            "to skip the check")
    if "connect call failed" in low or "connection refused" in low:
        return ConvertError(f"{where}: cannot connect to {host}: connection refused")
    return ConvertError(f"{where}: {text}")
