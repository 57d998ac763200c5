"""The HTTP API's transport: HTTP/1.1 (h11, sans-IO) over a listening socket, one thread per
connection, so a slow or half-open client holds only its own thread.

Why not aiohttp: its server with asyncio and ssl took an idle daemon with an API socket from 22
to 43 MiB (issue 12's goal is 25); an idle connection costs a thread here (~27 KiB of RSS).
Idle keep-alive connections are never closed by the server: the snapshotter's liveness monitor
holds one open without ever using it. Blocking calls (mount, umount, takeover...) run on a few
worker threads shared by all connections. A body over `MAX_BODY` is refused with 413 without
being read, malformed HTTP with nydusd's error body and a closed connection. `close()` lets the
answers being written go out (briefly), then hangs up.
"""

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, TypeVar

import h11

from ..daemon.logsetup import http_date
from .http_core import (
    MAX_BODY,
    METRICS_ONLY,
    SERVER,
    HttpApi,
    Request,
    Response,
    error_response,
    parse_target,
    too_large,
)
from .sockets import bind_unix

log = logging.getLogger(__name__)

T = TypeVar("T")

# Workers for blocking calls (mount, umount, takeover...). More than one: a mount waiting on a
# slow registry must not hold up the umount or mount of another image (the service serializes
# what must be serialized under its own lock, and never holds it while building an instance).
API_WORKERS = 4
MAX_HEAD = 16 << 10  # request line + headers (h11 checks only heads that come in pieces)
MAX_HEADERS = 128
RECV = 64 << 10
LINGER_S = 1.0  # reading (and dropping) what a refused client still sends, so it sees the answer
CLOSE_GRACE_S = 0.5  # for answers in progress at close()


class ApiServer:
    """Serves `api` on the listening socket `sock` once `start()` is called."""

    def __init__(self, api: HttpApi, sock: socket.socket, name: str = "api") -> None:
        self.api = api
        self.sock = sock
        self.name = name
        self.executor: ThreadPoolExecutor | None = None
        api.blocking = self._blocking
        self.accept_errors = 0  # accept() failures (EMFILE...), each logged
        self.protocol_errors = 0  # requests refused by the HTTP layer, each logged (info)
        self._conns: set[socket.socket] = set()
        self._busy = 0
        self._cond = threading.Condition()
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "ApiServer":
        self.sock.setblocking(False)
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._thread.start()
        return self

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, grace: float = CLOSE_GRACE_S) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()
        with self._cond:  # an answer being written (e.g. to PUT /daemon/exit) goes out first
            self._cond.wait_for(lambda: self._busy == 0, grace)
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        with self._cond:
            if self.executor is None:
                self.executor = ThreadPoolExecutor(max_workers=API_WORKERS, thread_name_prefix="api-worker")
            executor = self.executor
        return executor.submit(fn, *args).result()

    def _accept_loop(self) -> None:
        poller = select.poll()  # (not select(): the daemon may hold more than 1024 fds)
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # out of fds or memory: the client waits in the backlog
                self.accept_errors += 1
                log.error("%s: accept failed (%d so far): %s", self.name, self.accept_errors, e)
                if poller.poll(100) and self._closing:
                    return
                continue
            conn.setblocking(True)
            with self._cond:
                if self._closing:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    # -- one connection --------------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                event = self._next(conn, sock)
                if not isinstance(event, h11.Request):
                    return  # the client closed the connection between requests
                if not self._exchange(conn, sock, event):
                    self._linger(sock)
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            self._count_protocol_error(e)
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(OSError, h11.LocalProtocolError):
                    self._send(conn, sock, error_response(e.error_status_hint, f"BadRequest: {e}"), False)
                    self._linger(sock)
        except OSError:
            pass  # the client went away
        except Exception:  # a bug of ours: this connection ends, the server goes on
            log.exception("%s: connection failed", self.name)
        finally:
            with self._cond:
                self._conns.discard(sock)
            sock.close()

    def _next(self, conn: h11.Connection, sock: socket.socket) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                sock.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            conn.receive_data(sock.recv(RECV))

    def _exchange(self, conn: h11.Connection, sock: socket.socket, req: h11.Request) -> bool:
        """Answer one request; False when the connection must be closed after it."""
        method = req.method.decode("ascii")
        head = method == "HEAD"
        with self._answering():
            if _head_too_large(req):
                self._count_protocol_error("request head too large")
                self._send(conn, sock, error_response(431, "BadRequest: request head too large"), head)
                return False
            path, query = parse_target(req.target.decode("ascii", "surrogateescape"))
            found = self.api.route(method, path)
            if isinstance(found, Response):  # (before the body, like upstream)
                self._send(conn, sock, found, head)
                return conn.their_state is h11.DONE or (
                    not conn.they_are_waiting_for_100_continue and self._read_body(conn, sock) is not None)
            if _declared_length(req) > MAX_BODY:
                self._send(conn, sock, too_large(), head)
                return False
        body = self._read_body(conn, sock)  # (not busy: a client may hold its body back for ever)
        with self._answering():
            if body is None:
                self._send(conn, sock, too_large(), head)
                return False
            self._send(conn, sock, self.api.call(found, Request(method, path, query, body)), head)
        return True

    def _read_body(self, conn: h11.Connection, sock: socket.socket) -> bytes | None:
        """The request's body, or None when it is over MAX_BODY (not all of it is read then)."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = self._next(conn, sock)
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            if not isinstance(event, h11.Data):
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a request body")
            size += len(event.data)
            if size > MAX_BODY:
                return None
            parts.append(bytes(event.data))

    def _count_protocol_error(self, what: object) -> None:
        with self._cond:
            self.protocol_errors += 1
        log.info("%s: refused malformed HTTP: %s", self.name, what)

    def _send(self, conn: h11.Connection, sock: socket.socket, resp: Response, head: bool) -> None:
        headers = [("Server", SERVER), ("Content-Type", resp.content_type)]
        if resp.status != 204:
            headers.append(("Content-Length", str(len(resp.body))))
        headers.append(("Date", http_date(time.time())))
        out = conn.send(h11.Response(status_code=resp.status, headers=headers,
                                     reason=HTTPStatus(resp.status).phrase)) or b""
        if resp.body and not head:
            out += conn.send(h11.Data(data=resp.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        sock.sendall(out)

    def _linger(self, sock: socket.socket) -> None:
        """Half-close, then read and drop what the client still sends (briefly, boundedly):
        closing with unread data would reset the connection, and a TCP client could lose the
        answer with it."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            left = 4 * MAX_BODY
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                chunk = sock.recv(RECV)
                if not chunk:
                    return
                left -= len(chunk)


def _head_too_large(req: h11.Request) -> bool:
    size = len(req.target) + sum(len(name) + len(value) + 4 for name, value in req.headers)
    return len(req.headers) > MAX_HEADERS or size > MAX_HEAD


def _declared_length(req: h11.Request) -> int:
    for name, value in req.headers:
        if name == b"content-length":
            return int(value)  # (h11 checked it is one decimal number)
    return 0


def serve_unix(service: Any, path: str) -> ApiServer:
    """The whole API on a unix socket at `path` (created 0600, see `sockets.bind_unix`)."""
    return ApiServer(HttpApi(service), bind_unix(path), "api").start()


def serve_metrics_tcp(service: Any, host: str, port: int) -> ApiServer:
    """`/metrics` alone, for the optional TCP listener (the control API stays on the unix socket)."""
    host = host.strip("[]")  # ([::1]:9100)
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.create_server(addr[:2], family=family)
    return ApiServer(HttpApi(service, METRICS_ONLY), sock, "metrics").start()
