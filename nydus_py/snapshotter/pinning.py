"""Tags are resolved once, at pull time, and the image is mounted by digest from then on.

Why: the daemon is started again (recover_policy restart, a snapshotter restart, a node reboot)
long after the pull; mounting the tag then would serve whatever the tag points to by then, under
containers made from the old image. The digest is the one the registry's manifest hashes to (of
an index when the tag names one: the daemon picks the platform from it, as at pull time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from typing import Any

from ..convert import oci
from ..convert.errors import ConvertError
from ..convert.reference import ImageRef
from ..storage.registry import RegistryClient, parse_registry_config
from .errors import Unavailable


def pin_reference(ref: ImageRef, backend: dict[str, Any], timeout: float = 60.0) -> str:
    """`docker://REGISTRY/REPO@sha256:...` for the tag in `ref`, through a registry backend
    config (host, repo, auth, skip_verify, scheme) like the daemon's."""
    try:
        cfg = parse_registry_config(backend, env={}, docker_config_paths=[], where="")
    except ValueError as e:
        raise Unavailable(f"image {ref}: registry config: {e}") from None

    async def run() -> bytes | None:
        client = RegistryClient(cfg)
        await client.start()
        try:
            got = await client.fetch_manifest(ref.reference, oci.ACCEPT)
        finally:
            await client.close()
        return None if got is None else got[0]

    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pin")
    try:
        body = ex.submit(asyncio.run, run()).result(timeout)
    except concurrent.futures.TimeoutError:
        raise Unavailable(f"image {ref}: the registry did not answer within {timeout:.0f}s") from None
    except (OSError, ValueError, ConvertError) as e:
        raise Unavailable(f"image {ref}: cannot resolve the tag: {getattr(e, 'strerror', None) or e}") from None
    finally:
        ex.shutdown(wait=False)
    if body is None:
        raise Unavailable(f"image {ref} not found in the registry (manifest unknown)")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return "docker://" + str(ImageRef(ref.registry, ref.repository, None, digest))
