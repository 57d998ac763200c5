"""Conversion throughput and peak RSS: `nydusify-py convert` against `skopeo copy` of the same image.

An OCI image of --size-mib MiB in --layers gzip layers (large, medium and small files, half random
and half text, plus some files repeated in a later layer) is written as an OCI layout and pushed by
skopeo to a loopback docker-registry (the source). Then, each run against a fresh target registry:

  * `nydusify-py convert`: pull every layer, unpack, build one RAFS blob per layer + bootstrap,
    push the Nydus image;
  * `skopeo copy docker://SRC docker://DST`: the cost of a plain pull + push of the same image.

Measured: wall time, the process's peak RSS (VmHWM, polled), and throughput in MiB/s of the source
image (compressed) and of its file data. Child processes of a conversion, if any,
are reported apart: `helpers_peak_rss_mib` sums their peaks. Results: benchmarks/results/convert.{json,png}.

With `--build-cache`, the rebuild case instead: a second image equal to the first but for its last
layer; the first image is converted with `--build-cache` (filling the cache), then the second
(only its last layer converted, the others mounted from the cache). Reported: both wall times and
their ratio (goal <= 0.3). Results: benchmarks/results/convert-build-cache.json.

With `--baseline DIR` (a checkout of other code, e.g. `git worktree add /tmp/base main`), each
run also converts with DIR's nydus_py, right after this tree's: old and new alternate in the same
time window (the machine's load moves both alike), and the results carry both; the manifest
digests of both must be equal in each run (the output is byte for byte the same), else it fails.
With `--upload-mbit N`, the target registry sits behind a proxy that reads request bodies at N
Mbit/s (an upload link as to a remote registry; skopeo's pushes go through it too).
With `--format-changed` (the two trees write different bytes on purpose), each tree's digests
must instead be equal across its own runs (the output stays deterministic).
(The conversions run `python3 -P`: without it `-m` puts the working directory first on sys.path,
and a run from a checkout converted with that checkout's code for both trees.)
`--save-as NAME` writes benchmarks/results/NAME.json instead (no plot).
On a machine others share, `chrt -r 10 python3 benchmarks/bench_convert.py ...` (root) runs it,
the registries it starts and the conversions ahead of the other work: spreads of 0.1-0.4 s
between runs instead of 1-3 s (h45-*-rt results).

    python3 benchmarks/bench_convert.py [--size-mib 500] [--layers 5] [--runs 2] [--keep] [--build-cache]
                                        [--baseline DIR] [--save-as NAME]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import grouped_bar_plot, save  # noqa: E402
from tests.storage import registry_rig as rig  # noqa: E402
from tests.storage.fault_proxy import FaultProxy  # noqa: E402

TEXT = b"".join(b"%08d the quick brown fox jumps over the lazy dog; config=value\n" % i for i in range(20000))
MTIME = 1_700_000_000


def content(rng: random.Random, size: int) -> bytes:
    half = size // 2
    reps = TEXT * (2 + (size - half) // len(TEXT))
    off = rng.randrange(len(TEXT))
    return rng.randbytes(half) + reps[off:off + size - half]


def layer_files(rng: random.Random, budget: int, idx: int) -> list[tuple[str, int]]:
    """(path, size) adding up to about `budget` bytes: 60% large, 30% medium, 10% small files."""
    out: list[tuple[str, int]] = []
    for share, lo, hi, kind in ((0.6, 8 << 20, 32 << 20, "large"), (0.3, 256 << 10, 2 << 20, "medium"),
                                (0.1, 1 << 10, 16 << 10, "small")):
        left = int(budget * share)
        n = 0
        while left > 0:
            size = min(left, rng.randint(lo, hi))
            out.append((f"l{idx}/{kind}/{n // 100:03d}/f{n:05d}", size))
            left -= size
            n += 1
    return out


def write_layer(path: Path, files: list[tuple[str, bytes]]) -> tuple[str, str, int]:
    """gzip tar layer at `path`; returns (digest, diff_id, size)."""
    tar_hash = hashlib.sha256()

    class Tee(io.RawIOBase):
        def __init__(self, gz: gzip.GzipFile) -> None:
            self.gz = gz

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            tar_hash.update(b)
            self.gz.write(b)
            return len(b)

    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        tee = Tee(gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            dirs: set[str] = set()
            for name, data in files:
                parts = name.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in dirs:
                        dirs.add(d)
                        ti = tarfile.TarInfo(d)
                        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
                        tar.addfile(ti)
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
                tar.addfile(ti, io.BytesIO(data))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest(), "sha256:" + tar_hash.hexdigest(), path.stat().st_size


def make_layout(root: Path, size_mib: int, layers: int, seed: int = 1, last_seed: int | None = None) -> tuple[int, int]:
    """OCI layout with tag `v1`; returns (compressed bytes, file bytes). With `last_seed`, the
    last layer's content comes from that seed (the layers below are the same as without it)."""
    rng = random.Random(seed)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    budget = (size_mib << 20) // layers
    descs, diff_ids = [], []
    file_bytes = 0
    carried: list[tuple[str, bytes]] = []
    for i in range(layers):
        if i == layers - 1 and last_seed is not None:
            rng = random.Random(last_seed)
        files = [(p, content(rng, s)) for p, s in layer_files(rng, budget, i)]
        files += [(f"l{i}/dup/{p.rsplit('/', 1)[1]}", d) for p, d in carried]  # repeated content: dedup
        carried = [f for f in files if "/medium/" in f[0]][:3]
        file_bytes += sum(len(d) for _, d in files)
        tmp = root / f"layer{i}.tar.gz"
        digest, diff_id, size = write_layer(tmp, files)
        os.replace(tmp, blobs / digest[7:])
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
        diff_ids.append(diff_id)
        del files
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    (blobs / hashlib.sha256(config).hexdigest()).write_bytes(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
                           "layers": descs}).encode()
    (blobs / hashlib.sha256(manifest).hexdigest()).write_bytes(manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(), "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    return sum(d["size"] for d in descs), file_bytes


def run_polled(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time and peak RSS of `cmd`, the peak read from /proc/PID/status VmHWM every 20 ms.

    (wait4's ru_maxrss would not do here: Linux carries the parent's RSS high-water mark over
    fork+exec, so a child of this harness - which holds an image's worth of generated data - would
    report at least the harness's size.)"""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = 0
    status = f"/proc/{proc.pid}/status"
    helpers: dict[int, int] = {}  # child processes: pid -> their peak
    names: dict[int, str] = {}
    while proc.poll() is None:
        hwm = max(hwm, _hwm(status))
        kids = children(proc.pid)
        for k in kids:
            if k not in helpers:
                try:
                    with open(f"/proc/{k}/cmdline", "rb") as f:
                        names[k] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
                except OSError:
                    pass
            helpers[k] = max(helpers.get(k, 0), _hwm(f"/proc/{k}/status"))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err[-2000:]}")
    # the children's peaks summed (an upper bound of theirs at any one time)
    return {"wall_s": wall, "peak_rss_mib": hwm / 1024, "helpers_peak_rss_mib": sum(helpers.values()) / 1024,
            "helpers": len(helpers), "helper_cmds": sorted(set(names.values()))}  # type: ignore[dict-item]


def children(pid: int) -> list[int]:
    """The child processes of every thread of `pid` (a child started by a thread is listed
    under that thread's task only)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def _hwm(status: str) -> int:
    """VmHWM (KiB) from a /proc/PID/status; 0 when the process is gone."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def compile_package(root: Path = REPO) -> None:
    """Byte-compile nydus_py as `pip install` does: with PYTHONDONTWRITEBYTECODE set (as in our
    sandboxes) every run would otherwise compile its ~150 modules from source, ~0.1 s of start-up
    that an installed package never pays (skopeo, beside it, is a compiled binary)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "nydus_py")], check=True,
                   stdout=subprocess.DEVNULL)


def code_trees(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(suffix of the result names, source tree): this tree, then the baseline if given."""
    return [("", REPO)] + ([(" (baseline)", Path(args.baseline).resolve())] if args.baseline else [])


class Target:
    """A target registry, behind a proxy that reads request bodies at --upload-mbit when set (an
    upload link slower than loopback, as to a remote registry; Location headers point through it)."""

    def __init__(self, dst: rig.Registry, upload_mbit: float) -> None:
        self.dst = dst
        self.proxy = FaultProxy(dst.url, match=lambda _m, _p: False, forwarded_host=True,
                                upload_bandwidth=upload_mbit * 1e6 / 8) if upload_mbit else None
        self.host = self.proxy.host if self.proxy is not None else dst.host

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.dst.stop()
        shutil.rmtree(self.dst.dir, ignore_errors=True)


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """`run_polled` plus the CPU seconds the process used (user + system, once reaped)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    got = run_polled(cmd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    got["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return got


def plot(payload: dict) -> None:
    labels = ["wall time (s)", "peak RSS (MiB)", "throughput (MiB/s of image)", "throughput (MiB/s of files)"]
    series = {name: [m["wall_s"], m["peak_rss_mib"], m["mib_per_s_compressed"], m["mib_per_s_files"]]
              for name, m in payload["best"].items()}
    grouped_bar_plot("convert", f"{payload['compressed_bytes'] / 2**20:.0f} MiB gzip image "
                     f"({payload['file_bytes'] / 2**20:.0f} MiB files, {payload['layers']} layers): "
                     "nydusify-py convert vs skopeo copy", labels, series, "best of runs (log scale)", log=True)


def build_cache_case(args: argparse.Namespace, registry: str, skopeo: str, work: Path) -> int:
    """First conversion with --build-cache, then the image with one changed layer."""
    compressed, file_bytes = make_layout(work / "layout", args.size_mib, args.layers)
    make_layout(work / "layout2", args.size_mib, args.layers, last_seed=99)
    print(f"images: {args.layers} layers, {compressed / 2**20:.0f} MiB gzip, {file_bytes / 2**20:.0f} MiB files; "
          "the second differs in its last layer")
    src = rig.plain_registry(registry, work)
    try:
        for layout, tag in (("layout", "v1"), ("layout2", "v2")):
            subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--preserve-digests",
                            "--dest-tls-verify=false", f"oci:{work / layout}:v1", f"docker://{src.host}/bench/app:{tag}"],
                           check=True)
        runs: list[dict[str, float]] = []
        baseline_runs: list[dict[str, float]] = []
        digests: dict[tuple[int, str], set[str]] = {}  # (run, case) -> manifest digests of the trees
        for r, (suffix, tree) in ((r, t) for r in range(args.runs) for t in code_trees(args)):  # old, new alternate
            env = {**os.environ, "PYTHONPATH": str(tree), "DOCKER_CONFIG": str(work / "no-docker-config")}
            m: dict[str, float] = {}
            for tag, name in (("v1", "plain"), ("v1", "first"), ("v2", "rebuild")):
                if name != "rebuild":  # the plain and the first conversion each into an empty registry
                    dst = Target(rig.Registry(registry, work, f"dst-{name}-{r}{'-b' if suffix else ''}").start(),
                                 args.upload_mbit)
                out = work / f"result-{r}-{name}.json"
                cmd = [sys.executable, "-P", "-m", "nydus_py.cli.nydusify", "convert", "-q", "--source",
                       f"{src.host}/bench/app:{tag}", "--target", f"{dst.host}/bench/app:{tag}-nydus",
                       "--source-insecure", "--target-insecure", "--work-dir", str(work / "tmp"),
                       "--output-json", str(out)]
                if name != "plain":
                    cmd += ["--build-cache", f"{dst.host}/bench/app:cache"]
                try:
                    got = timed(cmd, env)
                    m[f"{name}_cpu_s"] = got["cpu_s"]
                    res = json.loads(out.read_text())
                    m[f"{name}_wall_s"] = got["wall_s"]
                    m[f"{name}_peak_rss_mib"] = got["peak_rss_mib"]
                    m[f"{name}_layers_built"] = res["layers_built"]
                    key = (-1, name + suffix) if args.format_changed else (r, name)
                    digests.setdefault(key, set()).add(res["manifest_digest"])
                    if len(digests.get(key, ())) > 1:
                        raise SystemExit(f"run {r + 1} {name}: manifest digests differ: {sorted(digests[key])}")
                    m[f"{name}_layers_cached"] = res["layers_cached"]
                    m[f"{name}_blobs_streamed"] = res.get("stream_push", {}).get("streamed", 0)
                finally:
                    if name != "first":
                        dst.stop()
            m["ratio"] = m["rebuild_wall_s"] / m["first_wall_s"]
            m["ratio_to_plain"] = m["rebuild_wall_s"] / m["plain_wall_s"]
            m["cpu_ratio"] = m["rebuild_cpu_s"] / m["first_cpu_s"]  # steadier than wall time on a busy machine
            m["load"] = os.getloadavg()[0]
            (baseline_runs if suffix else runs).append(m)
            print(f"run {r + 1}{suffix}: plain {m['plain_wall_s']:.2f}s, first with the cache {m['first_wall_s']:.2f}s "
                  f"({m['first_layers_built']:.0f} layers converted), rebuild {m['rebuild_wall_s']:.2f}s "
                  f"({m['rebuild_layers_built']:.0f} converted, {m['rebuild_layers_cached']:.0f} from the cache, "
                  f"{m['rebuild_blobs_streamed']:.0f} blob pushed while written): "
                  f"{m['ratio']:.2f}x the first, {m['ratio_to_plain']:.2f}x the plain conversion; CPU "
                  f"{m['rebuild_cpu_s']:.2f}s vs {m['first_cpu_s']:.2f}s: {m['cpu_ratio']:.2f}x (load {m['load']:.1f})")
        best = min(runs, key=lambda m: m["ratio"])
        median = sorted(m["ratio"] for m in runs)[len(runs) // 2]
        print(f"ratio rebuild/first: best {best['ratio']:.2f}, median {median:.2f} (load {os.getloadavg()[0]:.1f})")
        payload = {"median_ratio": median,"size_mib": args.size_mib, "layers": args.layers, "compressed_bytes": compressed,
                   "file_bytes": file_bytes, "cpus": os.cpu_count(), "runs": runs, "best": best,
                   "load": os.getloadavg()}
        if baseline_runs:
            payload["baseline"] = {"tree": str(Path(args.baseline).resolve()), "runs": baseline_runs,
                                   "median_ratio": sorted(m["ratio"] for m in baseline_runs)[len(baseline_runs) // 2]}
            print(f"baseline ratio rebuild/first: median {payload['baseline']['median_ratio']:.2f}")
        print(f"wrote {save(args.save_as or 'convert-build-cache', payload)}")
    finally:
        src.stop()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=500)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build-cache", action="store_true", help="the --build-cache rebuild case (one changed layer)")
    ap.add_argument("--baseline", metavar="DIR", help="a source tree whose nydus_py also converts in each run (A/B)")
    ap.add_argument("--save-as", metavar="NAME", help="results in benchmarks/results/NAME.json (no plot)")
    ap.add_argument("--upload-mbit", type=float, default=0.0,
                    help="the target registry behind a proxy reading uploads at this rate (0: loopback)")
    ap.add_argument("--format-changed", action="store_true",
                    help="with --baseline: the trees' outputs differ on purpose (each must be deterministic)")
    args = ap.parse_args()
    registry = shutil.which("docker-registry")
    skopeo = shutil.which("skopeo")
    if not registry or not skopeo:
        raise SystemExit("needs docker-registry and skopeo (scripts/install.sh)")
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=REPO / "benchmarks" / "work"))
    src = None
    for _, tree in code_trees(args):
        compile_package(tree)
    if args.build_cache:
        try:
            return build_cache_case(args, registry, skopeo, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        compressed, file_bytes = make_layout(work / "layout", args.size_mib, args.layers)
        print(f"image: {args.layers} layers, {compressed / 2**20:.0f} MiB gzip, {file_bytes / 2**20:.0f} MiB files "
              f"(made in {time.perf_counter() - t0:.1f}s)")
        src = rig.plain_registry(registry, work)
        subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                        f"oci:{work / 'layout'}:v1", f"docker://{src.host}/bench/app:v1"], check=True)
        trees = {f"nydusify-py convert{suffix}": tree for suffix, tree in code_trees(args)}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*trees, "skopeo copy"]}
        digests: set[str] = set()  # the manifest digests of every conversion: one
        per_tree: dict[str, set[str]] = {}  # with --format-changed: one per tree
        for r in range(args.runs):
            for name in runs:
                dst = Target(rig.Registry(registry, work,
                                          f"dst-{name.split()[0]}-{r}{'-b' if 'baseline' in name else ''}").start(),
                             args.upload_mbit)
                env = {**os.environ, "PYTHONPATH": str(trees.get(name, REPO)),
                       "DOCKER_CONFIG": str(work / "no-docker-config")}
                try:
                    if name == "skopeo copy":
                        cmd = [skopeo, "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                               "--dest-tls-verify=false", f"docker://{src.host}/bench/app:v1",
                               f"docker://{dst.host}/bench/app:v1"]
                    else:
                        cmd = [sys.executable, "-P", "-m", "nydus_py.cli.nydusify", "convert", "-q", "--source",
                               f"{src.host}/bench/app:v1", "--target", f"{dst.host}/bench/app:v1-nydus",
                               "--source-insecure", "--target-insecure", "--work-dir", str(work / "tmp"),
                               "--output-json", str(work / "result.json")]
                    m = timed(cmd, env)
                    m["load"] = os.getloadavg()[0]
                    if name != "skopeo copy" and args.format_changed:
                        per_tree.setdefault(name, set()).add(json.loads((work / "result.json").read_text())["manifest_digest"])
                        if len(per_tree[name]) > 1:
                            raise SystemExit(f"run {r + 1}: {name}'s manifest digests differ: {sorted(per_tree[name])}")
                        digests |= per_tree[name]
                    elif name != "skopeo copy":
                        digests.add(json.loads((work / "result.json").read_text())["manifest_digest"])
                        if len(digests) > 1:
                            raise SystemExit(f"run {r + 1}: manifest digests differ between the trees: {sorted(digests)}")
                finally:
                    dst.stop()
                m["mib_per_s_compressed"] = compressed / 2**20 / m["wall_s"]
                m["mib_per_s_files"] = file_bytes / 2**20 / m["wall_s"]
                runs[name].append(m)
                print(f"run {r + 1} {name}: {m['wall_s']:.2f}s (CPU {m['cpu_s']:.2f}s), peak RSS "
                      f"{m['peak_rss_mib']:.0f} MiB (+{m['helpers']:.0f} helpers {m['helpers_peak_rss_mib']:.0f} MiB), {m['mib_per_s_compressed']:.0f} MiB/s of image (load {m['load']:.1f})")
        best = {name: min(v, key=lambda m: m["wall_s"]) for name, v in runs.items()}
        for name in trees:
            ratios = sorted(a["wall_s"] / b["wall_s"] for a, b in zip(runs[name], runs["skopeo copy"], strict=True))
            print(f"{name}: median {ratios[len(ratios) // 2]:.2f}x skopeo copy's wall time (same run)")
        ratios = {name: sorted(a["wall_s"] / b["wall_s"] for a, b in zip(runs[name], runs["skopeo copy"], strict=True))
                  for name in trees}
        payload = {"size_mib": args.size_mib, "layers": args.layers, "compressed_bytes": compressed,
                   "file_bytes": file_bytes, "cpus": os.cpu_count(), "runs": runs, "best": best,
                   "median_ratio_to_skopeo": {name: r[len(r) // 2] for name, r in ratios.items()},
                   "manifest_digests": sorted(digests), "load": os.getloadavg()}
        path = save(args.save_as or "convert", payload)
        if args.save_as:
            print(f"wrote {path}")
        else:
            plot(payload)
            print(f"wrote {path} and convert.png")
    finally:
        if src is not None:
            src.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
