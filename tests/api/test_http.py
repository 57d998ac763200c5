"""The HTTP API on a service with no FUSE mount (mounts go into the VFS only), served by
`api.server` on a unix socket: every route, status code and JSON field the snapshotter and Kata
read, and bad input that changes nothing."""

import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nydus_py.api.http_core import HttpApi
from nydus_py.api.server import ApiServer
from nydus_py.api.sockets import bind_unix
from nydus_py.daemon.service import DaemonOptions, DaemonService
from nydus_py.vfs import INO_SHIFT
from tests.daemon.rig import Api, Image, Resp, make_image, snapshotter_config
from tests.waiting import wait_until

V1 = "/api/v1"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    work = tmp_path_factory.mktemp("images")
    return [make_image(str(work), seed, files=12) for seed in range(3)]


class Client:
    """The calls of aiohttp's test client these tests make, over one keep-alive connection."""

    def __init__(self, sock: str) -> None:
        self.api = Api(sock)

    def request(self, method: str, url: str, params: dict[str, str] | None = None, json: Any = None,
                data: bytes | None = None) -> Resp:
        path, _, raw = url.partition("?")
        if params:
            raw = (raw + "&" if raw else "") + urllib.parse.urlencode(params)
        return self.api.request(method, path, body=data if json is None else json, raw_query=raw or None)

    def get(self, url: str, **kw: Any) -> Resp:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> Resp:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: Any) -> Resp:
        return self.request("PUT", url, **kw)

    def delete(self, url: str, **kw: Any) -> Resp:
        return self.request("DELETE", url, **kw)


@contextmanager
def serving(service: DaemonService, sock: str) -> Iterator[Client]:
    server = ApiServer(HttpApi(service), bind_unix(sock)).start()
    try:
        yield Client(sock)
    finally:
        server.close()


def run(service: DaemonService, fn: Callable[[Client], None]) -> None:
    with serving(service, os.path.join(service.opts.mountpoint, "api.sock")) as client:
        fn(client)


def new_service(tmp_path: Path) -> DaemonService:
    return DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path)))


def mount_body(img: Image, sid: str, **extra: Any) -> dict[str, Any]:
    return {"fs_type": "rafs", "source": img.boot, "config": snapshotter_config(img.blobs, sid), **extra}


def expect_error(resp: Resp, status: int) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["server"] == "Nydus API"
    body = resp.json()
    assert set(body) == {"code", "message"} and body["message"]
    return body


def test_daemon_info_and_shared_mounts(tmp_path: Path, images: list[Image]) -> None:
    svc = new_service(tmp_path)

    def go(c: Client) -> None:
        r = c.get(f"{V1}/daemon")
        assert r.status == 200 and r.headers["server"] == "Nydus API"
        info = r.json()
        assert info["state"] == "INIT" and info["id"] is None and info["backend_collection"] == {}
        assert set(info["version"]) == {"package_ver", "git_commit", "build_time", "profile", "rustc"}
        assert len(info["version"]["git_commit"]) == 40
        for i, img in enumerate(images):
            # the snapshotter percent-encodes the query, Kata Go does not
            q = f"mountpoint=%2Fsnap{i}" if i % 2 else f"mountpoint=/snap{i}"
            r = c.post(f"{V1}/mount?{q}", json=mount_body(img, f"snap{i}"))
            assert r.status == 204, r.body
            assert r.headers["content-type"] == "application/json" and r.body == b""
        info = c.get(f"{V1}/daemon").json()
        coll = info["backend_collection"]
        assert sorted(coll) == ["/snap0", "/snap1", "/snap2"]
        entry = coll["/snap1"]
        assert entry["backend_type"] == "Rafs" and entry["mountpoint"] == "/snap1"
        assert entry["config"]["version"] == 2 and entry["config"]["id"] == "/snap1"
        assert entry["config"]["backend"]["type"] == "localfs"
        v2 = c.get("/api/v2/daemon").json()
        assert v2["backend_collection"] is None and v2["state"] == "INIT"
        # the VFS routes each sub-tree to its own image with distinct inode numbers
        inos = set()
        for i, img in enumerate(images):
            root = svc.vfs.lookup(1, f"snap{i}".encode())
            ident = svc.vfs.lookup(root.ino, f"id-{i}".encode())
            assert svc.vfs.read(ident.ino, 0, 0, 100) == img.files[f"id-{i}"]
            inos.add(ident.ino >> INO_SHIFT)
        assert len(inos) == 3
        # the superblock view
        sb = c.get(f"{V1}/daemon/backend", params={"mountpoint": "/snap0"}).json()
        assert sb["version"] == 6 and sb["inodes_count"] > 12
        # remount: same index, the new image's content
        idx = svc.vfs.mounts()["/snap2"]
        r = c.put(f"{V1}/mount", params={"mountpoint": "/snap2"}, json=mount_body(images[0], "snap2"))
        assert r.status == 204
        assert svc.vfs.mounts()["/snap2"] == idx
        root2 = svc.vfs.lookup(1, b"snap2")
        assert svc.vfs.read(svc.vfs.lookup(root2.ino, b"id-0").ino, 0, 0, 100) == images[0].files["id-0"]
        # umount, then the path is gone
        r = c.delete(f"{V1}/mount", params={"mountpoint": "/snap0"})
        assert r.status == 204
        assert sorted((c.get(f"{V1}/daemon").json())["backend_collection"]) == ["/snap1", "/snap2"]
        expect_error(c.delete(f"{V1}/mount", params={"mountpoint": "/snap0"}), 404)

    run(svc, go)
    svc.close_all()


def test_metrics_endpoints(tmp_path: Path, images: list[Image]) -> None:
    svc = new_service(tmp_path)

    def go(c: Client) -> None:
        # one mount: omitted id selects it (dedicated mode relies on this)
        assert (c.post(f"{V1}/mount?mountpoint=/s1", json=mount_body(images[0], "s1"))).status == 204
        m = c.get(f"{V1}/metrics").json()
        assert m["id"] == "/s1" and m["measure_latency"] is True
        for key, n in (("fop_hits", 15), ("fop_errors", 15), ("fop_cumulative_latency_total", 15),
                       ("block_count_read", 8), ("read_latency_dist", 8)):
            assert len(m[key]) == n and all(isinstance(v, int) for v in m[key]), key
        for key in ("files_account_enabled", "access_pattern_enabled", "data_read", "nr_opens"):
            assert key in m
        bc = c.get(f"{V1}/metrics/blobcache").json()
        assert isinstance(bc["underlying_files"], list) and isinstance(bc["data_all_ready"], bool)
        for key in ("store_path", "partial_hits", "whole_hits", "total", "entries_count", "prefetch_data_amount",
                    "prefetch_requests_count", "prefetch_workers", "prefetch_cumulative_time_millis",
                    "buffered_backend_size"):
            assert key in bc, key
        assert (c.post(f"{V1}/mount?mountpoint=/s2", json=mount_body(images[1], "s2"))).status == 204
        # two mounts: an omitted id is NoCounter (404); ids work with and without the leading /
        expect_error(c.get(f"{V1}/metrics"), 404)
        expect_error(c.get(f"{V1}/metrics/blobcache"), 404)
        for ident in ("/s2", "s2", "%2Fs2"):
            r = c.get(f"{V1}/metrics/blobcache?id={ident}")
            assert r.status == 200, ident
            r = c.get(f"{V1}/metrics?id={ident}")
            assert (r.json())["id"] == "/s2"
        expect_error(c.get(f"{V1}/metrics", params={"id": "/nope"}), 404)
        be = c.get(f"{V1}/metrics/backend", params={"id": "/s1"}).json()
        assert be["backend_type"] == "localfs" and len(be["read_latency_sizes_dist"]) == 8
        assert all(len(row) == 8 for row in be["read_latency_sizes_dist"])
        # reads through the VFS show up in the per-mount counters of the right mount only
        root = svc.vfs.lookup(1, b"s2")
        ident = svc.vfs.lookup(root.ino, b"id-1")
        svc.metrics.finished(svc.metrics.started(15, ident.ino, 7), (b"\x10\0\0\0\0\0\0\0" + bytes(8), b"x" * 9))
        m2 = c.get(f"{V1}/metrics", params={"id": "/s2"}).json()
        m1 = c.get(f"{V1}/metrics", params={"id": "/s1"}).json()
        assert m2["fop_hits"][4] == 1 and m2["data_read"] == 9 and m1["fop_hits"][4] == 0
        files = c.get(f"{V1}/metrics/files", params={"id": "/s2"}).json()
        assert files[str(ident.ino & ((1 << INO_SHIFT) - 1))]["data_read"] == 9
        latest = c.get(f"{V1}/metrics/files", params={"id": "/s2", "latest": "true"}).json()
        assert latest == [[ident.ino & ((1 << INO_SHIFT) - 1)]]
        assert c.get(f"{V1}/metrics/files", params={"id": "/s2", "latest": "true"}).json() == []
        pattern = c.get(f"{V1}/metrics/pattern", params={"id": "/s2"}).json()
        assert pattern[0]["nr_read"] == 1 and pattern[0]["first_access_time_secs"] > 0
        expect_error(c.get(f"{V1}/metrics/files", params={"id": "/s2", "latest": "maybe"}), 400)
        # nothing in flight: 204
        r = c.get(f"{V1}/metrics/inflight")
        assert r.status == 204
        svc.metrics.started(15, ident.ino, 99)
        ops = c.get(f"{V1}/metrics/inflight").json()
        assert ops == [{"inode": ident.ino, "opcode": 15, "unique": 99, "timestamp_secs": ops[0]["timestamp_secs"]}]
        text = c.get("/metrics").body.decode()
        assert 'nydusd_fuse_requests_total{mountpoint="/s2",op="read"} 1.0' in text
        assert "nydusd_backend_reads_total" in text and 'nydusd_state{state="INIT"} 1.0' in text

    run(svc, go)
    svc.close_all()


def snapshot(svc: DaemonService) -> Any:
    return (svc.state, svc.vfs.mounts(), json.dumps(svc.daemon_info(), sort_keys=True), dict(svc.overrides))


def test_bad_input_is_4xx_and_changes_nothing(tmp_path: Path, images: list[Image]) -> None:
    svc = new_service(tmp_path)
    good = mount_body(images[0], "a")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def go(c: Client) -> None:
        assert (c.post(f"{V1}/mount?mountpoint=/a", json=good)).status == 204
        before = snapshot(svc)
        cases: list[tuple[str, str, Any, int]] = [
            ("POST", f"{V1}/mount?mountpoint=/b", b"{not json", 400),
            ("POST", f"{V1}/mount", good, 400),  # no mountpoint
            ("POST", f"{V1}/mount?mountpoint=", good, 400),
            ("POST", f"{V1}/mount?mountpoint=relative", good, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {"source": images[1].boot, "config": "{}"}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "config": 5}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "fs_type": ["rafs"]}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "fs_type": "ext4"}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "config": "{\"device\": 3}"}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "config": "not json"}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "source": str(tmp_path / "missing.boot")}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "source": __file__}, 400),  # not a bootstrap
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "source": str(fifo)}, 400),  # would block open()
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "source": str(tmp_path)}, 400),  # a directory
            ("POST", f"{V1}/mount?mountpoint=/b", {**good, "prefetch_files": 7}, 400),
            ("POST", f"{V1}/mount?mountpoint=/b", [1, 2], 400),
            ("POST", f"{V1}/mount?mountpoint=/a", mount_body(images[1], "a"), 409),  # taken
            ("POST", f"{V1}/mount?mountpoint=/a/sub", good, 409),  # under a mount
            ("PUT", f"{V1}/mount?mountpoint=/zzz", good, 404),
            ("DELETE", f"{V1}/mount?mountpoint=/zzz", None, 404),
            ("DELETE", f"{V1}/mount", None, 400),
            ("DELETE", f"{V1}/mount?mountpoint=/a", b"{}", 400),  # a body where none is allowed
            ("GET", f"{V1}/mount", None, 400),  # wrong method
            ("GET", f"{V1}/nothing", None, 404),
            ("GET", f"{V1}/daemon/backend", None, 400),
            ("GET", f"{V1}/daemon/backend?mountpoint=/zzz", None, 404),
            ("PUT", f"{V1}/daemon", {"log_level": "loud"}, 400),
            ("PUT", f"{V1}/daemon", {"level": "info"}, 400),
            ("PUT", f"{V1}/daemon", b"", 400),
            ("PUT", f"{V1}/daemon/start", None, 400),  # INIT -> Start is not a transition
            ("PUT", f"{V1}/daemon/exit", b"x", 400),
            ("PUT", f"{V1}/daemon/fuse/sendfd", None, 501),  # no --supervisor
            ("PUT", f"{V1}/config?id=/a", {"registry_auth": 5}, 400),
            ("PUT", f"{V1}/config?id=/a", {"password": "x"}, 400),
            ("PUT", f"{V1}/config?id=/a", b"[", 400),
            ("PUT", "/api/v2/blobs", {"type": "bootstrap"}, 501),
            ("DELETE", "/api/v2/blobs?domain_id=x", None, 501),
        ]
        for method, url, body, status in cases:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            r = c.request(method, url, data=data)
            expect_error(r, status)
            assert snapshot(svc) == before, (method, url)

    run(svc, go)
    svc.close_all()


def test_state_transitions_over_the_api(tmp_path: Path) -> None:
    svc = new_service(tmp_path)

    def go(c: Client) -> None:
        assert (c.put(f"{V1}/daemon/exit")).status == 204  # INIT -Stop-> STOPPED, no umount
        assert svc.state.value == "STOPPED" and svc.exit_request == (0, False)
        expect_error(c.put(f"{V1}/daemon/exit"), 400)
        expect_error(c.put(f"{V1}/daemon/start"), 400)

    run(svc, go)


def test_config_overrides_and_log_level(tmp_path: Path, images: list[Image]) -> None:
    svc = new_service(tmp_path)

    def go(c: Client) -> None:
        assert (c.post(f"{V1}/mount?mountpoint=/a", json=mount_body(images[0], "a"))).status == 204
        r = c.put(f"{V1}/config", params={"id": "/a"}, json={"registry_auth": "dXNlcjpzZWNyZXQ="})
        assert r.status == 204
        got = c.get(f"{V1}/config", params={"id": "/a"}).json()
        assert got == {"registry_auth": "<redacted>"}
        everything = c.get(f"{V1}/config").body.decode()
        assert "dXNlcjpzZWNyZXQ=" not in everything and "/a:registry_auth" in everything
        assert (c.put(f"{V1}/daemon", json={"log_level": "DEBUG"})).status == 204
        assert logging.getLogger().level == logging.DEBUG
        assert (c.put("/api/v2/daemon", json={"log_level": "info"})).status == 204
        logging.getLogger("nydus_py.test").error('backend said {"auth": "dXNlcjpzZWNyZXQ="} Bearer abcdefghijklmn')
        events = c.get(f"{V1}/daemon/events").json()
        assert events["max_errors"] == 500 and events["max_size"] == 51200 and events["total_errors"] >= 1
        text = json.dumps(events)
        assert "dXNlcjpzZWNyZXQ=" not in text and "abcdefghijklmn" not in text and "<redacted>" in text
        metrics = c.get("/metrics").body.decode()
        assert "dXNlcjpzZWNyZXQ=" not in metrics

    events_before = logging.getLogger().handlers[:]
    svc.events.setLevel(logging.ERROR)
    logging.getLogger().addHandler(svc.events)
    try:
        run(svc, go)
    finally:
        logging.getLogger().handlers[:] = events_before
        logging.getLogger().setLevel(logging.WARNING)
        svc.close_all()


def test_slow_mount_does_not_stall_the_api(tmp_path: Path) -> None:
    """A mount runs on the API worker thread: state polls and metrics answer meanwhile."""
    from nydus_py.daemon.instance import Instance, register_fs_type
    from nydus_py.metrics.fsstats import FsStats
    from tests.fuse.memfs import MemFS

    entered, release = threading.Event(), threading.Event()

    def slow_factory(mountpoint: str, cmd: Any, default: Any) -> Instance:
        entered.set()
        assert release.wait(30)
        return Instance(mountpoint, cmd, MemFS(), "Rafs", FsStats(mountpoint))

    register_fs_type(("test-slowfs",), slow_factory)
    svc = new_service(tmp_path)
    threads: list[str] = []
    real_mount = svc.mount

    def mount_recording_its_thread(*args: Any) -> None:
        threads.append(threading.current_thread().name)
        real_mount(*args)

    svc.mount = mount_recording_its_thread  # type: ignore[method-assign]

    def go(c: Client) -> None:
        body = {"fs_type": "test-slowfs", "source": "x", "config": ""}
        answers: list[Resp] = []
        # its own connection, as the snapshotter's mount and state poll would be
        mount = threading.Thread(target=lambda: answers.append(
            Client(c.api.sock).post(f"{V1}/mount?mountpoint=/slow", json=body)))
        mount.start()
        wait_until(entered.is_set, what="the mount to be inside the filesystem factory")
        # answered while the mount is held inside the factory (a stalled API would wait for it)
        for _ in range(5):
            r = c.get(f"{V1}/daemon")
            assert r.status == 200
            assert (c.get(f"{V1}/metrics/inflight")).status == 204
        assert mount.is_alive() and not answers and not release.is_set()
        release.set()
        mount.join(30)
        assert answers[0].status == 204
        assert threads[0].startswith("api-worker"), threads  # (not the connection's thread)
        assert "/slow" in (c.get(f"{V1}/daemon").json())["backend_collection"]

    run(svc, go)
    svc.close_all()


def test_prefetch_progress_in_blobcache_metrics(tmp_path: Path, images: list[Image]) -> None:
    """fs_prefetch with a blob cache: the whole image is fetched in the background and the
    blobcache/Prometheus metrics show it (prefetch amounts, times, data_all_ready)."""
    svc = new_service(tmp_path)
    img = images[2]
    cfg = json.loads(snapshotter_config(img.blobs, "p", cache_dir=str(tmp_path / "cache")))
    cfg["fs_prefetch"] = {"enable": True, "prefetch_all": True, "threads_count": 2}

    def go(c: Client) -> None:
        body = {"fs_type": "rafs", "source": img.boot, "config": json.dumps(cfg)}
        assert (c.post(f"{V1}/mount?mountpoint=/p", json=body)).status == 204

        def finished() -> dict[str, Any] | None:
            # the chunk map's bits go durable in batches after their data (one fdatasync per
            # batch, a moment after the prefetch threads end), so data_all_ready comes a little later
            bc = c.get(f"{V1}/metrics/blobcache", params={"id": "/p"}).json()
            return bc if bc["prefetch_end_time_secs"] and bc["data_all_ready"] else None

        bc = wait_until(finished, 20, "prefetch to finish and every chunk to be marked ready")
        assert bc["prefetch_end_time_secs"] >= bc["prefetch_begin_time_secs"] > 0
        assert bc["prefetch_data_amount"] > 0 and bc["prefetch_workers"] == 2
        assert bc["data_all_ready"] is True and bc["underlying_files"]
        text = c.get("/metrics").body.decode()
        assert 'nydusd_prefetch_done{mountpoint="/p"} 1.0' in text

    run(svc, go)
    svc.close_all()
