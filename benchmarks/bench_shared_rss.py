"""RSS per mounted image of a shared `nydusd-py` daemon (issue 12: <= 0.5 MiB per image once idle).

A node's shared daemon holds every image of every pod. One image of --entries entries (small
files in directories of 50, RAFS v6, its blob in a loopback `docker-registry`) is mounted
--images times through `POST /api/v1/mount` with the snapshotter's per-image config (registry
backend, the shared blob cache), then each mount is walked (`ls -lR`) and a few files of each are
read. RSS (and threads, anonymous memory, the largest mappings) are read from /proc: with no
image, after the mounts, after the walks, and once idle again (--idle-s later). Per image = (after walks, idle - no image) / --images.

    python3 benchmarks/bench_shared_rss.py [--images 50] [--entries 2300] [--backend registry|localfs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import save  # noqa: E402
from nydus_py.transport.mount import is_mountpoint  # noqa: E402
from tests.daemon.rig import Api  # noqa: E402
from tests.storage import images  # noqa: E402
from tests.storage import registry_rig as rig  # noqa: E402


def proc_mem(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile (MiB) and Threads of `pid`."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
            elif k == "Threads":
                out[k] = int(v)
    return out


def smaps_by_path(pid: int, top: int = 12) -> list[tuple[str, float, int]]:
    """(mapping, Rss MiB, count) of the largest mappings of `pid`, grouped by path (anonymous
    mappings as [anon]; .blob.data, .chunk_map and .boot files by suffix)."""
    sums: dict[str, list[float]] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and not line.startswith(("Rss", "Size")) and ":" not in head[0]:
                path = head[5] if len(head) > 5 else "[anon]"
                for suffix in (".blob.data", ".chunk_map", ".boot"):
                    if path.endswith(suffix):
                        path = f"*{suffix}"
                name = path
                sums.setdefault(name, [0.0, 0])[1] += 1
            elif line.startswith("Rss:"):
                sums[name][0] += int(head[1]) / 1024
    return sorted(((k, round(v[0], 2), int(v[1])) for k, v in sums.items()), key=lambda t: -t[1])[:top]


def make_tree(root: Path, entries: int) -> list[str]:
    """`entries` entries: directories of 50 files of 100 B..8 KiB; returns the files."""
    files = []
    for i in range(entries - entries // 51):
        d = root / f"d{i // 50:03d}"
        if i % 50 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}").write_bytes(os.urandom(100 + (i * 7919) % 8000))
        files.append(f"d{i // 50:03d}/f{i:05d}")
    return files


def build(work: Path, entries: int, registry: rig.Registry | None) -> tuple[Path, Path, list[str]]:
    from nydus_py.builder.build import build_image
    from nydus_py.builder.options import BuildOptions
    from nydus_py.builder.sources import tree_from_directory
    from nydus_py.storage.registry import RegistryBackend, parse_registry_config

    files = make_tree(work / "tree", entries)
    blobs = work / "blobs"
    blobs.mkdir()
    res = build_image(tree_from_directory(work / "tree"), str(work / "image.boot"), str(blobs), BuildOptions())
    if registry is not None:
        with RegistryBackend(parse_registry_config(images.registry_config(registry.host, "bench/shared"),
                                                   env={})) as b:
            for bid in res.blob_ids:
                b.push_blob((blobs / bid).read_bytes())
    return work / "image.boot", blobs, files


def config(backend: str, work: Path, blobs: Path, registry: rig.Registry | None, i: int) -> str:
    """The per-image config (the snapshotter's, for the registry)."""
    if backend == "registry":
        assert registry is not None
        b: dict[str, Any] = {"type": "registry", "config": {"host": registry.host, "repo": "bench/shared",
                                                            "scheme": "http", "timeout": 30, "connect_timeout": 10}}
    else:
        b = {"type": "localfs", "config": {"dir": str(blobs)}}
    return json.dumps({"device": {"id": f"/snap{i}", "backend": b,
                                  "cache": {"type": "blobcache", "config": {"work_dir": str(work / "cache")}}},
                       "mode": "direct", "digest_validate": False, "enable_xattr": True})


def run(n_images: int, entries: int, backend: str, settle: float = 3.0, idle_s: float = 25.0) -> dict[str, Any]:
    """`idle_s`: how long the walked mounts stay untouched before "idle" is read (the daemon's
    idle trimmer runs every 10 s: a mount is trimmed after one to two rounds without requests)."""
    work = Path(tempfile.mkdtemp(prefix="nydus-bench-shared-"))
    registry = None
    proc = None
    mnt = work / "mnt"
    try:
        if backend == "registry":
            registry = rig.plain_registry(shutil.which("docker-registry") or "/usr/bin/docker-registry",
                                          work / "registry")
        boot, blobs, files = build(work, entries, registry)
        mnt.mkdir()
        sock = str(work / "api.sock")
        proc = subprocess.Popen([sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--mountpoint", str(mnt),
                                 "--apisock", sock, "--log-level", "warn", "--log-file", str(work / "nydusd.log")],
                                cwd=str(REPO), env={**images.env_without_auth(), "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "nydusd.log").read_text())
            time.sleep(0.01)
        api = Api(sock)
        time.sleep(settle)
        out: dict[str, Any] = {"images": n_images, "entries": entries, "backend": backend,
                               "no_image": proc_mem(proc.pid)}
        for i in range(n_images):
            r = api.request("POST", "/api/v1/mount", {"mountpoint": f"/img{i}"},
                            {"fs_type": "rafs", "source": str(boot), "config": config(backend, work, blobs, registry, i)})
            assert r.status == 204, r.body
        out["mounted"] = proc_mem(proc.pid)
        for i in range(n_images):
            subprocess.run(["ls", "-lR", str(mnt / f"img{i}")], check=True, stdout=subprocess.DEVNULL)
            for rel in files[:: max(1, len(files) // 5)]:
                with open(mnt / f"img{i}" / rel, "rb") as f:
                    f.read()
        out["walked"] = proc_mem(proc.pid)
        out["walked_smaps"] = smaps_by_path(proc.pid)
        time.sleep(idle_s)
        out["idle"] = proc_mem(proc.pid)
        out["idle_smaps"] = smaps_by_path(proc.pid)
        base = out["no_image"]["VmRSS"]
        out["per_image_mib"] = {k: (out[k]["VmRSS"] - base) / n_images for k in ("mounted", "walked", "idle")}
        out["threads_per_image"] = (out["idle"]["Threads"] - out["no_image"]["Threads"]) / n_images
        api.close()
        return out
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        if is_mountpoint(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--entries", type=int, default=2300)
    ap.add_argument("--backend", choices=("registry", "localfs"), default="registry")
    ap.add_argument("--idle-s", type=float, default=25.0, help="seconds untouched before the idle reading")
    ap.add_argument("--save-as", default="", help="results name under benchmarks/results")
    args = ap.parse_args()
    res = run(args.images, args.entries, args.backend, idle_s=args.idle_s)
    print(json.dumps(res, indent=2))
    if args.save_as:
        save(args.save_as, res)


if __name__ == "__main__":
    main()
