"""The supervisor socket of nydusd's failover and hot upgrade (§4 of the contract).

The daemon is always the client. Save (`sendfd`): connect, send the state bytes with the
/dev/fuse fd attached (SCM_RIGHTS, exactly one fd) to the first message, the rest as plain data,
close. Restore (`takeover`): connect, receive up to 32 KiB plus up to 16 fds, then read to EOF.
The state bytes are opaque to the supervisor.

The supervisor keeps exactly one fd (nydus-snapshotter refuses a message with more). A daemon
that has more to hand over (the blob-view FUSE connections of EROFS mounts beside /dev/fuse)
sends one fd bundle instead: a unix datagram socket whose receive queue holds a message carrying
all of them (`bundle_fds`). Its reader peeks (`unbundle_fds`): it gets copies and the message
stays, so the supervisor's fd can be handed out again, like a plain /dev/fuse fd.
"""

import array
import os
import socket
import stat

FIRST_CHUNK = 32 << 10
MAX_FDS = 16
TIMEOUT = 10.0
BUNDLE_MAGIC = b"nydus-py-fd-bundle/1"
BUNDLE_MAX = 250  # SCM_MAX_FD (253) per message, with room to spare


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


def bundle_fds(fds: list[int]) -> int:
    """One fd that carries `fds` (order kept), for a supervisor that holds exactly one; the
    caller owns it. The fds themselves stay the caller's too (the bundle holds copies)."""
    if len(fds) > BUNDLE_MAX:
        raise ValueError(f"{len(fds)} fds do not fit in one bundle (at most {BUNDLE_MAX})")
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with writer:
        if fds:
            socket.send_fds(writer, [BUNDLE_MAGIC], fds)
        else:
            writer.send(BUNDLE_MAGIC)
    return reader.detach()


def unbundle_fds(bundle: int, count: int) -> list[int]:
    """Copies of the `count` fds in `bundle` (which keeps its own: a peek, not a read); the
    caller owns them and still owns `bundle`. ValueError when it is not such a bundle."""
    if not stat.S_ISSOCK(os.fstat(bundle).st_mode):
        raise ValueError("the fd received is not an fd bundle")
    with socket.socket(fileno=os.dup(bundle)) as s:
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_DGRAM:
            raise ValueError("the fd received is not an fd bundle")
        s.setblocking(False)
        fds = array.array("i")
        try:
            # (socket.recv_fds ignores its flags argument: recvmsg, to peek)
            msg, anc, flags, _ = s.recvmsg(len(BUNDLE_MAGIC) + 1, socket.CMSG_SPACE(BUNDLE_MAX * fds.itemsize),
                                           socket.MSG_PEEK | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            raise ValueError("the fd bundle is empty") from None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        got = list(fds)
        if msg != BUNDLE_MAGIC or flags & socket.MSG_CTRUNC or len(got) != count:
            for fd in got:
                os.close(fd)
            raise ValueError(f"not the fd bundle expected ({len(got)} fds, {count} wanted)")
        return got
