"""A layer piped to its build (`TarPipe`) is inflated by the build's own thread as it reads
(`_InflateSink.pull`, the pipe's source): no thread sits between the download and the build, a
piece that expands a thousandfold is inflated a step at a time, a reader that lets go leaves the
rest to the pool, and a change that lands while a reader had let go of the pipe's lock to pull
is not missed."""

import asyncio
import gzip
import hashlib
import io
import random
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_py.builder.sources import TarPipe
from nydus_py.convert import converter

DEADLINE = 30.0  # (a deadline for what must happen, never a measure of speed)


def layer(files: list[bytes]) -> tuple[bytes, bytes]:
    """(gzip layer, its tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, data in enumerate(files):
            ti = tarfile.TarInfo(f"f{n}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0), raw.getvalue()


def mixed_layer() -> tuple[bytes, bytes]:
    rng = random.Random(7)
    return layer([rng.randbytes(50_000) + b"text " * 40_000 for _ in range(12)])


def read_all(pipe: TarPipe, step: int, got: list[bytes], stop_at: int | None = None) -> None:
    """The build's reads: `step` bytes at a time to the end (or to `stop_at`, then let go)."""
    pos = 0
    try:
        while stop_at is None or pos < stop_at:
            data = pipe.read(pos, step, pipe.generation)
            if not data:
                break
            got.append(data)
            pos += len(data)
        if stop_at is None:
            pipe.final_size(pipe.generation)
    finally:
        pipe.release()


def run(gz: bytes, piece: int, reader: Callable[[TarPipe], None], pipe: TarPipe | None = None
        ) -> tuple[converter._InflateSink, TarPipe, tuple[str, int, str]]:
    pipe = pipe or TarPipe()

    async def go() -> tuple[converter._InflateSink, tuple[str, int, str]]:
        with ThreadPoolExecutor(2) as pool:
            sink = converter._InflateSink(pool, "", None, len(gz), None, pipe)
            await sink.restart()
            t = threading.Thread(target=reader, args=(pipe,))
            t.start()
            try:
                for i in range(0, len(gz), piece):
                    await asyncio.wait_for(sink.write(gz[i:i + piece]), DEADLINE)
                await asyncio.wait_for(sink.settle(), DEADLINE)
                got = sink.finish()
                assert sink.layer_hex() == hashlib.sha256(gz).hexdigest()
                await sink.close()
            finally:
                pipe.close()
                await asyncio.to_thread(t.join, DEADLINE)
            assert not t.is_alive()
            return sink, got

    sink, got = asyncio.run(go())
    return sink, pipe, got


def test_the_reader_inflates_the_tar_itself_and_no_pool_job_runs() -> None:
    gz, tar = mixed_layer()
    got: list[bytes] = []
    feeders: set[int] = set()
    readers: set[int] = set()

    class Watched(TarPipe):
        def feed(self, data: bytes) -> None:
            feeders.add(threading.get_ident())
            super().feed(data)

    def reader(pipe: TarPipe) -> None:
        readers.add(threading.get_ident())
        read_all(pipe, 64 << 10, got)

    sink, pipe, (diff_id, size, kind) = run(gz, 32 << 10, reader, Watched())
    assert b"".join(got) == tar
    assert (diff_id, size, kind) == (hashlib.sha256(tar).hexdigest(), len(tar), "gzip")
    assert sink.jobs == 0  # (the old sink ran a pool job per run of pieces)
    assert feeders == readers  # every piece of the tar was made on the reader's thread
    assert pipe.pulled > 0


def test_a_piece_that_expands_a_thousandfold_is_inflated_a_step_at_a_time() -> None:
    """64 MiB of zeros arrive as one ~64 KiB piece: the reader inflates only what it reads
    (256 KiB steps), so the pipe never holds the piece's whole output."""
    gz, tar = layer([bytes(64 << 20)])
    assert len(gz) < 1 << 20
    got = hashlib.sha256()
    total = 0

    def reader(pipe: TarPipe) -> None:
        nonlocal total
        pos = 0
        try:
            while data := pipe.read(pos, 64 << 10, pipe.generation):
                got.update(data)
                pos += len(data)
            total = pos
            pipe.final_size(pipe.generation)
        finally:
            pipe.release()

    _, pipe, (_, size, _) = run(gz, len(gz), reader)
    assert (total, size) == (len(tar), len(tar))
    assert got.hexdigest() == hashlib.sha256(tar).hexdigest()
    assert pipe.peak_held <= 1 << 20, pipe.peak_held


def test_a_reader_that_lets_go_leaves_the_rest_to_the_pool() -> None:
    """A build that stops reading (it failed, or is done early) releases the pipe; the pieces
    still queued and to come are inflated in the pool, so the layer's digest and the tar's
    diff_id are still checked over every byte."""
    gz, tar = mixed_layer()
    got: list[bytes] = []
    sink, pipe, (diff_id, size, _) = run(gz, 16 << 10, lambda p: read_all(p, 16 << 10, got, stop_at=100_000))
    assert (diff_id, size) == (hashlib.sha256(tar).hexdigest(), len(tar))
    assert sink.jobs >= 1
    assert b"".join(got) == tar[:len(b"".join(got))]
    assert pipe.dropped_unread > 0


class _Source:
    """A pipe source whose `pull` finds nothing, and meanwhile (the reader has let go of the
    lock) `during` runs: the change must not be missed by a reader that then waits."""

    def __init__(self, during: Callable[[], None]) -> None:
        self.during = during
        self.calls = 0

    def pull(self) -> bool:
        self.calls += 1
        if self.calls == 1:
            self.during()
        return False

    def reader_gone(self) -> None:
        pass


def _returns(fn: Callable[[], object]) -> None:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), "the reader missed a change made while it pulled"


def test_the_end_of_the_tar_landing_during_a_pull_is_not_missed() -> None:
    pipe = TarPipe()
    pipe.feed(b"x" * 10)
    pipe.attach(_Source(pipe.close))
    _returns(lambda: pipe.final_size(pipe.generation))


def test_a_piece_arriving_during_a_pull_is_pulled() -> None:
    pipe = TarPipe()
    pieces = [b"abc"]

    class Late(_Source):
        def pull(self) -> bool:
            if self.calls and pieces:
                pipe.feed(pieces.pop())
                return True
            return super().pull()

    pipe.attach(Late(pipe.arrived))
    _returns(lambda: pipe.read(0, 3, pipe.generation))


_GZ, _TAR = mixed_layer()


@settings(max_examples=20, deadline=None)
@given(piece=st.integers(64, 300_000), step=st.integers(512, 200_000), stop=st.none() | st.integers(0, len(_TAR)),
       kind=st.sampled_from(["gzip", "zstd", "tar"]))
def test_any_piece_and_read_sizes_give_the_whole_tar(piece: int, step: int, stop: int | None, kind: str) -> None:
    """Whatever sizes the download's pieces and the build's reads have, and wherever the build
    lets go, the reader gets the tar's bytes in order and the digests cover the whole layer."""
    blob = {"gzip": _GZ, "zstd": zstandard.ZstdCompressor(level=1).compress(_TAR), "tar": _TAR}[kind]
    got: list[bytes] = []
    _, _, (diff_id, size, got_kind) = run(blob, piece, lambda p: read_all(p, step, got, stop_at=stop))
    data = b"".join(got)
    assert (diff_id, size, got_kind) == (hashlib.sha256(_TAR).hexdigest(), len(_TAR), kind)
    assert data == _TAR[:len(data)]
    if stop is None:
        assert len(data) == len(_TAR)
