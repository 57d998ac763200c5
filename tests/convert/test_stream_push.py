"""Layer blobs pushed while they are written (`convert.stream_push`): one PATCH whose body
follows the blob file as it grows (or PATCH pieces), and a PUT ?digest= completes it. Against
Debian's docker-registry: the bytes reach the registry before the blob is complete (its upload
file grows; PATCH pieces in its access log); the pushed blob is the local one (the registry checks
the digest; here each is fetched back and hashed); a connection cut mid-stream or a registry that
refuses PATCH ends in the whole file pushed the usual way, logged and counted; memory stays at a
read piece; a re-conversion into an existing tag does not stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import threading
import tracemalloc
import urllib.request
from pathlib import Path

import pytest

from nydus_py.convert import converter
from nydus_py.convert.converter import ConvertOptions
from nydus_py.convert.push_retry import PushRetry
from nydus_py.convert.stack import LayerStack
from nydus_py.convert.stream_push import BlobStream, StreamRefused
from nydus_py.storage.registry import RegistryClient
from nydus_py.storage.registry.config import RegistryConfig
from tests.storage import registry_rig as rig
from tests.storage.fault_proxy import FaultProxy
from tests.waiting import wait_until

from . import ociimage as oi
from . import regpush
from .test_check import check

pytestmark = [pytest.mark.slow]

MiB = 1 << 20


def patches(reg: rig.Registry) -> int:
    """PATCH requests the registry answered (its access log)."""
    return sum('"PATCH ' in line for line in reg.log_text().splitlines())


def uploading(reg: rig.Registry, repo: str) -> int:
    """Bytes in the registry's upload sessions of `repo` (its storage: they grow as a PATCH body
    arrives, and go when the session completes)."""
    root = reg.data / "docker/registry/v2/repositories" / repo / "_uploads"
    return sum(p.stat().st_size for p in root.glob("*/data")) if root.is_dir() else 0


def blob_sha(reg: rig.Registry, repo: str, digest: str) -> str:
    with urllib.request.urlopen(f"{reg.url}/v2/{repo}/blobs/{digest}", timeout=30) as r:
        return "sha256:" + hashlib.sha256(r.read()).hexdigest()


def manifest(reg: rig.Registry, repo: str, ref: str) -> dict:
    req = urllib.request.Request(f"{reg.url}/v2/{repo}/manifests/{ref}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def client(host: str, repo: str) -> RegistryClient:
    return RegistryClient(RegistryConfig(host=host, repo=repo, scheme="http", timeout=30.0))


class GrowingBlob:
    """A blob file written in pieces by a thread, told to a `BlobStream` as `BlobWriter` tells
    its watch; the thread waits for `gate(written)` (a condition with a deadline) before each piece."""

    def __init__(self, path: Path, size: int, seed: int = 7) -> None:
        self.path = path
        self.size = size
        self.hash = hashlib.sha256()
        self.piece = bytearray(MiB)  # one buffer, filled again for each piece (memory: one MiB)
        self.seed = seed
        self.error: BaseException | None = None

    def write(self, watch: BlobStream, gate=lambda written: True) -> threading.Thread:
        def run() -> None:
            try:
                with open(self.path, "wb", buffering=0) as f:
                    watch.opened(str(self.path))
                    written = 0
                    n = 0
                    while written < self.size:
                        wait_until(lambda w=written: gate(w), 30, "the writer's gate")
                        want = min(MiB, self.size - written)
                        self.piece[:8] = (self.seed * 1000 + n).to_bytes(8, "little")
                        view = memoryview(self.piece)[:want]
                        f.write(view)
                        self.hash.update(view)
                        written += want
                        n += 1
                        watch.grew(written)
                watch.closed(self.hash.hexdigest())
            except BaseException as e:  # noqa: BLE001 - the test reads it
                self.error = e
                watch.closed(None)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


def stream_file(reg_host: str, repo: str, blob: GrowingBlob, piece: int, gate=lambda written: True,
                read: int = MiB) -> tuple[bool | None, BlobStream]:
    async def go() -> tuple[bool | None, BlobStream]:
        dst = client(reg_host, repo)
        await dst.start()
        try:
            stream = BlobStream(asyncio.get_running_loop(), "test blob", piece, read)
            t = blob.write(stream, gate)
            got = await stream.run(dst)
            await asyncio.to_thread(t.join, 30)
            return got, stream
        finally:
            await dst.close()

    return asyncio.run(go())


def test_one_patch_follows_the_file_and_the_pushed_blob_is_the_local_one(plain_registry, tmp_path):
    """The writer stops after 3 MiB until the registry's upload file holds 2 MiB: a stream that
    waited for the whole blob would never get there (the gate's deadline fails the test)."""
    blob = GrowingBlob(tmp_path / "blob", 5 * MiB + 12345, seed=6)
    before = patches(plain_registry)
    got, stream = stream_file(plain_registry.host, "stream/one", blob, 0,
                              gate=lambda written: written < 3 * MiB or uploading(plain_registry, "stream/one") >= 2 * MiB)
    assert blob.error is None
    assert got is True and stream.sent == blob.size and stream.patches == 1
    digest = "sha256:" + blob.hash.hexdigest()
    assert blob_sha(plain_registry, "stream/one", digest) == digest
    assert patches(plain_registry) - before == 1


def test_pieces_go_up_before_the_blob_is_complete_and_the_pushed_blob_is_the_local_one(plain_registry, tmp_path):
    """The writer stops after 3 MiB until the registry has taken two 1 MiB PATCHes: a stream that
    waited for the whole blob would never get there (the gate's deadline fails the test)."""
    before = patches(plain_registry)
    blob = GrowingBlob(tmp_path / "blob", 5 * MiB + 12345)
    got, stream = stream_file(plain_registry.host, "stream/unit", blob, MiB,
                              gate=lambda written: written < 3 * MiB or patches(plain_registry) - before >= 2)
    assert blob.error is None
    assert got is True and stream.sent == blob.size and stream.patches == 6
    digest = "sha256:" + blob.hash.hexdigest()
    assert blob_sha(plain_registry, "stream/unit", digest) == digest
    assert patches(plain_registry) - before == 6


def test_a_blob_the_target_has_is_streamed_but_not_completed_again(plain_registry, tmp_path, caplog):
    blob = GrowingBlob(tmp_path / "blob", 2 * MiB, seed=8)
    assert stream_file(plain_registry.host, "stream/again", blob, MiB)[0] is True
    caplog.set_level(logging.INFO, "nydus_py.convert.stream_push")
    again = GrowingBlob(tmp_path / "blob2", 2 * MiB, seed=8)
    assert stream_file(plain_registry.host, "stream/again", again, MiB)[0] is False
    assert "had blob" in caplog.text and "streamed for nothing" in caplog.text


@pytest.mark.parametrize("piece", [0, 8 * MiB])
def test_memory_stays_at_a_read_piece(plain_registry, tmp_path, piece):
    """48 MiB in one PATCH or in 8 MiB ones, read back 1 MiB at a time: the upload holds a few
    MiB at most."""
    blob = GrowingBlob(tmp_path / "blob", 48 * MiB, seed=9)
    tracemalloc.start()
    try:
        got, _stream = stream_file(plain_registry.host, f"stream/memory{piece}", blob, piece)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got is True
    assert peak < 6 * MiB, f"peak {peak / MiB:.1f} MiB traced"


@pytest.mark.parametrize("piece", [0, MiB])
def test_a_dropped_blob_cancels_its_session(plain_registry, tmp_path, piece):
    """A blob written again at its commit (the held one dropped) once 3 MiB reached the registry:
    no PUT, the session deleted."""
    repo = f"stream/dropped{piece}"

    async def go() -> bool | None:
        dst = client(plain_registry.host, repo)
        await dst.start()
        try:
            stream = BlobStream(asyncio.get_running_loop(), "dropped blob", piece)
            path = tmp_path / "blob"
            path.write_bytes(os.urandom(3 * MiB))

            def writer() -> None:
                stream.opened(str(path))
                stream.grew(3 * MiB)
                wait_until(lambda: stream.patches >= 3 if piece else uploading(plain_registry, repo) >= 3 * MiB, 30,
                           "the bytes written so far to go up")
                stream.closed(None)

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            got = await stream.run(dst)
            await asyncio.to_thread(t.join, 30)
            return got
        finally:
            await dst.close()

    assert asyncio.run(go()) is None
    log = plain_registry.log_text()
    assert f'"DELETE /v2/{repo}/blobs/uploads/' in log
    assert f'"PUT /v2/{repo}/blobs/uploads/' not in log


def source_image(reg: rig.Registry, repo: str, seed: int) -> str:
    img = oi.make_image(oi.sample_layers(seed=seed, big=3 * MiB))
    regpush.push_image(reg.url, repo, "v1", img)
    return f"{reg.host}/{repo}:v1"


def opts(src: str, dst: str, work: Path, **kw) -> ConvertOptions:
    return ConvertOptions(source=src, target=dst, source_insecure=True, target_insecure=True, work_dir=str(work),
                          chunk_size=0x10000, push_retry=PushRetry(2, 0.01), **kw)


@pytest.mark.parametrize("piece", [0, 256 << 10])
def test_convert_streams_each_blob_before_its_layer_is_committed(plain_registry, tmp_path, monkeypatch, piece):
    """The first layer's commit (its blob's trailers, its name) waits until bytes of its blob are
    in the registry (its upload file; with pieces, PATCHes in its access log): without streaming
    there are none before it, and the wait fails the test. The image is the one a conversion with
    whole-blob pushes makes, and every blob in the registry hashes to its digest."""
    repo = f"stream/app{piece}"
    src = source_image(plain_registry, f"{repo}-src", 21)
    before = patches(plain_registry)
    real_commit = LayerStack.commit_layer

    def arrived() -> bool:
        return patches(plain_registry) > before if piece else uploading(plain_registry, repo) > 0

    def commit(self, layer):  # type: ignore[no-untyped-def]
        if layer.position == 0:
            wait_until(arrived, 30, "bytes of the first layer's blob in the registry")
        return real_commit(self, layer)

    monkeypatch.setattr(LayerStack, "commit_layer", commit)
    res = converter.convert(opts(src, f"{plain_registry.host}/{repo}:nydus", tmp_path / "w1", stream_piece=piece))
    monkeypatch.setattr(LayerStack, "commit_layer", real_commit)
    blobs = [d["digest"] for d in manifest(plain_registry, repo, "nydus")["layers"]][:-1]
    # (a blob is streamed only when the layers below are committed: the others go up "whole")
    assert res.stream_push["streamed"] + res.stream_push["whole"] == len(blobs) >= 2
    assert res.stream_push["dropped"] == 0
    assert res.stream_push["streamed"] >= 1 and res.stream_push["failed"] == res.stream_push["refused"] == 0
    assert patches(plain_registry) - before >= (2 if piece else 1) * res.stream_push["streamed"]
    for d in blobs:
        assert blob_sha(plain_registry, repo, d) == d
    whole = converter.convert(opts(src, f"{plain_registry.host}/{repo}-whole:nydus", tmp_path / "w2",
                                   stream_push=False))
    assert whole.stream_push["streamed"] == 0
    assert whole.manifest_digest == res.manifest_digest
    r = check("--source", src, "--target", f"{plain_registry.host}/{repo}:nydus")
    assert r.returncode == 0, r.stderr


def test_a_connection_cut_mid_stream_ends_in_a_whole_push(plain_registry, tmp_path, caplog):
    """The first PATCH the proxy sees (the first blob's stream: the lowest layer's blob is always
    streamed) is reset: that blob goes up whole (HEAD, PUT) once built, logged and counted; the
    image is the same as without the fault and the blobs hash right."""
    src = source_image(plain_registry, "stream/cut-src", 22)
    clean = converter.convert(opts(src, f"{plain_registry.host}/stream/cut-ref:nydus", tmp_path / "w1"))
    proxy = FaultProxy(plain_registry.url, match=lambda m, p: m == "PATCH", forwarded_host=True)
    seen = {"n": 0}

    def second_patch(req) -> bool:  # type: ignore[no-untyped-def]
        if req.method != "PATCH":
            return False
        seen["n"] += 1
        return seen["n"] == 1

    proxy.fault_if = second_patch
    proxy.inject("reset", 1)
    caplog.set_level(logging.WARNING, "nydus_py.convert.converter")
    try:
        res = converter.convert(opts(src, f"{proxy.host}/stream/cut:nydus", tmp_path / "w2"))
    finally:
        proxy.stop()
    assert proxy.injected["reset"] == 1
    sp = res.stream_push
    blobs = len(manifest(plain_registry, "stream/cut", "nydus")["layers"]) - 1
    assert sp["failed"] == 1 and sp["streamed"] + sp["whole"] + 1 == blobs
    assert "upload while it was written failed" in caplog.text and "pushing it whole" in caplog.text
    assert res.manifest_digest == clean.manifest_digest
    layers = [x["digest"] for x in manifest(plain_registry, "stream/cut", "nydus")["layers"]]
    for d in layers:
        assert blob_sha(plain_registry, "stream/cut", d) == d
    whole_puts = [r for r in proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path
                  and int(r.headers.get("content-length", "0")) > 0 and any(d in r.path for d in layers[:-1])]
    assert len(whole_puts) == 1 + sp["whole"]  # the layer blob whose stream was cut, once, with its bytes


def test_a_registry_that_refuses_patch_gets_whole_blobs(plain_registry, tmp_path, caplog):
    src = source_image(plain_registry, "stream/refuse-src", 23)
    proxy = FaultProxy(plain_registry.url, match=lambda m, p: m == "PATCH", forwarded_host=True)
    proxy.inject("405", 100)
    caplog.set_level(logging.WARNING, "nydus_py.convert.converter")
    try:
        res = converter.convert(opts(src, f"{proxy.host}/stream/refuse:nydus", tmp_path / "w", jobs=1))
    finally:
        proxy.stop()
    # the first PATCH (and any other stream's sent before its answer): then no stream tries again
    assert 1 <= proxy.injected["405"] <= res.stream_push["refused"]
    assert res.stream_push["streamed"] == 0 and res.stream_push["failed"] == 0
    assert "refused a PATCH upload" in caplog.text
    for d in [x["digest"] for x in manifest(plain_registry, "stream/refuse", "nydus")["layers"]]:
        assert blob_sha(plain_registry, "stream/refuse", d) == d
    r = check("--source", src, "--target", f"{plain_registry.host}/stream/refuse:nydus")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("tag", ["nydus", "other"])
def test_a_repository_with_images_gets_whole_pushes(plain_registry, tmp_path, caplog, tag):
    """A re-conversion into the same tag, or an image into another tag of a repository that has
    images (layers shared): their blobs are likely there, so they are pushed once built, after a
    HEAD (none is sent again)."""
    src = source_image(plain_registry, f"stream/again-{tag}-src", 24)
    repo = f"stream/again-{tag}"
    first = converter.convert(opts(src, f"{plain_registry.host}/{repo}:nydus", tmp_path / "w1"))
    assert first.stream_push["streamed"] >= 1
    before = patches(plain_registry)
    caplog.set_level(logging.INFO, "nydus_py.convert.converter")
    again = converter.convert(opts(src, f"{plain_registry.host}/{repo}:{tag}", tmp_path / "w2"))
    assert again.stream_push["streamed"] == 0 and patches(plain_registry) == before
    assert again.uploaded == [] and again.manifest_digest == first.manifest_digest
    assert "has images: layer blobs are pushed once built" in caplog.text


def test_a_rebuild_with_build_cache_records_streams_its_new_layer(plain_registry, tmp_path):
    """Into the repository of the first image (it has images), but the build cache's records tell
    which layers are new: the new top layer's blob is streamed, the others come from the cache.
    (Cached layers below it join the stack before it is prepared, so a top layer sharing chunks
    with them streams too: `test_build_cache.py::test_cached_base_layers_join_before_the_new_layer_is_built`;
    a stream dropped because a lower layer joined late is
    `test_archive_order.py::test_a_streamed_blob_that_a_lower_layer_joining_later_shares_is_dropped_and_written_again`.)"""
    layers = oi.sample_layers(seed=25, big=3 * MiB)
    regpush.push_image(plain_registry.url, "stream/cached-src", "v1", oi.make_image(layers))
    rng = random.Random(26)
    top = oi.compress(oi.Layer([oi.Entry("fresh", "dir", mode=0o755),
                                oi.Entry("fresh/big.bin", data=rng.randbytes(2 * MiB)),
                                oi.Entry("fresh/note", data=b"only in the new layer\n")], "gzip"))
    regpush.push_image(plain_registry.url, "stream/cached-src", "v2", oi.make_image([*layers, top]))
    cache = f"{plain_registry.host}/stream/cached:cache"
    src = f"{plain_registry.host}/stream/cached-src"
    first = converter.convert(opts(f"{src}:v1", f"{plain_registry.host}/stream/cached:v1", tmp_path / "w1",
                                   build_cache=cache))
    assert first.stream_push["streamed"] >= 1
    again = converter.convert(opts(f"{src}:v2", f"{plain_registry.host}/stream/cached:v2", tmp_path / "w2",
                                   build_cache=cache))
    assert again.layers_cached == len(layers) and again.layers_built == 1
    assert again.stream_push["streamed"] == 1 and again.stream_push["dropped"] == again.stream_push["whole"] == 0
    r = check("--source", f"{src}:v2", "--target", f"{plain_registry.host}/stream/cached:v2")
    assert r.returncode == 0, r.stderr


def test_stream_refused_is_raised_for_a_refused_first_patch():
    """(unit) A refusal is a status that is not a gateway's; a 503 stays a failure (retried whole)."""
    from nydus_py.storage.registry.transfer import HttpStatusError

    class Dst:
        def __init__(self, status: int) -> None:
            self.status = status

        async def open_upload(self) -> str:
            return "http://x/upload"

        async def patch_upload(self, *a, **k) -> str:  # type: ignore[no-untyped-def]
            raise HttpStatusError(self.status, f"HTTP {self.status}")

        async def cancel_upload(self, location: str) -> None:
            pass

    async def go(status: int, path: Path) -> None:
        stream = BlobStream(asyncio.get_running_loop(), "b", 4)
        path.write_bytes(b"12345678")
        stream.opened(str(path))
        stream.grew(8)
        await stream.run(Dst(status))

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(StreamRefused):
            asyncio.run(go(405, Path(d) / "a"))
        with pytest.raises(HttpStatusError):
            asyncio.run(go(503, Path(d) / "b"))
