"""Where the wall time of a cold small-file pass goes, request by request (`perf record -a`).

One cold pass (`xargs -0 -a small-plain.list cat` after drop_caches, on a fresh `nydusd-py fuse`
mount) under perf with the kernel's FUSE, scheduler, syscall and block tracepoints, then per
FUSE request (LOOKUP, READ) the wall time split in order:

  wake     fuse_request_send (the client queues it) -> the daemon thread that answers it returns
           from readv (/dev/fuse) or io_uring_enter (ring) with it
  handler  -> that thread enters writev / io_uring_enter with the reply; of it `pread`, the blob
           reads (and how many of them waited for block I/O issued meanwhile: the kernel's
           readahead of the blob file answers the others from the page cache)
  reply    -> fuse_request_end
  back     -> the client runs again
and `client` between one request's end and the client's next request (cat and the kernel's
own work: open, page cache, write to /dev/null). Whether client and daemon thread ran on the
same CPU is counted too (a wake-up there is a context switch, elsewhere an IPI).

Tracing adds a few microseconds to every event, so sums are above an untraced pass; the split,
not the total, is the result. The trace is system-wide, so only the requests of the traced
mount's connection count (other FUSE mounts on the machine stay out of the split). Uses bench_fusedev's --workdir (tree, image, nydusd-plain.json,
small-plain.list). Run as root; `--io-uring` also traces `nydusd-py fuse --io-uring` (sets
fuse.enable_uring=Y for the run and restores it).

python3 benchmarks/fusedev_timeline.py --workdir W [--io-uring] [--json out.json]
"""

import argparse
import bisect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import drop_caches, fuse_uring_enabled
from fusedev_cold_ab import start, stop

REPO = Path(__file__).resolve().parents[1]
EVENTS = ["fuse:fuse_request_send", "fuse:fuse_request_end", "sched:sched_switch", "block:block_rq_issue",
          *(f"syscalls:sys_{d}_{s}" for s in ("readv", "writev", "pread64", "io_uring_enter") for d in ("enter", "exit"))]
OPS = {1: "LOOKUP", 15: "READ"}
_LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
_REQ = re.compile(r"req (\d+)")
_OPC = re.compile(r"opcode (\d+)")
_CONN = re.compile(r"connection (\d+)")
_NEXT = re.compile(r"next_pid=(\d+)")


def connection_id(mnt: str) -> int:
    """The `connection` the fuse tracepoints print for the mount at `mnt`: its superblock's
    dev_t in the kernel's encoding (major << 20 | minor)."""
    dev = os.stat(mnt).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


def trace(repo: str, work: str, uring: bool, out: str) -> tuple[list[tuple[float, int, int, str, str]], int]:
    """One traced cold pass: events as (time us, tid, cpu, event, fields), and the mount's
    connection id."""
    mnt = os.path.join(work, "mnt-timeline")
    os.makedirs(mnt, exist_ok=True)
    extra = ["--io-uring"] if uring else []
    proc = start(repo, work, mnt, os.path.join(work, "timeline-daemon.log"), extra)
    try:
        conn = connection_id(mnt)
        drop_caches()
        cmd = ["perf", "record", "-q", "-a", "-o", out, "-e", ",".join(EVENTS), "--", "xargs", "-0", "-a",
               os.path.join(work, "small-plain.list"), "cat"]
        subprocess.run(cmd, cwd=mnt, stdout=subprocess.DEVNULL, check=True)
    finally:
        stop(proc, mnt)
    text = subprocess.run(["perf", "script", "-i", out, "-F", "comm,tid,cpu,time,event,trace"], check=True,
                          capture_output=True, text=True).stdout
    events = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            _comm, tid, cpu, t, name, rest = m.groups()
            events.append((float(t) * 1e6, int(tid), int(cpu), name, rest))
    return events, conn


def split(events: list[tuple[float, int, int, str, str]], conn: int | None = None) -> dict[str, Any]:
    """Per request the intervals above, from the events of one pass (of connection `conn`
    only, when given)."""
    reqs: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    got: dict[int, float] = {}  # daemon thread -> its last return with a request
    sent: dict[int, float] = {}  # daemon thread -> its last writev / io_uring_enter entry
    preads: dict[int, list[tuple[float, float]]] = {}  # thread -> (start, end) of its preads
    pread_at: dict[int, float] = {}
    blocks: dict[int, list[float]] = {}  # thread -> times it issued block I/O
    runs: dict[int, list[float]] = {}  # tid -> times it was switched in
    for t, tid, cpu, name, rest in events:
        if conn is not None and name.startswith("fuse:") and int(_CONN.search(rest).group(1)) != conn:  # type: ignore[union-attr]
            continue  # (another FUSE mount's request)
        if name == "fuse:fuse_request_send":
            u, op = int(_REQ.search(rest).group(1)), int(_OPC.search(rest).group(1))  # type: ignore[union-attr]
            reqs[u] = {"op": OPS.get(op, str(op)), "send": t, "client": tid, "ccpu": cpu}
            order.append(u)
        elif name in ("syscalls:sys_exit_readv", "syscalls:sys_exit_io_uring_enter"):
            got[tid] = t
        elif name in ("syscalls:sys_enter_writev", "syscalls:sys_enter_io_uring_enter"):
            sent[tid] = t
        elif name == "syscalls:sys_enter_pread64":
            pread_at[tid] = t
        elif name == "syscalls:sys_exit_pread64" and tid in pread_at:
            preads.setdefault(tid, []).append((pread_at.pop(tid), t))
        elif name == "block:block_rq_issue":
            blocks.setdefault(tid, []).append(t)
        elif name == "sched:sched_switch":
            runs.setdefault(int(_NEXT.search(rest).group(1)), []).append(t)  # type: ignore[union-attr]
        elif name == "fuse:fuse_request_end":
            u = int(_REQ.search(rest).group(1))  # type: ignore[union-attr]
            r = reqs.get(u)
            if r is not None and got.get(tid, -1) >= r["send"] and sent.get(tid, -1) >= got[tid]:
                r.update(got=got[tid], reply=sent[tid], end=t, dtid=tid, dcpu=cpu)
    rows = []
    for u in order:
        r = reqs[u]
        if "end" not in r:
            continue  # answered by a thread other than the one that received it (a hand-off), or cut off
        sw = runs.get(r["client"], [])
        k = bisect.bisect_left(sw, r["end"])
        r["back"] = sw[k] if k < len(sw) else r["end"]
        ps = [(a, b) for a, b in preads.get(r["dtid"], []) if r["got"] <= a and b <= r["reply"]]
        bl = blocks.get(r["dtid"], [])
        r["pread"] = sum(b - a for a, b in ps)
        r["pread_io"] = sum(1 for a, b in ps if bisect.bisect_left(bl, a) < bisect.bisect_right(bl, b))
        r["npread"] = len(ps)
        rows.append(r)
    out: dict[str, Any] = {"requests": len(order), "split": len(rows)}
    for opname in ("LOOKUP", "READ"):
        rs = [r for r in rows if r["op"] == opname]
        if not rs:
            continue
        out[opname] = {
            "n": len(rs),
            "same_cpu": sum(1 for r in rs if r["ccpu"] == r["dcpu"]),
            "preads": sum(r["npread"] for r in rs),
            "preads_waiting_for_io": sum(r["pread_io"] for r in rs),
            **{k: dist([f(r) for r in rs]) for k, f in (
                ("client_wait", lambda r: r["back"] - r["send"]),
                ("wake", lambda r: r["got"] - r["send"]),
                ("handler", lambda r: r["reply"] - r["got"]),
                ("pread", lambda r: r["pread"]),
                ("reply", lambda r: r["end"] - r["reply"]),
                ("back", lambda r: r["back"] - r["end"]))},
        }
    gaps = [b["send"] - a["back"] for a, b in zip(rows, rows[1:], strict=False) if a["client"] == b["client"]]
    out["client"] = dist(gaps)
    out["wall_ms"] = (rows[-1]["back"] - rows[0]["send"]) / 1e3 if rows else 0.0
    return out


def dist(v: list[float]) -> dict[str, float]:
    v = sorted(v)
    if not v:
        return {}
    return {"sum_ms": round(sum(v) / 1e3, 2), "p50_us": v[len(v) // 2], "p90_us": v[len(v) * 9 // 10],
            "p99_us": v[len(v) * 99 // 100], "mean_us": round(statistics.fmean(v), 1)}


def show(name: str, s: dict[str, Any]) -> None:
    print(f"{name}: {s['requests']} requests ({s['split']} split), {s['wall_ms']:.1f} ms from first to last")
    for op in ("LOOKUP", "READ"):
        if op not in s:
            continue
        o = s[op]
        print(f"  {op}: {o['n']}, same CPU {o['same_cpu']}, preads {o['preads']} ({o['preads_waiting_for_io']} "
              f"waited for block I/O)")
        for k in ("client_wait", "wake", "handler", "pread", "reply", "back"):
            d = o[k]
            print(f"    {k:12s} sum {d['sum_ms']:8.1f} ms  p50 {d['p50_us']:7.1f}  p90 {d['p90_us']:7.1f}  "
                  f"p99 {d['p99_us']:8.1f} us")
    c = s["client"]
    print(f"  client between requests: sum {c['sum_ms']:.1f} ms, p50 {c['p50_us']:.1f} us, p90 {c['p90_us']:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="bench_fusedev's --workdir")
    ap.add_argument("--repo", default=str(REPO), help="the checkout whose daemon runs")
    ap.add_argument("--io-uring", action="store_true", help="also trace the daemon with --io-uring")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("fusedev_timeline needs root (mounts, drop_caches, perf -a)")
    res: dict[str, Any] = {"loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp, fuse_uring_enabled(args.io_uring):
        for name, uring in [("dev", False), *([("uring", True)] if args.io_uring else [])]:
            res[name] = split(*trace(args.repo, args.workdir, uring, os.path.join(tmp, f"{name}.data")))
            show(name, res[name])
    res["loadavg_end"] = os.getloadavg()
    print(f"load average {res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
