"""A converted layer's blob is written in archive order while the layer is chunked (as upstream's
tarball builder dumps each entry's data as it parses the tar): its bytes reach the blob file
before the tar has all arrived, so its upload can follow it, which the stack allows once no
layer below is still storing chunks, and no chunk of this blob is stored below (a layer below
that joins later with shared chunks makes the commit write the blob again: the watch then hears
the blob dropped)."""

import io
import os
import random
import threading

from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import TarPipe
from nydus_py.convert.stack import LayerStack
from nydus_py.rafs.layout_common import unpack_chunks

from ..waiting import wait_until
from .ociimage import Entry, make_tar
from .test_follow_build import Feeder, builder, start_piped

CS = 0x10000


class Recorder:
    """A `BlobWatch` that keeps what it heard."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def opened(self, path: str) -> None:
        with self.lock:
            self.events.append(("opened", path))

    def grew(self, size: int) -> None:
        with self.lock:
            self.events.append(("grew", size))

    def closed(self, blob_id: object) -> None:
        with self.lock:
            self.events.append(("closed", blob_id))

    def grown(self) -> int:
        with self.lock:
            return max([v for k, v in self.events if k == "grew" and isinstance(v, int)], default=0)


def test_the_blob_file_grows_before_the_tar_has_arrived(tmp_path):
    """Half of a piped tar (big random files) is in: bytes of the blob are already in its file
    (before, the blob was written from a spill once the whole tar was chunked); then the blob
    is the one of the finished tar."""
    rng = random.Random(3)
    tar = make_tar([Entry(f"f{k}", data=rng.randbytes(4 * CS + k)) for k in range(16)])
    want_stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "oracle"))
    want = want_stack.commit_layer(want_stack.prepare_layer(io.BytesIO(tar)))
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    pipe = TarPipe()

    def blob_bytes() -> int:
        w = stack._held.get(0)
        fd = None if w is None else w._fd
        return 0 if fd is None else os.fstat(fd).st_size

    with builder() as pool:
        fut = start_piped(pool, stack, pipe)
        Feeder(pipe, tar[:len(tar) // 2], close=False).join()
        wait_until(lambda: blob_bytes() >= 8 * CS, 10, "blob bytes in the file while the tar is still arriving")
        assert not fut.done()
        Feeder(pipe, tar[len(tar) // 2:]).join()
        res = stack.commit_layer(fut.result(30))
    assert res.blob is not None and want.blob is not None and res.blob.blob_id == want.blob.blob_id


def test_chunks_are_stored_in_archive_order_not_tree_order(tmp_path):
    """`z/q`, `b`, `a`, `y` in the tar: their first chunks lie in the blob in that order."""
    rng = random.Random(5)
    names = ["z/q", "b", "a", "y"]
    tar = make_tar([Entry("z", "dir")] + [Entry(n, data=rng.randbytes(CS + 7)) for n in names])
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    prepared = stack.prepare_layer(io.BytesIO(tar))
    stack.commit_layer(prepared)
    tree = prepared.tree
    first = {}
    for n in range(len(tree)):
        chunks = tree.chunk_bytes(n)
        if chunks:
            first[tree.path(n).lstrip(b"/").decode()] = unpack_chunks(chunks)[0].compressed_offset
    assert sorted(first, key=first.__getitem__) == names


def test_a_layer_above_a_prepared_one_is_streamed_from_its_start(tmp_path):
    """Layer 0: followed (opened, growth up to the finished blob, its name). Layer 1, prepared
    while layer 0 is held but done storing its chunks: followed too (what layer 0 holds is
    final, and layer 1 references it). Layer 2, prepared once 0 and 1 are committed: followed."""
    rng = random.Random(9)
    tars = [make_tar([Entry(f"l{i}", data=rng.randbytes(3 * CS + i))]) for i in range(3)]
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    watches = [Recorder() for _ in tars]
    p0 = stack.prepare_layer(io.BytesIO(tars[0]), position=0, watch=watches[0])  # type: ignore[arg-type]
    p1 = stack.prepare_layer(io.BytesIO(tars[1]), position=1, watch=watches[1])  # type: ignore[arg-type]
    assert p0.streamed and p1.streamed
    r0 = stack.commit_layer(p0)
    r1 = stack.commit_layer(p1)
    p2 = stack.prepare_layer(io.BytesIO(tars[2]), position=2, watch=watches[2])  # type: ignore[arg-type]
    assert p2.streamed
    r2 = stack.commit_layer(p2)
    for w, r in zip(watches, (r0, r1, r2), strict=True):
        assert r.blob is not None and r.blob_path is not None
        assert w.events[0][0] == "opened" and w.events[-1] == ("closed", r.blob.blob_id)
        assert w.grown() == os.path.getsize(r.blob_path)


def _prepare_piped(pool, stack: LayerStack, pipe: TarPipe, position: int, watch: Recorder | None = None):
    pool.growths.append(pipe)
    return pool.submit(stack.prepare_layer, None, position=position, growth=pipe, watch=watch)


def _oracle_and_stack(tmp_path, tars: list[bytes]):
    """The layers built one after the other (what any schedule must give), and a fresh stack."""
    seq = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "seq"))
    want = [seq.add_layer(io.BytesIO(t)) for t in tars]
    return want, LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))


def _blob_bytes(stack: LayerStack, position: int) -> int:
    w = stack._held.get(position)
    fd = None if w is None else w._fd
    return 0 if fd is None else os.fstat(fd).st_size


def test_a_layer_prepared_beside_a_lower_one_is_streamed_once_that_one_has_stored_its_chunks(tmp_path):
    """Layer 1 is half built (its blob file holds MiBs) while layer 0 is still arriving: its
    watch hears nothing yet. Once layer 0 has stored all its chunks, layer 1's watch hears of
    the file and of everything written so far at once, then follows it to the finished blob,
    which is the blob of building the layers one after the other."""
    rng = random.Random(17)
    tars = [make_tar([Entry(f"a{k}", data=rng.randbytes(4 * CS + k)) for k in range(8)]),
            make_tar([Entry(f"b{k}", data=rng.randbytes(4 * CS + k)) for k in range(16)])]
    want, stack = _oracle_and_stack(tmp_path, tars)
    pipes, watch = [TarPipe(), TarPipe()], Recorder()
    with builder() as pool0, builder() as pool1:
        f0 = _prepare_piped(pool0, stack, pipes[0], 0)
        Feeder(pipes[0], tars[0][:len(tars[0]) // 2], close=False).join()
        f1 = _prepare_piped(pool1, stack, pipes[1], 1, watch)
        Feeder(pipes[1], tars[1][:len(tars[1]) // 2], close=False).join()
        wait_until(lambda: _blob_bytes(stack, 1) >= 16 * CS, 10, "layer 1's blob to hold its first MiB")
        assert not f0.done() and watch.events == []
        Feeder(pipes[0], tars[0][len(tars[0]) // 2:]).join()
        p0 = f0.result(30)
        Feeder(pipes[1], tars[1][len(tars[1]) // 2:]).join()
        p1 = f1.result(30)
    assert p1.streamed
    assert watch.events[0][0] == "opened" and watch.events[1][0] == "grew"
    assert isinstance(watch.events[1][1], int) and watch.events[1][1] >= 16 * CS  # the backlog at once
    got = [stack.commit_layer(p0), stack.commit_layer(p1)]
    assert stack.rewrites == 0
    assert got[1].blob is not None and got[1].blob_path is not None
    assert watch.events[-1] == ("closed", got[1].blob.blob_id)
    assert watch.grown() == os.path.getsize(got[1].blob_path)
    for g, w in zip(got, want, strict=True):
        assert g.blob is not None and w.blob is not None and g.blob.blob_id == w.blob.blob_id


def test_a_layer_sharing_chunks_a_lower_one_stored_later_is_not_streamed(tmp_path):
    """Layer 1 stores chunks that layer 0, still arriving then, stores too: once layer 0 is
    done, layer 1's blob will be written again at its commit, so its watch is never told of
    the file (`closed(None)` at the end of the preparation: the blob is pushed whole once
    committed); the blobs are those of building the layers one after the other. The same
    when layer 1 is done before layer 0."""
    rng = random.Random(19)
    common = rng.randbytes(3 * CS)
    tars = [make_tar([Entry("x", data=rng.randbytes(2 * CS)), Entry("c", data=common)]),
            make_tar([Entry("c1", data=common)] + [Entry(f"b{k}", data=rng.randbytes(4 * CS + k)) for k in range(16)])]
    want, stack = _oracle_and_stack(tmp_path, tars)
    pipes, watch = [TarPipe(), TarPipe()], Recorder()
    with builder() as pool0, builder() as pool1:
        f0 = _prepare_piped(pool0, stack, pipes[0], 0)
        f1 = _prepare_piped(pool1, stack, pipes[1], 1, watch)
        Feeder(pipes[1], tars[1][:len(tars[1]) // 2], close=False).join()
        wait_until(lambda: _blob_bytes(stack, 1) >= 16 * CS, 10, "layer 1's blob to hold its first MiB")
        Feeder(pipes[0], tars[0]).join()
        p0 = f0.result(30)
        Feeder(pipes[1], tars[1][len(tars[1]) // 2:]).join()
        p1 = f1.result(30)
    assert not p1.streamed and watch.events == [("closed", None)]
    got = [stack.commit_layer(p0), stack.commit_layer(p1)]
    assert stack.rewrites == 1
    for g, w in zip(got, want, strict=True):
        assert g.blob is not None and w.blob is not None and g.blob.blob_id == w.blob.blob_id
    # layer 1 done while layer 0 is still arriving: not followed either
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs2"))
    pipe, watch = TarPipe(), Recorder()
    with builder() as pool0:
        f0 = _prepare_piped(pool0, stack, pipe, 0)
        p1 = stack.prepare_layer(io.BytesIO(tars[1]), position=1, watch=watch)  # type: ignore[arg-type]
        assert not p1.streamed and watch.events == [("closed", None)]
        Feeder(pipe, tars[0]).join()
        p0 = f0.result(30)
    stack.commit_layer(p0)
    assert stack.commit_layer(p1).blob is not None


def test_a_streamed_blob_that_a_lower_layer_joining_later_shares_is_dropped_and_written_again(tmp_path):
    """Layer 1 is prepared (and followed) before layer 0 has started (as above build-cache hits
    still joining); layer 0 then stores chunks layer 1 stored too: layer 1's commit writes its
    blob again without them, its watch hears `closed(None)` after the file, and both blobs are
    those of building the layers one after the other."""
    rng = random.Random(13)
    common = rng.randbytes(2 * CS)
    tars = [make_tar([Entry("a", data=common + rng.randbytes(CS))]),
            make_tar([Entry("b", data=rng.randbytes(CS + 3)), Entry("c", data=common)])]
    seq = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "seq"))
    want = [seq.add_layer(io.BytesIO(t)) for t in tars]
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    watch = Recorder()
    p1 = stack.prepare_layer(io.BytesIO(tars[1]), position=1, watch=watch)  # type: ignore[arg-type]
    assert p1.streamed and watch.events[0][0] == "opened"
    p0 = stack.prepare_layer(io.BytesIO(tars[0]), position=0)
    got = [stack.commit_layer(p0), stack.commit_layer(p1)]
    assert stack.rewrites == 1 and watch.events[-1] == ("closed", None)
    for g, w in zip(got, want, strict=True):
        assert g.blob is not None and w.blob is not None and g.blob.blob_id == w.blob.blob_id
