"""What `nydusd-py` holds (issue 12, memory): modules only some configurations need are imported
when they are needed, not at start; an idle daemon stays under 25 MiB of RSS and a shared daemon
under 0.5 MiB per idle image."""

import email.utils
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.daemon.logsetup import http_date
from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.daemon.rig import Api
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]

# module -> why only some daemons need it
LAZY = {
    "asyncio": "the event loop, only for registries",
    "ssl": "TLS, only for registries",
    "hashlib": "OpenSSL's libcrypto, only for sha256 digests",
    "email": "RFC 2822 dates and log rotation",
    "tomllib": "TOML configs",
    "logging.handlers": "log rotation",
    "google_crc32c": "chunk CRCs",
    "aiohttp": "registries (the HTTP API is api.server: h11)",
    "grpc": "the gRPC API",
    "nydus_py.fs.erofs_serve": "fs_driver erofs mounts",
    "nydus_py.transport.erofs_mount": "fs_driver erofs mounts",
    "nydus_py.transport.fuse_uring": "--io-uring",
    "nydus_py.fs.passthrough": "passthrough mounts (virtio-fs shares)",
}


@pytest.mark.parametrize("modules", ["nydus_py.cli.daemon", "nydus_py.cli.daemon, nydus_py.api.server"])
def test_the_daemon_entry_point_imports_nothing_it_may_not_need(modules: str) -> None:
    """Also with the HTTP API server (`--apisock`): no asyncio, ssl or aiohttp."""
    code = (f"import sys, json; import {modules}; "
            f"print(json.dumps([m for m in {sorted(LAZY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = json.loads(out.stdout)
    assert loaded == [], {m: LAZY[m] for m in loaded}


def test_mounting_by_reference_loads_no_builder() -> None:
    """`--image REF` needs the manifest code and the bootstrap's tar, not the builder (~20 ms)."""
    code = ("import sys; import nydus_py.cli.daemon, nydus_py.convert.pull; "
            "print([m for m in sys.modules if m.startswith('nydus_py.builder')])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("ts", [0, 951782400, 1_700_000_000.75, 4_102_444_799])
def test_event_dates_are_formatdates(ts: float) -> None:
    """The API's error-event dates keep email.utils.formatdate's form without the email package."""
    assert http_date(ts) == email.utils.formatdate(ts, usegmt=True)


# -- RSS bounds (issue 12 goals; bounds, not timings) ---------------------------------------------

def vm_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def flat_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1.5k-entry image (30 directories of 50 small files), blobs in a local directory."""
    root = tmp_path_factory.mktemp("tree")
    for d in range(30):
        (root / f"d{d:02d}").mkdir()
        for f in range(50):
            (root / f"d{d:02d}" / f"f{f:02d}").write_bytes(b"z" * (f + 1))
    out = tmp_path_factory.mktemp("img")
    build_image(tree_from_directory(root), str(out / "image.boot"), str(out), BuildOptions())
    return out / "image.boot", out


class Daemon:
    def __init__(self, work: Path, args: list[str], env: dict[str, str] | None = None,
                 module: str = "nydus_py.cli.daemon") -> None:
        self.mnt = work / "mnt"
        self.mnt.mkdir()
        self.log = work / "nydusd.log"
        self.proc = subprocess.Popen([sys.executable, "-m", module, "fuse", "--mountpoint",
                                      str(self.mnt), "--log-level", "info", "--log-file", str(self.log), *args],
                                     env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=str(REPO))

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def alive(self) -> bool:
        assert self.proc.poll() is None, self.log_text()
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        if is_mountpoint(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)


@pytest.mark.slow
def test_an_idle_daemon_stays_under_25_mib(tmp_path: Path, flat_image: tuple[Path, Path]) -> None:
    """A dedicated daemon with no API, even with no byte-compiled modules (PYTHONDONTWRITEBYTECODE,
    an editable install: every module compiled at start) gives its start-up garbage back."""
    require_device("/dev/fuse")
    boot, blobs = flat_image
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}},
                               "mode": "direct"}))
    cache = tmp_path / "pycache"  # empty: no .pyc is found, none is written
    d = Daemon(tmp_path, ["--config", str(cfg), "--bootstrap", str(boot)],
               {"PYTHONPYCACHEPREFIX": str(cache), "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        wait_until(lambda: d.alive() and "state RUNNING" in d.log_text(), 30, "the daemon to run")
        wait_until(lambda: vm_rss_mib(d.proc.pid) <= 25.0, 10,
                   lambda: f"RSS <= 25 MiB (it is {vm_rss_mib(d.proc.pid):.1f})")
        assert not any(cache.rglob("*.pyc"))
    finally:
        d.stop()


@pytest.mark.slow
def test_an_idle_daemon_with_an_api_socket_stays_under_25_mib(tmp_path: Path) -> None:
    """How nydus-snapshotter and Kata run it: a shared daemon started with --apisock and no mount
    yet, its state polled and its metrics scraped, a liveness connection held open. The HTTP API is
    served without aiohttp, asyncio or ssl (43 MiB before, with aiohttp's server)."""
    require_device("/dev/fuse")
    sock = tmp_path / "api.sock"
    cache = tmp_path / "pycache"  # empty: no .pyc is found, none is written
    modules = tmp_path / "modules.json"
    d = Daemon(tmp_path, ["--apisock", str(sock)],
               {"PYTHONPYCACHEPREFIX": str(cache), "PYTHONDONTWRITEBYTECODE": "1",
                "NYDUS_TEST_MODULES_OUT": str(modules)}, module="tests.cli.modules_hook")
    api = None
    liveness = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        wait_until(lambda: d.alive() and sock.exists(), 30, "the API socket")
        liveness.connect(str(sock))  # held open and never used, like the snapshotter's monitor
        api = Api(str(sock))
        assert api.request("GET", "/api/v1/daemon").json()["state"] == "RUNNING"
        assert api.request("GET", "/api/v1/metrics/inflight").status == 204
        assert api.request("GET", "/api/v1/nothing").status == 404
        assert b'nydusd_state{state="RUNNING"} 1.0' in api.request("GET", "/metrics").body  # (a scrape)
        wait_until(lambda: vm_rss_mib(d.proc.pid) <= 25.0, 10,
                   lambda: f"RSS <= 25 MiB (it is {vm_rss_mib(d.proc.pid):.1f})")
        d.proc.send_signal(signal.SIGUSR2)
        loaded = wait_until(lambda: modules.exists() and json.loads(modules.read_text()), 10, "the module list")
        heavy = {m: LAZY[m] for m in ("aiohttp", "asyncio", "ssl", "grpc") if m in loaded}
        assert heavy == {}, heavy
        assert "prometheus_client" not in loaded  # (10 MiB with ssl: the page is api.promtext's)
        assert api.request("GET", "/api/v1/daemon").status == 200  # (the liveness connection is still open)
        assert not any(cache.rglob("*.pyc"))
    finally:
        liveness.close()
        if api is not None:
            api.close()
        d.stop()


@pytest.mark.slow
def test_a_shared_daemon_holds_under_half_a_mib_per_idle_image(tmp_path: Path,
                                                               flat_image: tuple[Path, Path]) -> None:
    """20 images mounted, each walked (stat of every entry) and read, then left idle: the inode
    cache has one budget for all and the idle trimmer gives back the bootstraps' pages."""
    require_device("/dev/fuse")
    boot, blobs = flat_image
    n = 20
    sock = tmp_path / "api.sock"
    d = Daemon(tmp_path, ["--apisock", str(sock), "--trim-interval", "0.2"])
    api = None
    try:
        wait_until(lambda: d.alive() and sock.exists(), 30, "the API socket")
        api = Api(str(sock))
        base = vm_rss_mib(d.proc.pid)
        cfg = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                     "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "c")}}},
                          "mode": "direct"})
        for i in range(n):
            r = api.request("POST", "/api/v1/mount", {"mountpoint": f"/img{i}"},
                            {"fs_type": "rafs", "source": str(boot), "config": cfg})
            assert r.status == 204, r.body
        for i in range(n):
            entries = 0
            for top, dirs, files in os.walk(d.mnt / f"img{i}"):
                for name in dirs + files:
                    os.lstat(os.path.join(top, name))
                    entries += 1
            assert entries == 30 * 51
            assert (d.mnt / f"img{i}" / "d07" / "f09").read_bytes() == b"z" * 10
        wait_until(lambda: (vm_rss_mib(d.proc.pid) - base) / n <= 0.5, 30,
                   lambda: f"<= 0.5 MiB per idle image (it is {(vm_rss_mib(d.proc.pid) - base) / n:.2f})")
    finally:
        if api is not None:
            api.close()
        d.stop()


@pytest.mark.slow
def test_the_start_up_heap_settles_after_the_daemon_serves(tmp_path: Path, flat_image: tuple[Path, Path]) -> None:
    """The start-up runs without cyclic collection; the one full collection (it found the
    start-up's cycles) and the trim come after RUNNING, off the first requests' path."""
    require_device("/dev/fuse")
    boot, blobs = flat_image
    d = Daemon(tmp_path, ["--localfs-dir", str(blobs), "--bootstrap", str(boot)])
    try:
        wait_until(lambda: d.alive() and "start-up heap settled" in d.log_text(), 30, "the start-up heap to settle")
        lines = d.log_text().splitlines()
        running = next(i for i, line in enumerate(lines) if "state RUNNING" in line and "after start" in line)
        settled = next(i for i, line in enumerate(lines) if "start-up heap settled" in line)
        assert running < settled, lines
        collected = int(lines[settled].split("settled: ")[1].split()[0])
        assert collected > 0, lines[settled]
    finally:
        d.stop()
