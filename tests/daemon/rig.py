"""Rig for daemon and API tests: images, configs, an HTTP client over a unix socket, and
`nydusd-py` run as a subprocess the way nydus-snapshotter and Kata run it."""

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.transport.mount import fuse_umount, is_mountpoint
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CHUNK = 0x10000


# -- images ------------------------------------------------------------------------------------------
def make_tree(root: str, seed: int, files: int = 30) -> dict[str, bytes]:
    """A small tree; returns relative path -> content of every regular file."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(files):
        rel = f"d{i % 4}/f{i:03d}-{seed}"
        data = rng.randbytes(rng.choice([0, 10, 4096, 70_000, 3 * CHUNK + 17]))
        out[rel] = data
    out[f"id-{seed}"] = f"image {seed}\n".encode()
    for rel, data in out.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.symlink(f"id-{seed}", os.path.join(root, "link"))
    return out


@dataclass
class Image:
    boot: str
    blobs: str
    files: dict[str, bytes]


def make_image(work: str, seed: int, files: int = 30) -> Image:
    src = os.path.join(work, f"src-{seed}")
    content = make_tree(src, seed, files)
    boot = os.path.join(work, f"image-{seed}.boot")
    blobs = os.path.join(work, "blobs")
    os.makedirs(blobs, exist_ok=True)
    build_image(tree_from_directory(src), boot, blobs, BuildOptions(chunk_size=CHUNK))
    return Image(boot, blobs, content)


def snapshotter_config(blob_dir: str, snapshot_id: str = "", cache_dir: str | None = None) -> str:
    """The v1 JSON the snapshotter writes, extra keys included (readahead, proxy.fallback, ...)."""
    cfg: dict[str, Any] = {
        "device": {"id": f"/{snapshot_id}" if snapshot_id else "",
                   "backend": {"type": "localfs", "config": {"readahead": False, "dir": blob_dir,
                                                             "proxy": {"fallback": False}}},
                   "cache": {"type": "blobcache" if cache_dir else "", "config": {
                       "work_dir": cache_dir or "", "disable_indexed_map": False}}},
        "mode": "direct", "digest_validate": True, "enable_xattr": True, "amplify_io": 1048576,
        "iostats_files": True, "access_pattern": True, "latest_read_files": True, "warmup": 0,
    }
    return json.dumps(cfg)


# -- HTTP over a unix socket --------------------------------------------------------------------------
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """One persistent connection (like Go's pooled client), re-opened if the server closes it."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.conn: UnixHTTPConnection | None = None

    def request(self, method: str, path: str, query: dict[str, str] | None = None, body: Any = None,
                raw_query: str | None = None) -> Resp:
        url = path
        if raw_query is not None:
            url += "?" + raw_query
        elif query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Host": "unix", "Content-Length": str(len(data or b""))}
        for attempt in range(2):
            if self.conn is None:
                self.conn = UnixHTTPConnection(self.sock)
            try:
                self.conn.request(method, url, body=data, headers=headers)
                r = self.conn.getresponse()
                payload = r.read()
                return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, payload)
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str, **query: str) -> Resp:
        return self.request("GET", path, query)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def assert_error(r: Resp, status: int) -> dict[str, Any]:
    assert r.status == status, (r.status, r.body)
    assert r.headers.get("content-type") == "application/json"
    body = r.json()
    assert set(body) == {"code", "message"} and isinstance(body["message"], str) and body["message"]
    return body


# -- the daemon process ---------------------------------------------------------------------------------
def version_commit() -> str:
    out = subprocess.run([sys.executable, "-m", "nydus_py.cli.daemon", "--version"], capture_output=True,
                         text=True, check=True, cwd=str(REPO)).stdout
    m = re.search(r"Git Commit:\s*(.+)", out)
    assert m, out
    return m.group(1).strip()


class DaemonProc:
    """`nydusd-py <args>` in a subprocess with its output in a log file."""

    def __init__(self, args: list[str], log: str, *, env: dict[str, str] | None = None,
                 module: str = "nydus_py.cli.daemon") -> None:
        """`module`: run the daemon through a wrapper module instead (same argv)."""
        self.args = args
        self.log = log
        full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=str(REPO), env=full_env)

    def log_text(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def wait_socket(self, path: str, timeout: float = 10.0) -> None:
        """Until `path` exists (like the snapshotter's stat poll); fails at once if the daemon exits."""

        def there() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            return os.path.exists(path)

        wait_until(there, timeout, lambda: f"socket {path}:\n{self.log_text()}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout}s:\n{self.log_text()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cleanup_mount(path: str) -> None:
    """Lazily unmount `path` if it is (still) a mount point, retrying while umount fails."""

    def gone() -> bool:
        if not is_mountpoint(path):
            return True
        try:
            fuse_umount(path, lazy=True)
        except OSError:
            return False
        return not is_mountpoint(path)

    wait_until(gone, 5, f"{path} to be unmounted")


def wait_state(api: Api, state: str, timeout: float = 10.0) -> dict[str, Any]:
    """Poll GET /api/v1/daemon like the snapshotter (a refused connection is retried: a stale
    socket file of a dead predecessor may still be there)."""
    last: list[object] = [None]

    def reached() -> dict[str, Any] | None:
        try:
            r = api.get("/api/v1/daemon")
            last[0] = (r.status, r.body)
            if r.status == 200 and r.json()["state"] == state:
                return r.json()  # type: ignore[no-any-return]
        except ConnectionError as e:
            last[0] = e
        return None

    return wait_until(reached, timeout, lambda: f"state {state}, last answer {last[0]!r}")
