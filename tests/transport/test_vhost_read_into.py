"""READ replies written straight into guest memory (FuseSession.handle_into, Filesystem.read_into)
through the vhost-user backend, driven by the Python front-end (no QEMU): the bytes, short
reads at the end of a file, writable halves split across descriptors and memory regions, the
EIO answers of the buffered path (a reply bigger than the room, a digest mismatch), READs of
cached data answered by the queue's dispatcher without the pool while a stalled one waits in
it, and no write into guest memory after a queue stop."""

import errno
import mmap
import os
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.api import Filesystem
from nydus_py.fuse.iovec import BufferDest, ReadDest, WouldBlock, scatter
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.constants import Compressor
from nydus_py.rafs.model import BlobInfo
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.vhost_user import virtiofs_server
from nydus_py.transport.vhost_user.inflight import Abandoned, InflightQueue
from nydus_py.transport.vhost_user.server import QueueWorker, VhostUserServer
from nydus_py.transport.vhost_user.virtiofs import fuse_into_handler
from nydus_py.transport.vhost_user.virtqueue import Chain

from ..fs.mountrig import CHUNK, build
from ..fuse.kernel import LOOKUP, READ
from ..fuse.memfs import MemFS
from ..waiting import wait_event, wait_until
from . import vhost_frontend as F
from .test_vhost_user import fuse_call, fuse_req, init
from .vhost_frontend import Frontend

SIZE = 5 * CHUNK + 1234  # a file of several chunks and a partial last one
DATA = random.Random(15).randbytes(SIZE)


class GatedDir(LocalBlobDir):
    """A blob directory whose read of one offset waits for the test (a stalled fetch), and
    that can hand back wrong bytes for another (the digest check refuses them). It stands for a
    remote backend (its reads may wait on the network: not `local`)."""

    local = False

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate_at: int | None = None
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.corrupt_at: int | None = None

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        if offset == self.gate_at:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        data = super().read(blob, offset, size)
        return bytes(len(data)) if offset == self.corrupt_at else data


@dataclass
class Rig:
    srv: VhostUserServer
    fe: Frontend
    fs: Filesystem
    nodeid: int
    source: GatedDir | None = None
    offsets: tuple[int, ...] = ()

    @property
    def worker(self) -> QueueWorker:
        return self.srv.workers[1]

    def read(self, offset: int, size: int, out: list[int], unique: int, *, indirect: bool = True) -> tuple[int, bytes]:
        """(error, data) of a READ whose reply lands in writable buffers of sizes `out`."""
        args = struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0)
        err, n, p = fuse_call(self.fe, READ, self.nodeid, args, unique, out, indirect=indirect)
        assert n == 16 + len(p)
        return err, p


def _start(tmp_path: Path, fs: Filesystem, **kw: object) -> tuple[VhostUserServer, Frontend, int]:
    sock = str(tmp_path / "vfs.sock")
    srv = virtiofs_server(FuseSession(fs), sock, stop_grace=0.5, **kw).start()  # type: ignore[arg-type]
    fe = Frontend(sock, mem_size=16 << 20)
    fe.setup(num=256, protocol=F.PF_REPLY_ACK | F.PF_MQ | F.PF_MEM_SLOTS, mem_slots=True)
    init(fe)
    err, _, p = fuse_call(fe, LOOKUP, 1, b"f\0", 3, [16, 128])
    assert err == 0
    return srv, fe, struct.unpack_from("<Q", p)[0]


def _passthrough(tmp_path: Path) -> Rig:
    root = tmp_path / "share"
    root.mkdir()
    (root / "f").write_bytes(DATA)
    fs = PassthroughFilesystem(str(root), writable=False)
    srv, fe, nodeid = _start(tmp_path, fs)
    return Rig(srv, fe, fs, nodeid)


def _rafs(tmp_path: Path) -> Rig:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(DATA)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    source = GatedDir(img.blob_dir)
    fs = RafsFilesystem(image, BlobDevice(image, source, validate=True), readahead_chunks=0)
    ino = image.lookup(image.root_ino, b"f")
    assert ino is not None
    offsets = tuple(c.compressed_offset for c in image.chunks(ino))
    srv, fe, nodeid = _start(tmp_path, fs)
    return Rig(srv, fe, fs, nodeid, source, offsets)


@pytest.fixture(params=["passthrough", "rafs"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    r = _passthrough(tmp_path) if request.param == "passthrough" else _rafs(tmp_path)
    yield r
    if r.source is not None:
        r.source.gate.set()
    r.fe.close()
    r.srv.stop()


@pytest.fixture
def rafs(tmp_path: Path) -> Iterator[Rig]:
    r = _rafs(tmp_path)
    yield r
    assert r.source is not None
    r.source.gate.set()
    r.fe.close()
    r.srv.stop()


def test_read_into_bytes_and_short_reads_at_eof(rig: Rig) -> None:
    u = 100
    cases = [
        (0, 4096, [16, 4096]),
        (CHUNK - 100, 300, [16, 5, 3, 292]),  # across a chunk boundary, odd pieces
        (7, 3 * CHUNK, [16] + [4096] * (3 * CHUNK // 4096)),  # many page-sized descriptors
        (SIZE - 1000, 4096, [16, 4096]),  # short: the file ends 1000 bytes in
        (SIZE - 10, 10, [10, 6, 10]),  # the out header itself split over descriptors: buffered path
        (SIZE, 4096, [16, 4096]),  # at the end: 0 bytes
        (SIZE + 5000, 4096, [16, 4096]),  # past it: 0 bytes
    ]
    for indirect in (True, False):
        for offset, size, out in cases:
            u += 1
            err, p = rig.read(offset, size, out, u, indirect=indirect)
            assert err == 0, (offset, size)
            assert p == DATA[offset : offset + size], (offset, size, len(p))
    assert rig.worker.failed == 0


def test_reply_bigger_than_the_room_is_eio(rig: Rig) -> None:
    err, p = rig.read(0, 4096, [16, 1000], 7)  # the file has 4096 bytes there: no partial write
    assert err == errno.EIO and p == b""
    err, p = rig.read(SIZE - 500, 4096, [16, 1000], 8)  # only 500 bytes left: they fit, as today
    assert err == 0 and p == DATA[-500:]


def test_writable_half_split_across_memory_regions(rig: Rig) -> None:
    """Descriptors in two guest memory regions (two mappings on our side): preadv / the copy
    scatters over both."""
    fe = rig.fe
    size2 = 1 << 20
    memfd2 = os.memfd_create("guest-ram-2")
    os.ftruncate(memfd2, size2)
    mem2 = mmap.mmap(memfd2, size2)
    gpa2 = F.GPA_BASE + fe.mem_size + (1 << 20)
    try:
        region = struct.pack("<QQQQQ", 0, gpa2, size2, F.UVA_BASE + (1 << 32), 0)
        assert fe.acked(F.ADD_MEM_REG, region, [memfd2]) == 0
        q = fe.queues[1]
        offset, size = CHUNK - 3000, 12000
        req = fuse_req(READ, rig.nodeid, struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0), 9)
        r_off = fe.alloc(len(req))
        fe.mem[r_off : r_off + len(req)] = req
        w1 = fe.alloc(16 + 3000)
        w3 = fe.alloc(4000)
        raw = [(F.GPA_BASE + r_off, len(req), 0), (F.GPA_BASE + w1, 16 + 3000, F.WRITE),
               (gpa2 + 4096, 5000, F.WRITE), (F.GPA_BASE + w3, 4000, F.WRITE)]
        head, _ = q.add([], [], raw=raw, indirect=True)
        q.do_kick()
        got, length = q.wait_used()
        q.free.append(head)
        assert got == head and length == 16 + size
        assert struct.unpack_from("<IiQ", fe.mem, w1) == (16 + size, 0, 9)
        data = bytes(fe.mem[w1 + 16 : w1 + 16 + 3000]) + bytes(mem2[4096 : 4096 + 5000]) + bytes(fe.mem[w3 : w3 + 4000])
        assert data == DATA[offset : offset + size]
    finally:
        mem2.close()
        os.close(memfd2)


def test_digest_mismatch_is_eio(rafs: Rig) -> None:
    assert rafs.source is not None
    rafs.source.corrupt_at = rafs.offsets[2]
    err, p = rafs.read(2 * CHUNK + 10, 100, [16, 4096], 11)
    assert err == errno.EIO and p == b""
    err, p = rafs.read(CHUNK, 100, [16, 4096], 12)  # the chunks around it are fine
    assert err == 0 and p == DATA[CHUNK : CHUNK + 100]


def test_cached_read_skips_the_pool_while_a_stalled_one_waits_in_it(rafs: Rig) -> None:
    src, w = rafs.source, rafs.worker
    assert src is not None
    err, p = rafs.read(0, 4096, [16, 4096], 20)  # cold: fetched by a pool thread
    assert err == 0 and p == DATA[:4096]
    assert (w.handed_over, w.inline_nowait) == (1, 0)
    err, p = rafs.read(100, 4096, [16, 4096], 21)  # the chunk is cached now: the dispatcher answers
    assert err == 0 and p == DATA[100:4196]
    assert (w.handed_over, w.inline_nowait) == (1, 1)
    # a READ whose chunk fetch stalls goes to the pool; a cached one behind it completes meanwhile
    src.gate_at = rafs.offsets[3]
    q = rafs.fe.queues[1]
    stalled, (w_off,) = q.add([fuse_req(READ, rafs.nodeid, struct.pack("<QQIIQII", 0, 3 * CHUNK, 4096, 0, 0, 0, 0),
                                         22)], [16 + 4096], indirect=True)
    q.do_kick()
    wait_event(src.entered, what="the stalled fetch to start")
    assert w.handed_over == 2
    err, p = rafs.read(200, 4096, [16, 4096], 23)
    assert err == 0 and p == DATA[200:4296]
    assert (w.handed_over, w.inline_nowait) == (2, 2)
    src.gate.set()
    got, length = q.wait_used()
    q.free.append(stalled)
    assert got == stalled and length == 16 + 4096
    assert bytes(rafs.fe.mem[w_off + 16 : w_off + 16 + 4096]) == DATA[3 * CHUNK : 3 * CHUNK + 4096]


class ColdDir(LocalBlobDir):
    """A local blob directory whose blob is out of the host's page cache (RWF_NOWAIT reads
    refused), recording the thread of each blocking read."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.threads: list[str] = []

    def preadv_into(self, blob: BlobInfo, offset: int, bufs: list[memoryview], want: int,
                    nowait: bool = False) -> bool:
        if nowait:
            raise BlockingIOError(errno.EAGAIN, "not in the page cache")
        self.threads.append(threading.current_thread().name)
        return super().preadv_into(blob, offset, bufs, want)


def test_local_read_out_of_the_page_cache_is_answered_by_the_dispatcher(tmp_path: Path) -> None:
    """A READ of a local blob file (no blob cache) that misses RWF_NOWAIT waits on the disk at
    most: the dispatcher reads it itself instead of handing it to the pool."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(DATA)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK, compressor=Compressor.NONE), views=False)
    image = open_bootstrap(img.boot)
    source = ColdDir(img.blob_dir)
    fs = RafsFilesystem(image, BlobDevice(image, source, validate=False), readahead_chunks=0)
    assert fs.device.raw_direct and not fs.read_waits(1)
    srv, fe, nodeid = _start(tmp_path, fs)
    try:
        r = Rig(srv, fe, fs, nodeid)
        err, p = r.read(CHUNK - 100, 2 * CHUNK, [16, CHUNK, CHUNK], 50)
        assert err == 0 and p == DATA[CHUNK - 100 : 3 * CHUNK - 100]
        w = r.worker
        assert source.threads == [w.thread.name] and w.handed_over == 0
        assert (w.inline_nowait, w.inline_blocking) == (0, 1)
    finally:
        fe.close()
        srv.stop()


def test_passthrough_read_of_cached_pages_skips_the_pool(tmp_path: Path) -> None:
    r = _passthrough(tmp_path)
    try:
        fs = r.fs
        assert isinstance(fs, PassthroughFilesystem)
        err, p = r.read(0, 8192, [16, 8192], 30)  # just written: in the host's page cache
        assert err == 0 and p == DATA[:8192]
        if not fs.nowait_supported:
            pytest.skip("this host filesystem refuses RWF_NOWAIT reads")
        assert r.worker.inline_nowait == 1 and r.worker.handed_over == 0
        err, p = r.read(SIZE - 20, 4096, [16, 4096], 31)  # short at the end of the file: still inline
        assert err == 0 and p == DATA[-20:]
        assert r.worker.inline_nowait == 2 and r.worker.handed_over == 0
    finally:
        r.fe.close()
        r.srv.stop()


def test_one_worker_reads_into_the_chain_without_a_pool(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    (root / "f").write_bytes(DATA)
    srv, fe, nodeid = _start(tmp_path, PassthroughFilesystem(str(root), writable=False), workers=1)
    try:
        rig = Rig(srv, fe, PassthroughFilesystem(str(root), writable=False), nodeid)
        err, p = rig.read(CHUNK, 3 * 4096, [16, 4096, 4096, 4096], 40)
        assert err == 0 and p == DATA[CHUNK : CHUNK + 3 * 4096]
        assert rig.worker.handed_over == 0 and rig.worker.inline_nowait == 0
    finally:
        fe.close()
        srv.stop()


def test_session_read_into_matches_the_buffered_reply() -> None:
    """FuseSession.handle_into writes the same reply handle_vectored returns (what /dev/fuse
    sends), and answers other requests with buffers."""
    session = FuseSession(MemFS())
    init_req = struct.pack("<IIQQIIIHH", 40 + 64, 26, 1, 0, 0, 0, 1, 0, 0) + struct.pack("<IIIII44x", 7, 38, 0, 0, 0)
    assert session.handle(init_req) is not None
    lookup = struct.pack("<IIQQIIIHH", 40 + 6, LOOKUP, 2, 1, 0, 0, 1, 0, 0) + b"hello\0"
    nodeid = struct.unpack_from("<Q", session.handle(lookup) or b"", 16)[0]
    guard = threading.Lock()
    for fh, offset, size in ((100 + nodeid, 0, 4096), (100 + nodeid, 3, 5), (100 + nodeid, 100, 10), (7, 0, 10)):
        req = struct.pack("<IIQQIIIHH", 80, READ, 3, nodeid, 0, 0, 1, 0, 0) + struct.pack("<QQIIQII", fh, offset, size,
                                                                                          0, 0, 0, 0)
        want = session.handle(req)
        assert want is not None and len(want) == 16 + len(b"hello world\n"[offset : offset + size] if fh != 7 else b"")
        mem = bytearray(16 + size)
        n = session.handle_into(req, [memoryview(mem)[:7 + 16], memoryview(mem)[7 + 16 :]], guard)
        assert isinstance(n, int) and bytes(mem[:n]) == want
        with pytest.raises(WouldBlock):  # MemFS has no way to answer without waiting
            session.handle_into(req, [memoryview(mem)], guard, nowait=True)
    r = session.handle_into(lookup, [memoryview(bytearray(200))], guard)
    assert isinstance(r, list) and b"".join(r) == session.handle(lookup)


class _CountingGuard:
    """A write guard that counts its entries and what the header held at each exit."""

    def __init__(self, mem: bytearray) -> None:
        self.mem = mem
        self.entries = 0
        self.headers: list[tuple[int, int, int]] = []

    def __enter__(self) -> None:
        self.entries += 1

    def __exit__(self, *exc: object) -> None:
        self.headers.append(struct.unpack_from("<IiQ", self.mem))


class _ShortFs(MemFS):
    """Fills the whole request, then says it wrote fewer bytes (the header must say so)."""

    def read_into(self, ino: int, fh: int, offset: int, size: int, dest: ReadDest, nowait: bool = False) -> int:
        dest.fill(lambda bufs: scatter(bufs, b"x" * dest.size))
        return 3


def test_read_into_writes_its_header_in_the_same_guard_as_its_data() -> None:
    """A READ answered into the transport's buffers takes their write guard once: the reply
    header goes in with the data. A filesystem that answers differently from what it filled,
    or fails, still gets a header that says what it answered."""
    def setup(fs: Filesystem) -> tuple[FuseSession, int]:
        session = FuseSession(fs)
        init_req = struct.pack("<IIQQIIIHH", 40 + 64, 26, 1, 0, 0, 0, 1, 0, 0) + struct.pack("<IIIII44x", 7, 38, 0, 0, 0)
        assert session.handle(init_req) is not None
        lookup = struct.pack("<IIQQIIIHH", 40 + 6, LOOKUP, 2, 1, 0, 0, 1, 0, 0) + b"hello\0"
        return session, struct.unpack_from("<Q", session.handle(lookup) or b"", 16)[0]

    for fs, fh, want in ((MemFS(), None, b"hello world\n"), (_ShortFs(), None, b"xxx"), (MemFS(), 7, None)):
        session, nodeid = setup(fs)
        req = struct.pack("<IIQQIIIHH", 80, READ, 9, nodeid, 0, 0, 1, 0, 0) + struct.pack(
            "<QQIIQII", 100 + nodeid if fh is None else fh, 0, 64, 0, 0, 0, 0)
        mem = bytearray(16 + 64)
        guard = _CountingGuard(mem)
        n = session.handle_into(req, [memoryview(mem)[:16], memoryview(mem)[16:]], guard)
        if want is None:  # a bad handle: EBADF, in a guard of its own (no data was written)
            assert n == 16 and guard.entries == 1 and guard.headers == [(16, -errno.EBADF, 9)]
            continue
        assert n == 16 + len(want) and bytes(mem[16:n]) == want
        assert struct.unpack_from("<IiQ", mem) == (n, 0, 9)
        if isinstance(fs, _ShortFs):  # the fill's header said 64: written again
            assert guard.entries == 2 and guard.headers == [(16 + 64, 0, 9), (n, 0, 9)]
        else:
            assert guard.entries == 1 and guard.headers == [(n, 0, 9)]


class _NoWalk(list):  # type: ignore[type-arg]
    """A READ's buffers that fail the test when walked whole (indexing and slicing still work)."""

    def __iter__(self) -> Iterator[memoryview]:
        raise AssertionError("the buffers were walked to sum their lengths")


def test_handle_into_takes_the_room_the_transport_knows() -> None:
    """The virtio handler passes the chain's writable size (known from its descriptors), so a
    READ's 257 buffers are not walked again to sum their lengths; the reply is the same."""
    session = FuseSession(MemFS())
    init_req = struct.pack("<IIQQIIIHH", 40 + 64, 26, 1, 0, 0, 0, 1, 0, 0) + struct.pack("<IIIII44x", 7, 38, 0, 0, 0)
    assert session.handle(init_req) is not None
    lookup = struct.pack("<IIQQIIIHH", 40 + 6, LOOKUP, 2, 1, 0, 0, 1, 0, 0) + b"hello\0"
    nodeid = struct.unpack_from("<Q", session.handle(lookup) or b"", 16)[0]
    req = struct.pack("<IIQQIIIHH", 80, READ, 3, nodeid, 0, 0, 1, 0, 0) + struct.pack("<QQIIQII", 100 + nodeid, 0,
                                                                                      4096, 0, 0, 0, 0)
    want = session.handle(req)
    mem = bytearray(16 + 4096)
    v = memoryview(mem)
    bufs = _NoWalk([v[:16], *(v[16 + o : 16 + o + 512] for o in range(0, 4096, 512))])
    n = session.handle_into(req, bufs, threading.Lock(), room=len(mem))
    assert isinstance(n, int) and bytes(mem[:n]) == want
    chain = Chain(0, [memoryview(req)], bufs, len(mem))  # (walk gives the size with the views)
    handler = fuse_into_handler(session)
    mem[:] = bytes(len(mem))
    assert handler(memoryview(req), chain, threading.Lock(), False) == n and bytes(mem[:n]) == want


def test_rafs_read_into_nowait_from_the_chunk_cache(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(DATA)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    fs = RafsFilesystem(image, BlobDevice(image, LocalBlobDir(img.blob_dir), validate=True), readahead_chunks=0)
    ino = fs.lookup(1, b"f").ino
    buf = bytearray(CHUNK)
    with pytest.raises(WouldBlock):
        fs.read_into(ino, 0, CHUNK - 10, 20, BufferDest([memoryview(buf)], 20), nowait=True)
    assert fs.read_into(ino, 0, CHUNK - 10, 20, BufferDest([memoryview(buf)], 20)) == 20
    assert bytes(buf[:20]) == DATA[CHUNK - 10 : CHUNK + 10]
    buf2 = bytearray(20)
    assert fs.read_into(ino, 0, CHUNK - 10, 20, BufferDest([memoryview(buf2)[:3], memoryview(buf2)[3:]], 20),
                        nowait=True) == 20
    assert bytes(buf2) == DATA[CHUNK - 10 : CHUNK + 10]


class _Ring:
    """A stand-in Virtqueue for InflightQueue (no guest memory needed for the guard)."""

    def push(self, head: int, length: int) -> None:
        pass

    def needs_notify(self) -> bool:
        return False


def test_no_write_into_a_chain_after_its_queue_stopped() -> None:
    ring = InflightQueue(_Ring(), lambda: None)  # type: ignore[arg-type]
    chain = Chain(5, [], [memoryview(bytearray(64))])
    ring.inflight[5] = chain
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with ring.guard(chain):
            writing.set()
            assert release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    wait_event(writing, what="the writer to hold the guard")
    stopper = threading.Thread(target=ring.stop)
    stopper.start()
    wait_until(lambda: ring.stopped, what="stop() to begin")
    assert stopper.is_alive()  # it waits for the write under way before the front-end is answered
    with pytest.raises(Abandoned), ring.guard(chain):  # and refuses new ones
        pass
    release.set()
    t.join(10)
    stopper.join(10)
    assert not stopper.is_alive() and ring.writers == 0
    assert not ring.complete_written(chain, 10) and ring.dropped == 1


def test_stalled_read_into_after_a_queue_stop_writes_nothing(rafs: Rig) -> None:
    """A READ waiting on its fetch when the queue stops (GET_VRING_BASE) never writes its data
    or header into the buffers the front-end owns again."""
    src, w = rafs.source, rafs.worker
    assert src is not None
    src.gate_at = rafs.offsets[1]
    q = rafs.fe.queues[1]
    _, (w_off,) = q.add([fuse_req(READ, rafs.nodeid, struct.pack("<QQIIQII", 0, CHUNK, 4096, 0, 0, 0, 0), 50)],
                        [16 + 4096], indirect=True)
    q.do_kick()
    wait_event(src.entered, what="the stalled fetch to start")
    base = rafs.fe.call(F.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert struct.unpack("<II", base)[0] == 1 and w.abandoned == 1
    rafs.fe.mem[w_off : w_off + 16 + 4096] = b"\x5a" * (16 + 4096)
    src.gate.set()
    wait_until(lambda: w.ring.dropped == 1, what="the late reply to be dropped")
    assert bytes(rafs.fe.mem[w_off : w_off + 16 + 4096]) == b"\x5a" * (16 + 4096)
    assert q.used_idx() == q.last_used


@pytest.mark.parametrize("sizes", [[16, 4096, 4096], [10, 6, 4096, 100], [16, 5, 3], [20, 4096], [16], [3, 3, 3, 3, 3, 3]])
def test_trim_is_the_slice_of_the_concatenation(sizes: list[int]) -> None:
    from nydus_py.fuse.iovec import trim

    total = sum(sizes)
    mem = bytearray(random.Random(len(sizes)).randbytes(total))
    bufs, pos = [], 0
    for n in sizes:
        bufs.append(memoryview(mem)[pos : pos + n])
        pos += n
    for skip in (0, 3, 16, total):
        for limit in (0, 1, total - min(skip, total), max(0, total - skip - 7)):
            for known in (-1, total):
                got = trim(bufs, skip, limit, known)
                assert b"".join(got) == bytes(mem[skip : skip + limit]), (skip, limit)
                assert all(len(b) for b in got)


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096, 5 * 4096])
def test_scatter_copies_what_fits(n: int) -> None:
    from nydus_py.fuse.iovec import scatter

    mem = bytearray(b"\xee" * (4 * 4096 + 100))
    bufs = [memoryview(mem)[0:100], memoryview(mem)[200:4296], memoryview(mem)[4400 : 4400 + 3 * 4096]]
    data = random.Random(n).randbytes(n)
    got = scatter(bufs, data)
    room = sum(len(b) for b in bufs)
    assert got == min(n, room)
    assert b"".join(bytes(b) for b in bufs)[:got] == data[:got]
    assert bytes(mem[100:200]) == b"\xee" * 100  # nothing between the buffers is touched


class _Recorder:
    def __init__(self) -> None:
        self.open: dict[int, int] = {}
        self.done: list[tuple[int, int]] = []  # (error, data bytes)

    def started(self, opcode: int, nodeid: int, unique: int) -> object:
        self.open[unique] = opcode
        return unique

    def finished(self, token: object, reply: object) -> None:
        assert isinstance(token, int)
        self.open.pop(token)
        if isinstance(reply, tuple):
            self.done.append((struct.unpack_from("<i", reply[0], 4)[0], len(reply[1])))


class _Refusing:
    def __enter__(self) -> None:
        raise Abandoned(errno.ESHUTDOWN, "the queue stopped")

    def __exit__(self, *exc: object) -> None:
        pass


def test_observer_sees_reads_into_and_none_is_left_open() -> None:
    """The metrics observer counts a READ answered into the caller's buffers like a buffered one
    (bytes, error), and one whose buffers were taken away is still finished (no in-flight leak)."""
    session = FuseSession(MemFS())
    rec = _Recorder()
    session.set_observer(rec)
    init_req = struct.pack("<IIQQIIIHH", 40 + 64, 26, 1, 0, 0, 0, 1, 0, 0) + struct.pack("<IIIII44x", 7, 38, 0, 0, 0)
    session.handle(init_req)
    lookup = struct.pack("<IIQQIIIHH", 40 + 6, LOOKUP, 2, 1, 0, 0, 1, 0, 0) + b"hello\0"
    nodeid = struct.unpack_from("<Q", session.handle(lookup) or b"", 16)[0]
    read = struct.pack("<IIQQIIIHH", 80, READ, 3, nodeid, 0, 0, 1, 0, 0) + struct.pack("<QQIIQII", 100 + nodeid, 0,
                                                                                       4096, 0, 0, 0, 0)
    rec.done.clear()
    mem = bytearray(16 + 4096)
    assert session.handle_into(read, [memoryview(mem)], threading.Lock()) == 16 + 12
    assert rec.done == [(0, 12)] and not rec.open
    with pytest.raises(Abandoned):
        session.handle_into(read, [memoryview(mem)], _Refusing())
    assert not rec.open and rec.done[-1] == (-errno.ESHUTDOWN, 0)
