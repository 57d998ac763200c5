"""A converted layer's blob is written in archive order while the layer is chunked (as upstream's
tarball builder dumps each entry's data as it parses the tar): its bytes reach the blob file
before the tar has all arrived, so its upload can follow it, which the stack allows only when
no layer below is being prepared (a layer below that joins later with shared chunks makes the
commit write the blob again: the watch then hears the blob dropped)."""

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


def test_a_layer_is_streamed_only_when_no_layer_below_is_being_prepared(tmp_path):
    """Layer 0: followed (opened, growth up to the finished blob, its name). Layer 1, prepared
    while layer 0 is held: not followed (`closed(None)` at once, no file announced). Layer 2,
    prepared once 0 and 1 are committed: followed."""
    rng = random.Random(9)
    tars = [make_tar([Entry(f"l{i}", data=rng.randbytes(3 * CS + i))]) for i in range(3)]
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    watches = [Recorder() for _ in tars]
    p0 = stack.prepare_layer(io.BytesIO(tars[0]), position=0, watch=watches[0])  # type: ignore[arg-type]
    p1 = stack.prepare_layer(io.BytesIO(tars[1]), position=1, watch=watches[1])  # type: ignore[arg-type]
    assert p0.streamed and not p1.streamed
    assert watches[1].events == [("closed", None)]
    r0 = stack.commit_layer(p0)
    r1 = stack.commit_layer(p1)
    p2 = stack.prepare_layer(io.BytesIO(tars[2]), position=2, watch=watches[2])  # type: ignore[arg-type]
    assert p2.streamed
    r2 = stack.commit_layer(p2)
    for w, r in ((watches[0], r0), (watches[2], r2)):
        assert r.blob is not None and r.blob_path is not None
        assert w.events[0][0] == "opened" and w.events[-1] == ("closed", r.blob.blob_id)
        assert w.grown() == os.path.getsize(r.blob_path)
    assert watches[1].events == [("closed", None)] and r1.blob is not None


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
