"""Start-up to RUNNING of `nydusd-py` for a 100k-file image, as the snapshotter sees it.

Dedicated daemon (`fuse --config --bootstrap --mountpoint --apisock`): time from exec until the API
socket appears (the daemon is RUNNING and mounted at that moment) and until the first
`GET /api/v1/daemon` answers RUNNING; the snapshotter allows 10 s, Kata Go about 4 s. Shared daemon:
exec to RUNNING with no image, then `POST /api/v1/mount` of the same image. Median of --runs.
With --image: `nydusd-py fuse --image REF` of a realistic 3-layer ~9k-entry image in a loopback
registry, from exec to the mount and to the end of a first command (bench_image_start.py), the
issue 12 goal being <= 0.45 s; saved as startup-image.json (+ .png).
Results: benchmarks/results/startup.json (+ .png). Needs root and /dev/fuse.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_load import build_flat_tree  # noqa: E402
from common import bar_plot, save  # noqa: E402

from tests.daemon.rig import Api  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def wait_for(cond, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.002)


def running(api: Api) -> bool:
    try:
        return api.get("/api/v1/daemon").json()["state"] == "RUNNING"
    except (ConnectionError, OSError):
        return False


def one_start(argv: list[str], sock: str, mnt: str, mount_body: dict | None = None) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nydus_py.cli.daemon", *argv], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = Api(sock)
    try:
        wait_for(lambda: os.path.exists(sock))
        t_sock = time.perf_counter() - t0
        wait_for(lambda: running(api))
        out = {"socket_s": t_sock, "running_s": time.perf_counter() - t0}
        if mount_body is not None:
            t1 = time.perf_counter()
            r = api.request("POST", "/api/v1/mount", {"mountpoint": "/img"}, mount_body)
            assert r.status == 204, r.body
            out["mount_s"] = time.perf_counter() - t1
            os.stat(os.path.join(mnt, "img", "d0000", "file000001"))
        return out
    finally:
        api.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def image_main(args: argparse.Namespace) -> None:
    from bench_image_start import run

    res = run(args.entries, args.runs)
    for v in ("plain", "table"):
        print(res[v].pop("last_log"))
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "raw"} if isinstance(v, dict) else v)
                      for k, v in res.items()}, indent=2))
    name = args.save_as or "startup-image"
    save(name, res)
    labels, values = [], []
    for v in ("plain", "table"):
        labels += [f"{v}: mount", f"{v}: first command"]
        values += [res[v]["mount_s"], res[v]["first_command_s"]]
    bar_plot(name, f"nydusd-py fuse --image, {res['entries']} entries, 3 layers (median of {args.runs})", labels,
             values, "seconds from exec")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", action="store_true", help="the image-by-reference start-up instead (see above)")
    ap.add_argument("--entries", type=int, default=9000, help="with --image: entries of the image")
    ap.add_argument("--save-as", default="", help="results name (default startup / startup-image)")
    args = ap.parse_args()
    if args.image:
        image_main(args)
        return
    work = tempfile.mkdtemp(prefix="nydus-bench-startup-")
    try:
        tree = os.path.join(work, "tree")
        build_flat_tree(tree, args.files)
        boot = os.path.join(work, "image.boot")
        blobs = os.path.join(work, "blobs")
        os.makedirs(blobs)
        subprocess.run([sys.executable, "-m", "nydus_py.cli.image", "create", "--bootstrap", boot, "--blob-dir",
                        blobs, tree], check=True, stdout=subprocess.DEVNULL)
        cfg_text = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": blobs}}},
                               "mode": "direct"})
        cfg = os.path.join(work, "config.json")
        Path(cfg).write_text(cfg_text)
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt)
        sockdir = os.path.join(work, "sock")
        os.makedirs(sockdir, mode=0o700)
        sock = os.path.join(sockdir, "api.sock")
        dedicated = [one_start(["fuse", "--config", cfg, "--bootstrap", boot, "--mountpoint", mnt, "--apisock",
                                sock, "--log-level", "warn"], sock, mnt) for _ in range(args.runs)]
        shared = [one_start(["fuse", "--mountpoint", mnt, "--apisock", sock, "--log-level", "warn"], sock, mnt,
                            {"fs_type": "rafs", "source": boot, "config": cfg_text}) for _ in range(args.runs)]
        med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
        res = {
            "files": args.files, "runs": args.runs, "bootstrap_bytes": os.path.getsize(boot),
            "dedicated_exec_to_socket_s": med(dedicated, "socket_s"),
            "dedicated_exec_to_running_s": med(dedicated, "running_s"),
            "shared_exec_to_running_s": med(shared, "running_s"),
            "shared_mount_api_s": med(shared, "mount_s"),
            "budget_s": {"kata_go": 4.0, "snapshotter": 10.0},
            "raw": {"dedicated": dedicated, "shared": shared},
        }
        print(json.dumps({k: v for k, v in res.items() if k != "raw"}, indent=2))
        save("startup", res)
        bar_plot("startup", f"nydusd-py start-up, {args.files}-file image (median of {args.runs})",
                 ["dedicated: socket", "dedicated: RUNNING", "shared: RUNNING", "shared: POST mount"],
                 [res["dedicated_exec_to_socket_s"], res["dedicated_exec_to_running_s"],
                  res["shared_exec_to_running_s"], res["shared_mount_api_s"]], "seconds")
    finally:
        subprocess.run(["umount", "-l", os.path.join(work, "mnt")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
