"""The scaffolding the registry tools built on another image share (optimize, commit,
chunkdict generate): a work directory removed at the end, registry clients started and closed
with it, and the target's uploads retried (`push_retry`) and counted."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..storage.registry import RegistryClient
from . import oci
from .converter import parse_platforms
from .errors import ConvertError
from .push_retry import PushRetry, RetryStats, chunked_pushes, retry_pushes
from .reference import ImageRef, parse_reference
from .remote import Endpoint, endpoint_config


@dataclass
class OneImage:
    """A tool's source image and target tag, for one platform."""
    src_ref: ImageRef
    dst_ref: ImageRef
    platform: oci.Platform
    src_ep: Endpoint
    dst_ep: Endpoint


def one_image(opts: Any, tool: str) -> OneImage:
    """The endpoints of `opts` (source, target, platform, *_insecure, plain_http, *_auth): the
    target must be a tag, and at most one --platform (default: this machine's)."""
    src_ref, dst_ref = parse_reference(opts.source), parse_reference(opts.target)
    if dst_ref.digest:
        raise ConvertError(f"target {opts.target} must name a tag, not a digest")
    plats = parse_platforms(opts.platform)
    if plats and len(plats) > 1:
        raise ConvertError(f"{tool} takes one --platform")
    return OneImage(src_ref, dst_ref, plats[0] if plats else oci.host_platform(),
                    Endpoint("source", src_ref, opts.source_insecure, opts.plain_http, opts.source_auth),
                    Endpoint("target", dst_ref, opts.target_insecure, opts.plain_http, opts.target_auth))


@dataclass
class ToolSession:
    work: str
    sources: list[RegistryClient]
    target: RegistryClient
    retries: RetryStats


@contextlib.asynccontextmanager
async def tool_session(prefix: str, work_dir: str | None, sources: Sequence[Endpoint], target: Endpoint,
                       push_retry: PushRetry, docker_config_paths: list[str] | None,
                       push_chunk_size: int = 0) -> AsyncIterator[ToolSession]:
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=prefix, dir=work_dir)
    srcs = [RegistryClient(endpoint_config(ep, docker_config_paths)) for ep in sources]
    dst = RegistryClient(endpoint_config(target, docker_config_paths))
    stats = RetryStats()
    chunked_pushes(dst, push_chunk_size)
    retry_pushes(dst, push_retry, stats)
    try:
        for c in (*srcs, dst):
            await c.start()
        yield ToolSession(work, srcs, dst, stats)
    finally:
        for c in (*srcs, dst):
            await c.close()
        shutil.rmtree(work, ignore_errors=True)
