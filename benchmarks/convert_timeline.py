"""Where a `nydusify-py convert` spends its wall time: the main steps' start and end, in ms since
the process started (interpreter start-up and imports included), with the thread that ran them,
and the garbage collector's share.

Run it in place of `python3 -m nydus_py.cli.nydusify` (same arguments):

    python3 -P benchmarks/convert_timeline.py convert --source ... --target ... [--build-cache REF]

The timeline goes to stderr after the conversion's own output. With `--rebuild-rig DIR` instead
of arguments, it makes the `bench_convert.py --build-cache` case once in DIR (two 514 MiB images
that differ in their last layer, the first converted with a build cache, the target registry's
storage kept) and then times rebuilds of the second against a fresh copy of that target, one
per `--runs`, alternating with `--baseline DIR`'s code when given:

    python3 benchmarks/convert_timeline.py --rebuild-rig /tmp/rig [--runs 3] [--baseline /work/wt/base]

(issue 14, h58: how a --build-cache rebuild's ~0.8 s was spent before and after its changes).
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_CLK = os.sysconf("SC_CLK_TCK")


def _process_start() -> float:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / _CLK


_START = _process_start()
_EVENTS: list[str] = []
_GC_N = [0, 0, 0]  # collections per generation (after the imports)
_GC_MS = [0.0, 0.0, 0.0]
_GC_T = [0.0]  # start of the collection running


def _now() -> float:
    return (time.clock_gettime(time.CLOCK_BOOTTIME) - _START) * 1000


def _event(text: str) -> None:
    _EVENTS.append(f"{_now():8.1f}  {threading.current_thread().name[:20]:20}  {text}")


def _wrap(owner: Any, name: str, label: str) -> None:
    """Log entry and exit (with the duration) of `owner.name`, a function or a coroutine."""
    f = getattr(owner, name)
    w: Any
    if inspect.iscoroutinefunction(f):
        @functools.wraps(f)
        async def w(*a: Any, **k: Any) -> Any:
            t = _now()
            _event(f"> {label}")
            try:
                return await f(*a, **k)
            finally:
                _event(f"< {label} ({_now() - t:.1f})")
    else:
        @functools.wraps(f)
        def w(*a: Any, **k: Any) -> Any:
            t = _now()
            _event(f"> {label}")
            try:
                return f(*a, **k)
            finally:
                _event(f"< {label} ({_now() - t:.1f})")
    if isinstance(inspect.getattr_static(owner, name), staticmethod):
        w = staticmethod(w)
    setattr(owner, name, w)


def _gc_callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _GC_T[0] = time.perf_counter()
    else:
        g = info["generation"]
        _GC_N[g] += 1
        _GC_MS[g] += (time.perf_counter() - _GC_T[0]) * 1000


def timed_main(argv: list[str]) -> int:
    """`nydusify-py` with its main steps logged; the timeline on stderr at the end."""
    _event("interpreter up")
    from nydus_py.cli import nydusify
    from nydus_py.convert import converter, stack

    _event("imports done")
    for n in ("_convert_one", "_cache_hits", "_cached_layer", "_prepare_layer", "_commit_layer", "_cache_record",
              "_push_rest", "_push_cache", "_push_cache_content", "_push_streamed", "_fetch"):
        if hasattr(converter.Converter, n):  # (a --baseline tree may lack some)
            _wrap(converter.Converter, n, n)
    for n in ("resolve_sources", "load_cache", "_bootstrap_layer"):
        _wrap(converter, n, n)
    for n in ("finish", "merge_committed", "add_cached_layer", "write_layer_bootstrap"):
        _wrap(stack.LayerStack, n, "stack." + n)
    if os.environ.get("CONVERT_TIMELINE_PUSHES"):  # each registry call of the push (many lines)
        from nydus_py.storage.registry.transfer import ImageTransfer

        _wrap(converter.Converter, "_push_file", "_push_file")
        for n in ("blob_exists", "push_blob", "push_manifest", "push_blob_file"):
            _wrap(ImageTransfer, n, "registry." + n)
    gc.callbacks.append(_gc_callback)
    try:
        return nydusify.main(argv)
    finally:
        _event("main returned")
        print("\n".join(_EVENTS), file=sys.stderr)
        print(f"gc after the imports: collections per generation {_GC_N}, ms {[round(x, 1) for x in _GC_MS]}",
              file=sys.stderr)


# -- the rebuild rig ---------------------------------------------------------------------------------


def _rig(args: Any) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_convert as bc
    from tests.storage import registry_rig as rr

    work = Path(args.rebuild_rig)
    registry, skopeo = shutil.which("docker-registry"), shutil.which("skopeo")
    if not registry or not skopeo:
        raise SystemExit("needs docker-registry and skopeo (scripts/install.sh)")

    def start(name: str) -> Any:
        log = work / name / "registry.log"
        if log.exists():  # (a restarted registry logs "listening" again: the rig reads the first)
            log.unlink()
        return rr.Registry(registry, work, name).start()

    def cmd(tree: str, src: str, dst: str, tag: str, out: Path, timeline: bool) -> list[str]:
        head = [sys.executable, "-P", __file__] if timeline else [sys.executable, "-P", "-m", "nydus_py.cli.nydusify"]
        return [*head, "convert", "-q", "--source", f"{src}/bench/app:{tag}", "--target", f"{dst}/bench/app:{tag}-nydus",
                "--source-insecure", "--target-insecure", "--work-dir", str(work / "tmp"), "--output-json", str(out),
                "--build-cache", f"{dst}/bench/app:cache"]

    def env(tree: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": tree, "DOCKER_CONFIG": str(work / "no-docker-config")}

    repo = str(Path(__file__).resolve().parents[1])
    if not (work / "first.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        comp, files = bc.make_layout(work / "layout", 514, 5)
        bc.make_layout(work / "layout2", 514, 5, last_seed=99)
        src = start("src")
        for lay, tag in (("layout", "v1"), ("layout2", "v2")):
            subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--preserve-digests",
                            "--dest-tls-verify=false", f"oci:{work / lay}:v1", f"docker://{src.host}/bench/app:{tag}"],
                           check=True)
        dst = start("dst0")
        try:
            subprocess.run(cmd(repo, src.host, dst.host, "v1", work / "first.json", False), env=env(repo), check=True)
        finally:
            dst.stop()
            src.stop()
    for tree in [repo, *([args.baseline] if args.baseline else [])]:
        bc.compile_package(Path(tree))
    walls: dict[str, list[float]] = {}
    for r in range(args.runs):
        for tree in [repo, *([args.baseline] if args.baseline else [])]:
            src = start("src")
            name = f"dst-{r}"
            shutil.rmtree(work / name, ignore_errors=True)
            shutil.copytree(work / "dst0" / "data", work / name / "data")
            dst = start(name)
            try:
                t = time.perf_counter()
                p = subprocess.run(cmd(tree, src.host, dst.host, "v2", work / "rebuild.json", True), env=env(tree),
                                   capture_output=True, text=True, check=True)
                wall = time.perf_counter() - t
            finally:
                dst.stop()
                src.stop()
                shutil.rmtree(work / name, ignore_errors=True)
            res = json.loads((work / "rebuild.json").read_text())
            walls.setdefault(tree, []).append(wall)
            print(f"== run {r + 1}, {tree}: wall {wall:.3f} s, manifest {res['manifest_digest'][:19]}, "
                  f"{res['layers_built']} built, {res['layers_cached']} cached (load {os.getloadavg()[0]:.1f})")
            print(p.stderr.rstrip())
    for tree, w in walls.items():
        print(f"{tree}: rebuild wall median {statistics.median(w):.3f} s, best {min(w):.3f} s over {len(w)} runs")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rebuild-rig":
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("--rebuild-rig", required=True)
        ap.add_argument("--runs", type=int, default=3)
        ap.add_argument("--baseline")
        sys.exit(_rig(ap.parse_args()))
    sys.exit(timed_main(sys.argv[1:]))
