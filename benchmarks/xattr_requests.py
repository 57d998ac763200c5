"""Which FUSE requests `ls -lR` and `ls -l DIR` send through `nydusd-py fuse` on bench_fusedev's
xattr tree (1% of files with an xattr), cold and warm: counted by opcode, GETXATTR also by name and
answer. The counts come from the daemon's debug log, which has one line per request, written
before the reply: once `ls` has returned, every request it caused is in the log.

Run as root: python3 benchmarks/xattr_requests.py --scale 0.1 --workdir DIR --tag NAME
"""

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

from bench_fusedev import REPO, FuseProcess, make_xattr_tree, write_config
from common import drop_caches, save
from gen_tree import generate

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory

_LINE = re.compile(r"FUSE (\w+) unique=\d+ .*? -> (.*?) \[")
_NAME = re.compile(r"name=b'([^']*)'")


def count(log_text: str) -> dict[str, object]:
    ops: collections.Counter[str] = collections.Counter()
    getx: collections.Counter[str] = collections.Counter()
    for line in log_text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        ops[m.group(1)] += 1
        if m.group(1) == "GETXATTR":
            name = _NAME.search(line)
            getx[f"{name.group(1) if name else '?'} -> {m.group(2)}"] += 1
    return {"requests": sum(ops.values()), "by_opcode": dict(ops), "getxattr": dict(getx)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--workdir", required=True, help="tree and image (shared with bench_fusedev's --workdir)")
    ap.add_argument("--tag", default="xattr-requests")
    args = ap.parse_args()
    work = args.workdir
    tree = os.path.join(work, f"tree-{args.scale:g}")
    if not os.path.isdir(tree):
        generate(tree, args.scale)
    xtree = os.path.join(work, f"tree-{args.scale:g}-xattr")
    make_xattr_tree(tree, xtree)
    img = os.path.join(work, "img-requests")
    boot, blobs = os.path.join(img, "boot"), os.path.join(img, "blobs")
    if not os.path.exists(boot):
        os.makedirs(blobs, exist_ok=True)
        build_image(tree_from_directory(xtree), boot, blobs, BuildOptions())
    entries = sum(len(ds) + len(fs) for _, ds, fs in os.walk(xtree))
    one_dir = max((d for d in os.scandir(xtree) if d.is_dir()), key=lambda d: len(os.listdir(d.path))).name
    mnt = os.path.join(work, "mnt-requests")
    os.makedirs(mnt, exist_ok=True)
    log = os.path.join(work, "nydusd-requests.log")
    Path(log).unlink(missing_ok=True)
    cfg = write_config(os.path.join(work, "nydusd-requests.json"), blobs)
    server = FuseProcess(mnt, log, [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--config", cfg,
                                    "--bootstrap", boot, "--mountpoint", mnt, "--log-level", "debug"])
    server.sigterm = True
    passes = [("ls -lR", "cold", ["ls", "-lR"]), ("ls -lR", "warm", ["ls", "-lR"]),
              ("ls -lR", "warm again", ["ls", "-lR"]), (f"ls -l {one_dir}", "warm", ["ls", "-l", one_dir]),
              (f"ls -l {one_dir}", "warm again", ["ls", "-l", one_dir])]
    results = []
    warm_getxattr = 0
    drop_caches()
    server.start()
    try:
        for what, temp, cmd in passes:
            mark = len(Path(log).read_text(errors="replace"))
            subprocess.run(cmd, cwd=mnt, check=True, stdout=subprocess.DEVNULL)
            c = count(Path(log).read_text(errors="replace")[mark:])
            results.append({"workload": what, "temp": temp, **c})
            getx, ops = c["getxattr"], c["by_opcode"]
            assert isinstance(getx, dict) and isinstance(ops, dict)
            if (what, temp) == ("ls -lR", "warm"):
                warm_getxattr = ops.get("GETXATTR", 0)
            print(f"{what:16s} {temp:10s} {c['requests']:6d} requests  {c['by_opcode']}")
            for k, v in sorted(getx.items()):
                print(f"{'':28s} GETXATTR {k}: {v}")
    finally:
        server.stop()
    per_file = warm_getxattr / entries
    print(f"{entries} entries; warm ls -lR: {per_file:.2f} GETXATTR round trips per entry")
    path = save(args.tag, {"scale": args.scale, "entries": entries, "one_dir": one_dir, "repo": str(REPO),
                           "warm_lsR_getxattr_per_entry": per_file, "passes": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
