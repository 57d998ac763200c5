"""`[remote.mirrors_config] dir`: registry mirrors in containerd's `certs.d` layout, as upstream
(config/daemonconfig/mirrors.go, selectMirrorHost) uses them.

For an image on REGISTRY, `DIR/<REGISTRY with :port as _port_>/hosts.toml`, else
`DIR/<REGISTRY>/hosts.toml`, else `DIR/_default/hosts.toml` lists `[host."SCHEME://MIRROR"]`
tables in order of preference. Before each mount the first mirror that has no `ping_url`, or
whose `ping_url` answers 2xx within 3 s, becomes the registry backend's host and scheme; with
none reachable the origin registry is used (logged). `header` and `ca` entries are not applied
by our registry backend: they are logged once and the mirror is still used.
"""

from __future__ import annotations

import logging
import os
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PING_TIMEOUT = 3.0
_warned: set[str] = set()


@dataclass(frozen=True)
class Mirror:
    scheme: str
    host: str
    ping_url: str = ""


def host_directory(host: str) -> str:
    """containerd's ":port" -> "_port_" in directory names."""
    name, sep, port = host.rpartition(":")
    return f"{name}_{port}_" if sep and name else host


def load_mirrors(root: str, registry_host: str) -> list[Mirror]:
    """The mirrors configured for `registry_host`, in file order; [] when none."""
    candidates = [os.path.join(root, host_directory(registry_host))] if host_directory(registry_host) != \
        registry_host else []
    candidates += [os.path.join(root, registry_host), os.path.join(root, "_default")]
    for d in candidates:
        if os.path.isdir(d):
            break
    else:
        return []
    path = os.path.join(d, "hosts.toml")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return []
    except (OSError, tomllib.TOMLDecodeError) as e:
        log.warning("mirrors config %s: %s; using %s itself", path, e, registry_host)
        return []
    out = []
    for server, conf in (doc.get("host") or {}).items():
        if not isinstance(conf, dict):
            continue
        url = urlsplit(server if server.startswith(("http://", "https://")) else "https://" + server)
        for key in ("header", "ca", "client"):
            if key in conf and f"{path}:{server}:{key}" not in _warned:
                _warned.add(f"{path}:{server}:{key}")
                log.warning("mirrors config %s: %s of %s is not applied by nydusd-py's registry backend",
                            path, key, server)
        out.append(Mirror(url.scheme, url.netloc, str(conf.get("ping_url", ""))))
    return out


def _reachable(m: Mirror) -> bool:
    try:
        with urllib.request.urlopen(m.ping_url, timeout=PING_TIMEOUT) as r:
            return 200 <= r.status < 300
    except urllib.error.HTTPError as e:
        log.warning("mirror %s: ping %s answered %d, trying the next one", m.host, m.ping_url, e.code)
    except (OSError, ValueError) as e:
        log.warning("mirror %s: ping %s failed (%s), trying the next one", m.host, m.ping_url, e)
    return False


def select_mirror(root: str, registry_host: str) -> Mirror | None:
    """The first usable mirror for `registry_host`, or None (the origin)."""
    mirrors = load_mirrors(root, registry_host)
    for m in mirrors:
        if not m.ping_url or _reachable(m):
            return m
    if mirrors:
        log.warning("no mirror of %s is reachable: using the registry itself", registry_host)
    return None
