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

from ..storage.registry import RegistryClient
from .push_retry import PushRetry, RetryStats, chunked_pushes, retry_pushes
from .remote import Endpoint, endpoint_config


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
