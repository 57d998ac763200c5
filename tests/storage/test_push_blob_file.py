"""`push_blob_file`: a file goes up as one streamed PUT of known length after the POST (no PATCH
pieces), and a body that met a 401 is streamed again from its first byte."""

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from nydus_py.storage.registry import RegistryBackend, parse_registry_config

from . import registry_rig as rig
from .images import registry_config


class FakeUploads:
    """Upload endpoints that log each request (method, Content-Length, chunked, body size) and
    ask for Basic credentials on PUT only, so the first PUT of a client meets a 401."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str | None, bool, int]] = []
        self.blobs: dict[str, bytes] = {}
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("HEAD", "/v2/test/up/blobs/{digest}", self.head)
        app.router.add_post("/v2/test/up/blobs/uploads/", self.post)
        app.router.add_route("*", "/v2/test/up/blobs/uploads/{uid}", self.upload)
        self.server = rig.ThreadedApp(app)

    async def head(self, request: web.Request) -> web.Response:
        self.log.append(("HEAD", None, False, 0))
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def post(self, request: web.Request) -> web.Response:
        self.log.append(("POST", None, False, 0))
        return web.Response(status=202, headers={"Location": "/v2/test/up/blobs/uploads/u1?_state=x"})

    async def upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.log.append((request.method, request.headers.get("Content-Length"),
                         "chunked" in request.headers.get("Transfer-Encoding", ""), len(body)))
        if request.method == "PATCH":
            return web.Response(status=202, headers={"Location": "/v2/test/up/blobs/uploads/u1?_state=y",
                                                     "Range": f"0-{len(body) - 1}"})
        if request.headers.get("Authorization") != "Basic " + rig.basic_auth():
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="test"'})
        digest = request.query["digest"]
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            return web.Response(status=400, text="digest mismatch")
        self.blobs[digest] = body
        return web.Response(status=201)


@pytest.fixture
def uploads() -> Iterator[FakeUploads]:
    f = FakeUploads()
    yield f
    f.server.stop()


def test_file_goes_up_as_one_streamed_put_and_again_after_a_401(uploads: FakeUploads, tmp_path: Path) -> None:
    data = os.urandom(5 * (1 << 20) + 12345)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cfg = parse_registry_config(registry_config(f"127.0.0.1:{uploads.server.port}", "test/up",
                                                auth=rig.basic_auth()),
                                env={}, docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        seen: list[int] = []
        fut = asyncio.run_coroutine_threadsafe(
            b.client.push_blob_file(str(path), digest, piece=1 << 20, progress=seen.append), b.loop)
        assert fut.result(60) is True
    assert uploads.blobs[digest] == data
    puts = [e for e in uploads.log if e[0] in ("PUT", "PATCH")]
    # the anonymous PUT meets the 401, the same body goes again with the credentials; no PATCH;
    # each with its length (not chunked) and the whole file
    assert puts == [("PUT", str(len(data)), False, len(data))] * 2
    assert sum(seen) == len(data)  # progress counts the bytes once


def test_empty_file(uploads: FakeUploads, tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    digest = "sha256:" + hashlib.sha256(b"").hexdigest()
    cfg = parse_registry_config(registry_config(f"127.0.0.1:{uploads.server.port}", "test/up",
                                                auth=rig.basic_auth()),
                                env={}, docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        assert asyncio.run_coroutine_threadsafe(b.client.push_blob_file(str(path), digest), b.loop).result(60)
    assert uploads.blobs[digest] == b""
