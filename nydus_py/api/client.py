"""A small synchronous client for the daemon's HTTP API over its unix socket (demo, tools)."""

import http.client
import json
import socket
import urllib.parse
from typing import Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class ApiCallError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ApiClient:
    """One keep-alive connection; `call()` returns the decoded JSON (None for 204) or raises ApiCallError."""

    def __init__(self, sock: str, timeout: float = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    def request(self, method: str, path: str, query: dict[str, str] | None = None,
                body: Any = None) -> tuple[int, bytes]:
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = b"" if body is None else json.dumps(body).encode()
        if self._conn is None:
            self._conn = _UnixConnection(self.sock, self.timeout)
        try:
            self._conn.request(method, url, body=data, headers={"Content-Length": str(len(data))})
            r = self._conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def call(self, method: str, path: str, query: dict[str, str] | None = None, body: Any = None) -> Any:
        status, payload = self.request(method, path, query, body)
        decoded = None
        if payload:
            try:
                decoded = json.loads(payload)
            except ValueError:
                decoded = payload.decode(errors="replace")
        if status >= 400:
            raise ApiCallError(status, decoded)
        return decoded

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
