"""Bootstrap load time and RSS for a 100k-file image (v6 built by us; v5 fixture for contrast).

Loading must not build a Python object per inode: the RSS growth after open should stay small and
flat in the number of files, and the load time near-constant. Each measurement runs in a fresh
interpreter so RSS is not polluted by the build.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from common import bar_plot, save

PROBE = r"""
import json, os, sys, time, resource
def rss():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
before = rss()
t0 = time.perf_counter()
from nydus_py.rafs import open_bootstrap
img = open_bootstrap(sys.argv[1])
root = img.getattr(img.root_ino)
t_load = time.perf_counter() - t0
after_load = rss()
t1 = time.perf_counter()
n = sum(1 for _ in img.walk())
t_walk = time.perf_counter() - t1
print(json.dumps({"load_s": t_load, "rss_before_mib": before, "rss_after_load_mib": after_load,
                  "walk_s": t_walk, "walked": n, "rss_after_walk_mib": rss()}))
"""


def build_flat_tree(root: str, files: int) -> None:
    per_dir = 1000
    for i in range(files):
        d = os.path.join(root, f"d{i // per_dir:04d}")
        if i % per_dir == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"file{i:06d}"), "wb") as f:
            f.write(b"x" * (i % 64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=100_000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="nydus-bench-load-")
    try:
        tree = os.path.join(work, "tree")
        build_flat_tree(tree, args.files)
        boot = os.path.join(work, "image.boot")
        os.makedirs(os.path.join(work, "blobs"))
        subprocess.run([sys.executable, "-m", "nydus_py.cli.image", "create", "--bootstrap", boot,
                        "--blob-dir", os.path.join(work, "blobs"), tree], check=True)
        out = subprocess.run([sys.executable, "-c", PROBE, boot], check=True, capture_output=True, text=True)
        res = json.loads(out.stdout)
        res["files"] = args.files
        res["bootstrap_bytes"] = os.path.getsize(boot)
        res["rss_growth_load_mib"] = res["rss_after_load_mib"] - res["rss_before_mib"]
        print(json.dumps(res, indent=2))
        save("load", res)
        bar_plot("load", f"RSS for a {args.files}-file v6 image", ["before", "after load", "after walk"],
                 [res["rss_before_mib"], res["rss_after_load_mib"], res["rss_after_walk_mib"]], "MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
