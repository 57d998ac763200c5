"""Build throughput and peak RSS: nydus-image-py create vs mkfs.erofs vs mksquashfs, one run.

Same generated tree for every builder, reps interleaved so machine noise hits all of them alike;
prints each builder's median wall time, MB/s and RSS, and the ratio to mkfs.erofs.
Goal (issue 2): nydus-image-py with zstd within 3x of mkfs.erofs's wall time.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from common import bar_plot, run_measured, save
from gen_tree import generate


def builders(tree: str, out: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "nydus-image-py zstd": [py, "-m", "nydus_py.cli.image", "create", "--bootstrap", f"{out}/boot",
                                "--blob-dir", f"{out}/blobs", "--compressor", "zstd", tree],
        "nydus-image-py none": [py, "-m", "nydus_py.cli.image", "create", "--bootstrap", f"{out}/boot",
                                "--blob-dir", f"{out}/blobs", "--compressor", "none", tree],
        "mkfs.erofs": ["mkfs.erofs", "-T0", "--chunksize=1048576", f"--blobdev={out}/blob.img", f"{out}/img.erofs", tree],
        "mkfs.erofs lz4hc": ["mkfs.erofs", "-T0", "-zlz4hc", f"{out}/img-lz4hc.erofs", tree],
        "mksquashfs zstd": ["mksquashfs", tree, f"{out}/img.sqfs", "-comp", "zstd", "-noappend", "-quiet"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="tree size (1.0 = ~1 GiB, ~20k files)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="nydus-bench-build-")
    tree = os.path.join(work, "tree")
    stats = generate(tree, args.scale) if not os.path.isdir(tree) else {}
    total = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(tree) for f in fs)
    results: dict[str, list[dict[str, float]]] = {}
    for rep in range(args.reps):
        names = list(builders(tree, "").keys())
        rot = names[rep % len(names):] + names[: rep % len(names)]
        for name in rot:
            out = os.path.join(work, "out")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(f"{out}/blobs")
            results.setdefault(name, []).append(run_measured(builders(tree, out)[name]))
    summary = {}
    base = statistics.median(r["wall_s"] for r in results["mkfs.erofs"])
    for name, runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        summary[name] = {
            "wall_s": wall,
            "mb_per_s": total / wall / 1e6,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "ratio_to_mkfs_erofs": wall / base,
        }
        print(f"{name:22s} {wall:7.2f} s  {total / wall / 1e6:7.1f} MB/s  rss {summary[name]['peak_rss_mib']:6.1f} MiB"
              f"  x{wall / base:.2f} of mkfs.erofs")
    goal = summary["nydus-image-py zstd"]["ratio_to_mkfs_erofs"] <= 3.0
    print(f"goal (zstd within 3x of mkfs.erofs): {'met' if goal else 'NOT met'}")
    save("build", {"tree": {"bytes": total, **stats}, "reps": args.reps, "summary": summary, "runs": results,
                   "goal_met": goal})
    bar_plot("build", f"Build wall time vs mkfs.erofs ({total / 1e6:.0f} MB)", list(summary),
             [v["ratio_to_mkfs_erofs"] for v in summary.values()], "x mkfs.erofs wall time")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
