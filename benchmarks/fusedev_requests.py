"""What bench_fusedev's metadata workloads cost through `nydusd-py fuse`, request by request.

For each workload (cold after drop_caches and a fresh mount, then warm `--warm` times) it records
the FUSE requests the daemon answered by opcode (its Prometheus `/metrics`), the wall time, the
daemon's CPU time, and how long the daemon's threads sat runnable but not running
(/proc/PID/task/*/schedstat, second field: run-queue delay). Request counts are what a change
to the request path can be judged by on a shared machine; the run-queue delay says how much of a
pass was spent waiting for a CPU rather than working, which is what makes round-trip-bound
passes vary from run to run when other processes compete for the cores.

Run as root: python3 benchmarks/fusedev_requests.py --scale 0.1 --workdir DIR --tag NAME
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_fusedev import NydusPy, build_images, make_xattr_tree, small_files, write_config
from common import api_get_text, drop_caches, save
from gen_tree import generate

_SAMPLE = re.compile(r'^nydusd_fuse_requests_total\{mountpoint="([^"]*)",op="(\w+)"\} (\S+)$', re.M)
CMDS = {
    "find": ["find", ".", "-type", "f"],
    "lsR": ["ls", "-lR"],
    "small": None,  # xargs -0 -a LIST cat
}


def fuse_requests(apisock: str) -> dict[str, int]:
    """Requests answered so far per opcode name, summed over mountpoints."""
    text = api_get_text(apisock, "/metrics")
    out: dict[str, int] = {}
    for _mp, op, v in _SAMPLE.findall(text):
        out[op] = out.get(op, 0) + int(float(v))
    return out


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def task_times(pid: int) -> tuple[float, float]:
    """(CPU seconds, run-queue wait seconds) summed over the threads of `pid` alive now."""
    cpu = wait = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()
        except (FileNotFoundError, ValueError):
            continue
        cpu += int(run_ns)
        wait += int(wait_ns)
    return cpu / 1e9, wait / 1e9


def wait_socket(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no API socket at {path}")
        time.sleep(0.01)


def one_pass(server: NydusPy, cmd: list[str]) -> dict[str, object]:
    assert server.proc is not None and server.apisock is not None
    before = fuse_requests(server.apisock)
    cpu0, wait0 = task_times(server.proc.pid)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=server.root, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    cpu1, wait1 = task_times(server.proc.pid)
    reqs = diff(fuse_requests(server.apisock), before)
    return {"wall_ms": wall * 1e3, "daemon_cpu_ms": (cpu1 - cpu0) * 1e3, "daemon_runq_wait_ms": (wait1 - wait0) * 1e3,
            "requests": sum(reqs.values()), "by_op": reqs, "loadavg1": float(Path("/proc/loadavg").read_text().split()[0])}


def native_pass(root: str, cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--workdir", required=True, help="tree and images (shared with bench_fusedev's --workdir)")
    ap.add_argument("--trees", default="plain,xattr")
    ap.add_argument("--workloads", default="find,lsR,small")
    ap.add_argument("--reps", type=int, default=2, help="cold passes (each on a fresh mount)")
    ap.add_argument("--warm", type=int, default=5, help="warm passes after each cold one")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--daemon-args", default="", help="more nydusd-py flags (space-separated)")
    ap.add_argument("--tag", default="fusedev-requests")
    args = ap.parse_args()
    work = args.workdir
    tree = os.path.join(work, f"tree-{args.scale:g}")
    if not os.path.isdir(tree):
        generate(tree, args.scale)
    trees = {"plain": tree}
    if "xattr" in args.trees:
        trees["xattr"] = os.path.join(work, f"tree-{args.scale:g}-xattr")
        make_xattr_tree(tree, trees["xattr"])
    results: list[dict[str, object]] = []
    for tname, t in trees.items():
        if tname not in args.trees:
            continue
        info = build_images(t, work, f"img-{tname}")
        _, small_list = small_files(t, work, tname)
        mnt = os.path.join(work, f"mnt-req-{tname}")
        os.makedirs(mnt, exist_ok=True)
        cfg = write_config(os.path.join(work, f"nydusd-req-{tname}.json"), str(info["blobs"]))
        server = NydusPy(mnt, str(info["boot"]), cfg, os.path.join(work, f"nydusd-req-{tname}.log"), args.threads,
                         apisock=os.path.join(work, f"req-{tname}.sock"))
        server.cmd += args.daemon_args.split()
        for w in args.workloads.split(","):
            cmd = CMDS[w] or ["xargs", "-0", "-a", small_list, "cat"]
            for rep in range(args.reps):
                drop_caches()
                native_cold = native_pass(t, cmd)
                native_warm = [native_pass(t, cmd) for _ in range(args.warm)]
                Path(server.apisock or "").unlink(missing_ok=True)
                drop_caches()
                server.start()
                try:
                    wait_socket(server.apisock or "")
                    passes = [one_pass(server, cmd) for _ in range(1 + args.warm)]
                finally:
                    server.stop()
                for i, p in enumerate(passes):
                    nat = native_cold if i == 0 else native_warm[i - 1]
                    p.update({"tree": tname, "workload": w, "rep": rep, "temp": "cold" if i == 0 else "warm",
                              "native_ms": nat, "ratio": float(p["wall_ms"]) / nat})  # type: ignore[arg-type]
                    results.append(p)
                    print(f"{tname:5s} {w:5s} {p['temp']:4s} {p['wall_ms']:8.1f} ms (native {nat:6.1f}, "
                          f"{p['ratio']:5.2f}x) cpu {p['daemon_cpu_ms']:7.1f} runq {p['daemon_runq_wait_ms']:7.1f} "
                          f"load {p['loadavg1']:4.1f}  {p['requests']:5d} req {p['by_op']}", flush=True)
    path = save(args.tag, {"scale": args.scale, "threads": args.threads, "passes": results})
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
