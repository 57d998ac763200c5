"""Lazy start from a registry against a full pull, side by side on the same loopback registry.

An image of --size-mib MiB in --layers layers (small, medium and large files, half random and
half text) is built three times from the same trees: as a Nydus image built as is ("plain": one
RAFS blob per layer and a merged bootstrap), as a Nydus image built with the "startup set" as
prefetch files ("ordered": `nydus-image create --prefetch-files`, so those files sit first and
contiguous in each layer's blob, in reading order, and the bootstrap's prefetch table lists them),
and as an OCI image (gzip tar layers). The startup set, files totalling --startup-pct percent of
the data (the Slacker figure, 6.4 %), is read from a `nydusd-py fuse` mount with a registry
backend and an empty blobcache. Measured:

  (a) mount-to-first-byte: daemon start to the first byte of a startup file
  (b) time to read the whole startup set lazily, per variant: plain image on demand (1 and 8
      readers), plain image with the set as --prefetch-files, ordered image on demand (cross-file
      amplification), and ordered image with fs_prefetch from its prefetch table (the main one)
  (c) full pull + unpack of the OCI image: `skopeo copy` then `tar -xzf` of every layer
  (d) bytes fetched from the registry against bytes read (backend metrics)
  (f) clustered_1_reader(_prefetch_all): a second startup set of the same byte share made of runs
      of files that sit together in the tree (a run of consecutive files of a random directory, in
      tree order; runs in random order), as an application start reads a package's modules or a
      set of shared libraries; plain image, no hints, one reader
  (g) beside each no_hints_1_reader* result, the best time any lazy reader could reach on that run
      (`bound_s`, `bound_speedup`: read and from daemon start; benchmarks/lazy_bound.py derives it):
      from the run's network, the plain image's blob bytes, the set's file count, the run's mount
      time and the measured latency of one small ranged GET (`bound_inputs`, the median of a few)
  (e) whole_tree_1_reader: every file of the plain image read by one reader in readdir order (as
      `tar -c` does), no hints: lazy time over the full pull's (`whole_over_pull`, lower is
      better) and bytes fetched over the blobs' bytes (`fetched_over_blob`); `bytes_by_mode` says
      how the bytes came (on demand, adaptive fetching's streams, prefetch)

once straight against the registry and once through a proxy adding --latency-ms per request and
a shared --bandwidth-mbit link. Every lazy variant runs with each --fs-driver (fusedev, and erofs:
the kernel EROFS driver over the daemon's lazy blob views; names prefixed `erofs_`). Results:
benchmarks/results/<--save-as, default lazy_registry>.{json,png}.

    python3 benchmarks/bench_lazy_registry.py [--size-mib 500] [--merging-mib 2] [--keep]

A/B of two daemons: BENCH_DAEMON_REPO=<other checkout> runs that checkout's nydusd-py (the rest,
images and sets included, stays this one's); alternate the two in one shell loop, same rounds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, drop_caches, grouped_bar_plot, save  # noqa: E402
from benchmarks.lazy_bound import bounds  # noqa: E402
from nydus_py.builder.build import build_image  # noqa: E402
from nydus_py.builder.merge import merge_layers, tree_from_image  # noqa: E402
from nydus_py.builder.options import BuildOptions  # noqa: E402
from nydus_py.builder.sources import tree_from_directory  # noqa: E402
from nydus_py.rafs import open_bootstrap  # noqa: E402
from nydus_py.storage.registry import RegistryBackend, parse_registry_config  # noqa: E402
from nydus_py.transport.mount import is_mountpoint  # noqa: E402
from tests.storage import images  # noqa: E402
from tests.storage import registry_rig as rig  # noqa: E402
from tests.storage.fault_proxy import FaultProxy  # noqa: E402

HUGE = 8 << 20  # files over this are left out of the startup sets (ordinary files, not the huge ones)
TEXT = b"".join(b"%08d the quick brown fox jumps over the lazy dog; config=value\n" % i for i in range(20000))


def content(rng: random.Random, size: int) -> bytes:
    half = size // 2
    reps = TEXT * (2 + (size - half) // len(TEXT))
    off = rng.randrange(len(TEXT))
    return rng.randbytes(half) + reps[off:off + size - half]


def make_layers(root: Path, total: int, layers: int, seed: int) -> dict[str, int]:
    """Layer directories root/l<i>; returns image path -> size of every regular file."""
    rng = random.Random(seed)
    files: dict[str, int] = {}
    per = total // layers
    for li in range(layers):
        d = root / f"l{li}"
        left = per
        sizes = [24 << 20] * (1 if per >= 64 << 20 else 0)
        sizes += [rng.randrange(1 << 20, 4 << 20) for _ in range(max(1, per // (12 << 20)))]
        left -= sum(sizes)
        while left > 0:  # the rest in small files
            s = min(left, rng.randrange(1 << 10, 48 << 10))
            sizes.append(s)
            left -= s
        for k, s in enumerate(sizes):
            rel = f"layer{li}/{'big' if s >= 1 << 20 else f'd{k % 40:02d}'}/f{k:05d}"
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content(rng, s))
            files[rel] = s
    return files


def random_set(files: dict[str, int], share: float, rng: random.Random) -> list[str]:
    """Files in random order until `share` of the bytes (the huge files over 8 MiB left out)."""
    total = sum(files.values())
    order = sorted(files)
    rng.shuffle(order)
    startup, acc = [], 0
    for rel in order:
        if acc >= total * share:
            break
        if files[rel] > HUGE:
            continue
        startup.append(rel)
        acc += files[rel]
    return startup


def clustered_set(files: dict[str, int], share: float, rng: random.Random,
                  run_files: tuple[int, int] = (4, 16)) -> list[list[str]]:
    """Runs of files that sit together in the tree, until `share` of the bytes: each run is a
    random start in a random directory (each directory once) and up to `run_files` of its next
    files in tree (name) order, the order the image stores and lists them; runs in random order.
    That is what an application start reads (a package's modules, a set of shared libraries),
    unlike `random_set`, which no daemon can predict. Files over 8 MiB are left out as there."""
    total = sum(files.values())
    dirs: dict[str, list[str]] = {}
    for rel in sorted(files):
        if files[rel] <= HUGE:
            dirs.setdefault(rel.rsplit("/", 1)[0], []).append(rel)
    names = sorted(dirs)
    rng.shuffle(names)
    runs, acc = [], 0
    for d in names:
        if acc >= total * share:
            break
        members = dirs[d]
        start = rng.randrange(len(members))
        run = []
        for rel in members[start:start + rng.randint(*run_files)]:
            if acc >= total * share:
                break
            run.append(rel)
            acc += files[rel]
        runs.append(run)
    return runs


def probe_network(host: str, repo: str, boot: Path, rounds: int = 7) -> dict[str, float]:
    """On-demand latency of one small ranged GET (the median of `rounds`, after one that sets up
    the connection and the token) and the throughput of one whole-blob GET, through `host`."""
    cfg = parse_registry_config(images.registry_config(host, repo, timeout=60), env={}, docker_config_paths=[])
    with open_bootstrap(str(boot)) as img:
        blobs = list(img.blobs)
    rng = random.Random(7)
    with RegistryBackend(cfg) as b:
        b.read(blobs[0], 0, 4096)
        lat = []
        for _ in range(rounds):
            blob = rng.choice(blobs)
            off = rng.randrange(max(1, blob.compressed_size - 16384))
            t = time.perf_counter()
            b.read(blob, off, 16384)
            lat.append(time.perf_counter() - t)
        lat.sort()
        big = max(blobs, key=lambda x: x.compressed_size)
        t = time.perf_counter()
        n = len(b.read(big, 0, big.compressed_size))
        whole = time.perf_counter() - t
    median = lat[len(lat) // 2]
    return {"get_latency_s": median, "get_latency_samples_s": lat,  # type: ignore[dict-item]
            "whole_blob_bytes": n, "whole_blob_s": whole,
            "measured_bandwidth_Bps": n / max(whole - median, 1e-6)}


def build_nydus(root: Path, layers: int, out: Path,
                prefetch: list[str] | None = None) -> tuple[Path, Path, list[str], float]:
    """One blob per layer: each layer is built on top of the previous bootstrap. With `prefetch`
    (image paths, in reading order) every layer is built with those of its files as prefetch
    files (`nydus-image create --prefetch-files`): they go first and contiguous in the layer's
    blob, in that order, and the final bootstrap's prefetch table lists them all."""
    blob_dir = out / "blobs"
    blob_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    boot = None
    for li in range(layers):
        tree = tree_from_directory(root / f"l{li}")
        if boot is not None:
            with open_bootstrap(str(boot)) as parent:
                tree = merge_layers([tree_from_image(parent, str(blob_dir)), tree])
        nb = out / f"boot{li}"
        # the files of this layer and the ones below (all in the merged tree)
        paths = [f"/{rel}".encode() for rel in prefetch or [] if int(rel.split("/")[0][5:]) <= li]
        build_image(tree, str(nb), str(blob_dir), BuildOptions(prefetch_paths=paths))
        boot = nb
    assert boot is not None
    with open_bootstrap(str(boot)) as img:
        ids = [b.blob_id for b in img.blobs]
    return boot, blob_dir, ids, time.perf_counter() - t


def build_oci_layers(root: Path, layers: int, out: Path) -> list[tuple[Path, str]]:
    """gzip tar per layer (`tar | gzip -6`); returns (file, diff_id)."""
    out.mkdir(parents=True, exist_ok=True)
    res = []
    for li in range(layers):
        tar_path = out / f"layer{li}.tar"
        subprocess.run(["tar", "-C", str(root / f"l{li}"), "--sort=name", "--mtime=@0", "--owner=0", "--group=0",
                        "-cf", str(tar_path), "."], check=True)
        h = hashlib.sha256()
        with open(tar_path, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        subprocess.run(["gzip", "-6", "-n", "-f", str(tar_path)], check=True)
        res.append((out / f"layer{li}.tar.gz", "sha256:" + h.hexdigest()))
    return res


def push_oci(b: RegistryBackend, layers: list[tuple[Path, str]], tag: str) -> None:
    descs = []
    for path, _diff in layers:
        data = path.read_bytes()
        digest = b.push_blob(data)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest,
                      "size": len(data)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [d for _p, d in layers]}}).encode()
    cd = b.push_blob(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": images.MANIFEST_MEDIA,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                                      "size": len(config)}, "layers": descs}).encode()
    b.push_manifest(tag, manifest, images.MANIFEST_MEDIA)


def push_nydus(b: RegistryBackend, boot: Path, blob_dir: Path, ids: list[str], tag: str) -> None:
    descs = []
    for bid in ids:
        data = (blob_dir / bid).read_bytes()
        descs.append({"mediaType": images.BLOB_MEDIA, "digest": b.push_blob(data), "size": len(data),
                      "annotations": {"containerd.io/snapshot/nydus-blob": "true"}})
    layer = images.bootstrap_layer(boot.read_bytes())
    descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": b.push_blob(layer),
                  "size": len(layer), "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true"}})
    config = b"{}"
    cd = b.push_blob(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": images.MANIFEST_MEDIA,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                                      "size": len(config)}, "layers": descs}).encode()
    b.push_manifest(tag, manifest, images.MANIFEST_MEDIA)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


def api_get(sock: str, path: str) -> dict:
    c = UnixHTTP(sock)
    try:
        c.request("GET", path)
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def read_file(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(1 << 20):
            n += len(b)
    return n


def read_tree(root: Path) -> int:
    """Every regular file under `root`, one after another in readdir order (as `tar -c` reads)."""
    n = 0
    for d, _dirs, names in os.walk(root):
        for name in names:
            p = Path(d) / name
            if p.is_file() and not p.is_symlink():
                n += read_file(p)
    return n


def lazy_run(work: Path, boot: Path, host: str, startup: list[str], threads: int, *, repo: str = "bench/nydus",
             prefetch: str = "none", merging_size: int = 4 << 20, prefetch_threads: int = 8,
             amplify_io: int = 1 << 20, driver: str = "fusedev", whole: bool = False) -> dict[str, object]:
    """Mount with an empty cache (`driver`: nydusd-py's --fs-driver), read the startup set with
    `threads` readers (`whole`: every file of the tree instead, one reader); times and bytes.

    prefetch: "none" (on-demand only), "list" (the startup set given as --prefetch-files),
    "table" (fs_prefetch from the bootstrap's prefetch table, the image built with the startup
    set as prefetch files) or "all" (background completion of every blob, `prefetch_all`, as the
    snapshotter's default config has it, but with no bandwidth cap: the best a reader without hints
    can get from fetching ahead). Prefetch runs with `prefetch_threads` workers and reads of up to
    `merging_size` bytes."""
    run = work / f"lazy-{driver}-{host.replace(':', '_')}-{threads}-{prefetch}-{repo.replace('/', '_')}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="nyb"))  # AF_UNIX paths are short
    mnt, sock = run / "mnt", str(sock_dir / "api.sock")
    mnt.mkdir()
    extra: dict[str, object] = {"amplify_io": amplify_io}
    argv_pf: list[str] = []
    if prefetch != "none":
        extra["fs_prefetch"] = {"enable": True, "prefetch_all": prefetch == "all",
                                "threads_count": prefetch_threads, "merging_size": merging_size}
    if prefetch == "list":
        (run / "prefetch.list").write_text("".join(f"/{rel}\n" for rel in startup))
        argv_pf = ["--prefetch-files", str(run / "prefetch.list")]
    cfg = images.nydusd_config(images.registry_config(host, repo, timeout=30, read_deadline=120),
                               str(run / "cache"), **extra)
    (run / "config.json").write_text(json.dumps(cfg))
    drop_caches()
    daemon_repo = os.environ.get("BENCH_DAEMON_REPO", str(REPO))  # A/B: the daemon of another checkout
    env = {**images.env_without_auth(), "PYTHONPATH": daemon_repo}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--config", str(run / "config.json"),
                             "--bootstrap", str(boot), "--mountpoint", str(mnt), "--apisock", sock,
                             "--thread-num", "8", "--log-level", os.environ.get("BENCH_LOG_LEVEL", "warn"), "--log-file", str(run / "nydusd.log"),
                             "--fs-driver", driver, *argv_pf],
                            env=env, cwd=daemon_repo)
    try:
        while not (is_mountpoint(str(mnt)) and os.path.exists(sock)):
            if proc.poll() is not None or time.perf_counter() - t0 > 60:
                raise RuntimeError((run / "nydusd.log").read_text()[-3000:])
            time.sleep(0.005)
        t_mount = time.perf_counter()
        with open(mnt / startup[0], "rb", buffering=0) as f:
            assert f.read(1)
        t_first = time.perf_counter()
        t1 = time.perf_counter()
        if whole:
            nread = read_tree(mnt)
        elif threads == 1:
            nread = sum(read_file(mnt / rel) for rel in startup)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads) as ex:
                nread = sum(ex.map(lambda rel: read_file(mnt / rel), startup))
        t_done = time.perf_counter()
        backend = api_get(sock, "/api/v1/metrics/backend")
        cache = api_get(sock, "/api/v1/metrics/blobcache")
    finally:
        clean_exit = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # not part of what is measured: note it and go on
            clean_exit = False
            proc.kill()
            proc.wait(30)
        if is_mountpoint(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    if not clean_exit:
        print(f"warning: the daemon did not stop within 30 s of SIGTERM (killed); log tail:\n"
              f"{(run / 'nydusd.log').read_text(errors='replace')[-1500:]}", flush=True)
    shutil.rmtree(run / "cache", ignore_errors=True)
    shutil.rmtree(sock_dir, ignore_errors=True)
    return {"mount_s": t_mount - t0, "first_byte_s": t_first - t0, "startup_read_s": t_done - t1,
            "start_to_done_s": t_done - t0, "bytes_read": nread, "backend_bytes": backend["read_amount_total"],
            "backend_requests": backend["read_count"], "prefetch_requests": cache["prefetch_requests_count"],
            "prefetch_bytes": cache["prefetch_data_amount"],
            "prefetch_s": cache["prefetch_cumulative_time_millis"] / 1000, "clean_exit": clean_exit,
            "bytes_by_mode": cache.get("fetched_bytes"), "streams": cache.get("streams"),
            "amplification": cache.get("amplification")}


def full_pull(work: Path, host: str) -> dict[str, object]:
    dest = work / "oci-pull"
    rootfs = work / "oci-rootfs"
    for d in (dest, rootfs):
        shutil.rmtree(d, ignore_errors=True)
    rootfs.mkdir(parents=True)
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{host}/bench/oci:v1",
                    f"oci:{dest}:v1"], check=True)
    t_copy = time.perf_counter() - t0
    index = json.loads((dest / "index.json").read_text())
    mdig = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((dest / "blobs" / "sha256" / mdig).read_bytes())
    t1 = time.perf_counter()
    for layer in manifest["layers"]:
        blob = dest / "blobs" / "sha256" / layer["digest"].split(":")[1]
        subprocess.run(["tar", "-C", str(rootfs), "-xzf", str(blob)], check=True)
    t_unpack = time.perf_counter() - t1
    size = sum(layer["size"] for layer in manifest["layers"])
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    return {"copy_s": t_copy, "unpack_s": t_unpack, "total_s": t_copy + t_unpack, "layer_bytes": size}


def best(runs: list[dict[str, object]], key: str, *more: str) -> dict[str, object]:
    """The run with the smallest `key` (other jobs share the CPUs: the least disturbed run), with
    every run's `key` and `more` values kept as samples."""
    out = dict(min(runs, key=lambda r: float(r[key])))  # type: ignore[arg-type]
    for k in (key, *more):
        out[f"samples_{k}"] = [r[k] for r in runs]
    return out


VARIANTS = (  # name, image, readers, prefetch ("whole": every file of the tree, not the startup set)
    ("no_hints_1_reader", "plain", 1, "none"),
    ("no_hints_8_readers", "plain", 8, "none"),
    ("no_hints_prefetch_list", "plain", 1, "list"),
    ("no_hints_1_reader_prefetch_all", "plain", 1, "all"),
    ("ordered_on_demand", "ordered", 1, "none"),
    ("ordered_prefetch", "ordered", 1, "table"),
    ("whole_tree_1_reader", "plain", 1, "whole"),
    ("clustered_1_reader", "plain", 1, "none"),
    ("clustered_1_reader_prefetch_all", "plain", 1, "all"),
)
CLUSTERED = {"clustered_1_reader", "clustered_1_reader_prefetch_all"}  # these read the clustered set
BOUNDED = "no_hints_1_reader"  # the variants (this prefix) that read the random set one file at a time
WHOLE = {"whole_tree_1_reader"}
MAIN = "ordered_prefetch"
DRIVERS = ("fusedev", "erofs")


def variant_key(driver: str, name: str) -> str:
    """fusedev variants keep their historical names; the others are prefixed with the driver."""
    return name if driver == "fusedev" else f"{driver}_{name}"


def x(v: float | None) -> str:
    """A speedup for the summary lines (None: the bound's read takes no time, no finite ratio)."""
    return "    -" if v is None else f"{v:5.2f}x"


def summary(label: str, res: dict[str, object], keys: list[str]) -> None:
    """One line per variant: speedups over the full pull (read, from daemon start), the bound
    where it applies (best fetch order; blob order in brackets) and bytes fetched over read."""
    sp, st, fo = res["speedup"], res["speedup_start_to_done"], res["fetched_over_read"]
    for v in keys:
        r = res[v]
        line = f"[{label}] {v:36s} read {sp[v]:6.2f}x  from start {st[v]:5.2f}x"  # type: ignore[index]
        if "bound_speedup" in r:  # type: ignore[operator]
            bs, bb = r["bound_speedup"], r["bound_blob_order_speedup"]  # type: ignore[index]
            line += (f"  bound read {x(bs['read'])} from start {x(bs['from_start'])}"
                     f" (blob order {x(bb['read'])} / {x(bb['from_start'])})")
        print(line + f"  fetched/read {fo[v]:5.2f}", flush=True)  # type: ignore[index]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=500)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--startup-pct", type=float, default=6.4)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--bandwidth-mbit", type=float, default=200.0)
    ap.add_argument("--merging-mib", type=float, default=2.0, help="fs_prefetch.merging_size")
    ap.add_argument("--prefetch-threads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported, all kept")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fs-driver", choices=(*DRIVERS, "both"), default="both",
                    help="nydusd-py --fs-driver of the lazy runs (both: side by side in one run)")
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "lazy_registry"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--save-as", default="lazy_registry", help="results name under benchmarks/results")
    ap.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    a = ap.parse_args()
    variants = [v for v in VARIANTS if not a.variants or v[0] in a.variants.split(",")]
    work = Path(a.work)
    drivers = DRIVERS if a.fs_driver == "both" else (a.fs_driver,)
    keys = [variant_key(d, v) for d in drivers for v, *_ in variants]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    registry = None
    proxy = None
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        files = make_layers(work / "src", a.size_mib << 20, a.layers, a.seed)
        gen_s = time.perf_counter() - t
        total = sum(files.values())
        startup = random_set(files, a.startup_pct / 100, random.Random(a.seed + 1))
        acc = sum(files[rel] for rel in startup)
        runs = clustered_set(files, a.startup_pct / 100, random.Random(a.seed + 2))
        clustered = [rel for run in runs for rel in run]
        # "plain": built as is; "ordered": the startup set (in reading order) as prefetch files
        built = {"plain": build_nydus(work / "src", a.layers, work / "nydus"),
                 "ordered": build_nydus(work / "src", a.layers, work / "nydus-ordered", startup)}
        oci = build_oci_layers(work / "src", a.layers, work / "oci")
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        registry = rig.plain_registry(binary, work / "registry")
        t = time.perf_counter()
        for name, (boot, blob_dir, ids, _s) in built.items():
            cfg = parse_registry_config(images.registry_config(registry.host, f"bench/{name}", timeout=300), env={},
                                        docker_config_paths=[])
            with RegistryBackend(cfg) as b:
                push_nydus(b, boot, blob_dir, ids, "v1")
        cfg = parse_registry_config(images.registry_config(registry.host, "bench/oci", timeout=300), env={},
                                    docker_config_paths=[])
        with RegistryBackend(cfg) as b:
            push_oci(b, oci, "v1")
        push_s = time.perf_counter() - t
        nydus_bytes = sum((built["plain"][1] / i).stat().st_size for i in built["plain"][2])
        oci_bytes = sum(p.stat().st_size for p, _ in oci)
        proxy = FaultProxy(registry.url, latency=a.latency_ms / 1000, bandwidth=a.bandwidth_mbit * 1e6 / 8,
                           match=lambda m, p: False)
        results: dict[str, dict[str, object]] = {}
        shaped = f"{a.latency_ms:g}ms+{a.bandwidth_mbit:g}Mbit"
        for label, host in (("loopback", registry.host), (shaped, proxy.host)):
            res: dict[str, object] = {}
            net = probe_network(host, "bench/plain", built["plain"][0])
            # the proxy paces every response to the configured rate: that is the link; loopback's is measured
            net["bandwidth_Bps"] = a.bandwidth_mbit * 1e6 / 8 if label == shaped else net["measured_bandwidth_Bps"]
            for driver in drivers:
                for vname, image, readers, pf in variants:
                    key = variant_key(driver, vname)
                    print(f"[{label}] {key} ...", flush=True)
                    sset = clustered if vname in CLUSTERED else startup
                    lazy = [lazy_run(work, built[image][0], host, sset, readers, repo=f"bench/{image}",
                                     prefetch="none" if pf == "whole" else pf,
                                     merging_size=int(a.merging_mib * (1 << 20)),
                                     prefetch_threads=a.prefetch_threads, driver=driver, whole=pf == "whole")
                            for _ in range(max(1, a.repeat))]
                    res[key] = best(lazy, "startup_read_s", "start_to_done_s", "first_byte_s")
            print(f"[{label}] full pull ...", flush=True)
            pull = best([full_pull(work, host) for _ in range(max(1, a.repeat))], "total_s")
            res["full_pull"] = pull
            res["speedup"] = {v: pull["total_s"] / res[v]["startup_read_s"] for v in keys}  # type: ignore[index]
            res["speedup_start_to_done"] = {v: pull["total_s"] / res[v]["start_to_done_s"]  # type: ignore[index]
                                            for v in keys}
            res["fetched_over_read"] = {v: res[v]["backend_bytes"] / res[v]["bytes_read"]  # type: ignore[index]
                                        for v in keys}
            # whole-tree reads: lazy time over the full pull's (lower is better, goal <= 1.2) and
            # bytes fetched over the blobs' bytes (goal <= 1.05)
            res["whole_over_pull"] = {v: res[v]["startup_read_s"] / pull["total_s"]  # type: ignore[index]
                                      for v in keys if v.removeprefix("erofs_") in WHOLE}
            res["whole_start_to_done_over_pull"] = {
                v: res[v]["start_to_done_s"] / pull["total_s"]  # type: ignore[index]
                for v in keys if v.removeprefix("erofs_") in WHOLE}
            res["fetched_over_blob"] = {v: res[v]["backend_bytes"] / nydus_bytes  # type: ignore[index]
                                        for v in keys if v.removeprefix("erofs_") in WHOLE}
            # the bound beside each run that reads the random set one file at a time (lazy_bound.py);
            # the pool the set is drawn from, stored sizes scaled by the blobs' compression
            pool = [s * nydus_bytes / total for s in files.values() if s <= HUGE]
            res["bound_inputs"] = {**net, "blob_bytes": nydus_bytes, "files": len(startup), "pool_files": len(pool),
                                   "full_pull_s": pull["total_s"]}
            for v in keys:
                if v.removeprefix("erofs_").startswith(BOUNDED):
                    run: dict[str, object] = res[v]  # type: ignore[assignment]
                    run.update(bounds(len(startup), net["get_latency_s"], net["bandwidth_Bps"], nydus_bytes, pool,
                                      float(run["mount_s"]), float(pull["total_s"])))  # type: ignore[arg-type]
            results[label] = res
            print(json.dumps(res, indent=1), flush=True)
            summary(label, res, keys)
        payload: dict[str, object] = {
            "image": {"size_bytes": total, "files": len(files), "layers": a.layers, "nydus_blob_bytes": nydus_bytes,
                      "oci_layer_bytes": oci_bytes, "bootstrap_bytes": built["plain"][0].stat().st_size,
                      "startup_files": len(startup), "startup_bytes": acc, "startup_pct": 100 * acc / total,
                      "clustered_files": len(clustered), "clustered_runs": len(runs),
                      "clustered_bytes": sum(files[rel] for rel in clustered)},
            "setup_s": {"generate": gen_s, "nydus_build_plain": built["plain"][3],
                        "nydus_build_ordered": built["ordered"][3], "push_all": push_s},
            "network": {"latency_ms": a.latency_ms, "bandwidth_mbit": a.bandwidth_mbit},
            "repeat": a.repeat,
            "fs_drivers": list(drivers),
            "lazy_config": {"amplify_io": 1 << 20, "prefetch_merging_size": int(a.merging_mib * (1 << 20)),
                            "prefetch_threads": a.prefetch_threads, "fuse_threads": 8},
            "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
            "results": results,
            "notes": "(a) first_byte_s counts from daemon start with the bootstrap already local; "
                     "(b) startup_read_s from the mount to the last startup byte, start_to_done_s from daemon "
                     "start; (c) skopeo copy + tar -xzf of every layer; page cache dropped before each run; the "
                     "cache directory starts empty; each measurement is the best of `repeat` runs (samples_* has them "
                     "all). plain = image built as is (startup files scattered in the "
                     "blobs); ordered = built with the startup set as prefetch files (first and contiguous in "
                     "each blob, in reading order; prefetch table). *_prefetch_list: --prefetch-files; "
                     "ordered_prefetch: fs_prefetch from the bootstrap's prefetch table; *_prefetch_all: background "
                     "completion of every blob (prefetch_all, no bandwidth cap) beside the reader. clustered_*: the "
                     "clustered startup set (runs of neighbouring files of random directories, same byte share). "
                     "bound_s / bound_speedup (beside no_hints_1_reader*): the best read / from-start time any lazy "
                     "reader could reach on the random set (benchmarks/lazy_bound.py; smallest files fetched first "
                     "from daemon start; bound_blob_order_*: streamed in blob order), from bound_inputs and the run's "
                     "mount_s; a read speedup of null: the bound's read takes no time (everything arrives before the "
                     "mount). Other jobs shared the 2 CPUs during the run.",
        }
        payload["total_run_s"] = time.perf_counter() - t_all
        save(a.save_as, payload)
        labels = list(results)
        series = {"full pull + unpack": [results[k]["full_pull"]["total_s"] for k in labels]}  # type: ignore[index]
        series.update({f"lazy {v}": [results[k][v]["startup_read_s"] for k in labels]  # type: ignore[index]
                       for v in keys})
        for driver in drivers if any(v[0] == MAIN for v in variants) else ():
            main_key = variant_key(driver, MAIN)
            series[f"lazy {main_key}: daemon start to done"] = [
                results[k][main_key]["start_to_done_s"] for k in labels]  # type: ignore[index]
        grouped_bar_plot(
            a.save_as, f"Reading the startup set ({100 * acc / total:.1f}% of a {total >> 20} MiB image) "
            "vs full pull (s, log)", labels, series, "seconds", log=True)
        print(f"results in {RESULTS / (a.save_as + '.json')}")
    finally:
        if proxy is not None:
            proxy.stop()
        if registry is not None:
            registry.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
