"""The API abuse catalogue against a real `nydusd-py fuse` daemon with an API socket (issue 16).

Bad mount sources (FIFO, character device, directory, symlinks to them, sockets, loops), bad and
hostile JSON, a 64 MiB body, malformed HTTP, and half-open connections held while the daemon must
keep serving. Every request that reaches the API gets a 4xx with nydusd's error body
(`{"code", "message"}`, contract 3.2) within a deadline; malformed HTTP that never becomes a
request gets a 4xx from the HTTP layer or a closed connection; the daemon stays responsive and
nothing is mounted by a refused request. The source swapped for a FIFO between the daemon's
checks and its open (issue 16 item 3) hangs the control plane today: that test is an expected
failure until the fix, bounded by its deadlines, and its daemon is killed at the end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_device
from tests.daemon.rig import (
    DaemonProc,
    Image,
    UnixHTTPConnection,
    cleanup_mount,
    make_image,
    snapshotter_config,
)

pytestmark = pytest.mark.slow
V1 = "/api/v1"
DEADLINE = 10.0  # seconds any one API answer may take


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def call(sock: str, method: str, path: str, body: bytes | None = None, timeout: float = DEADLINE) -> Reply:
    """One request on a fresh connection; raises TimeoutError if no answer within `timeout`."""
    conn = UnixHTTPConnection(sock, timeout=timeout)
    try:
        headers = {"Host": "unix", "Content-Length": str(len(body or b""))}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def assert_nydusd_error(r: Reply, what: str) -> dict[str, Any]:
    """A 4xx with nydusd's JSON error body."""
    assert 400 <= r.status < 500, (what, r.status, r.body[:300])
    assert r.headers.get("content-type") == "application/json", (what, r.headers)
    body = json.loads(r.body)
    assert set(body) == {"code", "message"} and isinstance(body["message"], str) and body["message"], (what, body)
    return body


def responsive(sock: str) -> dict[str, Any]:
    r = call(sock, "GET", f"{V1}/daemon")
    assert r.status == 200, r.body
    info: dict[str, Any] = json.loads(r.body)
    assert info["state"] == "RUNNING"
    return info


def mount_body(img: Image, sid: str, **over: Any) -> bytes:
    return json.dumps({"fs_type": "rafs", "source": img.boot, "config": snapshotter_config(img.blobs, sid),
                       **over}).encode()


def raw_exchange(sock: str, data: bytes, timeout: float = DEADLINE) -> bytes:
    """Send `data` and read until the peer closes or one full response has arrived; b"" when the
    peer closed without answering. TimeoutError if neither happens within `timeout`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    out = b""
    try:
        s.connect(sock)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                return out
    finally:
        s.close()


def parse_raw(resp: bytes) -> Reply:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Reply(status, headers, body)


# -- rig ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    work = tmp_path_factory.mktemp("abuse-images")
    return [make_image(str(work), seed, files=6) for seed in range(3)]


@dataclass
class Daemon:
    proc: DaemonProc
    sock: str
    mnt: str
    root: Path


@contextlib.contextmanager
def shared_daemon(root: Path, env: dict[str, str] | None = None, module: str = "nydus_py.cli.daemon") -> Iterator[Daemon]:
    """A shared `nydusd-py fuse` daemon (mounts go in as sub-directories) with an API socket;
    killed by pid at the end whatever state it is in."""
    require_device("/dev/fuse")
    (root / "mnt").mkdir(parents=True)
    (root / "sock").mkdir(mode=0o700)
    sock, mnt = str(root / "sock/api.sock"), str(root / "mnt")
    argv = ["fuse", "--thread-num", "2", "--mountpoint", mnt, "--apisock", sock, "--log-level", "info"]
    proc = DaemonProc(argv, str(root / "daemon.log"), env=env, module=module)
    try:
        proc.wait_socket(sock, timeout=20)
        yield Daemon(proc, sock, mnt, root)
    finally:
        proc.kill()
        cleanup_mount(mnt)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, images: list[Image]) -> Iterator[Daemon]:
    with shared_daemon(tmp_path_factory.mktemp("abuse")) as d:
        r = call(d.sock, "POST", f"{V1}/mount?mountpoint=/good", mount_body(images[0], "good"))
        assert r.status == 204, r.body
        yield d


def mounted(d: Daemon) -> list[str]:
    return sorted(responsive(d.sock)["backend_collection"])


def read_through_fuse(d: Daemon, sub: str, img: Image) -> None:
    for rel, data in img.files.items():
        with open(os.path.join(d.mnt, sub, rel), "rb") as f:
            assert f.read() == data, rel


# -- bad sources ------------------------------------------------------------------------------------


def bad_sources(where: Path) -> dict[str, str]:
    """name -> a mount source that is not a regular bootstrap file."""
    where.mkdir(exist_ok=True)
    fifo = where / "fifo"
    os.mkfifo(fifo)
    (where / "link-to-fifo").symlink_to(fifo)
    (where / "link-to-zero").symlink_to("/dev/zero")
    (where / "link-to-dir").symlink_to(where)
    (where / "loop-a").symlink_to(where / "loop-b")
    (where / "loop-b").symlink_to(where / "loop-a")
    (where / "dangling").symlink_to(where / "missing")
    (where / "empty").write_bytes(b"")
    (where / "text").write_bytes(b"not a bootstrap\n" * 300)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(where / "unix.sock"))
    unix.close()
    names = ["fifo", "link-to-fifo", "link-to-zero", "link-to-dir", "loop-a", "dangling", "empty", "text",
             "unix.sock", "missing"]
    out = {n: str(where / n) for n in names}
    out.update({"dev-zero": "/dev/zero", "dev-null": "/dev/null", "directory": str(where),
                "proc-self-mem": "/proc/self/mem", "relative": "relative/image.boot", "empty-string": ""})
    return out


def test_bad_sources_are_refused_and_change_nothing(daemon: Daemon, images: list[Image]) -> None:
    before = mounted(daemon)
    for name, source in bad_sources(daemon.root / "sources").items():
        r = call(daemon.sock, "POST", f"{V1}/mount?mountpoint=/bad", mount_body(images[1], "bad", source=source))
        assert_nydusd_error(r, name)
        assert mounted(daemon) == before, name
    read_through_fuse(daemon, "good", images[0])


# -- bad bodies -------------------------------------------------------------------------------------


def bad_bodies(img: Image) -> dict[str, bytes]:
    good = json.loads(mount_body(img, "b"))
    deep = 100_000
    return {
        "not json": b"{not json",
        "empty": b"",
        "null": b"null",
        "array": b"[1, 2]",
        "string": b'"rafs"',
        "number": b"5",
        "truncated": mount_body(img, "b")[:-7],
        "invalid utf-8": b'{"fs_type": "\xff\xfe", "source": "x", "config": ""}',
        "NaN source": b'{"fs_type": "rafs", "source": NaN, "config": ""}',
        "deeply nested body": b"[" * deep + b"]" * deep,
        "deeply nested object": b'{"a":' * deep + b"1" + b"}" * deep,
        "100000-digit number": b'{"fs_type": "rafs", "source": "x", "config": "", "n": ' + b"9" * 100_000 + b"}",
        "deeply nested config": json.dumps({**good, "config": "[" * deep + "]" * deep}).encode(),
        "config with a huge number": json.dumps({**good, "config": '{"device": ' + "9" * 100_000 + "}"}).encode(),
        "deeply nested TOML config": json.dumps({**good, "config": "a = " + "[" * deep + "]" * deep}).encode(),
        "TOML config with a huge number": json.dumps({**good, "config": "version = " + "9" * 100_000}).encode(),
        "config not a string": json.dumps({**good, "config": {"device": {}}}).encode(),
        "fs_type list": json.dumps({**good, "fs_type": ["rafs"]}).encode(),
        "unknown fs_type": json.dumps({**good, "fs_type": "ext4"}).encode(),
        "prefetch_files of numbers": json.dumps({**good, "prefetch_files": [1, 2]}).encode(),
        "100k prefetch_files, bad source": json.dumps({**good, "source": "/dev/zero",
                                                        "prefetch_files": ["/a"] * 100_000}).encode(),
        "900 KB source path": json.dumps({**good, "source": "/" + "a" * 900_000}).encode(),
        "2 MB config": json.dumps({**good, "config": " " * (2 << 20)}).encode(),
    }


def test_bad_bodies_get_4xx_and_change_nothing(daemon: Daemon, images: list[Image]) -> None:
    before = mounted(daemon)
    failures = []
    for name, body in bad_bodies(images[1]).items():
        r = call(daemon.sock, "POST", f"{V1}/mount?mountpoint=/b", body)
        try:
            assert_nydusd_error(r, name)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
        assert mounted(daemon) == before, name
    assert not failures, "\n".join(failures)
    # the same hostile JSON on the other routes that parse a body
    for path in (f"{V1}/daemon", f"{V1}/config?id=/good", f"{V1}/mount?mountpoint=/good"):
        for name in ("deeply nested body", "100000-digit number", "invalid utf-8"):
            assert_nydusd_error(call(daemon.sock, "PUT", path, bad_bodies(images[1])[name]), f"PUT {path} {name}")
    assert mounted(daemon) == before
    read_through_fuse(daemon, "good", images[0])


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_64_mib_body_is_refused_without_buffering_it(daemon: Daemon) -> None:
    before = mounted(daemon)
    pid = daemon.proc.proc.pid
    rss0 = vm_kib(pid, "VmRSS")
    size = 64 << 20
    head = b"POST %s/mount?mountpoint=/huge HTTP/1.1\r\nHost: unix\r\nContent-Length: %d\r\n\r\n" % (
        V1.encode(), size)
    resp = raw_exchange(daemon.sock, head + b"{" * size)
    if resp:  # a clean refusal may also be a closed connection
        assert_nydusd_error(parse_raw(resp), "64 MiB body")
    # the daemon read at most its body limit (1 MiB) and a few buffers beyond it
    assert vm_kib(pid, "VmHWM") - rss0 < 32 << 10
    assert mounted(daemon) == before


# -- malformed HTTP and half-open connections -------------------------------------------------------

MALFORMED = {
    "garbage": b"\x00\x01\x02garbage\r\n\r\n",
    "100 KB request line": b"GET /api/v1/daemon?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "100 KB header": b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
    "5000 headers": b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(5000))
    + b"\r\n",
    "bad content-length": b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "negative content-length": b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two content-lengths": b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
    "bad chunk size": b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n",
    "unknown method": b"FOO /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n",
}
ROUTED = {  # well-formed HTTP with hostile targets: these reach the API and get its error body
    "bad percent-encoding": b"POST /api/v1/mount?mountpoint=%ZZ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "NUL in mountpoint": b"POST /api/v1/mount?mountpoint=/a%00b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "dot-dot mountpoint": b"POST /api/v1/mount?mountpoint=/a/../b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "dot-dot route": b"GET /api/v1/../v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/0.9": b"GET /\r\n\r\n",
    "chunked 2^48-byte body": b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"FFFFFFFFFFFF\r\n" + b"{" * (2 << 20),
}
HALF_OPEN = [  # sent, then the connection is held open
    b"",
    b"GET /api/v1/dae",
    b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n",
    b"POST /api/v1/mount?mountpoint=/h HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"fs_type\"",
    b"POST /api/v1/mount?mountpoint=/h HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFF\r\n{",
    b"POST /api/v1/mount?mountpoint=/h HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
]


def test_malformed_http_is_refused(daemon: Daemon) -> None:
    before = mounted(daemon)
    for name, data in MALFORMED.items():
        resp = raw_exchange(daemon.sock, data)
        if resp:  # the HTTP layer's 400 (not a request, so no nydusd body) or a closed connection
            assert 400 <= parse_raw(resp).status < 500, (name, resp[:200])
    for name, data in ROUTED.items():
        assert_nydusd_error(parse_raw(raw_exchange(daemon.sock, data)), name)
    assert mounted(daemon) == before


def test_half_open_connections_do_not_block_the_api(daemon: Daemon, images: list[Image]) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(20):
            for data in HALF_OPEN:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(s)
                s.connect(daemon.sock)
                s.sendall(data)
        # with 120 connections stuck mid-request, the API still works end to end
        for _ in range(3):
            responsive(daemon.sock)
        r = call(daemon.sock, "POST", f"{V1}/mount?mountpoint=/during", mount_body(images[2], "during"))
        assert r.status == 204, r.body
        read_through_fuse(daemon, "during", images[2])
        assert call(daemon.sock, "GET", f"{V1}/metrics?id=/during").status == 200
        assert call(daemon.sock, "DELETE", f"{V1}/mount?mountpoint=/during").status == 204
        # the held requests never turned into mounts
        assert "/h" not in mounted(daemon)
    finally:
        for s in held:
            s.close()
    responsive(daemon.sock)
    assert "/h" not in mounted(daemon)


# -- the source swapped for a FIFO between check and open (issue 16 item 3) ---------------------------


def test_source_swapped_for_fifo_before_open_is_refused_without_blocking(
    tmp_path: Path, images: list[Image]
) -> None:
    source, fifo = tmp_path / "swapped.boot", tmp_path / "attacker.fifo"
    shutil.copy(images[1].boot, source)
    os.mkfifo(fifo)
    env = {"NYDUS_TEST_SWAP_SOURCE": str(source), "NYDUS_TEST_SWAP_FIFO": str(fifo)}
    answer: list[Reply | BaseException] = []
    with shared_daemon(tmp_path / "d", env, module="tests.reliability.swap_hook") as d:

        def mount_swapped() -> None:
            try:
                answer.append(call(d.sock, "POST", f"{V1}/mount?mountpoint=/swapped",
                                   mount_body(images[1], "swapped", source=str(source))))
            except BaseException as e:
                answer.append(e)

        t = threading.Thread(target=mount_swapped, daemon=True)
        t.start()
        try:
            deadline = time.monotonic() + DEADLINE
            while os.path.exists(fifo):  # the hook renames it over the source right before open()
                assert time.monotonic() < deadline, "the swap hook never ran: does the daemon still os.open()?"
                assert t.is_alive() or answer, "mount answered before the daemon opened the source"
                time.sleep(0.01)
            # the control plane keeps working: state, and a mount of another image
            responsive(d.sock)
            r = call(d.sock, "POST", f"{V1}/mount?mountpoint=/other", mount_body(images[2], "other"))
            assert r.status == 204, r.body
            read_through_fuse(d, "other", images[2])
            t.join(DEADLINE)
            assert answer, f"the swapped mount got no answer in {DEADLINE} s"
            got = answer[0]
            assert isinstance(got, Reply), got
            assert_nydusd_error(got, "source swapped for a FIFO")
            assert "/swapped" not in mounted(d)
        finally:
            # let a blocked open(2) return, so the daemon can be killed and the test end
            with contextlib.suppress(OSError):
                wfd = os.open(source, os.O_WRONLY | os.O_NONBLOCK)
                os.close(wfd)
            t.join(DEADLINE)


def test_swap_hook_really_blocks_a_plain_open(tmp_path: Path) -> None:
    """The hook's swap is what the FIFO-swap test relies on: after it, a blocking open() of the
    source would wait for a writer (checked here with O_NONBLOCK, which fails with ENXIO for
    a write open of a FIFO without readers)."""
    source, fifo = tmp_path / "s", tmp_path / "f"
    source.write_bytes(b"x")
    os.mkfifo(fifo)
    from tests.reliability import swap_hook

    real = os.open
    try:
        swap_hook.install(str(source), str(fifo))
        with pytest.raises(OSError) as e:
            os.open(source, os.O_WRONLY | os.O_NONBLOCK)
        assert e.value.errno == errno.ENXIO and not fifo.exists()
    finally:
        os.open = real  # type: ignore[misc]
