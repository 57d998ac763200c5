"""What a layer of many small files costs against one of big files, in the conversion's build.

Two 64 MiB layer tars (half random, half text, as bench_convert's files): one of small files
(1-7 KiB, about 16k of them), one of a few big ones (8-16 MiB). Each is handed to
`LayerStack.prepare_layer` through a `TarPipe` from a feeder thread, as `nydusify-py convert`
hands an inflating download to its build (one chunk worker per layer, zstd, the default chunk
size), then committed. Reported per layer: wall time of prepare + commit, CPU, and microseconds
per tar entry. With `--baseline DIR` each repetition also runs DIR's nydus_py right after this
tree's (old and new alternate; each in its own process: `python3 -P`).

    python3 benchmarks/bench_layer_files.py [--reps 3] [--baseline /work/main] [--save-as NAME]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
TEXT = b"".join(b"%08d the quick brown fox jumps over the lazy dog; config=value\n" % i for i in range(2000))

ONE_RUN = r"""
import json, os, shutil, sys, tempfile, threading, time
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import TarPipe
from nydus_py.convert.stack import LayerStack
from nydus_py.rafs.constants import Compressor
path, work = sys.argv[1], sys.argv[2]
pipe = TarPipe()
def feed():
    with open(path, "rb") as f:
        while piece := f.read(256 << 10):
            pipe.feed(piece)
    pipe.close()
d = tempfile.mkdtemp(dir=work)
stack = LayerStack(BuildOptions(compressor=Compressor.ZSTD), d, workers=1, durable=False)
threading.Thread(target=feed, daemon=True).start()
t0, c0 = time.perf_counter(), time.process_time()
prepared = stack.prepare_layer(None, growth=pipe)
res = stack.commit_layer(prepared)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
shutil.rmtree(d)
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "entries": prepared.entries,
                  "blob": res.blob.blob_id if res.blob else None}))
"""


def make_layer(path: Path, kind: str) -> None:
    rng = random.Random(5)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        total = n = 0
        while total < (64 << 20):
            size = rng.randint(1 << 10, 7 << 10) if kind == "small" else rng.randint(8 << 20, 16 << 20)
            reps = TEXT * (2 + size // len(TEXT))
            off = rng.randrange(len(TEXT))
            data = rng.randbytes(size // 2) + reps[off:off + size - size // 2]
            ti = tarfile.TarInfo(f"d{n // 100:04d}/f{n:06d}")
            ti.size, ti.mtime, ti.mode = len(data), 1_700_000_000, 0o644
            t.addfile(ti, io.BytesIO(data))
            total += size
            n += 1


def run(tree: Path, layer: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-P", "-c", ONE_RUN, str(layer), str(WORK)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", metavar="DIR")
    ap.add_argument("--save-as", metavar="NAME", default="layer-files")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    trees = [("new", REPO)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        layers = {kind: Path(tmp) / f"{kind}.tar" for kind in ("small", "large")}
        for kind, path in layers.items():
            make_layer(path, kind)
        for rep in range(args.reps):
            for kind, path in layers.items():
                blobs = set()
                for name, tree in trees:  # old and new alternate
                    m = run(tree, path)
                    m["load"] = os.getloadavg()[0]
                    blobs.add(m.pop("blob"))
                    results.setdefault(name, {}).setdefault(kind, []).append(m)
                    print(f"rep {rep + 1} {kind:5s} {name:8s}: {m['wall_s']:.3f}s (CPU {m['cpu_s']:.3f}s), "
                          f"{m['entries']:.0f} entries, {m['wall_s'] / m['entries'] * 1e6:.1f} us/entry "
                          f"(load {m['load']:.1f})")
                if len(blobs) != 1:
                    raise SystemExit(f"{kind}: the trees wrote different blobs: {sorted(map(str, blobs))}")
    summary = {name: {kind: sorted(m["wall_s"] for m in ms)[len(ms) // 2] for kind, ms in kinds.items()}
               for name, kinds in results.items()}
    for name, kinds in summary.items():
        print(f"{name}: median small {kinds['small']:.3f}s, large {kinds['large']:.3f}s "
              f"(small / large {kinds['small'] / kinds['large']:.1f}x)")
    sys.path.insert(0, str(REPO))
    from benchmarks.common import save

    print(f"wrote {save(args.save_as, {'runs': results, 'median_wall_s': summary, 'load': os.getloadavg()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
