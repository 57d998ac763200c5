"""Kubelet credential provider plugins (`[remote.auth] enable_kubelet_credential_providers`),
as upstream's pkg/auth/kubelet.go: the one `[remote.auth]` source that works without a cluster.

A plugin is an executable in `credential_provider_bin_dir` named after its provider; it gets a
`CredentialProviderRequest` (JSON) on stdin and answers a `CredentialProviderResponse` with
`auth: {MATCH: {username, password}}`. The config is kubelet's `CredentialProviderConfig` (YAML
or JSON). Providers run for images matching their `matchImages` (kubelet's glob rules: each host
label a glob, same label count, port equal when given, the glob's path a prefix). Answers are
cached per `cacheKeyType` (Image, Registry, Global) for `cacheDuration` (else the provider's
`defaultCacheDuration`). Upstream's order is kept: docker config.json first, then these.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config.goformat import parse_go_duration

log = logging.getLogger(__name__)

API_VERSION = "credentialprovider.kubelet.k8s.io/v1"
EXEC_TIMEOUT = 60.0


class ProviderConfigError(ValueError):
    pass


def parse_duration(text: str) -> float:
    """Go's time.Duration text ("12h", "1h30m", "0s", "0") in seconds; "" is 0."""
    if text == "":
        return 0.0
    try:
        return parse_go_duration(text)
    except ValueError:
        raise ProviderConfigError(f"invalid duration {text!r}") from None


def _split(url: str) -> tuple[list[str], str, str]:
    """(host labels, port, path) of an image or a matchImages pattern (scheme ignored)."""
    url = url.split("://", 1)[-1]
    host, _, path = url.partition("/")
    host, _, port = host.partition(":")
    return host.split("."), port, path


def image_matches(pattern: str, image: str) -> bool:
    """kubelet's URLsMatchStr."""
    glob_host, glob_port, glob_path = _split(pattern)
    host, port, path = _split(image)
    if len(glob_host) != len(host) or (glob_port and glob_port != port):
        return False
    if not all(fnmatch.fnmatchcase(h, g) for g, h in zip(glob_host, host, strict=True)):
        return False
    return path.startswith(glob_path)


@dataclass
class Provider:
    name: str
    match_images: list[str]
    default_cache: float
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def load_config(path: str) -> list[Provider]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except OSError as e:
        raise ProviderConfigError(f"credential_provider_config {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            import yaml  # (YAML is kubelet's usual form; JSON needs nothing)
        except ImportError:
            raise ProviderConfigError(f"credential_provider_config {path}: YAML needs PyYAML; write it as JSON") \
                from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ProviderConfigError(f"credential_provider_config {path}: {e}") from None
    if not isinstance(doc, dict) or not doc.get("providers"):
        raise ProviderConfigError(f"credential_provider_config {path}: at least one provider is required")
    out: list[Provider] = []
    for p in doc["providers"]:
        out.append(_provider(p, path, {q.name for q in out}))
    return out


def _provider(p: Any, path: str, seen: set[str]) -> Provider:
    where = f"credential_provider_config {path}"
    if not isinstance(p, dict):
        raise ProviderConfigError(f"{where}: a provider must be a mapping")
    name = p.get("name") or ""
    if not isinstance(name, str) or not name or any(c in name for c in " /\\") or name in (".", ".."):
        raise ProviderConfigError(f"{where}: invalid provider name {name!r}")
    if name in seen:
        raise ProviderConfigError(f"{where}: duplicate provider name: {name}")
    if p.get("apiVersion") != API_VERSION:
        raise ProviderConfigError(f"{where}: provider {name}: unsupported apiVersion {p.get('apiVersion')!r} "
                                  f"(only {API_VERSION})")
    images = p.get("matchImages") or []
    if not images or not all(isinstance(i, str) and i for i in images):
        raise ProviderConfigError(f"{where}: provider {name}: at least one non-empty matchImage is required")
    if "defaultCacheDuration" not in p:
        raise ProviderConfigError(f"{where}: provider {name}: defaultCacheDuration is required")
    env = {}
    for e in p.get("env") or []:
        if not isinstance(e, dict) or not e.get("name"):
            raise ProviderConfigError(f"{where}: provider {name}: environment variable name cannot be empty")
        env[str(e["name"])] = str(e.get("value", ""))
    return Provider(name, list(images), parse_duration(str(p["defaultCacheDuration"])),
                    [str(a) for a in p.get("args") or []], env)


class KubeletProvider:
    def __init__(self, config_path: str, bin_dir: str) -> None:
        if not bin_dir:
            raise ProviderConfigError("credential_provider_bin_dir must be set with enable_kubelet_credential_providers")
        self.providers = load_config(config_path)
        self.bin_dir = bin_dir
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}  # (provider, key) -> (expiry, auth)
        self.execs = 0

    def credentials(self, image: str) -> str | None:
        """base64 `user:pass` for `image` (REGISTRY/REPO), or None."""
        for p in self.providers:
            if not any(image_matches(m, image) for m in p.match_images):
                continue
            auths = self._cached(p, image)
            if auths is None:
                auths = self._exec(p, image)
            best = max((k for k in auths if image_matches(k, image)), key=len, default=None)
            if best is not None:
                return auths[best]
        return None

    def _cached(self, p: Provider, image: str) -> dict[str, str] | None:
        host = image.split("/", 1)[0]
        now = time.monotonic()
        with self._lock:
            for key in (image, host, "<global>"):
                hit = self._cache.get((p.name, key))
                if hit is not None and hit[0] > now:
                    return hit[1]
        return None

    def _exec(self, p: Provider, image: str) -> dict[str, str]:
        exe = os.path.join(self.bin_dir, p.name)
        request = json.dumps({"apiVersion": API_VERSION, "kind": "CredentialProviderRequest", "image": image})
        self.execs += 1
        try:
            r = subprocess.run([exe, *p.args], input=request, capture_output=True, text=True, timeout=EXEC_TIMEOUT,
                               env={**os.environ, **p.env})
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("credential provider %s for %s: %s", p.name, image, e)
            return {}
        if r.returncode != 0:
            log.error("credential provider %s for %s exited with %d: %s", p.name, image, r.returncode,
                      r.stderr.strip()[-300:])
            return {}
        try:
            resp = json.loads(r.stdout)
            if resp.get("kind") != "CredentialProviderResponse":
                raise ValueError(f"kind {resp.get('kind')!r}")
            auths = {k: base64.b64encode(f"{v['username']}:{v['password']}".encode()).decode()
                     for k, v in (resp.get("auth") or {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("credential provider %s for %s: bad response: %s", p.name, image, e)
            return {}
        ttl = parse_duration(resp["cacheDuration"]) if resp.get("cacheDuration") else p.default_cache
        kind = resp.get("cacheKeyType", "Image")
        key = {"Registry": image.split("/", 1)[0], "Global": "<global>"}.get(kind, image)
        if ttl > 0:
            with self._lock:
                self._cache[(p.name, key)] = (time.monotonic() + ttl, auths)
        return auths
