"""The supervisor socket of nydusd's failover and hot upgrade (§4 of the contract).

The daemon is always the client. Save (`sendfd`): connect, send the state bytes with the
/dev/fuse fd attached (SCM_RIGHTS, exactly one fd) to the first message, the rest as plain data,
close. Restore (`takeover`): connect, receive up to 32 KiB plus up to 16 fds, then read to EOF.
The state bytes are opaque to the supervisor.
"""

import socket

FIRST_CHUNK = 32 << 10
MAX_FDS = 16
TIMEOUT = 10.0


def send_state(path: str, fd: int, state: bytes, timeout: float = TIMEOUT) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        first = state[:FIRST_CHUNK] or b"\0"
        sent = socket.send_fds(s, [first], [fd])
        rest = first[sent:] + state[len(first):] if state else b""
        if rest:
            s.sendall(rest)
        s.shutdown(socket.SHUT_WR)


def recv_state(path: str, timeout: float = TIMEOUT) -> tuple[bytes, list[int]]:
    """(state bytes, received fds); the caller owns the fds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        data, fds, _flags, _addr = socket.recv_fds(s, FIRST_CHUNK, MAX_FDS)
        chunks = [data]
        try:
            while data:
                data = s.recv(256 << 10)
                chunks.append(data)
        except BaseException:
            for fd in fds:
                socket.close(fd)
            raise
        return b"".join(chunks), fds
