"""Mounting a Nydus image by reference: `docker://REGISTRY/REPO:TAG` as a rafs mount source.

`nydusd-py fuse --image REGISTRY/REPO:TAG` and `POST /api/v1/mount` with
`{"fs_type": "rafs", "source": "docker://REGISTRY/REPO:TAG", "config": ...}` both come here. The
daemon fetches the manifest and the bootstrap layer, mounts the bootstrap, and reads data lazily
from the blobs through the registry backend, whose `host` and `repo` become the reference's.

Config: the mount's config (or the daemon's `--config`) must use the `registry` backend; its
auth, scheme, timeouts, proxy and cache settings apply. With no config at all, one is made:
registry backend, HTTPS, except plain HTTP for loopback registries (127.0.0.0/8, localhost, ::1),
as Docker treats those as insecure by default. A config without a cache section (the made-up one
included) gets the default blob cache: `$NYDUS_PY_CACHE_DIR`, else `/var/lib/nydus-py/cache`,
capped at `$NYDUS_PY_CACHE_SIZE` bytes (default 10 GiB, least recently used blobs evicted).
Without a cache every page-cache miss would be a ranged GET of one chunk, fetched again after
every eviction: a lazy image would lose to a full pull.

Where the bootstrap goes: with a blobcache, under its work_dir as `<layer digest>.image.boot`
(kept and reused, so a restart or a takeover does not download it again); otherwise in a temp
directory that is removed as soon as the bootstrap is mapped.
"""

import contextlib
import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from ..config import CACHE_TYPES, ConfigError, ParsedConfig, parse_any
from ..convert.errors import ConvertError
from ..convert.reference import ImageRef, is_loopback, parse_reference
from ..rafs.errors import FormatError
from .errors import BadRequest

IMAGE_PREFIX = "docker://"


def is_image_source(source: str) -> bool:
    return source.startswith(IMAGE_PREFIX)


@dataclass
class ImageBootstrap:
    path: str
    ref: ImageRef
    manifest_digest: str
    temp_dir: str | None = None

    def release(self) -> None:
        """Drop a temporary bootstrap once it is mapped (the mapping outlives the name)."""
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


DEFAULT_CACHE_DIR = "/var/lib/nydus-py/cache"
DEFAULT_CACHE_SIZE = 10 << 30


def default_cache() -> dict[str, Any]:
    """The blob cache of image mounts whose config has none (see the module docstring)."""
    work_dir = os.environ.get("NYDUS_PY_CACHE_DIR") or DEFAULT_CACHE_DIR
    raw = os.environ.get("NYDUS_PY_CACHE_SIZE", "")
    try:
        size = int(raw) if raw else DEFAULT_CACHE_SIZE
    except ValueError:
        raise BadRequest(f"NYDUS_PY_CACHE_SIZE={raw!r} is not a byte count") from None
    return {"type": "blobcache", "config": {"work_dir": work_dir, "size_limit": max(0, size)}}


def default_config(ref: ImageRef) -> ParsedConfig:
    scheme = "http" if is_loopback(ref.host) else "https"
    v1 = {"device": {"backend": {"type": "registry", "config": {"host": ref.host, "repo": ref.repository,
                                                                "scheme": scheme}},
                     "cache": default_cache()},
          "mode": "direct", "digest_validate": False, "enable_xattr": True}
    return parse_any(json.dumps(v1))


def image_config(ref: ImageRef, parsed: ParsedConfig | None) -> ParsedConfig:
    """`parsed` with the registry backend pointed at `ref` (a made-up config when None)."""
    if parsed is None:
        return default_config(ref)
    if parsed.rafs.backend.type != "registry":
        raise BadRequest(f"mounting image {ref} needs a registry backend, the config has "
                         f"{parsed.rafs.backend.type!r}")
    v1 = copy.deepcopy(parsed.v1)
    v1["device"]["backend"]["config"].update(host=ref.host, repo=ref.repository)
    if not v1["device"].get("cache"):
        v1["device"]["cache"] = default_cache()
    try:
        out = parse_any(json.dumps(v1))
    except ConfigError as e:
        raise BadRequest(f"config: {e}") from None
    out.access_pattern, out.latest_read_files = parsed.access_pattern, parsed.latest_read_files
    return out


def prepare_image_mount(source: str, config_text: str,
                        fallback: ParsedConfig | None) -> tuple[ImageBootstrap, ParsedConfig]:
    """Fetch the bootstrap of image `source` (`docker://REF`); BadRequest with the reason when
    the reference, the config or the image is unusable."""
    # Imported here: they pull in aiohttp, which a daemon serving local images never needs.
    from ..convert.pull import fetch_bootstrap_sync
    from ..storage.registry import parse_registry_config

    try:
        ref = parse_reference(source[len(IMAGE_PREFIX):])
    except ConvertError as e:
        raise BadRequest(str(e)) from None
    parsed: ParsedConfig | None = fallback
    if config_text.strip():
        try:
            parsed = parse_any(config_text)
        except ConfigError as e:
            raise BadRequest(f"config: {e}") from None
    parsed = image_config(ref, parsed)
    try:
        reg = parse_registry_config(parsed.rafs.backend.config)
    except ConfigError as e:
        raise BadRequest(f"config: {e}") from None
    temp_dir = None
    cache = parsed.rafs.cache
    if cache.type in CACHE_TYPES:
        dest_dir = cache.work_dir
    else:
        dest_dir = temp_dir = tempfile.mkdtemp(prefix="nydusd-py-image-")
    try:
        image = fetch_bootstrap_sync(reg, ref, dest_dir)
    except (ConvertError, FormatError) as e:
        _cleanup(temp_dir)
        raise BadRequest(str(e)) from None
    except OSError as e:
        _cleanup(temp_dir)
        raise BadRequest(f"image {ref}: {e.strerror or e}") from None
    except BaseException:
        _cleanup(temp_dir)
        raise
    return ImageBootstrap(image.bootstrap_path, ref, image.manifest_digest, temp_dir), parsed


def _cleanup(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(path)


def image_source(ref: str) -> str:
    """The mount source for a reference given on the command line (`docker://` added)."""
    return ref if is_image_source(ref) else IMAGE_PREFIX + ref

