"""`api.server`, the HTTP transport, on raw sockets: what the snapshotter, Kata and a hostile local
client rely on beyond the routes (tests/api/test_http.py) — idle keep-alive connections kept,
pipelining, 100-continue, HEAD, body limits, early answers, malformed HTTP, slow clients, close()
letting the answer in progress out, accept failures retried."""

import json
import logging
import os
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nydus_py.api.http_core import MAX_BODY, HttpApi
from nydus_py.api.server import ApiServer, serve_metrics_tcp
from nydus_py.api.sockets import bind_unix
from nydus_py.daemon.service import DaemonOptions, DaemonService
from tests.waiting import wait_until

DEADLINE = 10.0
GET_DAEMON = b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Conn:
    """One raw client connection, reading answers one at a time."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(DEADLINE)
        self.s.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def _fill(self) -> None:
        chunk = self.s.recv(1 << 16)
        if not chunk:
            raise EOFError(f"closed with {self.buf[:200]!r} unread")
        self.buf += chunk

    def read(self, head_only: bool = False) -> Reply:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buf) < size:
            self._fill()
        body, self.buf = self.buf[:size], self.buf[size:]
        return Reply(int(lines[0].split()[1]), headers, body)

    def closed_by_server(self) -> bool:
        """True when the server has closed its end (EOF pending), without waiting."""
        p = select.poll()  # (not select(): it refuses fds of 1024 and above)
        p.register(self.s, select.POLLIN)
        if not p.poll(0):
            return False
        self.s.setblocking(False)
        try:
            return self.s.recv(1, socket.MSG_PEEK) == b""
        finally:
            self.s.settimeout(DEADLINE)

    def close(self) -> None:
        self.s.close()


def nydusd_error(r: Reply, status: int) -> str:
    assert r.status == status, (r.status, r.body)
    assert r.headers["content-type"] == "application/json" and r.headers["server"] == "Nydus API"
    body = json.loads(r.body)
    assert set(body) == {"code", "message"} and body["message"]
    return str(body["message"])


@dataclass
class Served:
    service: DaemonService
    server: ApiServer
    path: str

    def conn(self) -> Conn:
        return Conn(self.path)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    svc = DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path)))
    path = str(tmp_path / "api.sock")
    server = ApiServer(HttpApi(svc), bind_unix(path)).start()
    try:
        yield Served(svc, server, path)
    finally:
        server.close()
        svc.close_all()


def test_an_idle_keep_alive_connection_stays_open_and_usable(served: Served) -> None:
    """The snapshotter's liveness monitor holds one connection and may never use it."""
    idle, used = served.conn(), served.conn()
    try:
        idle.send(GET_DAEMON)
        assert idle.read().status == 200
        never_used = served.conn()
        for _ in range(20):
            used.send(GET_DAEMON)
            assert used.read().status == 200
        assert not idle.closed_by_server() and not never_used.closed_by_server()
        idle.send(GET_DAEMON)
        assert idle.read().status == 200
        never_used.send(GET_DAEMON)
        assert never_used.read().status == 200
    finally:
        idle.close()
        used.close()


def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    c = served.conn()
    c.send(GET_DAEMON + b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"
           + b"GET /api/v1/metrics/inflight HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.read().status == 200
    assert nydusd_error(c.read(), 404) == "NotFound: NoRoute: /nothing"
    r = c.read()
    assert r.status == 204 and "content-length" not in r.headers and r.headers["content-type"] == "application/json"
    c.close()


def test_expect_100_continue_is_answered_before_the_body(served: Served) -> None:
    c = served.conn()
    body = b'{"log_level": "info"}'
    c.send(b"PUT /api/v1/daemon HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert c.read(head_only=True).status == 100
    c.send(body)
    assert c.read().status == 204
    c.close()


def test_head_gets_the_headers_without_a_body(served: Served) -> None:
    c = served.conn()
    c.send(b"HEAD /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n" + GET_DAEMON)
    r = c.read(head_only=True)
    assert r.status == 400 and int(r.headers["content-length"]) > 0  # (no HEAD route, as upstream)
    assert c.read().status == 200  # the next answer starts right after the head
    c.close()


def test_an_answer_before_the_body_reads_it_away_and_keeps_the_connection(served: Served) -> None:
    c = served.conn()
    body = b"x" * 100_000
    c.send(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body + GET_DAEMON)
    nydusd_error(c.read(), 404)
    assert c.read().status == 200
    c.send(b"POST /api/v1/daemon HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
           + GET_DAEMON)
    assert "InvalidMethod" in nydusd_error(c.read(), 400)
    assert c.read().status == 200
    c.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_body_limit(served: Served, chunked: bool) -> None:
    """Up to MAX_BODY is read and parsed (here: not JSON, 400); one byte more is 413 and the
    connection is closed without reading the rest."""

    def put(size: int) -> Conn:
        c = served.conn()
        if chunked:
            c.send(b"PUT /api/v1/daemon HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % size
                   + b" " * size + b"\r\n0\r\n\r\n")
        else:
            c.send(b"PUT /api/v1/daemon HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b" " * size)
        return c

    c = put(MAX_BODY)
    assert "ParseBody" in nydusd_error(c.read(), 400)
    c.send(GET_DAEMON)
    assert c.read().status == 200
    c.close()
    c = put(MAX_BODY + 1)
    assert nydusd_error(c.read(), 413) == "BadRequest: Request Entity Too Large"
    wait_until(c.closed_by_server, DEADLINE, "the server to close the connection")
    c.close()


def test_a_declared_length_over_the_limit_is_refused_before_the_body(served: Served) -> None:
    c = served.conn()
    c.send(b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % (64 << 20))
    assert nydusd_error(c.read(), 413)  # (no body sent: an answer that waited for it would time out)
    c.close()


@pytest.mark.parametrize("data", [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET /api/v1/daemon HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(500)) + b"\r\n",
    b"GET /api/v1/daemon?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_http_gets_nydusds_error_body_and_a_close(served: Served, data: bytes) -> None:
    c = served.conn()
    c.send(data)
    r = c.read()
    assert 400 <= r.status < 500
    nydusd_error(r, r.status)
    wait_until(c.closed_by_server, DEADLINE, "the server to close the connection")
    c.close()
    assert served.server.protocol_errors >= 1


def test_a_client_that_never_reads_its_answers_blocks_no_one(served: Served) -> None:
    """Thousands of pipelined requests whose answers are never read fill the socket buffers:
    that connection's thread waits in send, the others are served."""
    hog = served.conn()
    hog.s.setblocking(False)
    sent = 0
    request = b"GET /api/v1/daemon/events HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises(BlockingIOError):  # until the server stops reading: it is stuck writing
        for _ in range(200_000):
            sent += hog.s.send(request)
    c = served.conn()
    for _ in range(5):
        c.send(GET_DAEMON)
        assert c.read().status == 200
    c.close()
    hog.close()


def test_close_lets_the_answer_in_progress_out_then_hangs_up(served: Served) -> None:
    """PUT /daemon/exit: the service asks to exit while its answer is not yet written, and the
    daemon's main thread closes the server at once; the 204 still arrives."""
    closed = threading.Event()

    def on_exit() -> None:
        threading.Thread(target=lambda: (served.server.close(), closed.set())).start()

    served.service.on_exit = on_exit
    real_call = served.server.api.call

    def call_then_wait_for_close(handler: Any, req: Any) -> Any:
        resp = real_call(handler, req)
        wait_until(lambda: served.server.closing, DEADLINE, "close() to begin")  # the race, lost
        return resp

    served.server.api.call = call_then_wait_for_close  # type: ignore[method-assign]
    idle, c = served.conn(), served.conn()
    c.send(b"PUT /api/v1/daemon/exit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert c.read().status == 204
    wait_until(closed.is_set, DEADLINE, "close() to return")
    wait_until(idle.closed_by_server, DEADLINE, "idle connections to be closed")
    with pytest.raises(ConnectionRefusedError):
        served.conn()
    idle.close()
    c.close()


class FlakyListener(socket.socket):
    """A listening socket whose first accept() fails as it would when out of fds."""

    failed = False

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.failed:
            self.failed = True
            raise OSError(24, "Too many open files")
        return super().accept()


def test_an_accept_failure_is_logged_counted_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    svc = DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path)))
    path = str(tmp_path / "api.sock")
    listener = FlakyListener(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    server = ApiServer(HttpApi(svc), listener).start()
    try:
        with caplog.at_level(logging.ERROR, "nydus_py.api.server"):
            c = Conn(path)
            c.send(GET_DAEMON)
            assert c.read().status == 200
            c.close()
        assert server.accept_errors == 1
        assert "accept failed (1 so far): [Errno 24] Too many open files" in caplog.text
    finally:
        server.close()
        os.unlink(path)


def test_the_tcp_listener_serves_prometheus_only(tmp_path: Path) -> None:
    svc = DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path)))
    server = serve_metrics_tcp(svc, "127.0.0.1", 0)
    try:
        with socket.create_connection(server.sock.getsockname(), timeout=DEADLINE) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b'nydusd_state{state="INIT"} 1.0' not in data:
                chunk = s.recv(1 << 16)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/plain; version=0.0.4" in data
        with socket.create_connection(server.sock.getsockname(), timeout=DEADLINE) as s:
            s.sendall(GET_DAEMON)
            assert s.recv(1 << 16).startswith(b"HTTP/1.1 404 ")
    finally:
        server.close()
