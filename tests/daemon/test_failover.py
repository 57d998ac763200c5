"""Failover and hot upgrade through the supervisor socket (contract §3.5 D and F, §4): the test
plays the snapshotter's supervisor, holding the state blob and the /dev/fuse fd."""

import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.daemon.rig import Api, DaemonProc, Image, cleanup_mount, make_image, snapshotter_config, wait_state

pytestmark = pytest.mark.slow
V1 = "/api/v1"


class Supervisor:
    """The snapshotter side of §4: listen, let the daemon connect, keep or hand out state + fd."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.state = b""
        self.fd = -1

    def _listen(self) -> socket.socket:
        if os.path.exists(self.path):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(1)
        s.settimeout(15)
        return s

    def save(self, api: Api) -> None:
        """A sendfd round."""
        with self._listen() as listener:
            result: list[tuple[bytes, list[int]]] = []

            def accept() -> None:
                conn, _ = listener.accept()
                with conn:
                    msg, fds, _f, _a = socket.recv_fds(conn, 1 << 18, 4)
                    while chunk := conn.recv(1 << 16):
                        msg += chunk
                    result.append((msg, fds))

            t = threading.Thread(target=accept)
            t.start()
            r = api.request("PUT", f"{V1}/daemon/fuse/sendfd")
            t.join(15)
        assert r.status == 204, r.body
        (state, fds), = result
        assert len(fds) == 1
        if self.fd >= 0:
            os.close(self.fd)
        self.state, self.fd = state, fds[0]

    def serve_restore(self) -> threading.Thread:
        """Listen to send the saved state + fd to the next daemon that connects."""
        listener = self._listen()

        def send() -> None:
            with listener:
                conn, _ = listener.accept()
                with conn:
                    socket.send_fds(conn, [self.state], [self.fd])

        t = threading.Thread(target=send)
        t.start()
        return t

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    work = tmp_path_factory.mktemp("images")
    return [make_image(str(work), seed, files=10) for seed in range(2)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    require_device("/dev/fuse")
    for d in ("mnt", "socket/d1", "supervisor"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "socket").chmod(0o700)
    yield tmp_path
    cleanup_mount(str(tmp_path / "mnt"))


def snapshot_tree(mnt: str, images: list[Image]) -> dict[str, tuple[int, bytes]]:
    out = {}
    for k, img in enumerate(images):
        for rel in img.files:
            p = os.path.join(mnt, f"s{k}", rel)
            with open(p, "rb") as f:
                out[p] = (os.stat(p).st_ino, f.read())
    return out


def start_shared(root: Path, images: list[Image], sock: str, *extra: str) -> tuple[DaemonProc, Api]:
    argv = ["fuse", "--thread-num", "2", "--id", "d1", "--mountpoint", str(root / "mnt"), "--apisock", sock,
            "--log-level", "info", "--supervisor", str(root / "supervisor/d1.sock"), "--failover-policy", "resend",
            *extra]
    d = DaemonProc(argv, str(root / f"{os.path.basename(sock)}.log"))
    d.wait_socket(sock)
    return d, Api(sock)


def test_failover_after_kill_9(root: Path, images: list[Image]) -> None:
    sock = str(root / "socket/d1/api.sock")
    mnt = str(root / "mnt")
    sup = Supervisor(str(root / "supervisor/d1.sock"))
    a, api = start_shared(root, images, sock)
    b = None
    try:
        for k, img in enumerate(images):
            body = {"fs_type": "rafs", "source": img.boot, "config": snapshotter_config(img.blobs, f"s{k}")}
            assert api.request("POST", f"{V1}/mount", {"mountpoint": f"/s{k}"}, body).status == 204
        before = snapshot_tree(mnt, images)
        sup.save(api)
        a.stop(signal.SIGKILL)
        api.close()
        assert is_mountpoint(mnt), "the supervisor's fd keeps the FUSE connection alive"
        sender = sup.serve_restore()
        # D.5: same argv, no --upgrade: the daemon sees the crash and waits in INIT
        b, api = start_shared(root, images, sock)
        assert wait_state(api, "INIT")["backend_collection"] == {}
        r = api.request("PUT", f"{V1}/daemon/fuse/takeover")
        assert r.status == 204, r.body
        sender.join(10)
        info = wait_state(api, "READY")
        assert sorted(info["backend_collection"]) == ["/s0", "/s1"]
        assert api.request("PUT", f"{V1}/daemon/start").status == 204
        wait_state(api, "RUNNING")
        # same files, same bytes, same inode numbers as before the crash
        assert snapshot_tree(mnt, images) == before
        assert sorted(os.listdir(mnt)) == ["s0", "s1"]
        assert api.request("PUT", f"{V1}/daemon/fuse/takeover").status == 400  # only valid in INIT
        assert b.stop() == 0
        assert not is_mountpoint(mnt)
    finally:
        sup.close()
        api.close()
        a.kill()
        if b is not None:
            b.kill()


def test_hot_upgrade(root: Path, images: list[Image]) -> None:
    sock0 = str(root / "socket/d1/api.sock")
    sock1 = str(root / "socket/d1/api1.sock")
    mnt = str(root / "mnt")
    sup = Supervisor(str(root / "supervisor/d1.sock"))
    old, api0 = start_shared(root, images, sock0)
    new = None
    api1 = None
    try:
        for k, img in enumerate(images):
            body = {"fs_type": "rafs", "source": img.boot, "config": snapshotter_config(img.blobs, f"s{k}")}
            assert api0.request("POST", f"{V1}/mount", {"mountpoint": f"/s{k}"}, body).status == 204
        before = snapshot_tree(mnt, images)
        sup.save(api0)
        sender = sup.serve_restore()
        new, api1 = start_shared(root, images, sock1, "--upgrade")
        wait_state(api1, "INIT")
        assert api1.request("PUT", f"{V1}/daemon/fuse/takeover").status == 204
        sender.join(10)
        wait_state(api1, "READY")
        assert api0.request("PUT", f"{V1}/daemon/exit").status == 204
        assert old.wait_exit() == 0
        assert is_mountpoint(mnt)
        assert api1.request("PUT", f"{V1}/daemon/start").status == 204
        wait_state(api1, "RUNNING")
        assert snapshot_tree(mnt, images) == before
        assert new.stop() == 0
        assert not is_mountpoint(mnt)
    finally:
        sup.close()
        api0.close()
        if api1 is not None:
            api1.close()
        old.kill()
        if new is not None:
            new.kill()
