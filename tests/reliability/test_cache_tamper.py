"""Outside damage to the blob cache (issue 16, item 5), on a real built image and its local blob.

What must hold: a cache damaged while the daemon was down (or under it) never serves wrong bytes
where that can be told cheaply - the file sizes, and the stamp that ties the chunk map to its
blob and data file - and with `validate` never at all. Bytes changed in place with validation
off are served as they are: that is the documented price of not hashing cached reads, and the
tests below pin it down so the README stays true.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import BlobInfo, RafsImage
from nydus_py.storage.cache import BlobCacheManager, ChunkMap
from nydus_py.storage.cache.chunk_map import HEADER_SIZE
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import resolve_path
from tests.storage import images

NYDUS_HEADER = 16  # magic, version, magic2, all_ready: the rest of the 4 KiB header is reserved (our stamp)


class CountingDir(LocalBlobDir):
    """The local blob dir, counting what is fetched from it."""

    def __init__(self, blob_dir: str) -> None:
        super().__init__(blob_dir)
        self.reads = 0

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        self.reads += 1
        return super().read(blob, offset, size)


@dataclass
class Cache:
    manager: BlobCacheManager
    device: BlobDevice
    source: CountingDir
    image: RafsImage

    def read(self, rel: str, size: int) -> bytes:
        return self.device.read(resolve_path(self.image, b"/" + rel.encode()), 0, size + 1)


@dataclass
class Rig:
    img: images.BuiltImage
    work: Path
    opened: list[Cache] = field(default_factory=list)

    @property
    def blob(self) -> BlobInfo:
        image = open_bootstrap(str(self.img.boot))
        try:
            return image.blobs[0]
        finally:
            image.close()

    @property
    def data(self) -> Path:
        return self.work / f"{self.img.blob_id}.blob.data"

    @property
    def map(self) -> Path:
        return self.work / f"{self.img.blob_id}.blob.data.chunk_map"

    def open(self, validate: bool = False) -> Cache:
        image = open_bootstrap(str(self.img.boot))
        src = CountingDir(str(self.img.blob_dir))
        m = BlobCacheManager(str(self.work), src, validate=validate)
        c = Cache(m, BlobDevice(image, m), src, image)
        self.opened.append(c)
        return c

    def close(self, c: Cache) -> None:
        c.manager.close()
        c.image.close()
        self.opened.remove(c)

    def populate(self) -> int:
        """Every file read through the cache and persisted; returns the chunks now ready."""
        c = self.open()
        assert not self.wrong(c)
        n = c.manager.ready_chunks(c.image.blobs[0])
        self.close(c)
        return n

    def wrong(self, c: Cache) -> list[str]:
        return [rel for rel, data in self.img.files.items() if c.read(rel, len(data)) != data]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> images.BuiltImage:
    return images.build(tmp_path_factory.mktemp("tamper"), seed=16)


@pytest.fixture
def rig(built: images.BuiltImage, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(built, tmp_path / "cache")
    yield r
    for c in list(r.opened):
        r.close(c)


def _cached_chunk_offsets(rig: Rig) -> list[tuple[int, int]]:
    """(uncompressed offset, size) of the blob's chunks, from the image."""
    image = open_bootstrap(str(rig.img.boot))
    try:
        seen: dict[int, int] = {}
        for rel in rig.img.files:
            for ch in image.chunks(resolve_path(image, b"/" + rel.encode())):
                seen[ch.uncompressed_offset] = ch.uncompressed_size
        return sorted(seen.items())
    finally:
        image.close()


@pytest.mark.parametrize("validate", [False, True], ids=["novalidate", "validate"])
def test_truncated_data_file_drops_its_chunks(rig: Rig, validate: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The reproducer: half a data file, restart. Before: the file was extended with zeros under
    a map that still said ready, and most files read back wrong with validation off."""
    ready = rig.populate()
    assert ready == rig.blob.chunk_count
    size = rig.data.stat().st_size
    os.truncate(rig.data, size // 2)
    with caplog.at_level(logging.WARNING, logger="nydus_py.storage.cache.blobcache"):
        c = rig.open(validate)
    assert rig.wrong(c) == []
    s = c.manager.stats
    assert (s.invalidated_maps, s.dropped_chunks, s.cache_corruptions) == (1, ready, 0)
    assert c.source.reads > 0 and "truncated" in caplog.text
    assert rig.data.stat().st_size == size  # pre-sized again, after the map was reset
    rig.close(c)
    c = rig.open(validate)  # healed: everything is in the cache again
    assert rig.wrong(c) == [] and c.source.reads == 0 and c.manager.stats.invalidated_maps == 0


def test_truncation_while_open_is_caught_on_read(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Cut under a running cache: the short read resets the map (it was EIO before), and no
    write past the cut may make the lost chunks look present again."""
    rig.populate()
    c = rig.open()
    assert rig.wrong(c) == [] and c.source.reads == 0
    os.truncate(rig.data, rig.data.stat().st_size // 3)
    with caplog.at_level(logging.ERROR, logger="nydus_py.storage.cache.blobcache"):
        assert rig.wrong(c) == []
    s = c.manager.stats
    assert s.invalidated_maps == 1 and s.dropped_chunks == rig.blob.chunk_count and "truncated" in caplog.text
    c.manager.flush()
    rig.close(c)
    c = rig.open()  # chunks served before the cut was seen were dropped with the rest: refetched
    assert rig.wrong(c) == [] and c.manager.stats.invalidated_maps == 0


def test_truncation_before_a_write_is_caught(rig: Rig) -> None:
    """Cut while only part of the blob was cached, then more is fetched: the write past the cut
    would re-extend the file and hide the cut; the cache notices first."""
    c = rig.open()
    half = dict(list(rig.img.files.items())[: len(rig.img.files) // 2])
    for rel, data in half.items():
        assert c.read(rel, len(data)) == data
    c.manager.flush()
    os.truncate(rig.data, 0)
    assert rig.wrong(c) == []  # the rest is fetched: its first write finds the cut
    assert c.manager.stats.invalidated_maps == 1
    c.manager.flush()
    rig.close(c)
    c = rig.open()
    assert rig.wrong(c) == []


def test_map_copied_from_another_blob_is_not_trusted(rig: Rig, built: images.BuiltImage, tmp_path: Path) -> None:
    """A whole cache entry of one blob put under another blob's name (same chunk count)."""
    other = images.build(tmp_path / "other", seed=17)
    assert other.blob_id != built.blob_id
    orig = Rig(other, rig.work)
    orig.populate()
    image = open_bootstrap(str(other.boot))
    assert image.blobs[0].chunk_count == rig.blob.chunk_count  # same layout, other bytes
    assert image.blobs[0].uncompressed_size == rig.blob.uncompressed_size
    image.close()
    shutil.copyfile(orig.data, rig.data)
    shutil.copyfile(orig.map, rig.map)
    c = rig.open()
    assert rig.wrong(c) == []
    assert c.manager.stats.invalidated_maps == 1 and c.manager.stats.dropped_chunks == rig.blob.chunk_count


def test_replaced_data_file_is_not_trusted(rig: Rig) -> None:
    """The data file swapped for another full-size one (here: zeros) under an intact map."""
    rig.populate()
    fresh = rig.data.with_suffix(".new")
    with open(fresh, "wb") as f:
        f.truncate(rig.data.stat().st_size)
    os.replace(fresh, rig.data)
    c = rig.open()
    assert rig.wrong(c) == []
    assert c.manager.stats.invalidated_maps == 1


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_map_without_a_valid_stamp_is_reset(rig: Rig, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """A map written by another tool (no stamp; nydusd leaves those bytes zero) or one whose
    stamp was damaged: reset with a log line and a count, never a crash."""
    ready = rig.populate()
    raw = bytearray(rig.map.read_bytes())
    if damage == "missing":
        raw[NYDUS_HEADER:HEADER_SIZE] = bytes(HEADER_SIZE - NYDUS_HEADER)
    else:
        raw[NYDUS_HEADER + 20] ^= 0x10  # inside the stamped blob id
    rig.map.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="nydus_py.storage.cache.blobcache"):
        c = rig.open()
    assert rig.wrong(c) == []
    assert (c.manager.stats.invalidated_maps, c.manager.stats.dropped_chunks) == (1, ready)
    assert "stamp" in caplog.text


def test_random_garbage_in_the_map_header_never_crashes(rig: Rig) -> None:
    rng = random.Random(1616)
    rig.populate()
    good = rig.map.read_bytes()
    for _ in range(40):
        raw = bytearray(good)
        for _ in range(rng.randrange(1, 9)):
            raw[rng.randrange(HEADER_SIZE)] = rng.randrange(256)
        rig.map.write_bytes(bytes(raw))
        c = rig.open(validate=True)
        assert rig.wrong(c) == []
        rig.close(c)


def _damage_in_place(rig: Rig, how: str) -> list[tuple[int, int]]:
    """Zero or flip bytes of a few cached chunks, keeping size and inode; returns the chunks hit."""
    chunks = _cached_chunk_offsets(rig)
    hit = chunks[1::7]
    with open(rig.data, "r+b") as f:
        for off, size in hit:
            if how == "zeroed":
                f.seek(off)
                f.write(bytes(size))
            else:
                f.seek(off + size // 2)
                b = f.read(1)
                f.seek(off + size // 2)
                f.write(bytes([b[0] ^ 0x01]))
    return hit


@pytest.mark.parametrize("how", ["zeroed", "flipped"])
def test_damage_in_place_with_validation_is_refetched(rig: Rig, how: str) -> None:
    rig.populate()
    hit = _damage_in_place(rig, how)
    c = rig.open(validate=True)
    assert rig.wrong(c) == []
    assert c.manager.stats.cache_corruptions == len(hit) and c.source.reads > 0
    assert c.manager.stats.invalidated_maps == 0  # size and stamp were fine: only the digest tells


@pytest.mark.parametrize("how", ["zeroed", "flipped"])
def test_damage_in_place_without_validation_is_served_as_documented(rig: Rig, how: str) -> None:
    """digest_validate off trusts the cache: bytes changed in place (same size, same file) are
    served as they are, and nothing is fetched. README says so; this keeps it honest."""
    rig.populate()
    _damage_in_place(rig, how)
    c = rig.open(validate=False)
    assert rig.wrong(c) != [] and c.source.reads == 0
    assert c.manager.stats.invalidated_maps == 0
    rig.close(c)
    c = rig.open(validate=True)  # turning validation on heals it
    assert rig.wrong(c) == [] and c.manager.stats.cache_corruptions > 0
    rig.close(c)
    c = rig.open(validate=False)
    assert rig.wrong(c) == []


def test_inspecting_a_live_map_never_resets_it(rig: Rig) -> None:
    """Tools (and tests) open a map without binding it to a data file: any valid stamp is
    accepted, so looking cannot reset what the cache relies on."""
    ready = rig.populate()
    before = rig.map.read_bytes()
    m = ChunkMap(str(rig.map), rig.blob.chunk_count)
    assert m.ready_count == ready and m.invalid is None
    m.close()
    assert rig.map.read_bytes() == before


CHILD = """
import random, sys
sys.path.insert(0, {repo!r})
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import resolve_path
image = open_bootstrap({boot!r})
m = BlobCacheManager({work!r}, LocalBlobDir({blobs!r}), sync_delay=0.002)
dev = BlobDevice(image, m)
rels = {rels!r}
rng = random.Random({seed})

def step():
    ino = resolve_path(image, b"/" + rng.choice(rels).encode())
    size = image.getattr(ino).size
    dev.read(ino, rng.randrange(0, size), rng.randrange(1, 300000))

step()
m.flush()  # something is surely ready on disk before the kill
print("flushed", flush=True)
while True:
    step()
    print("read", flush=True)
"""


@pytest.mark.slow
def test_kill9_then_restart_serves_right_bytes_without_resetting(built: images.BuiltImage, tmp_path: Path) -> None:
    """The crash rule still holds with the stamp: after `kill -9` in the middle of reads, a
    restarted cache (validation off) serves every file right, and a crash is not damage: the
    map is kept and its ready chunks are used."""
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    rng = random.Random(99)
    for round_ in range(6):
        rig = Rig(built, tmp_path / f"cache{round_}")
        code = CHILD.format(repo=repo, boot=str(built.boot), work=str(rig.work), blobs=str(built.blob_dir),
                            rels=sorted(built.files), seed=round_)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"flushed\n"
        for _ in range(rng.randrange(0, 40)):  # killed after that many more reads, mid-stream
            assert proc.stdout.readline() == b"read\n"
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        c = rig.open(validate=False)
        had = c.manager.ready_chunks(c.image.blobs[0])
        assert had > 0 and c.manager.stats.invalidated_maps == 0
        assert rig.wrong(c) == []
        assert c.source.reads < rig.blob.chunk_count  # the chunks ready before the kill were used
        rig.close(c)
