"""Read-around of random misses (storage/cache/blobcache, issue 12: a first command read without
hints), against a real `docker-registry`, counted in its access log: a file read after a
neighbour in the blob costs no second GET, and scattered reads that never use their neighbours
keep the bytes fetched within the budget. GETs are counted where they are sent (the backend's
counters) and where they arrive (the registry's access log, written a moment later: waited for)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.cache.blobcache import AROUND_WASTE
from nydus_py.storage.registry import RegistryBackend, parse_registry_config

from ..waiting import wait_until
from . import registry_rig as rig
from .synth import Blob, make_blob

REPO_NAME = "test/around"


def pushed(reg: rig.Registry, seed: int, n: int) -> tuple[Blob, RegistryBackend]:
    b = make_blob(n, seed=seed)
    b = dataclasses.replace(b, info=dataclasses.replace(b.info, blob_id=hashlib.sha256(b.data).hexdigest()))
    conf = {"host": reg.host, "repo": REPO_NAME, "scheme": "http", "timeout": 5}
    backend = RegistryBackend(parse_registry_config(conf, env={}, docker_config_paths=[]))
    backend.push_blob(b.data)
    return b, backend


def follow(b: Blob):  # noqa: ANN201
    return lambda c: iter(b.chunks[c.index + 1:])


def arrived(reg: rig.Registry, blob_id: str, n: int) -> None:
    """The registry logged `n` GETs of the blob (its access log lags the answers)."""
    wait_until(lambda: reg.blob_gets(blob_id) >= n, 10, f"{n} GETs of the blob in the registry's log")
    assert reg.blob_gets(blob_id) == n


def test_a_neighbour_read_after_a_random_miss_costs_no_get(tmp_path: Path, plain_registry: rig.Registry) -> None:
    b, backend = pushed(plain_registry, 61, 120)
    with backend:
        m = BlobCacheManager(str(tmp_path / "cache"), backend)
        logged, sent = plain_registry.blob_gets(b.info.blob_id), backend.counters.requests
        # a file of 40 chunks, a random miss: what it asks for pays for a window after it
        assert m.read_chunks(b.info, b.chunks[0:40], follow=follow(b)) == b.plain[0:40]
        assert backend.counters.requests == sent + 1 and m.stats.around_chunks >= 3
        for i in (41, 42):  # files read together, next in the blob
            assert m.read_chunks(b.info, [b.chunks[i]], follow=follow(b)) == [b.plain[i]]
        assert backend.counters.requests == sent + 1
        assert m.stats.ahead_used_bytes == b.chunks[41].compressed_size + b.chunks[42].compressed_size
        arrived(plain_registry, b.info.blob_id, logged + 1)
        m.close()


def test_scattered_reads_keep_to_the_budget(tmp_path: Path, plain_registry: rig.Registry) -> None:
    b, backend = pushed(plain_registry, 62, 600)
    with backend:
        m = BlobCacheManager(str(tmp_path / "cache"), backend)
        logged, sent = plain_registry.blob_gets(b.info.blob_id), backend.counters.requests
        assert m.read_chunks(b.info, b.chunks[0:40], follow=follow(b)) == b.plain[0:40]
        picks = list(range(60, 600, 31))
        for i in picks:
            assert m.read_chunks(b.info, [b.chunks[i]], follow=follow(b)) == [b.plain[i]]
        asked = sum(c.compressed_size for c in b.chunks[0:40]) + sum(b.chunks[i].compressed_size for i in picks)
        assert m.stats.demand_bytes == asked
        assert m.stats.ondemand_bytes - asked == m.stats.ahead_bytes <= AROUND_WASTE * asked
        assert m.stats.around_refused > 0
        assert backend.counters.requests - sent == 1 + len(picks)  # none was a neighbour
        arrived(plain_registry, b.info.blob_id, logged + 1 + len(picks))
        m.close()
