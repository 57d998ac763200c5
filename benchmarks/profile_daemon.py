"""py-spy profile of `nydusd-py fuse` serving cold bench_fusedev workloads (samples holding the GIL).

Each pass: drop_caches, mount, run the workload, unmount; py-spy samples the daemon (all
threads, idle ones left out) for the whole run. Prints where the daemon's CPU went, by function
(self time) and by a few layers (inclusive), and keeps the collapsed stacks.

`--io-uring` profiles `nydusd-py fuse --io-uring` (fuse.enable_uring=Y for the run, restored).

Run as root: python3 benchmarks/profile_daemon.py --workdir DIR --workload small --passes 3
"""

import argparse
import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench_fusedev import NydusPy, build_images, small_files, write_config
from common import drop_caches, fuse_uring_enabled, save

LAYERS = {  # a frame's file path fragment -> layer
    "transport/fusedev.py": "transport (read/write /dev/fuse, hand-offs)",
    "transport/fuse_uring.py": "transport (io_uring ring loop)",
    "transport/io_uring.py": "io_uring ring (ctypes enter, SQE/CQE)",
    "fuse/uring.py": "ring entry codec (assemble, place reply)",
    "fuse/protocol.py": "fuse protocol (decode, dispatch, pack)",
    "metrics/": "metrics observer",
    "vfs/": "vfs routing",
    "fs/rafs_fs.py": "rafs filesystem",
    "rafs/": "rafs image decoding",
    "storage/": "storage (chunks, cache, backend)",
}


def summarize(stacks: Path) -> dict[str, object]:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames, _, n = line.rpartition(" ")
        if not frames:
            continue
        count = int(n)
        total += count
        parts = frames.split(";")
        self_t[parts[-1]] += count
        seen = set()
        for f in parts:
            for frag, layer in LAYERS.items():
                if frag in f and layer not in seen:
                    seen.add(layer)
                    incl[layer] += count
    return {"samples": total,
            "top_self": [(f, round(100 * c / total, 1)) for f, c in self_t.most_common(25)],
            "layers_inclusive_pct": {k: round(100 * v / total, 1) for k, v in incl.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--workload", choices=["small", "find"], default="small")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--tag", default="")
    ap.add_argument("--gil", action=argparse.BooleanOptionalAction, default=True,
                    help="only samples holding the GIL (Python work; without it, threads in read/write(2) and "
                         "runnable ones waiting for a CPU are sampled too)")
    ap.add_argument("--io-uring", action="store_true", help="profile the daemon with --io-uring")
    args = ap.parse_args()
    with fuse_uring_enabled(args.io_uring):
        run(args)


def run(args: argparse.Namespace) -> None:
    tree = os.path.join(args.workdir, f"tree-{args.scale:g}")
    info = build_images(tree, args.workdir, "img-plain")
    _, small_list = small_files(tree, args.workdir, "plain")
    cmd = ["xargs", "-0", "-a", small_list, "cat"] if args.workload == "small" else ["find", ".", "-type", "f"]
    mnt = os.path.join(args.workdir, "mnt-prof")
    os.makedirs(mnt, exist_ok=True)
    cfg = write_config(os.path.join(args.workdir, "nydusd-prof.json"), str(info["blobs"]))
    server = NydusPy(mnt, str(info["boot"]), cfg, os.path.join(args.workdir, "nydusd-prof.log"), 4)
    if args.io_uring:
        server.cmd.append("--io-uring")
    tag = args.tag or f"profile-{args.workload}"
    out = Path(args.workdir) / f"{tag}.stacks"
    raw: list[str] = []
    for _ in range(args.passes):
        drop_caches()
        server.start()
        assert server.proc is not None
        part = out.with_suffix(".part")
        spy = subprocess.Popen(["py-spy", "record", "-p", str(server.proc.pid), "-r", "2000", "-f", "raw", "-o",
                                str(part), "--nonblocking", *(["--gil"] if args.gil else [])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            subprocess.run(["sleep", "1"], check=True)  # py-spy attaches
            subprocess.run(cmd, cwd=mnt, check=True, stdout=subprocess.DEVNULL)
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            server.stop()
        raw.append(part.read_text())
    out.write_text("".join(raw))
    res = summarize(out)
    print(f"{res['samples']} samples")
    for k, v in res["layers_inclusive_pct"].items():  # type: ignore[union-attr]
        print(f"  {v:5.1f}%  {k}")
    for f, pct in res["top_self"]:  # type: ignore[union-attr]
        print(f"  self {pct:5.1f}%  {f}")
    path = save(tag, {"workload": args.workload, "passes": args.passes, "gil_only": args.gil, "stacks": str(out), **res})
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
