"""Faults between the daemon's storage and a real registry, injected by our proxy.

For every fault: reads return the right bytes or fail (EIO) within the deadline, never a wrong
byte; nothing wrong is left in the cache; the backend's counters count the fault."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.chunkdata import verify_chunk
from nydus_py.rafs.errors import FormatError
from nydus_py.storage.cache import BlobCacheManager, ChunkMap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.prefetch import resolve_path
from nydus_py.storage.registry import RegistryBackend, parse_registry_config

from ..clock import ManualClock
from . import images
from . import registry_rig as rig
from .fault_proxy import FaultProxy

TIMEOUT, DEADLINE = 1.0, 3.0

# fault -> (counter, what it counts)
COUNTER = {
    "5xx": lambda c, cs: c.errors_by_status.get(503, 0),
    "reset": lambda c, cs: c.network_errors,
    "stall": lambda c, cs: c.timeouts,
    "truncate": lambda c, cs: c.short_bodies + c.network_errors,
    "short": lambda c, cs: c.short_bodies,
    "oversize": lambda c, cs: c.oversized_bodies,
    "bad_range": lambda c, cs: c.bad_content_range,
    "corrupt": lambda c, cs: cs.digest_errors,
    "200_for_206": lambda c, cs: c.ok_200_for_206,
}


@pytest.fixture(scope="module")
def image(tmp_path_factory, plain_registry):
    img = images.build(tmp_path_factory.mktemp("faults"), seed=11)
    cfg = parse_registry_config(images.registry_config(plain_registry.host, "test/faults"), env={},
                                docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, img, "v1")
    return img


@dataclass
class Rig:
    proxy: FaultProxy
    backend: RegistryBackend
    cache: BlobCacheManager
    device: BlobDevice
    image: images.BuiltImage

    def read(self, rel: str) -> bytes:
        img = self.device.image
        return self.device.read(resolve_path(img, b"/" + rel.encode()), 0, 1 << 30)

    def check_cache(self) -> int:
        """Every chunk the map says is ready holds exactly its bytes."""
        blob = self.device.image.blobs[0]
        n = 0
        self.cache.flush()  # the bits reach the file in batches
        work = Path(self.cache.work_dir)
        cmap = ChunkMap(str(work / f"{blob.blob_id}.blob.data.chunk_map"), blob.chunk_count)
        try:
            with open(work / f"{blob.blob_id}.blob.data", "rb") as f:
                for rel in self.image.files:
                    ino = resolve_path(self.device.image, b"/" + rel.encode())
                    for c in self.device.image.chunks(ino):
                        if cmap.is_ready(c.index):
                            f.seek(c.uncompressed_offset)
                            verify_chunk(f.read(c.uncompressed_size), c, blob)
                            n += 1
        finally:
            cmap.close()
        return n


@pytest.fixture
def make_rig(tmp_path, image):
    made: list[Rig] = []

    def make(upstream: rig.Registry, repo: str = "test/faults", challenge: str = "",
             clock: Callable[[], float] | None = None, **cfg: object) -> Rig:
        proxy = FaultProxy(upstream.url, stall_seconds=10, challenge=challenge)
        conf = images.registry_config(proxy.host, repo, timeout=TIMEOUT, read_deadline=DEADLINE, retry_limit=3, **cfg)
        parsed = parse_registry_config(conf, env={}, docker_config_paths=[])
        backend = RegistryBackend(parsed) if clock is None else RegistryBackend(parsed, clock=clock)
        cache = BlobCacheManager(str(tmp_path / f"cache{len(made)}"), backend, amplify_io=128 << 10)
        bimg = open_bootstrap(str(image.boot))
        r = Rig(proxy, backend, cache, BlobDevice(bimg, cache, amplify_io=128 << 10), image)
        made.append(r)
        return r

    yield make
    for r in made:
        r.cache.close()
        r.device.image.close()
        r.proxy.stop()


FILES = ["big/a.bin", "etc/passwd", "big/c.bin", "text/log.txt"]


@pytest.mark.parametrize("fault", sorted(COUNTER))
def test_one_fault_is_absorbed(make_rig, plain_registry, fault):
    r = make_rig(plain_registry)
    r.proxy.inject(fault)
    assert r.read("big/a.bin") == r.image.files["big/a.bin"]
    assert r.backend.hung_reads == 0  # the client finished by itself, the watchdog never fired
    assert r.proxy.injected[fault] == 1
    assert COUNTER[fault](r.backend.counters, r.cache.stats) >= 1
    if fault != "200_for_206":
        assert r.backend.counters.retries + r.cache.stats.digest_errors >= 1
    for rel in FILES:
        assert r.read(rel) == r.image.files[rel]
    assert r.check_cache() > 0


@pytest.mark.parametrize("fault", sorted(set(COUNTER) - {"200_for_206"}))
def test_persistent_fault_is_eio_within_deadline(make_rig, plain_registry, fault):
    r = make_rig(plain_registry)
    r.proxy.inject(fault, 50)
    with pytest.raises((OSError, FormatError)):
        r.read("big/b.bin")
    # EIO came from the client's own deadline and retry limit, not from the backend's watchdog
    # (which fires only DEADLINE + a grace after the read began): the read did not hang
    assert r.backend.hung_reads == 0
    assert COUNTER[fault](r.backend.counters, r.cache.stats) >= 1
    if fault != "corrupt":  # a flipped byte spoils one chunk of the range; the others are fine
        assert r.cache.ready_chunks(r.device.image.blobs[0]) == 0  # nothing entered the cache
    r.check_cache()
    r.proxy.clear()
    for rel in FILES + ["big/b.bin"]:
        assert r.read(rel) == r.image.files[rel]
    assert r.check_cache() > 0


def test_5xx_burst_then_recovery(make_rig, plain_registry):
    r = make_rig(plain_registry)
    r.proxy.inject("5xx", 3)  # three in a row: the fourth attempt succeeds
    assert r.read("big/c.bin") == r.image.files["big/c.bin"]
    c = r.backend.counters
    assert c.errors_by_status[503] == 3 and c.retries >= 3 and c.read_errors == 0


def test_mixed_faults_never_a_wrong_byte(make_rig, plain_registry):
    r = make_rig(plain_registry)
    kinds = ["5xx", "reset", "truncate", "short", "oversize", "bad_range", "corrupt", "200_for_206"]
    got_errors = 0
    for _round in range(3):
        for k in kinds:
            r.proxy.inject(k)
        for rel in FILES:
            try:
                assert r.read(rel) == r.image.files[rel]
            except (OSError, FormatError):
                got_errors += 1
    r.proxy.clear()
    for rel, data in r.image.files.items():
        assert r.read(rel) == data
    assert r.check_cache() >= len(r.image.files)
    assert set(r.proxy.injected) == set(kinds)  # every kind hit a real read at least once
    c, cs = r.backend.counters, r.cache.stats
    assert all(COUNTER[k](c, cs) >= 1 for k in kinds)


@pytest.fixture(scope="module")
def token_image(image, token_registry):
    cfg = parse_registry_config(images.registry_config(token_registry.host, "test/faults", auth=rig.basic_auth()),
                                env={}, docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, image, "v1")
    return image


def test_expired_token_is_renewed(make_rig, token_registry, token_server, token_image):
    challenge = (f'Bearer realm="{token_server.realm}",service="{token_server.service}",'
                 f'scope="repository:test/faults:pull"')
    clock = ManualClock()
    r = make_rig(token_registry, challenge=challenge, clock=clock, auth=rig.basic_auth())
    assert r.read("etc/passwd") == r.image.files["etc/passwd"]
    fetches = r.backend.counters.token_fetches
    assert fetches == 1
    clock.advance(1.1)  # the token is no longer brand new: a 401 for it buys a new one
    r.proxy.inject("expired_token")
    assert r.read("big/a.bin") == r.image.files["big/a.bin"]
    c = r.backend.counters
    assert r.proxy.injected["expired_token"] == 1 and c.unauthorized >= 2
    assert c.token_fetches == fetches + 1 and c.read_errors == 0
    # a storm of 401s does not become a storm of token requests
    before = len(token_server.requests)
    r.proxy.inject("expired_token", 40)
    with pytest.raises((OSError, FormatError)):
        r.read("big/b.bin")
    assert len(token_server.requests) - before <= 4
    r.proxy.clear()
    assert r.read("big/b.bin") == r.image.files["big/b.bin"]
