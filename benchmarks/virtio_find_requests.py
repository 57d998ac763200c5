"""What a guest's `find` (bench_virtiofs's find_5000) sends over virtio-fs, request by request.

One TCG guest per server over bench_virtiofs's tree. The guest drops its caches, prints a
marker, sleeps, runs `find many | wc -l`, prints a second marker and sleeps again; the host
watches the guest's result port and takes a snapshot at each marker while the guest sleeps:
* `nydus_py passthrough` (and `--rafs`: the RAFS server): the daemon's per-opcode request
  counters (Prometheus `/metrics` on its `--apisock`) and its process CPU;
* `virtiofsd` (`-d`): the opcodes its debug log names, and its process CPU.
The differences are what one cold `find` costs each server. Request counts are the stable part
on a shared machine; the CPU figures (ticks of 10 ms) are coarse, so `--reps` repeats the find.

python3 benchmarks/virtio_find_requests.py [--servers virtiofsd,passthrough,rafs] [--reps 3]
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench_virtiofs import VIRTIOFSD, build_image, make_tree
from common import api_get_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.transport.virtio_rig import run_guest, stop_pid  # noqa: E402

_SAMPLE = re.compile(r'^nydusd_fuse_requests_total\{mountpoint="[^"]*",op="(\w+)"\} (\S+)$', re.M)
_VFSD_OP = re.compile(rb"opcode: (\w+) \(\d+\)")
SCRIPT = r"""for r in $(seq @REPS@); do
  echo "@@P$r"; sleep 2
  echo 3 > /proc/sys/vm/drop_caches; echo "@@A$r"; sleep 2
  n=$(find many | wc -l); echo "@@B$r $n"; sleep 2
  echo 3 > /proc/sys/vm/drop_caches; n=$(find many | wc -l); echo "@@C$r $n"; sleep 2
done
"""


def _cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` (all its threads) and its children (virtiofsd serves from a forked
    child); threads that end meanwhile are skipped."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), \
                open(f"/proc/{pid}/task/{tid}/children") as f:
            ticks += sum(_cpu_ticks(int(c)) for c in f.read().split())
    return ticks


def nydus_counts(apisock: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for op, v in _SAMPLE.findall(api_get_text(apisock, "/metrics")):
        out[op] += int(float(v))
    return out


def vfsd_counts(log: Path) -> Counter[str]:
    return Counter(m.decode() for m in _VFSD_OP.findall(log.read_bytes()))


def run(name: str, cmd: list[str], sock: str, work: Path, reps: int, counts: Callable[[], Counter[str]],
        logf: Path) -> dict[str, object]:
    with open(logf, "wb") as lf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=lf)
    vm = work / f"vm-{name}"
    result = vm / "result.log"
    snaps: dict[str, tuple[Counter[str], int]] = {}
    done = threading.Event()

    def watch() -> None:  # snapshot at each marker, while the guest sleeps
        while not done.is_set():
            try:
                text = result.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            for m in re.findall(r"@@([PABC]\d+)", text):
                if m not in snaps:
                    snaps[m] = (counts(), _cpu_ticks(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        r = run_guest(sock, SCRIPT.replace("@REPS@", str(reps)), vm, timeout=300, watch_pid=proc.pid)
        r.check()
    finally:
        done.set()
        t.join()
        stop_pid(proc)
    per_rep = []
    hz = os.sysconf("SC_CLK_TCK")
    for i in range(1, reps + 1):
        (p, cp), (a, ca), (b, cb), (c, cc) = (snaps[f"{k}{i}"] for k in "PABC")
        per_rep.append({"drop": dict(sorted((a - p).items())), "drop_cpu_ms": (ca - cp) / hz * 1e3,
                        "find": dict(sorted((b - a).items())), "find_cpu_ms": (cb - ca) / hz * 1e3,
                        "drop_and_find": dict(sorted((c - b).items())), "drop_and_find_cpu_ms": (cc - cb) / hz * 1e3})
    for k in ("drop", "find", "drop_and_find"):
        print(name, k, json.dumps(per_rep[-1][k]), [p[f"{k}_cpu_ms"] for p in per_rep], flush=True)
    return {"reps": per_rep, "output": r.output}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "virtiofs"))
    ap.add_argument("--servers", default="virtiofsd,passthrough")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    make_tree(work)
    boot, cfg = build_image(work)
    tmp = Path(tempfile.mkdtemp(prefix="vfind-"))
    out: dict[str, object] = {"loadavg": os.getloadavg()}
    for server in args.servers.split(","):
        sock, api = str(tmp / f"{server}.sock"), str(tmp / f"{server}.api")
        logf = tmp / f"{server}.log"
        if server == "virtiofsd":
            cmd = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={work / 'tree'}", "-o", "cache=auto", "-d"]
            out[server] = run(server, cmd, sock, tmp, args.reps, lambda lf=logf: vfsd_counts(lf), logf)
            continue
        src = ["--shared-dir", str(work / "tree")] if server == "passthrough" else \
            ["--bootstrap", str(boot), "--config", str(cfg)]
        cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--log-level", "warn",
               "--apisock", api, *src]
        out[server] = run(server, cmd, sock, tmp, args.reps, lambda a=api: nydus_counts(a), logf)
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
