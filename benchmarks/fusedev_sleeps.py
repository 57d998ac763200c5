"""Old against new `nydusd-py fuse`, alternated: per cold workload the wall time, the daemon's
CPU and how often its threads slept (voluntary context switches: each a read(2) or lock wait
that ends with a wake-up, which on a VM whose idle vCPUs halt is an IPI through the host).

Sleeps and CPU depend little on how loaded the shared machine is, where wall time does: they
say what a transport change did when wall times are noise. Also the requests the daemon
answered (its metrics), so CPU per request. `--io-uring` runs both daemons with `--io-uring`
(fuse.enable_uring=Y for the run, restored after); `--blobcache` serves through a blob cache
filled (warmed) by a first read of the same files, so the cold runs read ready chunks from it.
Run as root:

python3 benchmarks/fusedev_sleeps.py --workdir DIR --baseline /path/to/old/checkout --rounds 4
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench_fusedev import _fop_count, build_images, small_files, write_config
from common import api_get, drop_caches, fuse_uring_enabled, save
from fusedev_poll import REPO, Variant
from gen_tree import generate


def thread_sums(pid: int) -> tuple[int, int, int]:
    """(CPU ns, voluntary, involuntary context switches) summed over the threads alive now."""
    cpu = vol = invol = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{t}/status").read_text()
            cpu += int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0])
        except OSError:  # (a thread that ended meanwhile: ENOENT or ESRCH)
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                invol += int(line.split()[1])
    return cpu, vol, invol


def transport(apisock: str | None) -> str:
    """Which transport serves the daemon's mount (/api/v1/metrics/transport)."""
    assert apisock is not None
    return str(api_get(apisock, "/api/v1/metrics/transport")["transport"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--baseline", required=True, help="the old checkout (variant 'base')")
    ap.add_argument("--workloads", default="small,find,lsR")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--tag", default="fusedev-sleeps")
    ap.add_argument("--io-uring", action="store_true", help="both daemons with --io-uring")
    ap.add_argument("--blobcache", action="store_true", help="through a blob cache, warmed before each run")
    ap.add_argument("--extra", default="", help="more daemon flags for both variants (e.g. '--fuse-poll-us 0')")
    ap.add_argument("--new-extra", default="", help="more daemon flags for the new variant only (e.g. "
                    "'--io-uring' with --baseline this checkout: io_uring against /dev/fuse)")
    args = ap.parse_args()
    with fuse_uring_enabled(args.io_uring or "--io-uring" in args.new_extra.split()):
        run(args)


def run(args: argparse.Namespace) -> None:
    tree = os.path.join(args.workdir, f"tree-{args.scale:g}")
    if not os.path.isdir(tree):
        generate(tree, args.scale)
    info = build_images(tree, args.workdir, "img-plain")
    _, small_list = small_files(tree, args.workdir, "plain")
    cfg = write_config(os.path.join(args.workdir, "nydusd-sleeps.json"), str(info["blobs"]))
    cache_dir = os.path.join(args.workdir, "sleeps-cache")
    if args.blobcache:
        cfg = os.path.join(args.workdir, "nydusd-sleeps-cache.json")
        Path(cfg).write_text(json.dumps({
            "device": {"backend": {"type": "localfs", "config": {"dir": str(info["blobs"])}},
                       "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True}))
    extra = (["--io-uring"] if args.io_uring else []) + args.extra.split()
    cmds = {"small": ["xargs", "-0", "-a", small_list, "cat"], "find": ["find", ".", "-type", "f"], "lsR": ["ls", "-lR"]}
    variants = [("base", args.baseline), ("new", str(REPO))]
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    for w in args.workloads.split(","):
        for r in range(args.rounds):
            for label, repo in (variants if r % 2 == 0 else variants[::-1]):
                mnt = os.path.join(args.workdir, f"mnt-sleeps-{label}")
                os.makedirs(mnt, exist_ok=True)
                v = Variant(label, repo, extra + (args.new_extra.split() if label == "new" else []), mnt, str(info["boot"]), cfg, os.path.join(args.workdir, f"sleeps-{label}.log"),
                            args.threads, os.path.join(args.workdir, f"sleeps-{label}.sock"))
                if args.blobcache:  # a cache of its own, filled by reading the files once
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    v.start()
                    try:
                        subprocess.run(cmds["small"], cwd=v.root, stdout=subprocess.DEVNULL, check=True)
                    finally:
                        v.stop()
                drop_caches()
                v.start()
                assert v.proc is not None
                try:
                    if "--io-uring" in v.cmd and transport(v.apisock) != "fuse_io_uring":
                        # (fuse.enable_uring is host-wide: another run may have set it back meanwhile)
                        raise RuntimeError(f"{label}: io_uring fell back to /dev/fuse reads; see {v.log}")
                    a = thread_sums(v.proc.pid)
                    n0 = _fop_count(v.apisock)
                    t = time.perf_counter()
                    subprocess.run(cmds[w], cwd=v.root, stdout=subprocess.DEVNULL, check=True)
                    wall = time.perf_counter() - t
                    b = thread_sums(v.proc.pid)
                    n = _fop_count(v.apisock) - n0
                finally:
                    v.stop()
                raw.setdefault(w, {}).setdefault(label, []).append(
                    {"wall_ms": wall * 1e3, "daemon_cpu_ms": (b[0] - a[0]) / 1e6, "sleeps": b[1] - a[1],
                     "preempted": b[2] - a[2], "requests": n, "cpu_us_per_request": (b[0] - a[0]) / 1e3 / max(1, n),
                     "wall_us_per_request": wall * 1e6 / max(1, n), "loadavg1": os.getloadavg()[0]})
        for label, runs in raw[w].items():
            med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            print(f"{w:6s} {label:5s} wall {med['wall_ms']:6.0f} ms  daemon CPU {med['daemon_cpu_ms']:6.0f} ms  "
                  f"sleeps {med['sleeps']:6.0f}  preempted {med['preempted']:5.0f}  requests {med['requests']:5.0f}  "
                  f"CPU/request {med['cpu_us_per_request']:5.1f} us  wall/request {med['wall_us_per_request']:5.1f} us  "
                  f"load {med['loadavg1']:.1f}", flush=True)
    path = save(args.tag, {"baseline": args.baseline, "rounds": args.rounds, "io_uring": args.io_uring,
                           "blobcache": args.blobcache, "raw": raw})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
