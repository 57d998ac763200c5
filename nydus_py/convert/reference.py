"""Image references (`[REGISTRY/]REPO[:TAG][@DIGEST]`), parsed like docker/distribution does.

The first path component is a registry when it has a '.', a ':' or is `localhost`; otherwise the
image is on Docker Hub (`docker.io`, one-component names get `library/`). A `docker://` prefix
(skopeo's transport name) is accepted and dropped. Without tag or digest the tag is `latest`.
"""

import re
from dataclasses import dataclass

from .errors import ConvertError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "index.docker.io"  # the host nydusd configs and the v2 API use for Docker Hub
PREFIX = "docker://"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_LEN = 4096


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """Where the v2 API lives (Docker Hub's API host for docker.io)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> "ImageRef":
        return ImageRef(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_loopback(host: str) -> bool:
    """Whether `host[:port]` names this machine (where plain HTTP is the usual default)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    return name in ("localhost", "::1") or name.startswith("127.")


def parse_reference(text: str) -> ImageRef:
    """ImageRef of `text`; ConvertError naming what is wrong."""
    raw = text.strip()
    if raw.startswith(PREFIX):
        raw = raw[len(PREFIX):]
    if not raw or len(raw) > MAX_LEN:
        raise ConvertError(f"invalid image reference {text!r}: empty or too long")
    if "://" in raw:
        raise ConvertError(f"invalid image reference {text!r}: expected REGISTRY/REPO[:TAG][@DIGEST], not a URL")
    name, _, digest = raw.partition("@")
    if digest and not DIGEST.fullmatch(digest):
        raise ConvertError(f"invalid image reference {text!r}: digest must be sha256:<64 hex digits>")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise ConvertError(f"invalid image reference {text!r}: bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _HOST.fullmatch(first):
            raise ConvertError(f"invalid image reference {text!r}: bad registry host {first!r}")
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if registry in (DOCKER_HUB, DOCKER_HUB_API, "registry-1.docker.io"):
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    comps = path.split("/")
    if not path or not all(_COMPONENT.fullmatch(c) for c in comps):
        raise ConvertError(f"invalid image reference {text!r}: repository {path!r} must be lowercase "
                           "components of letters, digits and . _ - separated by /")
    if len(path) > 255:
        raise ConvertError(f"invalid image reference {text!r}: repository name longer than 255 characters")
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, path, tag, digest or None)
