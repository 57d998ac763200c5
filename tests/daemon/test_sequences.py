"""Replays of nydus-snapshotter's call sequences (contract §3.5) against `nydusd-py` on real FUSE
mounts: dedicated start, shared daemon with mounts and umounts, metrics collection, sendfd,
shutdown by SIGTERM and by the exit call; every status code and JSON field the snapshotter reads."""

import os
import re
import signal
import socket
import stat
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.daemon.rig import (
    Api,
    DaemonProc,
    Image,
    assert_error,
    cleanup_mount,
    make_image,
    snapshotter_config,
    version_commit,
    wait_state,
)

pytestmark = pytest.mark.slow
V1 = "/api/v1"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    work = tmp_path_factory.mktemp("images")
    return [make_image(str(work), seed) for seed in range(4)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    require_device("/dev/fuse")
    for d in ("mnt", "socket/d1", "config/d1", "logs/d1", "supervisor", "cache"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "socket").chmod(0o700)
    yield tmp_path
    cleanup_mount(str(tmp_path / "mnt"))


def read_all(base: str, files: dict[str, bytes]) -> int:
    n = 0
    for rel, data in files.items():
        with open(os.path.join(base, rel), "rb") as f:
            assert f.read() == data, rel
        n += len(data)
    return n


def test_dedicated_daemon_sequence(root: Path, images: list[Image]) -> None:
    img = images[0]
    cfg = root / "config/d1/config.json"
    cfg.write_text(snapshotter_config(img.blobs, "", cache_dir=str(root / "cache")))
    sock = str(root / "socket/d1/api.sock")
    sup = str(root / "supervisor/d1.sock")
    mnt = str(root / "mnt")
    d = DaemonProc(["fuse", "--thread-num", "4", "--id", "d1", "--config", str(cfg), "--bootstrap", img.boot,
                    "--mountpoint", mnt, "--apisock", sock, "--log-level", "info", "--log-rotation-size", "100",
                    "--supervisor", sup, "--log-file", str(root / "logs/d1/nydusd.log"),
                    "--failover-policy", "resend"], str(root / "out.log"))
    try:
        # A.2: the socket appears once the daemon is RUNNING and mounted
        d.wait_socket(sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert is_mountpoint(mnt)
        # A.3: liveness connection, idle forever
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.connect(sock)
        api = Api(sock)
        # A.4: the very first GET already answers RUNNING
        r = api.get(f"{V1}/daemon")
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        info = r.json()
        assert info["state"] == "RUNNING" and info["id"] == "d1"
        assert info["version"]["git_commit"] == version_commit()
        assert info["supervisor"] == sup and list(info["backend_collection"]) == ["/"]
        # A.6: a sendfd round: the daemon connects to the supervisor with state + the FUSE fd
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(sup)
            listener.listen(1)
            got: dict[str, object] = {}

            def accept() -> None:
                conn, _ = listener.accept()
                with conn:
                    msg, fds, _f, _a = socket.recv_fds(conn, 1 << 18, 4)
                    rest = b""
                    while chunk := conn.recv(1 << 16):
                        rest += chunk
                    got["state"], got["fds"] = msg + rest, fds

            t = threading.Thread(target=accept)
            t.start()
            r = api.request("PUT", f"{V1}/daemon/fuse/sendfd")
            assert r.status == 204, r.body
            t.join(10)
        assert len(got["fds"]) == 1 and b'"mountpoint": "/"' in got["state"]  # type: ignore[arg-type,operator]
        for fd in got["fds"]:  # type: ignore[attr-defined]
            os.close(fd)
        # A.7: blobcache metrics with no id (single-object rule), underlying_files an array
        bc = api.get(f"{V1}/metrics/blobcache")
        assert bc.status == 200
        assert isinstance(bc.json()["underlying_files"], list)
        nbytes = read_all(mnt, img.files)
        assert os.readlink(os.path.join(mnt, "link")) == "id-0"
        # G: metrics collection
        m = api.get(f"{V1}/metrics").json()
        assert m["id"] == "/" and len(m["fop_hits"]) == 15 and len(m["fop_errors"]) == 15
        assert len(m["block_count_read"]) == 8 and len(m["read_latency_dist"]) == 8
        assert m["fop_hits"][4] >= 1 and m["fop_errors"][4] == 0
        assert m["data_read"] >= nbytes and sum(m["read_latency_dist"]) == m["fop_hits"][4]
        assert m["fop_hits"][9] >= len(img.files)  # lookups
        bc2 = api.get(f"{V1}/metrics/blobcache").json()
        assert bc2["underlying_files"], "the blob cache holds the blobs that were read"
        assert bc2["fetched_bytes"]["ondemand"] > 0 and bc2["fetched_bytes"]["stream"] == 0
        assert bc2["streams"]["stream_switches"] == 0  # (a localfs backend never streams)
        amp = bc2["amplification"]  # how misses took neighbours along (what bench_lazy_registry reports)
        assert amp["backend_reads"] >= 1 and amp["demand_bytes"] > 0 and amp["ahead_used_bytes"] <= amp["ahead_bytes"]
        assert amp["waited"] >= 0
        # directory-aware read-around: what the guesses brought, and what of it reads used
        assert 0 <= amp["dir_used_bytes"] <= amp["dir_bytes"] and amp["dir_chunks"] >= amp["dir_guesses"] >= 0
        assert api.get(f"{V1}/metrics/inflight").status == 204
        be = api.get(f"{V1}/metrics/backend").json()
        assert be["read_count"] >= 1 and be["read_errors"] == 0
        prom = api.get("/metrics")
        assert prom.status == 200 and b"nydusd_fuse_request_duration_seconds_bucket" in prom.body
        text = prom.body.decode()
        for family in ('nydusd_fuse_requests_total{mountpoint="/",op="read"}', "nydusd_read_bytes_total",
                       "nydusd_backend_read_duration_seconds_bucket", 'nydusd_cache_misses_total{mountpoint="/"}',
                       'nydusd_cache_hits_total{kind="chunk",mountpoint="/"}', "nydusd_cache_usage_bytes",
                       'nydusd_state{state="RUNNING"} 1.0', "nydusd_rss_bytes",
                       'nydusd_cache_streams_total{event="switch",mountpoint="/"} 0.0'):
            assert family in text, family
        ondemand = re.search(r'nydusd_cache_fetched_bytes_total\{mode="ondemand",mountpoint="/"\} (\S+)', text)
        assert ondemand and float(ondemand.group(1)) >= 1  # the reads above fetched on demand
        reads = re.search(r'nydusd_backend_reads_total\{backend="localfs",mountpoint="/"\} (\S+)', text)
        assert reads and float(reads.group(1)) == be["read_count"]
        assert os.path.exists(root / "logs/d1/nydusd.log")
        # the idle liveness connection is still open
        live.setblocking(False)
        with pytest.raises(BlockingIOError):
            live.recv(1)
        # K: SIGTERM -> lazy umount, socket removed, exit 0
        assert d.stop() == 0
        assert not is_mountpoint(mnt) and not os.path.exists(sock)
        live.close()
        api.close()
    finally:
        d.kill()


def test_shared_daemon_sequence(root: Path, images: list[Image]) -> None:
    sock = str(root / "socket/d1/api.sock")
    mnt = str(root / "mnt")
    d = DaemonProc(["fuse", "--thread-num", "4", "--id", "d1", "--mountpoint", mnt, "--apisock", sock,
                    "--log-level", "info", "--supervisor", str(root / "supervisor/d1.sock"),
                    "--failover-policy", "resend"], str(root / "out.log"))
    api = Api(sock)
    try:
        d.wait_socket(sock)
        info = wait_state(api, "RUNNING")
        assert info["backend_collection"] == {}
        assert os.listdir(mnt) == []
        sids = ["11", "12", "13"]
        for sid, img in zip(sids, images, strict=False):
            r = api.request("POST", f"{V1}/mount", raw_query=f"mountpoint=%2F{sid}",
                            body={"fs_type": "rafs", "source": img.boot,
                                  "config": snapshotter_config(img.blobs, sid, cache_dir=str(root / "cache"))})
            assert r.status == 204, r.body
            assert api.get(f"{V1}/daemon").json()["state"] == "RUNNING"
            r = api.request("GET", f"{V1}/metrics/blobcache", raw_query=f"id=%2F{sid}")
            assert r.status == 200 and isinstance(r.json()["underlying_files"], list)
        assert sorted(os.listdir(mnt)) == sids
        inos = set()
        for sid, img in zip(sids, images, strict=False):
            read_all(os.path.join(mnt, sid), img.files)
            for rel in img.files:
                inos.add(os.stat(os.path.join(mnt, sid, rel)).st_ino)
        assert len(inos) == sum(len(i.files) for i in images[:3]), "inode numbers collide across images"
        # Kata's nested mountpoint, unencoded
        r = api.request("POST", f"{V1}/mount", raw_query="mountpoint=/rafs/c1/lowerdir",
                        body={"fs_type": "rafs", "source": images[3].boot,
                              "config": snapshotter_config(images[3].blobs, "c1")})
        assert r.status == 204, r.body
        read_all(os.path.join(mnt, "rafs/c1/lowerdir"), images[3].files)
        # G: metrics per RAFS instance, by the id the snapshotter uses
        for sid in sids:
            m = api.request("GET", f"{V1}/metrics", raw_query=f"id=%2F{sid}").json()
            assert m["id"] == f"/{sid}" and m["fop_hits"][4] >= 1 and m["fop_errors"][4] == 0
        assert_error(api.get(f"{V1}/metrics"), 404)  # several instances, no id
        # C: umount one, its directory goes, the others keep working
        r = api.request("DELETE", f"{V1}/mount", raw_query="mountpoint=%2F12")
        assert r.status == 204
        assert sorted(os.listdir(mnt)) == ["11", "13", "rafs"]
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(mnt, "12", "id-1"))
        read_all(os.path.join(mnt, "13"), images[2].files)
        assert_error(api.request("DELETE", f"{V1}/mount", raw_query="mountpoint=%2F12"), 404)
        assert api.request("DELETE", f"{V1}/mount", raw_query="mountpoint=/rafs/c1/lowerdir").status == 204
        assert sorted(os.listdir(mnt)) == ["11", "13"]
        # exit (the upgrade path): 204, the process ends with 0 and leaves the mount in place
        r = api.request("PUT", f"{V1}/daemon/exit")
        assert r.status == 204
        assert d.wait_exit() == 0
        assert is_mountpoint(mnt)
    finally:
        api.close()
        d.kill()


def test_sigint_and_usage_errors(root: Path, images: list[Image]) -> None:
    img = images[0]
    cfg = root / "config.json"
    cfg.write_text(snapshotter_config(img.blobs))
    mnt = str(root / "mnt")
    sock = str(root / "socket/d1/api.sock")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    grpc_sock = str(root / "socket/d1/grpc.sock")
    d = DaemonProc(["fuse", "--config", str(cfg), "--bootstrap", img.boot, "--mountpoint", mnt, "--apisock", sock,
                    "--grpc-sock", grpc_sock, "--metrics-addr", f"127.0.0.1:{port}"], str(root / "out.log"))
    try:
        d.wait_socket(sock)
        # the optional TCP listener serves /metrics and nothing of the control API
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200 and b'nydusd_state{state="RUNNING"} 1.0' in r.read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/daemon", timeout=10)
        assert e.value.code == 404
        # the gRPC socket answers with the same state
        import grpc

        from nydus_py.api.grpc_gen import control_pb2 as pb
        from nydus_py.api.grpc_gen import control_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"unix:{grpc_sock}") as channel:
            info = pb_grpc.ControlStub(channel).GetDaemonInfo(pb.DaemonInfoRequest(), timeout=10)
        assert info.state == "RUNNING" and stat.S_IMODE(os.stat(grpc_sock).st_mode) == 0o600
        assert d.stop(signal.SIGINT) == 0
        assert not os.path.exists(grpc_sock)
        assert not is_mountpoint(mnt) and not os.path.exists(sock)
    finally:
        d.kill()
    # usage errors exit 2, start-up failures 1
    for args, code in ((["fuse"], 2), (["fuse", "--mountpoint", mnt, "--id", "x"], 2),
                       (["fuse", "--mountpoint", mnt, "--thread-num", "0"], 2),
                       (["fuse", "--mountpoint", mnt, "--no-such-flag"], 2),
                       (["fuse", "--mountpoint", mnt, "--prefetch-files", "/x"], 2),
                       (["fuse", "--mountpoint", str(root / "missing")], 1),
                       (["fuse", "--mountpoint", mnt, "--config", str(root / "missing.json"), "--bootstrap",
                         img.boot], 1),
                       (["singleton", "--fscache", str(root / "cache"), "--apisock", sock], 1)):
        p = DaemonProc(args, str(root / "usage.log"))
        assert p.wait_exit() == code, (args, p.log_text())
        assert not is_mountpoint(mnt)
    assert "not supported" in Path(root / "usage.log").read_text()


def test_ten_images_mounted_and_unmounted_while_readers_run(root: Path, tmp_path_factory: pytest.TempPathFactory,
                                                            images: list[Image]) -> None:
    work = tmp_path_factory.mktemp("ten")
    ten = [make_image(str(work), 100 + i, files=8) for i in range(10)]
    sock = str(root / "socket/d1/api.sock")
    mnt = str(root / "mnt")
    d = DaemonProc(["fuse", "--thread-num", "4", "--mountpoint", mnt, "--apisock", sock], str(root / "out.log"))
    api = Api(sock)
    errors: list[str] = []
    stop = threading.Event()
    try:
        d.wait_socket(sock)
        for k in range(2):  # stable mounts the readers use
            body = {"fs_type": "rafs", "source": images[k].boot, "config": snapshotter_config(images[k].blobs, f"r{k}")}
            assert api.request("POST", f"{V1}/mount", {"mountpoint": f"/r{k}"}, body).status == 204

        def reader(k: int) -> None:
            while not stop.is_set():
                try:
                    read_all(os.path.join(mnt, f"r{k}"), images[k].files)
                    os.listdir(mnt)
                except Exception as e:  # noqa: BLE001 - every failure is a test failure
                    errors.append(f"reader {k}: {e!r}")
                    return

        readers = [threading.Thread(target=reader, args=(k % 2,)) for k in range(4)]
        for t in readers:
            t.start()
        for rnd in range(2):
            for i, img in enumerate(ten):
                body = {"fs_type": "rafs", "source": img.boot, "config": snapshotter_config(img.blobs, f"t{i}")}
                r = api.request("POST", f"{V1}/mount", {"mountpoint": f"/t{i}"}, body)
                assert r.status == 204, r.body
            for i, img in enumerate(ten):
                read_all(os.path.join(mnt, f"t{i}"), img.files)
            for i in range(10):
                r = api.request("DELETE", f"{V1}/mount", {"mountpoint": f"/t{i}"})
                assert r.status == 204, (rnd, i, r.body)
        stop.set()
        for t in readers:
            t.join(30)
        assert not errors, errors
        assert sorted(os.listdir(mnt)) == ["r0", "r1"]
        info = api.get(f"{V1}/daemon").json()
        assert sorted(info["backend_collection"]) == ["/r0", "/r1"] and info["state"] == "RUNNING"
        for k in range(2):
            m = api.get(f"{V1}/metrics", id=f"/r{k}").json()
            assert m["fop_errors"][4] == 0 and m["fop_hits"][4] > 0
        assert d.stop() == 0
    finally:
        stop.set()
        api.close()
        d.kill()


def test_quickstart_dir_and_external_umount_ends_the_daemon(root: Path, images: list[Image]) -> None:
    """`--localfs-dir` (localfs backend + blob cache in one directory, no config), and nydusd's
    rule that the daemon exits 0 when its FUSE mount goes away under it."""
    img = images[1]
    mnt = str(root / "mnt")
    sock = str(root / "socket/d1/api.sock")
    d = DaemonProc(["fuse", "--localfs-dir", img.blobs, "--bootstrap", img.boot, "--mountpoint", mnt,
                    "--apisock", sock], str(root / "out.log"))
    try:
        d.wait_socket(sock)
        read_all(mnt, img.files)
        subprocess.run(["umount", mnt], check=True)
        assert d.wait_exit() == 0
        assert not os.path.exists(sock)
    finally:
        d.kill()
