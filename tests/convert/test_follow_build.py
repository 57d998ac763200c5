"""A layer built while its tar is still being written (`LayerStack.prepare_layer(growth=)`, what
the converter does while a layer downloads): the files are chunked as they arrive, the result is
byte for byte the build of the finished tar, a restart of the tar restarts the build, and a tar
that will not complete ends the build instead of leaving it waiting."""

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
from nydus_py.builder.sources import Growth, Restarted
from nydus_py.convert.stack import LayerStack, PreparedLayer

from ..waiting import wait_event, wait_until
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
