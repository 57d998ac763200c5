"""Shared benchmark plumbing: run a command measuring wall time and peak RSS, keep JSON + PNG."""

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ENABLE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


@contextlib.contextmanager
def fuse_uring_enabled(on: bool = True) -> Iterator[None]:
    """fuse.enable_uring=Y for the block (when `on`), the old value restored after: the
    parameter is host-wide and the daemon never writes it."""
    if not on:
        yield
        return
    old = Path(ENABLE_URING_PARAM).read_text().strip()
    Path(ENABLE_URING_PARAM).write_text("Y")
    try:
        yield
    finally:
        Path(ENABLE_URING_PARAM).write_text(old)


def api_get_text(apisock: str, path: str) -> str:
    """GET `path` from a daemon's API socket (the body as text)."""
    conn = http.client.HTTPConnection("localhost", timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(apisock)
    conn.sock = sock
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def api_get(apisock: str, path: str) -> dict:  # type: ignore[type-arg]
    """GET `path` from a daemon's API socket (a JSON body)."""
    return json.loads(api_get_text(apisock, path))  # type: ignore[no-any-return]


def run_measured(cmd: list[str], **kw: object) -> dict[str, float]:
    """Run `cmd` to completion; return wall seconds and the child's peak RSS in MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    _pid, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": rusage.ru_maxrss / 1024}


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def save(name: str, payload: dict[str, object]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def bar_plot(name: str, title: str, labels: list[str], values: list[float], ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 4))
    ax.bar(labels, values, color="#4c72b0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grouped_bar_plot(name: str, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str,
                     log: bool = False) -> Path:
    """One group of bars per label, one bar per series (e.g. per server), saved as RESULTS/name.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9 * n / 2), 4.5))
    for k, (sname, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width, label=sname)
    ax.axhline(1.0, color="black", linewidth=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
