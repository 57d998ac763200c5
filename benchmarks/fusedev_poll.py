"""GETATTR round trip and idle CPU of `nydusd-py fuse` variants, alternated in one run.

Each variant is a daemon command: a source tree to run it from (`--baseline REPO` adds that
checkout's daemon, e.g. main before a change) and extra flags (`--fuse-poll-us N`). Per round,
every variant in turn: start, a stat loop on one file with attr_timeout 0 (each stat is one
GETATTR per path component; the daemon's own count divides), by 1 client and by 4 clients at
once, then the daemon's CPU over `--idle` seconds of nothing (busy-polling must not burn an idle
CPU). Rounds rotate the starting variant. `--io-uring` runs every variant with `--io-uring`
(fuse.enable_uring=Y for the run, restored after). Run as root:

python3 benchmarks/fusedev_poll.py --workdir DIR [--baseline /path/to/old/repo] --rounds 3
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_fusedev import BIG, STAT_PROBE, NydusPy, _fop_count, build_images, write_config
from common import fuse_uring_enabled, save
from gen_tree import generate

REPO = Path(__file__).resolve().parents[1]


class Variant(NydusPy):
    def __init__(self, label: str, repo: str, extra: list[str], mnt: str, boot: str, cfg: str, log: str,
                 threads: int, apisock: str) -> None:
        super().__init__(mnt, boot, cfg, log, threads, apisock=apisock)
        self.name = label
        self.cmd += extra
        self.repo = repo

    def start(self) -> None:
        Path(self.apisock or "").unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.repo,
                                         env={**os.environ, "PYTHONPATH": self.repo})
        deadline = time.monotonic() + 30
        while not (os.path.exists(os.path.join(self.root, self.probe)) and os.path.exists(self.apisock or "")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount; see {self.log}")
            time.sleep(0.01)


def halts() -> int:
    """Idle entries of every CPU so far (cpuidle states but POLL: each a halt of the vCPU, whose
    wake-up is an IPI through the host)."""
    n = 0
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        for st in (cpu / "cpuidle").glob("state*"):
            if (st / "name").read_text().strip() != "POLL":
                n += int((st / "usage").read_text())
    return n


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def stat_clients(path: str, clients: int, n: int, reps: int) -> list[float]:
    """us per stat, per batch, of `clients` processes running the probe at once (all batches)."""
    procs = [subprocess.Popen([sys.executable, "-c", STAT_PROBE, path, str(n), str(reps)], stdout=subprocess.PIPE,
                              text=True) for _ in range(clients)]
    out = []
    for p in procs:
        o, _ = p.communicate()
        out += [float(x) for x in o.split()]
    return out


def measure(v: Variant, native_us: float, n: int, reps: int, idle: float) -> dict[str, object]:
    v.start()
    assert v.proc is not None
    try:
        path = os.path.join(v.root, BIG)
        res: dict[str, object] = {}
        for clients in (1, 4):
            before = _fop_count(v.apisock)
            h0 = halts()
            batches = stat_clients(path, clients, n, reps)
            requests = _fop_count(v.apisock) - before
            per_stat = requests / (clients * (n * reps + 1))
            med = statistics.median(batches)
            res[f"c{clients}"] = {"stat_us": med, "getattr_rtt_us": (med - native_us) / per_stat,
                                  "halts_per_request": (halts() - h0) / requests,
                                  "best_rtt_us": (min(batches) - native_us) / per_stat,
                                  "requests_per_stat": per_stat, "batches_us": batches}
        time.sleep(0.2)  # let the last burst's window run out (not what is measured)
        c0 = cpu_s(v.proc.pid)
        time.sleep(idle)
        res["idle_cpu_pct"] = (cpu_s(v.proc.pid) - c0) / idle * 100
        res["loadavg1"] = float(Path("/proc/loadavg").read_text().split()[0])
    finally:
        v.stop()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--baseline", help="another checkout whose daemon runs as variant 'base'")
    ap.add_argument("--polls", default="0,100", help="--fuse-poll-us values of this checkout's daemon")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="daemon FUSE threads")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of idle CPU measurement")
    ap.add_argument("--tag", default="fusedev-poll")
    ap.add_argument("--io-uring", action="store_true", help="every variant with --io-uring")
    args = ap.parse_args()
    with fuse_uring_enabled(args.io_uring):
        run(args)


def run(args: argparse.Namespace) -> None:
    tree = os.path.join(args.workdir, f"tree-{args.scale:g}")
    if not os.path.isdir(tree):
        generate(tree, args.scale)
    info = build_images(tree, args.workdir, "img-plain")
    cfg = write_config(os.path.join(args.workdir, "nydusd-rtt.json"), str(info["blobs"]), attr_timeout=0)
    variants: list[Variant] = []

    def add(label: str, repo: str, extra: list[str]) -> None:
        extra = [*extra, "--io-uring"] if args.io_uring else extra
        mnt = os.path.join(args.workdir, f"mnt-poll-{len(variants)}")
        os.makedirs(mnt, exist_ok=True)
        variants.append(Variant(label, repo, extra, mnt, str(info["boot"]), cfg,
                                os.path.join(args.workdir, f"poll-{len(variants)}.log"), args.threads,
                                os.path.join(args.workdir, f"poll-{len(variants)}.sock")))

    if args.baseline:
        add("base", args.baseline, [])
    for us in args.polls.split(","):
        add(f"poll{us}", str(REPO), ["--fuse-poll-us", us])
    native = statistics.median(stat_clients(os.path.join(tree, BIG), 1, args.n, args.reps))
    raw: dict[str, list[dict[str, object]]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            res = measure(v, native, args.n, args.reps, args.idle)
            raw[v.name].append(res)
            c1, c4 = res["c1"], res["c4"]
            print(f"round {r} {v.name:8s} rtt 1 client {c1['getattr_rtt_us']:6.1f} us (best {c1['best_rtt_us']:6.1f}, "  # type: ignore[index]
                  f"{c1['halts_per_request']:.2f} halts/request)"  # type: ignore[index]
                  f"  4 clients {c4['getattr_rtt_us']:6.1f} us/stat-per-client  idle cpu {res['idle_cpu_pct']:5.2f}%"  # type: ignore[index]
                  f"  load {res['loadavg1']}", flush=True)
    summary = {name: {"rtt_1_us": statistics.median(x["c1"]["getattr_rtt_us"] for x in rs),  # type: ignore[index]
                      "rtt_4_us": statistics.median(x["c4"]["getattr_rtt_us"] for x in rs),  # type: ignore[index]
                      "halts_per_request_1": statistics.median(x["c1"]["halts_per_request"] for x in rs),  # type: ignore[index]
                      "idle_cpu_pct": statistics.median(x["idle_cpu_pct"] for x in rs)}  # type: ignore[misc]
               for name, rs in raw.items()}
    for name, s in summary.items():
        print(f"{name:8s} GETATTR rtt: 1 client {s['rtt_1_us']:6.1f} us ({s['halts_per_request_1']:.2f} vCPU halts "
              f"per request), 4 clients {s['rtt_4_us']:6.1f} us; idle CPU {s['idle_cpu_pct']:.2f}%")
    path = save(args.tag, {"native_stat_us": native, "summary": summary, "raw": raw, "threads": args.threads,
                           "io_uring": args.io_uring,
                           "cpuidle": Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
