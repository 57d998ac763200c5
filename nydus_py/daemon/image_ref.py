"""Mounting a Nydus image by reference: `docker://REGISTRY/REPO:TAG` as a rafs mount source.

`nydusd-py fuse --image REGISTRY/REPO:TAG` and `POST /api/v1/mount` with
`{"fs_type": "rafs", "source": "docker://REGISTRY/REPO:TAG", "config": ...}` both come here. The
daemon fetches the manifest and the bootstrap layer, mounts the bootstrap, and reads data lazily
from the blobs through the registry backend, whose `host` and `repo` become the reference's.

Config: the mount's config (or the daemon's `--config`) must use the `registry` backend; its
auth, scheme, timeouts, proxy and cache settings apply. With no config at all, one is made:
registry backend, HTTPS, except plain HTTP for loopback registries (127.0.0.0/8, localhost, ::1),
as Docker treats those as insecure by default; the image's prefetch table, if it has one, is
prefetched from the start (fs_prefetch, not prefetch_all). A config without a cache section (the
made-up one included) gets the default blob cache: `$NYDUS_PY_CACHE_DIR`, else `/var/lib/nydus-py/cache`,
capped at `$NYDUS_PY_CACHE_SIZE` bytes (default 10 GiB, least recently used blobs evicted).
Without a cache every page-cache miss would be a ranged GET of one chunk, fetched again after
every eviction: a lazy image would lose to a full pull.

Where the bootstrap goes: with a blobcache, under its work_dir as `<layer digest>.image.boot`
(kept and reused, so a restart or a takeover does not download it again); otherwise in a temp
directory that is removed as soon as the bootstrap is mapped.
"""

import concurrent.futures
import contextlib
import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import CACHE_TYPES, ConfigError, ParsedConfig, parse_any
from ..convert.errors import ConvertError
from ..convert.reference import ImageRef, is_loopback, parse_reference
from ..rafs.errors import FormatError
from .errors import BadRequest

if TYPE_CHECKING:
    from ..convert.pull import NydusImage
    from ..storage.registry import RegistryBackend

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
DEFAULT_PREFETCH_THREADS = 4


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
          "mode": "direct", "digest_validate": False, "enable_xattr": True,
          # the image's prefetch table (nydusify's hints) from the start, as the snapshotter's
          # default config does; without a table nothing is started (daemon.instance)
          "fs_prefetch": {"enable": True, "prefetch_all": False, "threads_count": DEFAULT_PREFETCH_THREADS}}
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


FETCH_TIMEOUT = 600.0


@dataclass
class ImagePlan:
    """What mounting `docker://REF` needs before any request is made: the reference, the mount's
    config (registry backend pointed at it) and where the bootstrap goes."""

    ref: ImageRef
    parsed: ParsedConfig
    dest_dir: str
    temp_dir: str | None = None

    def start_fetch(self, backend: "RegistryBackend") -> "concurrent.futures.Future[NydusImage]":
        """Resolve the manifest and fetch the bootstrap through `backend`'s own client and loop:
        the connection, and any token, the blob reads use next (no second client, handshake or
        auth round trip); the caller does its other set-up meanwhile."""
        import asyncio  # (loaded with the backend by then)

        from ..convert.pull import fetch_bootstrap

        return asyncio.run_coroutine_threadsafe(fetch_bootstrap(backend.client, self.ref, self.dest_dir),
                                                backend.loop)

    def finish(self, fut: "concurrent.futures.Future[NydusImage]", timeout: float = FETCH_TIMEOUT) -> ImageBootstrap:
        """The fetched bootstrap; BadRequest with the reason (the temp dir removed) on failure."""
        try:
            try:
                image = fut.result(timeout)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise BadRequest(f"image {self.ref}: fetching the bootstrap took more than {timeout:.0f}s") from None
            except (ConvertError, FormatError) as e:
                raise BadRequest(str(e)) from None
            except OSError as e:
                raise BadRequest(f"image {self.ref}: {e.strerror or e}") from None
        except BaseException:
            self.cleanup()
            raise
        return ImageBootstrap(image.bootstrap_path, self.ref, image.manifest_digest, self.temp_dir)

    def cleanup(self) -> None:
        _cleanup(self.temp_dir)
        self.temp_dir = None



def plan_image_mount(source: str, config_text: str, fallback: ParsedConfig | None) -> ImagePlan:
    """Parse `source` (`docker://REF`) and the mount's config; BadRequest with the reason when the
    reference or the config is unusable. Makes no request."""
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
    cache = parsed.rafs.cache
    if cache.type in CACHE_TYPES:
        return ImagePlan(ref, parsed, cache.work_dir)
    temp_dir = tempfile.mkdtemp(prefix="nydusd-py-image-")
    return ImagePlan(ref, parsed, temp_dir, temp_dir)


def prepare_image_mount(source: str, config_text: str,
                        fallback: ParsedConfig | None) -> tuple[ImageBootstrap, ParsedConfig]:
    """Fetch the bootstrap of image `source` (`docker://REF`) with a client of its own (a
    takeover, which has no backend yet); BadRequest with the reason when the reference, the
    config or the image is unusable."""
    # Imported here: they pull in aiohttp, which a daemon serving local images never needs.
    from ..convert.pull import fetch_bootstrap_sync
    from ..storage.registry import parse_registry_config

    plan = plan_image_mount(source, config_text, fallback)
    try:
        reg = parse_registry_config(plan.parsed.rafs.backend.config)
    except ConfigError as e:
        plan.cleanup()
        raise BadRequest(f"config: {e}") from None
    fut: concurrent.futures.Future[NydusImage] = concurrent.futures.Future()
    try:
        fut.set_result(fetch_bootstrap_sync(reg, plan.ref, plan.dest_dir, timeout=FETCH_TIMEOUT))
    except BaseException as e:  # (reported by finish)
        fut.set_exception(e)
    return plan.finish(fut), plan.parsed


def _cleanup(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(path)


def image_source(ref: str) -> str:
    """The mount source for a reference given on the command line (`docker://` added)."""
    return ref if is_image_source(ref) else IMAGE_PREFIX + ref

