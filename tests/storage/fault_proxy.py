"""A fault-injecting HTTP proxy for the registry tests.

Sits between the daemon and a registry, either as a reverse proxy (`upstream` given: the
backend's `host` points here) or as a forward proxy (the backend's `proxy.url` points here and
requests carry absolute URIs). Every request is logged; scripted faults apply to the next
matching requests (by default: blob GETs):

  5xx            answer 503
  reset          close the connection with RST before answering
  stall          say nothing for `stall_seconds`, then close
  truncate       send the real headers and half of the body, then RST
  truncate_200   the same for a whole-blob 200 answer (a download cut off midway)
  short          206 whose Content-Length and body are shorter than the asked range
  oversize       206 with the right Content-Range but extra bytes in the body
  bad_range      206 for the range shifted by one byte (right length, wrong bytes)
  corrupt        206 with the right headers and one flipped byte
  200_for_206    fetch without Range and answer 200 with the whole blob
  expired_token  401 with the registry's Bearer challenge, whatever token was sent
  405            405 Method Not Allowed (a registry that does not take this method, e.g. PATCH)

Besides, `hold_if(request)` holds every request it selects (e.g. by Range) until `release_held()`,
then forwards it normally: a registry stalled for as long as the test wants, not for a fixed time.
`fault_if(request)`, when set, picks the requests scripted faults apply to instead of `match`
(e.g. only large ranges). `corrupt_offset`, when set, flips that byte of the blob in every 206
whose range covers it (a registry that keeps serving one bad chunk, whoever asks).

One request per connection (`Connection: close`), which keeps the fault boundaries exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

KINDS = ("5xx", "reset", "stall", "truncate", "truncate_200", "short", "oversize", "bad_range", "corrupt", "200_for_206",
         "expired_token", "405")
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "content-length"}


def is_blob_get(method: str, path: str) -> bool:
    return method == "GET" and "/blobs/sha256:" in path


@dataclass
class Request:
    method: str
    target: str
    path: str
    headers: dict[str, str]
    fault: str | None = None
    status: int = 0
    time: float = field(default_factory=time.monotonic)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def auth(self) -> bool:
        return "authorization" in self.headers


class FaultProxy:
    def __init__(self, upstream: str | None = None, *, stall_seconds: float = 30.0, challenge: str = "",
                 match: Callable[[str, str], bool] = is_blob_get, latency: float = 0.0,
                 bandwidth: float = 0.0, forwarded_host: bool = False, upload_bandwidth: float = 0.0) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.stall_seconds = stall_seconds
        self.challenge = challenge
        self.match = match
        self.latency = latency  # seconds added to every request
        self.bandwidth = bandwidth  # bytes/s shared by all responses (0 = unlimited)
        # bytes/s shared by all request bodies, read at that pace (an upload link: the client's
        # sends wait on the socket; 0 = unlimited)
        self.upload_bandwidth = upload_bandwidth
        self._up_free = 0.0
        # tell the registry the client's Host (X-Forwarded-Host): the upload URLs it answers
        # (Location) then point here, so a session's PATCH and PUT come through too
        self.forwarded_host = forwarded_host
        self._link_free = 0.0
        self.body_bytes = 0
        self.faults: deque[str] = deque()
        self.injected: Counter[str] = Counter()
        self.requests: list[Request] = []
        self.hold_if: Callable[[Request], bool] | None = None
        self.fault_if: Callable[[Request], bool] | None = None
        self.corrupt_offset: int | None = None
        self.corrupted = 0  # responses corrupt_offset flipped a byte in
        self.held = 0  # requests that hold_if selected (held until release_held)
        self._gate: asyncio.Event | None = None
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._run(self._start())

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def release_held(self) -> None:
        """Let every held request (and any later one hold_if selects) through."""
        async def go() -> None:
            assert self._gate is not None
            self._gate.set()
        self._run(go())

    async def _start(self) -> None:
        self._gate = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60))
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def inject(self, kind: str, times: int = 1) -> None:
        assert kind in KINDS, kind
        self.faults.extend([kind] * times)

    def clear(self) -> None:
        self.faults.clear()

    def blob_requests(self) -> list[Request]:
        return [r for r in self.requests if is_blob_get(r.method, r.path)]

    def pause(self) -> None:
        """Stop listening (new connections are refused) - a proxy that went away."""
        async def go() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()
        self._run(go())

    def resume(self) -> None:
        self._run(self._listen())

    def stop(self) -> None:
        async def go() -> None:
            if self._server is not None:
                self._server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2)
            if self._session is not None:
                await self._session.close()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self._run(go())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # -- one connection -------------------------------------------------------------------------
    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, aiohttp.ClientError,
                asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(1)
        if not first.isalpha():  # a TLS hello or junk: refuse at once, like a plain HTTP server would
            self._rst(writer)
            return
        head = first + await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        raw_headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
                raw_headers.append((k.strip(), v.strip()))
        if headers.get("transfer-encoding", "").lower() == "chunked":  # (a stream upload's PATCH)
            body = await self._read_chunked(reader, self._pace_up)
        else:
            length = int(headers.get("content-length", "0") or 0)
            if not self.upload_bandwidth:
                body = await reader.readexactly(length)
            else:
                pieces = []
                while length > 0:
                    pieces.append(await reader.readexactly(min(length, 256 << 10)))
                    length -= len(pieces[-1])
                    await self._pace_up(len(pieces[-1]))
                body = b"".join(pieces)
        if target.startswith(("http://", "https://")):
            url = target
            path = "/" + target.split("://", 1)[1].split("/", 1)[1] if "/" in target.split("://", 1)[1] else "/"
        else:
            path = target
            if path == "/ping":
                await self._respond(writer, 200, [], b"pong")
                return
            assert self.upstream is not None, "reverse proxy without upstream"
            url = self.upstream + target
        req = Request(method, target, path, headers)
        self.requests.append(req)
        if self.hold_if is not None and self.hold_if(req):
            self.held += 1
            assert self._gate is not None
            await self._gate.wait()
        if self.latency:
            await asyncio.sleep(self.latency)
        picked = self.fault_if(req) if self.fault_if is not None else self.match(method, path)
        fault = self.faults.popleft() if self.faults and picked else None
        req.fault = fault
        if fault:
            self.injected[fault] += 1
        if fault == "5xx":
            req.status = 503
            await self._respond(writer, 503, [("Content-Type", "text/plain")], b"injected 503")
            return
        if fault == "405":
            req.status = 405
            await self._respond(writer, 405, [("Content-Type", "application/json")],
                                b'{"errors":[{"code":"UNSUPPORTED","message":"method not allowed (injected)"}]}')
            return
        if fault == "reset":
            self._rst(writer)
            return
        if fault == "stall":
            await asyncio.sleep(self.stall_seconds)
            self._rst(writer)
            return
        if fault == "expired_token":
            req.status = 401
            await self._respond(writer, 401, [("WWW-Authenticate", self.challenge)],
                                b'{"errors":[{"code":"UNAUTHORIZED","message":"token expired (injected)"}]}')
            return
        fwd = [(k, v) for k, v in raw_headers if k.lower() not in HOP and k.lower() != "host"]
        if self.forwarded_host and "host" in headers:
            fwd.append(("X-Forwarded-Host", headers["host"]))
        if fault == "200_for_206":
            fwd = [(k, v) for k, v in fwd if k.lower() != "range"]
        assert self._session is not None
        async with self._session.request(method, url, headers=fwd, data=body or None, allow_redirects=False) as up:
            data = await up.read()
            status = up.status
            out_headers = [(k, v) for k, v in up.headers.items() if k.lower() not in HOP]
        req.status = status
        if self.corrupt_offset is not None and status == 206:
            data = self._corrupt_at(self.corrupt_offset, data, out_headers)
        if fault == "truncate_200" and status == 200:
            writer.write(self._head(200, out_headers, len(data)))
            writer.write(data[: len(data) // 2])
            await writer.drain()
            self._rst(writer)
            return
        if fault and status == 206:
            data, status, out_headers = self._mangle(fault, data, out_headers)
            if status < 0:
                writer.write(self._head(206, out_headers, int(dict(out_headers)["Content-Length"])))
                writer.write(data)
                await writer.drain()
                self._rst(writer)
                return
        await self._respond(writer, status, out_headers, data)

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader,
                            pace: Callable[[int], Awaitable[None]] | None = None) -> bytes:
        """A request body in chunked transfer encoding (forwarded with its length then)."""
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
            if pace is not None:
                await pace(size)

    async def _pace_up(self, n: int) -> None:
        """Wait for `n` request-body bytes to cross the shared upload link."""
        if not self.upload_bandwidth:
            return
        now = time.monotonic()
        start = max(now, self._up_free)
        self._up_free = start + n / self.upload_bandwidth
        if self._up_free > now:
            await asyncio.sleep(self._up_free - now)

    def _mangle(self, fault: str, data: bytes, headers: list[tuple[str, str]]) -> tuple[bytes, int, list[tuple[str, str]]]:
        h = dict(headers)
        first, last = (int(x) for x in h["Content-Range"].split(" ")[1].split("/")[0].split("-"))
        total = h["Content-Range"].split("/")[1]
        if fault == "truncate":
            h["Content-Length"] = str(len(data))
            return data[: len(data) // 2], -1, list(h.items())
        if fault == "short":
            return data[:-1] if len(data) > 1 else b"", 206, list(h.items())
        if fault == "oversize":
            return data + b"EXTRA-BYTES", 206, list(h.items())
        if fault == "bad_range":
            h["Content-Range"] = f"bytes {first + 1}-{last + 1}/{total}"
            return data[1:] + b"\0", 206, list(h.items())
        if fault == "corrupt":
            b = bytearray(data)
            if b:
                b[len(b) // 2] ^= 0xFF
            return bytes(b), 206, list(h.items())
        return data, 206, headers

    def _corrupt_at(self, offset: int, data: bytes, headers: list[tuple[str, str]]) -> bytes:
        first = int(dict(headers)["Content-Range"].split(" ")[1].split("-")[0])
        if not first <= offset < first + len(data):
            return data
        self.corrupted += 1
        b = bytearray(data)
        b[offset - first] ^= 0xFF
        return bytes(b)

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]], length: int) -> bytes:
        lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers if k.lower() != "content-length"]
        lines += [f"Content-Length: {length}", "Connection: close", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    async def _respond(self, writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]],
                       body: bytes) -> None:
        self.body_bytes += len(body)
        if not self.bandwidth:
            writer.write(self._head(status, headers, len(body)) + body)
            await writer.drain()
            return
        writer.write(self._head(status, headers, len(body)))
        piece = 64 << 10
        for pos in range(0, len(body), piece):
            part = body[pos:pos + piece]
            now = time.monotonic()  # one shared link: responses queue for it
            start = max(now, self._link_free)
            self._link_free = start + len(part) / self.bandwidth
            if self._link_free > now:
                await asyncio.sleep(self._link_free - now)
            writer.write(part)
            await writer.drain()

    @staticmethod
    def _rst(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
