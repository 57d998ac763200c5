"""Hand-made blobs for cache tests: chunks with real digests, and a source that can be held,
counted, broken and corrupted on purpose."""

from __future__ import annotations

import errno
import hashlib
import random
import threading
from dataclasses import dataclass, field

from nydus_py.rafs import codec
from nydus_py.rafs.constants import BlobFeatures, ChunkFlags, Compressor, Digester
from nydus_py.rafs.model import BlobInfo, ChunkInfo
from tests.waiting import wait_for


@dataclass
class Blob:
    info: BlobInfo
    chunks: list[ChunkInfo]
    data: bytes  # stored (compressed) blob bytes
    plain: list[bytes]  # uncompressed chunk contents


def make_blob(n: int, seed: int = 0, chunk_size: int = 0x4000, compress: bool = True, index: int = 0) -> Blob:
    """`n` chunks of up to `chunk_size` bytes (lz4-compressed when that helps), 4K-aligned
    uncompressed offsets as RAFS v6 lays them out."""
    rng = random.Random(seed)
    stored = bytearray()
    chunks, plain = [], []
    u_off = 0
    for i in range(n):
        size = chunk_size if i < n - 1 else rng.randrange(1, chunk_size + 1)
        half = size // 2
        data = rng.randbytes(half) + bytes(size - half)  # half random, half zeros
        raw = codec.compress(Compressor.LZ4_BLOCK, data) if compress else data
        flags = ChunkFlags(0)
        if compress and len(raw) < len(data):
            flags |= ChunkFlags.COMPRESSED
        else:
            raw = data
        chunks.append(ChunkInfo(codec.digest(Digester.BLAKE3, data), index, flags, len(stored), len(raw), u_off,
                                size, i * chunk_size, i, 0))
        stored += raw
        plain.append(data)
        u_off += (size + 4095) // 4096 * 4096
    blob_id = hashlib.sha256(bytes(stored) + seed.to_bytes(4, "little")).hexdigest()
    info = BlobInfo(index, blob_id, Compressor.LZ4_BLOCK, Digester.BLAKE3, chunk_size, chunk_count=n,
                    features=BlobFeatures.ALIGNED, compressed_size=len(stored), uncompressed_size=u_off)
    return Blob(info, chunks, bytes(stored), plain)


@dataclass
class FakeSource:
    """BlobSource over in-memory blobs, recording every read. A slow backend is a gate the
    test holds closed: reads block inside until it opens them, and `wait_inside` tells the
    test when reads have got that far, so it orders threads by events, not by sleeping."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    fail: int = 0  # fail this many reads with EIO
    corrupt: int = 0  # flip a byte in this many reads
    gate: threading.Event | None = None  # reads block until it is set
    prefetch_gate: threading.Event | None = None  # prefetch reads block until it is set
    calls: list[tuple[str, int, int, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    inside: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})  # by prefetch
    changed: threading.Condition = field(init=False)  # notified when `calls`/`inside` change

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def add(self, blob: Blob) -> FakeSource:
        self.blobs[blob.info.blob_id] = blob.data
        return self

    def wait_inside(self, demand: int = 0, prefetch: int = 0, timeout: float = 10.0, what: str = "") -> None:
        """Block until exactly `demand` on-demand and `prefetch` prefetch reads are in the backend."""
        want = {False: demand, True: prefetch}
        wait_for(self.changed, lambda: self.inside == want, timeout,
                 lambda: f"{what or 'reads'}: {want} inside the backend, have {self.inside}")

    def _read(self, blob: BlobInfo, offset: int, size: int, prefetch: bool) -> bytes:
        with self.lock:
            self.calls.append((blob.blob_id, offset, size, prefetch))
            fail = self.fail > 0
            if fail:
                self.fail -= 1
            corrupt = not fail and self.corrupt > 0
            if corrupt:
                self.corrupt -= 1
            # the gates this read passes, as they are now: the test may swap them afterwards
            gates = [g for g in (self.gate, self.prefetch_gate if prefetch else None) if g is not None]
            self.inside[prefetch] += 1
            self.changed.notify_all()
        try:
            for g in gates:
                if not g.wait(30):
                    raise OSError(errno.EIO, "fake backend: the test never opened the gate")
        finally:
            with self.lock:
                self.inside[prefetch] -= 1
                self.changed.notify_all()
        if fail:
            raise OSError(errno.EIO, "injected backend failure")
        data = self.blobs[blob.blob_id][offset:offset + size]
        if len(data) != size:
            raise OSError(errno.EIO, "read past the end")
        if corrupt:
            b = bytearray(data)
            b[len(b) // 2] ^= 0x55
            data = bytes(b)
        return data

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self._read(blob, offset, size, False)

    def read_prefetch(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self._read(blob, offset, size, True)

    def reads(self, prefetch: bool | None = None) -> int:
        return sum(1 for c in self.calls if prefetch is None or c[3] == prefetch)
