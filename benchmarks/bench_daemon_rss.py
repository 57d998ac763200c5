"""Daemon RSS serving a flat 100k-file image, per --fs-driver, side by side in one run.

Issue 10's goal: with the kernel EROFS driver, metadata no longer walks through Python, so the
daemon's RSS after a full walk of a 100k-file image should stay at its idle size (<= 30 MiB).
The image (files of 0..63 bytes, 1000 per directory; RAFS v6, built by us) is served by
`nydusd-py fuse` with each driver in turn; a cold `ls -lR` and a read of every 97th file run
against each, and the daemon's VmRSS / VmHWM are read from /proc before and after. For scale,
the bare interpreter with the daemon's modules imported is measured too.

    python3 benchmarks/bench_daemon_rss.py [--files 100000] [--save]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_load import build_flat_tree
from common import bar_plot, drop_caches, save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.transport.mount import is_mountpoint  # noqa: E402

RSS_GOAL_MIB = 30.0
DRIVERS = ("fusedev", "erofs")


def vm(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


def build(work: str, files: int) -> tuple[str, str]:
    tree, boot, blobs = os.path.join(work, "tree"), os.path.join(work, "image.boot"), os.path.join(work, "blobs")
    build_flat_tree(tree, files)
    os.makedirs(blobs)
    subprocess.run([sys.executable, "-m", "nydus_py.cli.image", "create", "--bootstrap", boot, "--blob-dir", blobs,
                    tree], check=True, cwd=str(REPO), stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return boot, blobs


def serve(work: str, boot: str, blobs: str, driver: str, files: int) -> dict[str, float]:
    mnt = os.path.join(work, f"mnt-{driver}")
    os.makedirs(mnt, exist_ok=True)
    cfg = os.path.join(work, "config.json")
    Path(cfg).write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": blobs}}},
                                     "mode": "direct", "digest_validate": False}))
    log = os.path.join(work, f"nydusd-{driver}.log")
    drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--fs-driver", driver,
                             "--config", cfg, "--bootstrap", boot, "--mountpoint", mnt, "--log-level", "warn",
                             "--log-file", log], cwd=str(REPO))
    try:
        deadline = time.monotonic() + 60
        while not (is_mountpoint(mnt) and os.path.isdir(os.path.join(mnt, "d0000"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{driver}: no mount; see {log}")
            time.sleep(0.01)
        mounted = time.perf_counter() - t0
        idle = vm(proc.pid)
        t = time.perf_counter()
        subprocess.run(["ls", "-lR"], cwd=mnt, check=True, stdout=subprocess.DEVNULL)
        lsr = time.perf_counter() - t
        walked = vm(proc.pid)
        nread = 0
        for i in range(0, files, 97):
            with open(os.path.join(mnt, f"d{i // 1000:04d}", f"file{i:06d}"), "rb") as f:
                nread += len(f.read())
        after = vm(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if is_mountpoint(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)
    return {"mount_s": mounted, "rss_idle_mib": idle["VmRSS"], "rss_after_lsR_mib": walked["VmRSS"],
            "lsR_s": lsr, "rss_after_reads_mib": after["VmRSS"], "peak_rss_mib": after["VmHWM"],
            "bytes_read": nread}


def bare_interpreter() -> float:
    """VmRSS of a Python that imported the daemon's entry module and nothing else."""
    code = ("import nydus_py.cli.daemon, sys\n"
            "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0] / 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=str(REPO))
    return float(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--save", action="store_true", help="keep results as benchmarks/results/daemon_rss.{json,png}")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="nydus-bench-rss-")
    try:
        boot, blobs = build(work, args.files)
        res: dict[str, object] = {"files": args.files, "bootstrap_bytes": os.path.getsize(boot),
                                  "bare_interpreter_mib": bare_interpreter()}
        for driver in DRIVERS:
            res[driver] = serve(work, boot, blobs, driver, args.files)
        erofs = res["erofs"]
        assert isinstance(erofs, dict)
        res["goal"] = {"erofs rss after ls -lR <= MiB": RSS_GOAL_MIB,
                       "met": erofs["rss_after_lsR_mib"] <= RSS_GOAL_MIB}
        print(json.dumps(res, indent=2))
        if args.save:
            save("daemon_rss", res)
            labels = [f"{d} {k}" for d in DRIVERS for k in ("idle", "after ls -lR")]
            values = [res[d][k] for d in DRIVERS for k in ("rss_idle_mib", "rss_after_lsR_mib")]  # type: ignore[index]
            bar_plot("daemon_rss", f"nydusd-py RSS serving a {args.files}-file image", labels, values, "MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
