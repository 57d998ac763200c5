"""What each fusedev fast-path setting is worth: leave-one-out runs on the bench_fusedev tree.

The server runs in this process (FuseDevSession + FuseSession + RafsFilesystem, no daemon
around it) so each setting can be switched off alone: zero-message open/opendir, sequential
chunk readahead, writev replies from chunk views, 1 MiB bdi readahead, leader/follower workers.
Configurations take turns within each rep. Reports medians in ms (GETATTR: µs per stat with
attr_timeout 0) and the change against "all on". Needs root and a tree + image made by
bench_fusedev.py --workdir DIR (pass the same DIR).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import drop_caches, save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.fs.rafs_fs import RafsFilesystem  # noqa: E402
from nydus_py.fuse.abi import InitFlags  # noqa: E402
from nydus_py.fuse.api import DEFAULT_WANT  # noqa: E402
from nydus_py.fuse.protocol import FuseSession  # noqa: E402
from nydus_py.rafs import open_bootstrap  # noqa: E402
from nydus_py.storage.device import BlobDevice  # noqa: E402
from nydus_py.storage.localfs import LocalBlobDir  # noqa: E402
from nydus_py.transport.fusedev import FuseDevSession  # noqa: E402

BIG = "opt/models/bigfile_100m.bin"
SETTINGS = ("no_open", "readahead", "vectored", "bdi_1m", "leader_follower")
STAT_LOOP = """
import os, statistics, sys, time
p = sys.argv[1]
os.stat(p)
per = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(1000):
        os.stat(p)
    per.append((time.perf_counter() - t) / 1000 * 1e6)
print(statistics.median(per))
"""


class PlainOpenFs(RafsFilesystem):
    """RafsFilesystem that keeps OPEN/OPENDIR/RELEASE round trips (the "no_open off" case)."""

    def init(self, capable: InitFlags) -> InitFlags:
        return DEFAULT_WANT


class CopyingFs(RafsFilesystem):
    """Hands out a copy of the data, as before the zero-copy path."""

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:  # type: ignore[override]
        return bytes(super().read(ino, fh, offset, size))


class Server:
    def __init__(self, info: dict, mnt: str, on: set[str], threads: int, attr_timeout: float = 86400.0) -> None:
        self.image = open_bootstrap(info["boot"])
        self.source = LocalBlobDir(info["blobs"])
        cls: type[RafsFilesystem] = RafsFilesystem
        if "no_open" not in on:
            cls = PlainOpenFs
        if "vectored" not in on:
            cls = type("PlainCopyFs", (CopyingFs, cls), {}) if cls is PlainOpenFs else CopyingFs
        self.fs = cls(self.image, BlobDevice(self.image, self.source, validate=False), attr_timeout=attr_timeout,
                      readahead_chunks=4 if "readahead" in on else 0)
        session = FuseSession(self.fs)
        handler = session.handle_vectored if "vectored" in on else session.handle
        self.dev = FuseDevSession(handler, mnt, threads=threads, readahead_kb=1024 if "bdi_1m" in on else 0,
                                  leader_follower="leader_follower" in on)
        self.dev.mount()

    def close(self) -> None:
        self.dev.close()
        self.fs.close()
        self.image.close()
        self.source.close()


def timed(cmd: list[str], cwd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t) * 1e3


def one(info: dict, mnt: str, on: set[str], threads: int, small_list: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, cmd in (("seq cold", ["dd", f"if={BIG}", "of=/dev/null", "bs=1M", "status=none"]),
                      ("small cold", ["xargs", "-0", "-a", small_list, "cat"]),
                      ("lsR cold", ["ls", "-lR"])):
        drop_caches()
        s = Server(info, mnt, on, threads)
        try:
            out[name] = timed(cmd, mnt)
            warm = name.replace("cold", "warm")
            out[warm] = timed(cmd, mnt)
        finally:
            s.close()
    s = Server(info, mnt, on, threads, attr_timeout=0.0)
    try:
        r = subprocess.run([sys.executable, "-c", STAT_LOOP, os.path.join(mnt, BIG)], check=True,
                           capture_output=True, text=True)
        out["getattr us"] = float(r.stdout)
    finally:
        s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="bench_fusedev.py --workdir (tree + images)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    info = json.loads((Path(args.workdir) / "img" / "done.json").read_text())
    small_list = str(Path(args.workdir) / "small.list")
    mnt = os.path.realpath(os.path.join(args.workdir, "mnt-ablation"))
    os.makedirs(mnt, exist_ok=True)
    configs = {"all on": set(SETTINGS), **{f"no {s}": set(SETTINGS) - {s} for s in SETTINGS}, "all off": set()}
    raw: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    for rep in range(args.reps):
        names = list(configs)
        for c in names[rep % len(names):] + names[: rep % len(names)]:
            raw[c].append(one(info, mnt, configs[c], args.threads, small_list))
            print(f"  rep {rep} {c:20s} " + " ".join(f"{k} {v:.0f}" for k, v in raw[c][-1].items()), flush=True)
    keys = list(raw["all on"][0])
    med = {c: {k: statistics.median(r[k] for r in runs) for k in keys} for c, runs in raw.items()}
    print(f"\nmedians of {args.reps} reps (ms; getattr in us per stat); change vs 'all on'")
    print(f"{'config':20s}" + "".join(f"{k:>16s}" for k in keys))
    for c in configs:
        cells = []
        for k in keys:
            v, base = med[c][k], med["all on"][k]
            cells.append(f"{v:9.0f}" + (f" {v / base - 1:+5.0%}" if c != "all on" else "      "))
        print(f"{c:20s}" + "".join(f"{x:>16s}" for x in cells))
    save("fusedev_ablation", {"reps": args.reps, "threads": args.threads, "medians": med, "raw": raw})


if __name__ == "__main__":
    main()
