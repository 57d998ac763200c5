"""What one cold sequential read of bench_fusedev's 100 MiB file (or, `--workload small`, of its
small files) costs through `nydusd-py fuse` and `nydusd-py fuse --fs-driver erofs`.

Each pass: drop_caches, start the daemon (with an API socket), `dd bs=1M` the file once (or cat the small files), read the
daemon's counters, stop it. Recorded per pass: wall time, the daemon's CPU time (per-thread
schedstat, ns) and minor page faults, the READs the kernel sent and their sizes (fusedev: the
block-size histogram of /api/v1/metrics; EROFS driver: the blob views' `kernel_reads` and
bytes), decode-ahead counters (views), and the FUSE mounts' bdi read_ahead_kb. CPU and faults
are what a change to the read path is judged by on a shared machine; the wall time depends on
who else has the cores.

`--code DIR[,DIR...]` runs the passes with each nydus_py tree in turn (alternating, so old and
new code see the same load), e.g. a `git archive` of main beside the worktree.

Run as root: python3 benchmarks/seq_read_probe.py --workdir DIR [--code A,B] [--passes 3]
(DIR: bench_fusedev's --workdir, whose tree and images it reuses or builds.)
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_fusedev import BIG, build_images, small_files, write_config
from common import api_get, drop_caches, save
from fusedev_requests import task_times
from gen_tree import generate

REPO = Path(__file__).resolve().parents[1]



def minflt(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def fuse_bdis(prefixes: tuple[str, ...]) -> dict[str, str]:
    """read_ahead_kb of the FUSE mounts under `prefixes` (the mount and the blob views)."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        fstype = f[f.index("-") + 1]
        if fstype.startswith("fuse") and f[4].startswith(prefixes):
            try:
                out[f[4]] = Path(f"/sys/class/bdi/{f[2]}/read_ahead_kb").read_text().strip()
            except OSError as e:
                out[f[4]] = f"({e.strerror})"
    return out


def one_pass(code: str, driver: str, work: str, info: dict, threads: int, workload: list[str]) -> dict:
    mnt = os.path.join(work, f"mnt-seqprobe-{driver}")
    os.makedirs(mnt, exist_ok=True)
    sock = os.path.join(work, f"seqprobe-{driver}.sock")
    Path(sock).unlink(missing_ok=True)
    cfg = write_config(os.path.join(work, "nydusd-seqprobe.json"), str(info["blobs"]))
    cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--config", cfg, "--bootstrap", str(info["boot"]),
           "--mountpoint", mnt, "--thread-num", str(threads), "--log-level", "warn", "--apisock", sock]
    if driver == "erofs":
        cmd[4:4] = ["--fs-driver", "erofs"]
    drop_caches()
    env = {**os.environ, "PYTHONPATH": code}
    with open(os.path.join(work, f"seqprobe-{driver}.log"), "ab") as log:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(sock) and os.path.exists(os.path.join(mnt, "opt"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not mount; see {work}/seqprobe-{driver}.log")
            time.sleep(0.01)
        bdis = fuse_bdis((mnt, "/run/nydus-py/blobview-", "/tmp/blobview-"))
        m0, b0 = api_get(sock, "/api/v1/metrics"), api_get(sock, "/api/v1/metrics/blobcache")
        cpu0, _ = task_times(proc.pid)
        f0 = minflt(proc.pid)
        t = time.perf_counter()
        subprocess.run(workload, cwd=mnt, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        cpu1, _ = task_times(proc.pid)
        faults = minflt(proc.pid) - f0
        m1, b1 = api_get(sock, "/api/v1/metrics"), api_get(sock, "/api/v1/metrics/blobcache")
    finally:
        proc.send_signal(15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = {"code": code, "driver": driver, "wall_ms": wall * 1e3, "daemon_cpu_ms": (cpu1 - cpu0) * 1e3,
           "minflt": faults, "read_ahead_kb": bdis, "loadavg1": float(Path("/proc/loadavg").read_text().split()[0])}
    if driver == "fuse":
        hist = [a - b for a, b in zip(m1["block_count_read"], m0["block_count_read"], strict=True)]
        out.update({"reads": sum(hist), "read_bytes": m1["data_read"] - m0["data_read"], "read_size_hist": hist})
    else:
        e0, e1 = b0["erofs"], b1["erofs"]
        out.update({"reads": e1["kernel_reads"] - e0["kernel_reads"],
                    "read_bytes": e1["kernel_read_bytes"] - e0["kernel_read_bytes"],
                    "backend_reads": e1["backend_reads"] - e0["backend_reads"],
                    **{k: e1[k] - e0.get(k, 0) for k in e1 if k.startswith(("decode_ahead", "released"))}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--code", default=str(REPO), help="comma-separated nydus_py trees, alternated")
    ap.add_argument("--drivers", default="fuse,erofs")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--workload", choices=["seq", "small"], default="seq",
                    help="seq: dd of the 100 MiB file; small: cat of every small file (bench_fusedev's list)")
    ap.add_argument("--tag", default="seq-read-probe")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("seq_read_probe needs root (mounts and drop_caches)")
    work = args.workdir
    tree = os.path.join(work, f"tree-{args.scale:g}")
    if not os.path.isdir(tree):
        generate(tree, args.scale)
    info = build_images(tree, work, "img-plain")
    codes = [os.path.abspath(c) for c in args.code.split(",")]
    if args.workload == "seq":
        workload = ["dd", f"if={BIG}", "of=/dev/null", "bs=1M", "status=none"]
    else:
        workload = ["xargs", "-0", "-a", small_files(tree, work, "plain")[1], "cat"]
    passes = []
    for k in range(args.passes):
        for driver in args.drivers.split(","):
            for code in codes:
                p = one_pass(code, driver, work, info, args.threads, workload)
                passes.append(p)
                extra = {k: v for k, v in p.items() if k.startswith(("decode_ahead", "released"))}
                print(f"pass {k} {driver:5s} {code:32s} {p['wall_ms']:7.1f} ms cpu {p['daemon_cpu_ms']:6.1f} ms "
                      f"minflt {p['minflt']:6d} reads {p['reads']:4d} ({p['read_bytes'] / max(1, p['reads']) / 1024:.0f} "
                      f"KiB avg) load {p['loadavg1']:.1f} {extra or ''}", flush=True)
    summary = {}
    for driver in args.drivers.split(","):
        for code in codes:
            ps = [p for p in passes if p["driver"] == driver and p["code"] == code]
            summary[f"{driver} {code}"] = {k: statistics.median(p[k] for p in ps)
                                           for k in ("wall_ms", "daemon_cpu_ms", "minflt", "reads")}
    print("\nmedians:")
    for k, v in summary.items():
        print(f"  {k:40s} wall {v['wall_ms']:7.1f} ms  cpu {v['daemon_cpu_ms']:6.1f} ms  minflt {v['minflt']:7.0f}  "
              f"reads {v['reads']:.0f}")
    path = save(args.tag, {"scale": args.scale, "threads": args.threads, "workload": args.workload, "passes": passes,
                           "summary": summary})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
