"""Daemon start to the first command of a realistic image mounted by reference (issue 12).

A generated image of the shape of Debian minbase + python3 + an app layer: 3 layers, about
--entries entries (mostly small files in deep directories, a few shared libraries of a few MiB),
converted to a Nydus image (one blob per layer, merged bootstrap) twice, "plain" (no hints, what
most users have) and "table" (the first command's files as prefetch table, packed first), and
pushed to a loopback `docker-registry`. Each run starts `nydusd-py fuse --image REF --mountpoint M` with no config
(the defaults a user runs: the made-up registry config and the default blob cache, emptied before
each run) and measures from exec:

  mount_s          the mountpoint shows up in /proc/self/mountinfo
  daemon_cpu_to_mount_s  the daemon's CPU time (user + sys) at that moment: less noisy than
                   wall time on a shared machine
  first_command_s  `cat` of the "first command" set (the files a `python3 -c 'import json,
                   sqlite3'` would read: an interpreter, a few libraries, ~150 small modules)
                   has finished

and the registry requests the daemon made (the registry's access log), by kind. Median of --runs;
the daemon's log (timestamps) of the last run is printed. Run by bench_startup.py (`--image`), or
alone: `bench_image_start.py [ENTRIES [RUNS]]`. Needs root, /dev/fuse and docker-registry.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.storage.registry import RegistryBackend, parse_registry_config  # noqa: E402
from nydus_py.transport.mount import is_mountpoint  # noqa: E402
from tests.storage import images  # noqa: E402
from tests.storage import registry_rig as rig  # noqa: E402

# (layer, directories, files) shaped like minbase / python3 / app
SHAPE = ((0, 420, 0.55), (1, 260, 0.38), (2, 40, 0.07))
_REQ = re.compile(r'"(GET|HEAD|POST|PUT|PATCH) (/v2/[^ ]*) HTTP')


def _content(rng: random.Random, size: int) -> bytes:
    half = size // 2
    text = b"def f_%d(x):\n    return x * %d  # a module line\n" % (rng.randrange(1 << 20), rng.randrange(99))
    return rng.randbytes(half) + (text * (1 + (size - half) // len(text)))[:size - half]


def make_layers(root: Path, entries: int, seed: int = 3) -> list[str]:
    """Layer trees root/l0..l2 with about `entries` entries in all; returns the first command's
    files (image paths), in the order it reads them."""
    rng = random.Random(seed)
    first: list[str] = []
    for li, ndirs, share in SHAPE:
        files = int(entries * share) - ndirs
        base = root / f"l{li}"
        dirs = [f"usr/lib/l{li}/p{d // 20:02d}/m{d:03d}" for d in range(ndirs)]
        for d in dirs:
            (base / d).mkdir(parents=True, exist_ok=True)
        for k in range(files):
            big = k < 3  # an interpreter and libraries
            size = rng.randrange(300 << 10, 1536 << 10) if big else rng.randrange(200, 12 << 10)
            rel = f"{dirs[k % ndirs]}/{'lib' if big else 'mod'}{k:05d}.{'so' if big else 'py'}"
            (base / rel).write_bytes(_content(rng, size))
            if big and li < 2 or (not big and k % (files // 60 or 1) == 0):
                first.append(rel)
    return first


def build_nydus(src: Path, out: Path, prefetch: list[str]) -> tuple[Path, Path, list[str]]:
    """One blob per layer, each layer built over the previous bootstrap (as nydusify does);
    `prefetch` (image paths) become the prefetch table, packed first in each blob."""
    from nydus_py.builder.build import build_image
    from nydus_py.builder.merge import merge_layers, tree_from_image
    from nydus_py.builder.options import BuildOptions
    from nydus_py.builder.sources import tree_from_directory
    from nydus_py.rafs import open_bootstrap

    blob_dir = out / "blobs"
    blob_dir.mkdir(parents=True, exist_ok=True)
    boot = None
    for li, _d, _s in SHAPE:
        tree = tree_from_directory(src / f"l{li}")
        if boot is not None:
            with open_bootstrap(str(boot)) as parent:
                tree = merge_layers([tree_from_image(parent, str(blob_dir)), tree])
        nb = out / f"boot{li}"
        mine = [f"/{p}".encode() for p in prefetch if int(p.split("/")[2][1:]) <= li]  # (usr/lib/l<layer>/...)
        build_image(tree, str(nb), str(blob_dir), BuildOptions(prefetch_paths=mine))
        boot = nb
    assert boot is not None
    with open_bootstrap(str(boot)) as img:
        ids = [b.blob_id for b in img.blobs]
    return boot, blob_dir, ids


def build_and_push(work: Path, first: list[str], registry: rig.Registry, repo: str, table: bool) -> str:
    """The image of work/src (with the first command's files as its prefetch table when
    `table`), pushed as REPO:v1; returns the reference."""
    from bench_lazy_registry import push_nydus

    boot, blob_dir, ids = build_nydus(work / "src", work / f"nydus-{repo.replace('/', '_')}", first if table else [])
    cfg = parse_registry_config(images.registry_config(registry.host, repo, timeout=300), env={})
    b = RegistryBackend(cfg)
    try:
        push_nydus(b, boot, blob_dir, ids, "v1")
    finally:
        b.close()
    return f"{registry.host}/{repo}:v1"


def requests_since(registry: rig.Registry, offset: int) -> list[str]:
    """`METHOD path` of every request in the registry's access log after byte `offset`."""
    text = registry.log_path.read_bytes()[offset:].decode(errors="replace")
    return [f"{m.group(1)} {m.group(2)}" for m in _REQ.finditer(text)]


def request_kinds(reqs: list[str]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in reqs:
        method, path = r.split(" ", 1)
        kind = "manifest" if "/manifests/" in path else "blob" if "/blobs/" in path else "ping" if path == "/v2/" \
            else path
        key = f"{method} {kind}"
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compile_tree(tree: Path = REPO) -> None:
    """Byte-compile `tree`'s nydus_py as an installed package is: this environment sets
    PYTHONDONTWRITEBYTECODE, and compiling every module at each start would be measured instead."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "nydus_py")], check=True)


def one_run(ref: str, first: list[str], registry: rig.Registry, work: Path, cache: Path,
            tree: Path = REPO) -> dict[str, Any]:
    """One start of the daemon from code tree `tree` (this one by default)."""
    shutil.rmtree(cache, ignore_errors=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    log_file = work / "nydusd.log"
    log_file.unlink(missing_ok=True)
    offset = registry.log_path.stat().st_size
    env = {**images.env_without_auth(), "PYTHONPATH": str(tree), "NYDUS_PY_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--image", ref, "--mountpoint",
                             str(mnt), "--log-level", "info", "--log-file", str(log_file)], env=env, cwd=str(tree))
    try:
        while not is_mountpoint(str(mnt)):
            if proc.poll() is not None or time.perf_counter() - t0 > 60:
                raise RuntimeError(log_file.read_text(errors="replace")[-3000:])
            time.sleep(0.002)
        t_mount = time.perf_counter() - t0
        cpu_mount = cpu_seconds(proc.pid)
        at_mount = registry.log_path.stat().st_size
        subprocess.run(["cat", *first], cwd=str(mnt), stdout=subprocess.DEVNULL, check=True)
        t_first = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
        if is_mountpoint(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    startup_reqs = requests_since(registry, offset)
    to_mount = startup_reqs[:len(startup_reqs) - len(requests_since(registry, at_mount))]
    return {"mount_s": t_mount, "first_command_s": t_first, "daemon_cpu_to_mount_s": cpu_mount, "registry_requests": len(startup_reqs),
            "requests_to_mount": request_kinds(to_mount), "request_kinds": request_kinds(startup_reqs),
            "log": log_file.read_text(errors="replace")}


def run(entries: int, runs: int, variants: tuple[str, ...] = ("plain", "table")) -> dict[str, Any]:
    """Each variant ("plain": no prefetch table, "table": the first command's files as the table)
    --runs times; medians, and the last run's daemon log."""
    work = Path(tempfile.mkdtemp(prefix="nydus-bench-image-start-"))
    registry = rig.plain_registry(shutil.which("docker-registry") or "/usr/bin/docker-registry", work / "registry")
    try:
        first = make_layers(work / "src", entries)
        compile_tree()
        n = sum(1 for _ in (work / "src").rglob("*"))
        first_bytes = sum((work / "src" / f"l{li}" / rel).stat().st_size for rel in first for li, _d, _s in SHAPE
                          if (work / "src" / f"l{li}" / rel).exists())
        out: dict[str, Any] = {"entries": n, "first_command_files": len(first), "first_command_bytes": first_bytes,
                               "runs": runs}
        for variant in variants:
            ref = build_and_push(work, first, registry, f"bench/{variant}", variant == "table")
            rows = [one_run(ref, first, registry, work, work / "cache") for _ in range(runs)]
            out[variant] = {"mount_s": statistics.median(r["mount_s"] for r in rows),
                            "daemon_cpu_to_mount_s": statistics.median(r["daemon_cpu_to_mount_s"] for r in rows),
                            "first_command_s": statistics.median(r["first_command_s"] for r in rows),
                            "requests_to_mount": rows[-1]["requests_to_mount"],
                            "request_kinds": rows[-1]["request_kinds"],
                            "raw": [{k: v for k, v in r.items() if k != "log"} for r in rows],
                            "last_log": rows[-1]["log"]}
        return out
    finally:
        registry.stop()
        subprocess.run(["umount", "-l", str(work / "mnt")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import json

    res = run(int(sys.argv[1]) if len(sys.argv) > 1 else 9000, int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    for v in ("plain", "table"):
        print(res[v].pop("last_log"))
    print(json.dumps(res, indent=2))
