"""A layer built while its tar is still being written (`LayerStack.prepare_layer(growth=)`, what
the converter does while a layer downloads): the files are chunked as they arrive, the result is
byte for byte the build of the finished tar, a restart of the tar restarts the build, and a tar
that will not complete ends the build instead of leaving it waiting. The same for a tar handed
over in memory (`TarPipe`), which also stays within its memory bound."""

import contextlib
import io
import os
import random
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import Growth, Restarted, TarPipe, tree_from_tar
from nydus_py.convert.stack import LayerStack, PreparedLayer
from nydus_py.rafs import codec
from nydus_py.rafs.errors import FormatError

from ..waiting import wait_event, wait_until
from .ociimage import Entry, make_tar

CS = 0x10000


def sample_tar(seed: int) -> bytes:
    rng = random.Random(seed)
    shared = rng.randbytes(2 * CS + 5)
    entries = [Entry("z", "dir"), Entry("z/first", data=rng.randbytes(3 * CS + 17)), Entry("a", "dir"),
               Entry("a/small", data=b"s" * 100), Entry("a/shared", data=shared), Entry("b", data=shared),
               Entry("a/link", "link", target="a/small"), Entry("empty", data=b""),
               Entry("z/first", data=rng.randbytes(CS))]  # the later member wins (the first one's chunks are stored too, as upstream does)
    entries += [Entry(f"m{k}", data=rng.randbytes(rng.randrange(1, 3 * CS))) for k in range(12)]
    return make_tar(entries)


def blob_and_tree(stack: LayerStack, prepared: PreparedLayer) -> tuple[bytes, bytes]:
    res = stack.commit_layer(prepared)
    assert res.blob_path is not None
    with open(res.blob_path, "rb") as f:
        return f.read(), bytes(prepared.tree.chunks)


def oracle(tmp_path, tar: bytes) -> tuple[bytes, bytes]:
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "oracle"))
    return blob_and_tree(stack, stack.prepare_layer(io.BytesIO(tar)))


class Writer:
    """Writes a tar file in steps, as a download does, announcing each write to `growth`."""

    def __init__(self, path: str, growth: Growth) -> None:
        self.f = open(path, "wb", buffering=0)  # noqa: SIM115
        self.growth = growth
        self.pos = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.pos += len(data)
        self.growth.grew(self.pos)

    def restart(self) -> None:
        self.growth.restart()  # (before the truncation, as the converter's sink does)
        self.f.seek(0)
        self.f.truncate()
        self.pos = 0


class Spills:
    """Counts the files the build has chunked (`BlobWriter.spill_file` calls)."""

    def __init__(self) -> None:
        self.count = 0
        self.first = threading.Event()


@pytest.fixture
def spills(monkeypatch):
    got = Spills()
    real = BlobWriter.spill_file

    def spy(self, source, key, size):  # type: ignore[no-untyped-def]
        real(self, source, key, size)
        got.count += 1
        got.first.set()

    monkeypatch.setattr(BlobWriter, "spill_file", spy)
    return got


def files_with_data(tar: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return sum(1 for m in t.getmembers() if m.isreg() and m.size)


@contextlib.contextmanager
def builder() -> Iterator[ThreadPoolExecutor]:
    """A thread for the build; a test that fails midway ends the tars it follows first (else the
    build would wait for them forever, and the pool's exit for it)."""
    growths: list[Growth] = []
    with ThreadPoolExecutor(1) as pool:
        pool.growths = growths  # type: ignore[attr-defined]
        try:
            yield pool
        except BaseException:
            for g in growths:
                g.close(failed=True)
            raise


def start(pool: ThreadPoolExecutor, stack: LayerStack, path: str, growth: Growth) -> "Future[PreparedLayer]":
    def run() -> PreparedLayer:
        with open(path, "rb") as tar:
            return stack.prepare_layer(tar, position=0, growth=growth)

    pool.growths.append(growth)  # type: ignore[attr-defined]
    return pool.submit(run)


def test_build_follows_a_growing_tar_and_equals_the_finished_build(tmp_path, spills):
    tar = sample_tar(1)
    want = oracle(tmp_path, tar)
    spills.count = 0  # (the oracle's files)
    spills.first.clear()
    path = str(tmp_path / "layer.tar")
    growth = Growth()
    w = Writer(path, growth)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start(pool, stack, path, growth)
        half = len(tar) // 2
        for pos in range(0, half, 7000):  # odd pieces: members and blocks cut anywhere
            w.write(tar[pos:min(pos + 7000, half)])
        wait_event(spills.first, 10, "the build to chunk a file before the tar is complete")
        assert not fut.done()
        end = len(tar) - 2 * tarfile.BLOCKSIZE  # every member, not the end-of-archive blocks
        w.write(tar[half:end])
        # each file is chunked as soon as it is in, not once the whole tar is
        n = files_with_data(tar)
        wait_until(lambda: spills.count == n, 10, lambda: f"{spills.count} of {n} files chunked before the end")
        w.write(tar[end:])
        assert not fut.done()  # all bytes are in, but the tar may still grow: the build waits for its end
        growth.close()
        prepared = fut.result(30)
    assert blob_and_tree(stack, prepared) == want


def test_a_restarted_tar_restarts_the_build(tmp_path, spills):
    tar = sample_tar(2)
    path = str(tmp_path / "layer.tar")
    growth = Growth()
    w = Writer(path, growth)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start(pool, stack, path, growth)
        w.write(tar[: len(tar) // 2])
        wait_event(spills.first, 10, "the build to chunk a file")
        w.restart()
        with pytest.raises(Restarted):
            fut.result(30)
        assert not stack._held and not [n for n in os.listdir(tmp_path / "blobs") if not n.startswith(".")]
        fut = start(pool, stack, path, growth)  # the build again, following the new attempt
        w.write(tar)
        growth.close()
        prepared = fut.result(30)
    assert blob_and_tree(stack, prepared) == oracle(tmp_path, tar)


def test_a_tar_that_will_not_complete_ends_the_build(tmp_path, spills):
    tar = sample_tar(3)
    path = str(tmp_path / "layer.tar")
    growth = Growth()
    w = Writer(path, growth)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start(pool, stack, path, growth)
        w.write(tar[: len(tar) // 2])
        wait_event(spills.first, 10, "the build to chunk a file")
        growth.close(failed=True)  # the download failed (or was cancelled)
        with pytest.raises(OSError):
            fut.result(30)
    assert not stack._held


# -- the tar piped in memory (`TarPipe`: what the converter does, no tar file) -------------------


class Feeder:
    """Feeds a `TarPipe` from its own thread, as the inflate thread does, in odd pieces."""

    def __init__(self, pipe: TarPipe, data: bytes, piece: int = 7000, close: bool = True) -> None:
        self.pipe = pipe
        self.thread = threading.Thread(target=self._run, args=(data, piece, close), daemon=True)
        self.error: BaseException | None = None
        self.thread.start()

    def _run(self, data: bytes, piece: int, close: bool) -> None:
        try:
            for pos in range(0, len(data), piece):
                self.pipe.feed(data[pos:pos + piece])
            if close:
                self.pipe.close()
        except BaseException as e:  # (reported by the test)
            self.error = e

    def join(self) -> None:
        wait_until(lambda: not self.thread.is_alive(), 10, "the feeder to get all its pieces in")
        assert self.error is None


def start_piped(pool: ThreadPoolExecutor, stack: LayerStack, pipe: TarPipe) -> "Future[PreparedLayer]":
    pool.growths.append(pipe)  # type: ignore[attr-defined]
    return pool.submit(stack.prepare_layer, None, position=0, growth=pipe)


def test_a_piped_tar_is_built_as_the_finished_tar_within_its_memory_bound(tmp_path, spills):
    """Chunk reads (64 KiB here) and pieces both cross the limit: the pipe never holds much
    more than `limit`, the writer waits for the build, and the result is byte for byte the
    build of the finished tar."""
    tar = sample_tar(4)
    want = oracle(tmp_path, tar)
    pipe = TarPipe(limit=CS // 2)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start_piped(pool, stack, pipe)
        feeder = Feeder(pipe, tar)
        prepared = fut.result(30)
        feeder.join()
    assert blob_and_tree(stack, prepared) == want
    assert pipe.peak_held <= CS + CS // 2 + 7000  # the biggest read plus what lies before it, a piece
    assert pipe.dropped_unread == 0


def test_a_read_bigger_than_the_pipe_goes_through(tmp_path, spills):
    """A pax header bigger than the limit is read in one piece: the writer goes past the limit
    while the build waits for it (else both would wait for good)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("big-pax")
        ti.size = 3 * CS
        ti.pax_headers = {"comment": "x" * (4 * CS)}
        t.addfile(ti, io.BytesIO(os.urandom(3 * CS)))
    tar = buf.getvalue()
    pipe = TarPipe(limit=CS // 4)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start_piped(pool, stack, pipe)
        feeder = Feeder(pipe, tar)
        prepared = fut.result(30)
        feeder.join()
    assert blob_and_tree(stack, prepared) == oracle(tmp_path, tar)


def test_a_restarted_pipe_restarts_the_build(tmp_path, spills):
    tar = sample_tar(5)
    pipe = TarPipe(limit=4 * CS)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start_piped(pool, stack, pipe)
        Feeder(pipe, tar[: len(tar) // 2], close=False).join()
        wait_event(spills.first, 10, "the build to chunk a file")
        pipe.restart()  # (the download starts again: what the pipe held is dropped)
        with pytest.raises(Restarted):
            fut.result(30)
        assert not stack._held
        fut = start_piped(pool, stack, pipe)  # the build again, reading the new attempt from its start
        feeder = Feeder(pipe, tar)
        prepared = fut.result(30)
        feeder.join()
    assert blob_and_tree(stack, prepared) == oracle(tmp_path, tar)


def test_a_failed_piped_build_lets_the_writer_finish(tmp_path):
    """A build that fails (a hostile member name here) lets go of the pipe: the writer, far
    more than the limit ahead, does not wait for a reader that will not come (the converter then
    reports the download's own outcome)."""
    tar = make_tar([Entry("../escape", data=b"x" * 10), *(Entry(f"f{k}", data=os.urandom(CS)) for k in range(8))])
    pipe = TarPipe(limit=CS)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start_piped(pool, stack, pipe)
        feeder = Feeder(pipe, tar)
        with pytest.raises(FormatError, match="escape"):
            fut.result(30)
        feeder.join()
    assert pipe.dropped_unread > 0 and not stack._held


def test_a_piped_tar_cut_short_is_a_format_error(tmp_path):
    tar = make_tar([Entry("a", data=os.urandom(3 * CS))])
    pipe = TarPipe(limit=CS)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start_piped(pool, stack, pipe)
        Feeder(pipe, tar[:2 * CS]).join()  # the download ended (its digest checks are the converter's)
        with pytest.raises(FormatError, match="truncated"):
            fut.result(30)


def test_a_piped_tar_must_be_read_by_on_file():
    with pytest.raises(TypeError, match="on_file"):
        tree_from_tar(None, growth=TarPipe())


def test_a_chunk_a_layer_below_is_still_writing_is_referenced_not_stored_twice(tmp_path, monkeypatch):
    """Two layers prepared at once, the upper repeating a file of the lower, which is still
    arriving: the upper waits for the lower's blob before storing those chunks, finds them there
    and references them, so the commit does not write its blob again (it did: ~0.2 s per 50 MB
    layer), and both blobs are those of building the layers one after the other."""
    rng = random.Random(7)
    common = rng.randbytes(2 * CS + 9)
    lower = make_tar([Entry("a", data=common), Entry("z", data=rng.randbytes(3 * CS))])
    upper = make_tar([Entry("b", data=rng.randbytes(CS + 1)), Entry("c", data=common)])
    opts = BuildOptions(chunk_size=CS)
    seq = LayerStack(opts, str(tmp_path / "seq"))
    want = [seq.add_layer(io.BytesIO(t)) for t in (lower, upper)]
    waited = threading.Event()
    real_wait = BlobWriter.wait_chunk

    def spy_wait(self, digest):  # type: ignore[no-untyped-def]
        waited.set()
        real_wait(self, digest)

    monkeypatch.setattr(BlobWriter, "wait_chunk", spy_wait)
    rewritten: list[int] = []
    real_stored = BlobWriter.stored_chunks
    monkeypatch.setattr(BlobWriter, "stored_chunks", lambda w: rewritten.append(1) or real_stored(w))
    stack = LayerStack(opts, str(tmp_path / "blobs"))
    first = codec.digest(opts.digester, common[:CS])
    pipe = TarPipe()
    with builder() as pool, ThreadPoolExecutor(1) as other:
        low = start_piped(pool, stack, pipe)
        Feeder(pipe, lower[:len(lower) - CS], close=False).join()  # `a` is in, `z` is not
        wait_until(lambda: 0 in stack._held and stack._held[0].spill_pending(first), 10,
                   "the lower layer to spill the shared chunks")
        up = other.submit(stack.prepare_layer, io.BytesIO(upper), position=1)
        wait_until(lambda: up.done() or waited.is_set(), 10, "the upper layer to come to the shared chunks")
        Feeder(pipe, lower[len(lower) - CS:]).join()
        prepared = [low.result(30), up.result(30)]
    got = [stack.commit_layer(p) for p in prepared]
    assert not rewritten and stack.rewrites == 0
    for g, w in zip(got, want, strict=True):
        assert g.blob is not None and w.blob is not None and g.blob.blob_id == w.blob.blob_id
        assert g.new_chunks == w.new_chunks and g.deduplicated == w.deduplicated
    assert [bytes(t.chunks) for t in stack.layers] == [bytes(t.chunks) for t in seq.layers]


def test_a_released_pipe_ends_its_build_with_an_error(tmp_path, spills):
    """The converter lets go of a pipe whose build it gave up on (cancelled): a build still
    running then stops with an error at its next read, not an assertion or a wait."""
    tar = sample_tar(6)
    pipe = TarPipe(limit=4 * CS)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with builder() as pool:
        fut = start_piped(pool, stack, pipe)
        Feeder(pipe, tar[: len(tar) // 2], close=False).join()
        wait_event(spills.first, 10, "the build to chunk a file")
        pipe.release()
        feeder = Feeder(pipe, tar[len(tar) // 2:])
        with pytest.raises(OSError, match="let go"):
            fut.result(30)
        feeder.join()
    assert not stack._held
