"""The main job, end to end on this machine: build a RAFS v6 image from a sample tree, check it,
list it, start `nydusd-py` as a shared daemon with an API socket (as nydus-snapshotter does),
mount the image through the API, read every file back through /dev/fuse, and print the metrics
the API reports.

Run as root: `python3 -m nydus_py.demo [--keep DIR]`.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .api.client import ApiClient
from .transport.mount import is_mountpoint


def run(*cmd: str) -> str:
    print("$", " ".join(cmd))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out


def sample_tree(root: str) -> None:
    """A small tree with every file type, shared content (dedup) and a multi-chunk file."""
    os.makedirs(f"{root}/etc/app", exist_ok=True)
    os.makedirs(f"{root}/usr/bin", exist_ok=True)
    os.makedirs(f"{root}/var/empty", exist_ok=True)
    with open(f"{root}/etc/app/config.toml", "w") as f:
        f.write("[server]\nport = 8080\n")
    with open(f"{root}/usr/bin/tool", "wb") as f:
        f.write(os.urandom(3 << 20) + b"\0" * (2 << 20))  # several 1 MiB chunks, zero chunks dedup
    os.chmod(f"{root}/usr/bin/tool", 0o755)
    for i in range(200):
        with open(f"{root}/etc/app/item{i:03d}.txt", "w") as f:
            f.write(f"item {i}\n" * (i + 1))
    os.symlink("../etc/app/config.toml", f"{root}/usr/config")
    os.link(f"{root}/etc/app/config.toml", f"{root}/etc/app/config.hardlink")
    os.mkfifo(f"{root}/var/fifo")
    os.setxattr(f"{root}/etc/app/config.toml", "user.demo", b"nydus_py")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="nydus-py-demo-")
    os.makedirs(work, exist_ok=True)
    src, blobs, mnt = f"{work}/source", f"{work}/blobs", f"{work}/mnt"
    boot = f"{work}/image.boot"
    py = sys.executable
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(blobs, ignore_errors=True)
    os.makedirs(blobs)
    os.makedirs(mnt, exist_ok=True)
    sample_tree(src)

    print("== 1. build a RAFS v6 image (zstd, blake3, 1 MiB chunks)")
    print(run(py, "-m", "nydus_py.cli.image", "create", "--bootstrap", boot, "--blob-dir", blobs, src))
    print("== 2. check structure and every chunk digest")
    print(run(py, "-m", "nydus_py.cli.image", "check", "--bootstrap", boot, "--blob-dir", blobs))
    print("== 3. list it")
    print("\n".join(run(py, "-m", "nydus_py.cli.image", "inspect", "--bootstrap", boot).splitlines()[:14]))
    print("   ...")

    print("== 4. start nydusd-py (shared daemon, API socket) and mount the image through the API")
    cfg = {"device": {"id": "/demo", "backend": {"type": "localfs", "config": {"dir": blobs}},
                      "cache": {"type": "blobcache", "config": {"work_dir": f"{work}/cache"}}},
           "mode": "direct", "digest_validate": True, "enable_xattr": True, "iostats_files": True}
    sockdir = f"{work}/socket"
    os.makedirs(sockdir, mode=0o700, exist_ok=True)
    sock = f"{sockdir}/api.sock"
    log = open(f"{work}/nydusd.log", "w")  # noqa: SIM115 - lives as long as the daemon
    t0 = time.perf_counter()
    daemon = subprocess.Popen([py, "-m", "nydus_py.daemon", "fuse", "--mountpoint", mnt, "--apisock", sock,
                               "--thread-num", "4", "--log-level", "info"], stdout=log, stderr=log)
    api = ApiClient(sock)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            if daemon.poll() is not None:
                raise SystemExit(f"nydusd-py exited early, see {work}/nydusd.log")
            time.sleep(0.05)
        info = api.call("GET", "/api/v1/daemon")
        print(f"   API socket up after {time.perf_counter() - t0:.2f}s: state {info['state']}, "
              f"git commit {info['version']['git_commit'][:12]}")
        api.call("POST", "/api/v1/mount", {"mountpoint": "/demo"},
                 {"fs_type": "rafs", "source": boot, "config": json.dumps(cfg)})
        print(f"   POST /api/v1/mount?mountpoint=/demo -> 204; {mnt} now holds {os.listdir(mnt)}")
        image = f"{mnt}/demo"
        print("== 5. read from the mount and compare with the source")
        t0 = time.perf_counter()
        with open(f"{image}/etc/app/config.toml") as f:
            print(f"   first byte after mount: {f.read(1)!r} in {1000 * (time.perf_counter() - t0):.1f} ms")
        mismatches = 0
        files = 0
        for dirpath, _dirs, names in os.walk(src):
            for n in names:
                p = os.path.join(dirpath, n)
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                q = os.path.join(image, os.path.relpath(p, src))
                with open(p, "rb") as a, open(q, "rb") as b:
                    files += 1
                    if hashlib.sha256(a.read()).digest() != hashlib.sha256(b.read()).digest():
                        mismatches += 1
        print(f"   {files} files read, {mismatches} mismatches")
        print(f"   symlink usr/config -> {os.readlink(f'{image}/usr/config')}")
        print(f"   xattr user.demo = {os.getxattr(f'{image}/etc/app/config.toml', 'user.demo')!r}")
        st = os.stat(f"{image}/etc/app/config.toml")
        print(f"   hard link shares inode: {st.st_ino == os.stat(f'{image}/etc/app/config.hardlink').st_ino}")
        print("== 6. metrics from the API")
        m = api.call("GET", "/api/v1/metrics", {"id": "/demo"})
        print(f"   GET /api/v1/metrics?id=/demo: data_read {m['data_read']} bytes, reads {m['fop_hits'][4]}, "
              f"lookups {m['fop_hits'][9]}, read errors {m['fop_errors'][4]}, "
              f"read latency buckets {m['read_latency_dist']}")
        bc = api.call("GET", "/api/v1/metrics/blobcache", {"id": "/demo"})
        print(f"   GET /api/v1/metrics/blobcache?id=/demo: {len(bc['underlying_files'])} cache files, "
              f"{bc['whole_hits']} whole hits, {bc['partial_hits']} partial hits of {bc['total']} reads")
        be = api.call("GET", "/api/v1/metrics/backend", {"id": "/demo"})
        print(f"   GET /api/v1/metrics/backend?id=/demo: {be['read_count']} backend reads, "
              f"{be['read_amount_total']} bytes, {be['read_errors']} errors")
        status, prom = api.request("GET", "/metrics")
        lines = [ln for ln in prom.decode().splitlines() if ln.startswith(("nydusd_fuse_requests_total",
                                                                          "nydusd_backend_read_bytes_total"))]
        print(f"   GET /metrics (Prometheus, {status}): {len(prom)} bytes, e.g.")
        for ln in lines[:4]:
            print(f"     {ln}")
        blob_bytes = sum(os.path.getsize(os.path.join(blobs, b)) for b in os.listdir(blobs))
        print(f"   blob size on disk: {blob_bytes} bytes; source: "
              f"{sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(src) for n in ns if os.path.isfile(os.path.join(d, n)))} bytes")
        api.call("DELETE", "/api/v1/mount", {"mountpoint": "/demo"})
        print(f"== 7. DELETE /api/v1/mount?mountpoint=/demo -> 204; {mnt} now holds {os.listdir(mnt)}")
        if mismatches:
            return 1
    finally:
        api.close()
        daemon.terminate()
        rc = daemon.wait(timeout=20)
        log.close()
        print(f"== 8. SIGTERM: daemon exited {rc}, still mounted: {is_mountpoint(mnt)}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
