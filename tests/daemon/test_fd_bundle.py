"""The fd bundle that carries several fds through a supervisor keeping exactly one, and the
takeover state formats: /1 (the fd is /dev/fuse; no EROFS entries) still loads, /2 unbundles."""

import json
import os
import socket
import threading

import pytest

from nydus_py.daemon import supervisor
from nydus_py.daemon.service import STATE_FORMAT, STATE_FORMAT_BUNDLE, DaemonOptions, DaemonService


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bundle_is_peeked_not_consumed_and_keeps_order() -> None:
    pipes = [os.pipe() for _ in range(3)]
    writers = [w for _r, w in pipes]
    bundle = supervisor.bundle_fds(writers)
    try:
        for w in writers:
            os.close(w)  # the bundle holds its own copies
        for attempt in range(3):  # every takeover gets copies; the bundle stays whole
            copies = supervisor.unbundle_fds(bundle, 3)
            for k, c in enumerate(copies):
                os.write(c, b"%d%d" % (k, attempt))
                os.close(c)
        for k, (r, _w) in enumerate(pipes):
            assert os.read(r, 100) == b"".join(b"%d%d" % (k, a) for a in range(3))
    finally:
        os.close(bundle)
        for r, _w in pipes:
            os.close(r)


def test_empty_bundle_and_refusals_leak_no_fd() -> None:
    before = fd_count()
    empty = supervisor.bundle_fds([])
    assert supervisor.unbundle_fds(empty, 0) == []
    r, w = os.pipe()
    one = supervisor.bundle_fds([w])
    try:
        with pytest.raises(ValueError, match="1 fds, 2 wanted"):
            supervisor.unbundle_fds(one, 2)
        with pytest.raises(ValueError, match="not an fd bundle"):
            supervisor.unbundle_fds(r, 1)  # e.g. a /dev/fuse fd under a /2 state
        with pytest.raises(ValueError, match="at most"):
            supervisor.bundle_fds([w] * (supervisor.BUNDLE_MAX + 1))
    finally:
        for fd in (empty, one, r, w):
            os.close(fd)
    assert fd_count() == before


def test_bundle_travels_through_the_supervisor_socket(tmp_path) -> None:
    """send_state/recv_state move the one bundle fd like a /dev/fuse fd; its fds come out."""
    path = str(tmp_path / "sup.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    got: list[tuple[bytes, list[int]]] = []

    def hold() -> None:  # the supervisor: keep what the daemon sends
        conn, _ = listener.accept()
        with conn:
            msg, fds, _f, _a = socket.recv_fds(conn, 1 << 16, 4)
            while chunk := conn.recv(1 << 16):
                msg += chunk
            got.append((msg, fds))

    t = threading.Thread(target=hold)
    t.start()
    r, w = os.pipe()
    bundle = supervisor.bundle_fds([w])
    supervisor.send_state(path, bundle, b"state")
    os.close(bundle)
    os.close(w)
    t.join(10)
    listener.close()
    (state, fds), = got
    assert state == b"state" and len(fds) == 1
    (copy,) = supervisor.unbundle_fds(fds[0], 1)
    os.write(copy, b"x")
    assert os.read(r, 1) == b"x"
    for fd in (copy, fds[0], r):
        os.close(fd)


def _state(fmt: str, **extra: object) -> bytes:
    svc = DaemonService(DaemonOptions())
    return json.dumps({"format": fmt, "mountpoint": "", "mounts": [], "vfs": svc.vfs.export_layout(),
                       "fuse": svc.session.export_state(), "default_config": None, **extra}).encode()


def test_state_1_without_erofs_entries_still_loads() -> None:
    r, w = os.pipe()
    svc = DaemonService(DaemonOptions())
    try:
        assert svc._restore(_state(STATE_FORMAT), w) == w  # the fd is /dev/fuse itself
        assert svc.instances == {}
    finally:
        os.close(r)
        os.close(w)


def test_state_2_unbundles_and_closes_what_it_does_not_keep() -> None:
    r, w = os.pipe()
    bundle = supervisor.bundle_fds([w])
    os.close(w)
    before = fd_count()
    svc = DaemonService(DaemonOptions())
    fuse = svc._restore(_state(STATE_FORMAT_BUNDLE, fds=1, fuse_fd=0, erofs=[]), bundle)
    assert fuse >= 0 and fd_count() == before  # the bundle closed, its copy of /dev/fuse kept
    os.write(fuse, b"y")
    assert os.read(r, 1) == b"y"
    os.close(fuse)
    # a state that does not match its bundle: refused, every fd closed
    bundle = supervisor.bundle_fds([r])
    before = fd_count() - 1
    with pytest.raises(ValueError):
        svc._restore(_state(STATE_FORMAT_BUNDLE, fds=2, fuse_fd=0, erofs=[]), bundle)
    assert fd_count() == before
    os.close(r)
