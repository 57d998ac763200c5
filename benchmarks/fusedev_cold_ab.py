"""Cold walks of one image, alternated: native ext4, `nydusd-py fuse` from a baseline checkout and
from this one, round after round (drop_caches, mount, run, unmount), so that old and new code meet
the same machine load. For a before/after of one change on a shared, noisy machine, where
bench_fusedev's full matrix takes too long to repeat.

Uses the tree and image bench_fusedev leaves in its --workdir (tree-<scale>, img-plain, the
nydusd-plain.json config, small-plain.list). Run as root.

python3 benchmarks/fusedev_cold_ab.py --workdir W --baseline /path/to/old/checkout \
    --workload find --rounds 5 --json out.json
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common import drop_caches, fuse_uring_enabled

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "find": lambda w: ["find", ".", "-type", "f"],
    "lsR": lambda w: ["ls", "-lR"],
    "small": lambda w: ["xargs", "-0", "-a", os.path.join(w, "small-plain.list"), "cat"],
    # the small files looked up but not read (what LOOKUP-time work costs when no READ follows)
    "stat": lambda w: ["xargs", "-0", "-a", os.path.join(w, "small-plain.list"), "stat", "-c", "%s"],
}


def start(repo: str, work: str, mnt: str, log: str, extra: Sequence[str] = (),
          config: str = "nydusd-plain.json") -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--config", os.path.join(work, config),
           "--bootstrap", os.path.join(work, "img-plain", "boot"), "--mountpoint", mnt, "--thread-num", "4",
           "--log-level", "warn", *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": repo}, stdout=subprocess.DEVNULL,
                                stderr=out)
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(mnt, "opt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc, mnt)
            raise SystemExit(f"{repo}: the daemon did not mount; see {log}")
        time.sleep(0.01)
    return proc


def cpu_ms(pid: int) -> float:
    """CPU time of process `pid` so far, in ms, summed over its threads (schedstat: ns, not the
    10 ms ticks of /proc/PID/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total / 1e6


def stop(proc: subprocess.Popen[bytes], mnt: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", mnt], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="bench_fusedev's --workdir")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--baseline", required=True, help="the checkout with the code before the change")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="find")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--io-uring", action="store_true", help="both daemons with --io-uring (fuse.enable_uring=Y "
                    "for the run, restored after)")
    ap.add_argument("--base-args", default="", help="more daemon flags for the baseline arm (e.g. "
                    "'--fuse-warm-kb 0' with --baseline set to this checkout: a feature's own cost)")
    ap.add_argument("--new-args", default="", help="more daemon flags for the new arm")
    ap.add_argument("--config", default="nydusd-plain.json", help="the daemons' config, in --workdir (e.g. one "
                    "with a blob cache filled beforehand)")
    args = ap.parse_args()
    with fuse_uring_enabled(args.io_uring):
        run(args)


def run(args: argparse.Namespace) -> None:
    work = args.workdir
    mnt = os.path.join(work, "mnt-cold-ab")
    os.makedirs(mnt, exist_ok=True)
    arms = [("native", None, os.path.join(work, f"tree-{args.scale:g}")), ("base", args.baseline, mnt),
            ("new", str(REPO), mnt)]
    cmd = WORKLOADS[args.workload](work)
    ms: dict[str, list[float]] = {name: [] for name, _r, _d in arms}
    cpu: dict[str, list[float]] = {name: [] for name, r, _d in arms if r}  # the daemon's, during the run
    for r in range(args.rounds):
        for name, repo, root in arms:
            drop_caches()
            flags = (["--io-uring"] if args.io_uring else []) + (args.base_args if name == "base" else
                                                                  args.new_args if name == "new" else "").split()
            proc = (start(repo, work, mnt, os.path.join(work, f"cold-ab-{name}.log"), flags, args.config)
                    if repo else None)
            c0 = cpu_ms(proc.pid) if proc is not None else 0.0
            t = time.perf_counter()
            subprocess.run(cmd, cwd=root, stdout=subprocess.DEVNULL, check=True)
            ms[name].append((time.perf_counter() - t) * 1e3)
            extra = ""
            if proc is not None:
                cpu[name].append(cpu_ms(proc.pid) - c0)
                extra = f", daemon CPU {cpu[name][-1]:.1f} ms"
                stop(proc, mnt)
            print(f"round {r} {name:6s} {ms[name][-1]:8.1f} ms{extra} (load {os.getloadavg()[0]:.2f})", flush=True)
    ratios = {k: statistics.median(a / b for a, b in zip(v, ms["native"], strict=True)) for k, v in ms.items()}
    for k, v in ms.items():
        daemon = f", daemon CPU median {statistics.median(cpu[k]):.1f} ms" if k in cpu else ""
        print(f"{k:6s} median {statistics.median(v):8.1f} ms, median ratio to native {ratios[k]:.2f}{daemon}")
    # new/base within each round (the two ran a few seconds apart): steadier than the arms' own
    # medians when other work on the machine comes and goes between rounds
    paired = {"wall": statistics.median(n / b for n, b in zip(ms["new"], ms["base"], strict=True)),
              "daemon_cpu": statistics.median(n / b for n, b in zip(cpu["new"], cpu["base"], strict=True))}
    print(f"new/base paired by round, median: wall {paired['wall']:.3f}, daemon CPU {paired['daemon_cpu']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": args.workload, "cmd": cmd, "baseline": args.baseline,
                                               "io_uring": args.io_uring,
                                               "base_args": args.base_args, "new_args": args.new_args,
                                               "ms": ms, "daemon_cpu_ms": cpu, "median_ratio_to_native": ratios,
                                               "paired_new_over_base": paired,
                                               "loadavg_end": os.getloadavg()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
