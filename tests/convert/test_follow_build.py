"""A layer built while its tar is still being written (`LayerStack.prepare_layer(growth=)`, what
the converter does while a layer downloads): the files are chunked as they arrive, the result is
byte for byte the build of the finished tar, a restart of the tar restarts the build, and a tar
that will not complete ends the build instead of leaving it waiting."""

import io
import os
import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import Growth, Restarted
from nydus_py.convert.stack import LayerStack, PreparedLayer

from ..waiting import wait_event
from .ociimage import Entry, make_tar

CS = 0x10000


def sample_tar(seed: int) -> bytes:
    rng = random.Random(seed)
    shared = rng.randbytes(2 * CS + 5)
    entries = [Entry("z", "dir"), Entry("z/first", data=rng.randbytes(3 * CS + 17)), Entry("a", "dir"),
               Entry("a/small", data=b"s" * 100), Entry("a/shared", data=shared), Entry("b", data=shared),
               Entry("a/link", "link", target="a/small"), Entry("empty", data=b""),
               Entry("z/first", data=rng.randbytes(CS))]  # the later member wins: the first is not stored
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
        self.f.seek(0)
        self.f.truncate()
        self.pos = 0
        self.growth.restart()


@pytest.fixture
def spilled(monkeypatch):
    """An event set once the build has chunked its first file (so it runs ahead of the end)."""
    event = threading.Event()
    real = BlobWriter.spill_file

    def spy(self, source, key, size):  # type: ignore[no-untyped-def]
        real(self, source, key, size)
        event.set()

    monkeypatch.setattr(BlobWriter, "spill_file", spy)
    return event


def start(pool: ThreadPoolExecutor, stack: LayerStack, path: str, growth: Growth) -> "Future[PreparedLayer]":
    def run() -> PreparedLayer:
        with open(path, "rb") as tar:
            return stack.prepare_layer(tar, position=0, growth=growth)

    return pool.submit(run)


def test_build_follows_a_growing_tar_and_equals_the_finished_build(tmp_path, spilled):
    tar = sample_tar(1)
    want = oracle(tmp_path, tar)
    path = str(tmp_path / "layer.tar")
    growth = Growth()
    w = Writer(path, growth)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with ThreadPoolExecutor(1) as pool:
        fut = start(pool, stack, path, growth)
        half = len(tar) // 2
        for pos in range(0, half, 7000):  # odd pieces: members and blocks cut anywhere
            w.write(tar[pos:min(pos + 7000, half)])
        wait_event(spilled, 10, "the build to chunk a file before the tar is complete")
        assert not fut.done()
        w.write(tar[half:])
        assert not fut.done()  # all bytes are in, but the tar may still grow: the build waits for its end
        growth.close()
        prepared = fut.result(30)
    assert blob_and_tree(stack, prepared) == want


def test_a_restarted_tar_restarts_the_build(tmp_path, spilled):
    tar = sample_tar(2)
    path = str(tmp_path / "layer.tar")
    growth = Growth()
    w = Writer(path, growth)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with ThreadPoolExecutor(1) as pool:
        fut = start(pool, stack, path, growth)
        w.write(tar[: len(tar) // 2])
        wait_event(spilled, 10, "the build to chunk a file")
        w.restart()
        with pytest.raises(Restarted):
            fut.result(30)
        assert not stack._held and not [n for n in os.listdir(tmp_path / "blobs") if not n.startswith(".")]
        fut = start(pool, stack, path, growth)  # the build again, following the new attempt
        w.write(tar)
        growth.close()
        prepared = fut.result(30)
    assert blob_and_tree(stack, prepared) == oracle(tmp_path, tar)


def test_a_tar_that_will_not_complete_ends_the_build(tmp_path, spilled):
    tar = sample_tar(3)
    path = str(tmp_path / "layer.tar")
    growth = Growth()
    w = Writer(path, growth)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    with ThreadPoolExecutor(1) as pool:
        fut = start(pool, stack, path, growth)
        w.write(tar[: len(tar) // 2])
        wait_event(spilled, 10, "the build to chunk a file")
        growth.close(failed=True)  # the download failed (or was cancelled)
        with pytest.raises(OSError):
            fut.result(30)
    assert not stack._held
