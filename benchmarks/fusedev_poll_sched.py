"""Why the reading thread of `nydusd-py fuse` stops polling in a cold pass: one cold pass
(small files or find) on a fresh daemon under `perf record -a` with the scheduler tracepoints,
then the daemon's polling counters (metrics API) beside what the scheduler did:

  - each time a daemon thread left its CPU while still runnable (a sched_yield that let
    another task run, or a preemption): which task ran instead (the client, another thread
    of the daemon, a kernel thread, another process);
  - each wake-up of the client and of a daemon thread: on the waker's CPU (a context switch)
    or on another one (an IPI to a halted vCPU on this VM);
  - on how many CPUs the client and the reading thread ran;
  - and, once the pass is over, that the idle daemon sleeps: 2 s with no requests, spin time
    and CPU time of the daemon over them.

Uses bench_fusedev's --workdir (tree, image, nydusd-plain.json, small-plain.list). Run as
root. `--repo` picks the checkout whose daemon runs, so old and new code can be traced in turn.

python3 benchmarks/fusedev_poll_sched.py --workdir W [--repo R] [--workload small|find] [--rounds 2]
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import api_get, drop_caches
from fusedev_cold_ab import WORKLOADS, cpu_ms, start, stop

REPO = Path(__file__).resolve().parents[1]
EVENTS = ["sched:sched_switch", "sched:sched_wakeup"]
_LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
_SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*?prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")
_WAKE = re.compile(r"comm=(.*?) pid=(\d+) .*?target_cpu=(\d+)")
CLIENTS = {"cat", "xargs", "find"}


def kind(comm: str, pid: int, daemon: set[int], client: set[int]) -> str:
    """What a task that ran is: the client, the daemon, a kernel thread, idle or another one."""
    if pid == 0:
        return "idle"
    if pid in client:
        return "client"
    if pid in daemon:
        return "daemon"
    if comm.startswith(("kworker", "ksoftirqd", "rcu", "migration", "kcompactd", "khugepaged", "jbd2", "kthreadd")):
        return f"kthread:{comm.split('/')[0]}"
    return f"other:{comm}"


def one_pass(repo: str, work: str, workload: str, out: str) -> dict[str, Any]:
    mnt = os.path.join(work, "mnt-poll-sched")
    os.makedirs(mnt, exist_ok=True)
    sock = os.path.join(work, "poll-sched-api.sock")
    Path(sock).unlink(missing_ok=True)
    proc = start(repo, work, mnt, os.path.join(work, "poll-sched-daemon.log"), ["--apisock", sock])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.01)  # (the mount comes before the API server)
        daemon = {int(t) for t in os.listdir(f"/proc/{proc.pid}/task")}
        before = api_get(sock, "/api/v1/metrics/transport")["fusedev"]
        drop_caches()
        cmd = ["perf", "record", "-q", "-a", "-o", out, "-e", ",".join(EVENTS), "--", *WORKLOADS[workload](work)]
        load = os.getloadavg()[0]
        subprocess.run(cmd, cwd=mnt, stdout=subprocess.DEVNULL, check=True)
        after = api_get(sock, "/api/v1/metrics/transport")["fusedev"]
        # an idle daemon sleeps: once the last window has run out, spin time stays flat
        time.sleep(0.5)
        idle0 = api_get(sock, "/api/v1/metrics/transport")["fusedev"]
        cpu0 = cpu_ms(proc.pid)
        time.sleep(2)
        idle1 = api_get(sock, "/api/v1/metrics/transport")["fusedev"]
        idle_cpu = cpu_ms(proc.pid) - cpu0
        daemon |= {int(t) for t in os.listdir(f"/proc/{proc.pid}/task")}
    finally:
        stop(proc, mnt)
    text = subprocess.run(["perf", "script", "-i", out, "-F", "comm,tid,cpu,time,event,trace"], check=True,
                          capture_output=True, text=True).stdout
    events = [(m.group(2), int(m.group(3)), m.group(5), m.group(6))
              for m in map(_LINE.match, text.splitlines()) if m]
    client: set[int] = set()
    for _tid, _cpu, name, rest in events:  # the client's tasks: by name, once it ran
        if name == "sched:sched_switch" and (s := _SWITCH.search(rest)) and s.group(4) in CLIENTS:
            client.add(int(s.group(5)))
    instead: collections.Counter[str] = collections.Counter()
    wakes: dict[str, collections.Counter[str]] = {"client": collections.Counter(), "daemon": collections.Counter()}
    cpus: dict[str, set[int]] = {"client": set(), "daemon": set()}
    for tid, cpu, name, rest in events:
        if name == "sched:sched_switch":
            s = _SWITCH.search(rest)
            if s is None:
                continue
            prev, state, nxt = int(s.group(2)), s.group(3), int(s.group(5))
            if prev in daemon and state.startswith("R"):
                instead[kind(s.group(4), nxt, daemon, client)] += 1
            for who, group in (("client", client), ("daemon", daemon)):
                if nxt in group:
                    cpus[who].add(cpu)
        elif name == "sched:sched_wakeup":
            w = _WAKE.search(rest)
            if w is None:
                continue
            pid, target = int(w.group(2)), int(w.group(3))
            waker = kind("", int(tid), daemon, client)
            for who, group in (("client", client), ("daemon", daemon)):
                if pid in group:
                    wakes[who][f"by {waker}, {'same CPU' if target == cpu else 'other CPU'}"] += 1
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int) and k != "poll_us"}
    return {"load": load, "poll": delta, "idle_2s": {"spin_us": idle1["poll_spin_us"] - idle0["poll_spin_us"],
                                                     "requests": idle1["requests"] - idle0["requests"],
                                                     "daemon_cpu_ms": round(idle_cpu, 2)}, "ran_instead_of_a_runnable_daemon_thread": dict(instead.most_common()),
            "wakeups": {k: dict(v.most_common()) for k, v in wakes.items()},
            "cpus": {k: sorted(v) for k, v in cpus.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="bench_fusedev's --workdir")
    ap.add_argument("--repo", action="append", help="checkout(s) whose daemon runs, in turn (default: this one)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("fusedev_poll_sched needs root (mounts, drop_caches, perf -a)")
    repos = args.repo or [str(REPO)]
    res: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for repo in repos:
                s = one_pass(repo, args.workdir, args.workload, os.path.join(tmp, "p.data"))
                s.update(repo=repo, round=r)
                res.append(s)
                print(json.dumps(s), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
