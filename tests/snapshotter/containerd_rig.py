"""Real containerd 1.6 (Debian) with its own root, state, socket and config, talking to
`nydus-snapshotter-py` as a proxy snapshotter (E2E-RIGS.md 3 and 4).

containerd still puts shim sockets under /run/containerd/s and FIFOs under /run/containerd/fifo
(hard-coded in 1.6); runc's state goes to a directory of ours (`Root` runtime option). Every
process started here is stopped by pid, SIGTERM first, SIGKILL after a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from nydus_py.transport.mount import is_mountpoint
from tests.waiting import WaitTimeout, wait_until

REPO = Path(__file__).resolve().parents[2]
SNAPSHOTTER = "nydus-py"

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.runtime.v2.task"]
    platforms = ["linux/amd64"]

[proxy_plugins]
  [proxy_plugins.{name}]
    type = "snapshot"
    address = "{snap_sock}"
"""


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def log_tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-n:].decode(errors="replace")


def wait_started(proc: subprocess.Popen[bytes], sock: str, name: str, log: Path, stop: Callable[[], None]) -> None:
    """Until `proc` has created `sock`; when it exits first or takes 30 s: `stop`, then fail."""

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}")
        return os.path.exists(sock)

    try:
        wait_until(up, 30, f"{name} to create {sock}")
    except AssertionError as e:
        stop()
        raise AssertionError(f"{name} did not start ({e}):\n{log_tail(log)}") from None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Containerd:
    def __init__(self, binary: str, ctr: str, work: Path, snap_sock: str) -> None:
        self.ctr = ctr
        self.work = work
        self.sock = str(work / "containerd.sock")
        self.runc_root = work / "runc"
        self.log = work / "containerd.log"
        self.config = work / "config.toml"
        self.config.write_text(CONFIG.format(root=work / "root", state=work / "state", sock=self.sock,
                                             opt=work / "opt", name=SNAPSHOTTER, snap_sock=snap_sock))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([binary, "--config", str(self.config)], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_started(self.proc, self.sock, "containerd", self.log, self.stop)

    def run(self, tool: str, *args: str, timeout: float = 120, check: bool = True,
            ns: str = "default") -> subprocess.CompletedProcess[str]:
        r = subprocess.run([tool, "--address", self.sock, "--namespace", ns, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{Path(tool).name} {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n"
                                 f"containerd log:\n{log_tail(self.log)}")
        return r

    def ctr_run(self, ref: str, cid: str, *cmd: str) -> str:
        """`ctr run --rm` with our snapshotter; runc keeps its state in our work directory."""
        r = self.run(self.ctr, "run", "--snapshotter", SNAPSHOTTER, "--rm", "--runc-root", str(self.runc_root),
                     "--fifo-dir", str(self.work / "fifo"),
                     ref, cid, *cmd)
        return r.stdout

    def stop(self) -> None:
        stop_process(self.proc)


class SnapshotterProcess:
    """`python3 -m nydus_py.snapshotter` with the daemon run from this checkout."""

    def __init__(self, work: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.root = work / "snapshotter"
        self.sock = str(work / "snapshotter.sock")
        self.log = work / "snapshotter.log"
        argv = [sys.executable, "-m", "nydus_py.snapshotter", "--root", str(self.root), "--address", self.sock,
                "--nydusd-path", f"{sys.executable} -m nydus_py.cli.daemon", "--log-level", "debug",
                "--stop-daemon-on-exit", *extra]
        e = dict(os.environ if env is None else env)
        e["PYTHONPATH"] = str(REPO)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=e,
                                         start_new_session=True)
        wait_started(self.proc, self.sock, "snapshotter", self.log, self.stop)

    @property
    def daemon_sock(self) -> str:
        return str(self.root / "nydusd" / "api.sock")

    @property
    def mnt(self) -> Path:
        return self.root / "mnt"

    def daemon_pid(self) -> int | None:
        try:
            return int((self.root / "nydusd" / "nydusd.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """SIGTERM (it stops its daemon too); then make sure the daemon and its mount are gone."""
        pid = self.daemon_pid()
        stop_process(self.proc, 30)
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pid = None
        if pid is not None:  # the snapshotter did not stop it: do it here, by pid
            os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda: not pid_exists(pid), 15, f"daemon {pid} to exit")
            except WaitTimeout:
                os.kill(pid, signal.SIGKILL)
        if is_mountpoint(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)
