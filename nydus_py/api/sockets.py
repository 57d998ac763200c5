"""The daemon's unix sockets (HTTP and gRPC APIs): created 0600 in a directory that is not
world-writable, put in place atomically over a stale file."""

import contextlib
import os
import socket
import stat


def check_socket_dir(path: str) -> None:
    """The directory must exist or be creatable (0700), and must not be world-writable."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_mode & stat.S_IWOTH:
        raise OSError(f"refusing to create the API socket in world-writable directory {d}")


def bind_unix(path: str) -> socket.socket:
    """A listening socket at `path`, created 0600 and put in place atomically (bound under a
    temporary name, chmod'ed, renamed over any stale file)."""
    check_socket_dir(path)
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(128)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sock.setblocking(False)
    return sock
