"""The supervisor side of a daemon's failover (NYDUSD-CONTRACT.md 4), as upstream's
pkg/supervisor: the daemon connects to our socket, either to hand us its state and its /dev/fuse
fd (`PUT /api/v1/daemon/fuse/sendfd`), or, as a new daemon in INIT, to get them back
(`PUT /api/v1/daemon/fuse/takeover`).

Holding the /dev/fuse fd is what keeps the FUSE connection (and every open file on it) alive
while no daemon runs: requests wait in the kernel until the next daemon takes over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

FIRST_CHUNK = 1 << 18
MAX_FDS = 4


class SupervisorError(Exception):
    pass


class Supervisor:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.state = b""
        self.fd = -1
        self._lock = threading.Lock()

    @property
    def has_state(self) -> bool:
        return self.fd >= 0

    def _listen(self) -> socket.socket:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(1)
        s.settimeout(self.timeout)
        return s

    def save(self, trigger: Callable[[], object]) -> None:
        """Listen, run `trigger` (the sendfd API call), keep the state and the fd it sends."""
        with self._lock, self._listen() as listener:
            got: list[tuple[bytes, list[int]]] = []
            errors: list[BaseException] = []

            def accept() -> None:
                try:
                    conn, _ = listener.accept()
                    with conn:
                        conn.settimeout(self.timeout)
                        msg, fds, _f, _a = socket.recv_fds(conn, FIRST_CHUNK, MAX_FDS)
                        while chunk := conn.recv(1 << 16):
                            msg += chunk
                        got.append((msg, fds))
                except OSError as e:
                    errors.append(e)

            t = threading.Thread(target=accept, name="supervisor-save", daemon=True)
            t.start()
            try:
                trigger()
            finally:
                t.join(self.timeout + 1)
            if not got:
                raise SupervisorError(f"the daemon sent no state to {self.path}: {errors[0] if errors else 'timeout'}")
            (state, fds), = got
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise SupervisorError(f"the daemon sent {len(fds)} fds with its state, expected 1")
            os.set_inheritable(fds[0], False)  # (SCM_RIGHTS fds are inheritable: no daemon must get it)
            if self.fd >= 0:
                os.close(self.fd)
            self.state, self.fd = state, fds[0]
            log.debug("saved %d bytes of state and the /dev/fuse fd from %s", len(state), self.path)

    def serve_restore(self) -> Callable[[], None]:
        """Listen for the next daemon and hand it the saved state and fd; returns `join`, which
        raises SupervisorError when nothing was handed over."""
        listener = self._listen()
        done: list[BaseException | None] = []

        def send() -> None:
            try:
                with listener:
                    conn, _ = listener.accept()
                    with conn:
                        socket.send_fds(conn, [self.state or b"\0"], [self.fd])
                done.append(None)
            except OSError as e:
                done.append(e)

        t = threading.Thread(target=send, name="supervisor-restore", daemon=True)
        t.start()

        def join() -> None:
            t.join(self.timeout + 1)
            if not done or done[0] is not None:
                with contextlib.suppress(OSError):
                    listener.close()
                raise SupervisorError(f"no daemon took the state from {self.path}: "
                                      f"{done[0] if done else 'timeout'}")

        return join

    def close(self) -> None:
        """Drop the fd: with no daemon left, the FUSE connection is aborted (ENOTCONN)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.state = b""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
