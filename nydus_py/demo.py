"""The main job, end to end on this machine, with real parts only:

1. start a loopback `docker-registry` (Debian's distribution 2.8) with a temp config;
2. build a sample OCI image in Python (a busybox-static root filesystem and an app layer with a
   whiteout, an opaque directory, a hard link and a 6 MiB data file) and push it with our client;
3. convert it with `nydusify-py convert` (one RAFS blob per layer + bootstrap layer, pushed back);
4. start `nydusd-py` as a shared daemon with an API socket, as nydus-snapshotter does, and mount the
   Nydus image *by reference* through `POST /api/v1/mount` (source `docker://REGISTRY/REPO:TAG`):
   the daemon fetches the manifest and the bootstrap, then reads data lazily from the registry;
5. run busybox from the mount with chroot;
6. print the metrics the API reports (only part of the blob bytes were fetched);
7. unmount, stop the daemon and the registry, remove everything.

Run as root: `python3 -m nydus_py.demo [--keep DIR]`.
"""

import argparse
import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

from .api.client import ApiClient
from .storage.registry import RegistryClient, parse_registry_config
from .transport.mount import is_mountpoint

BUSYBOX = "/bin/busybox"
MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def run(*cmd: str) -> str:
    print("$", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


# -- 1. a loopback registry ----------------------------------------------------------------------


class Registry:
    def __init__(self, work: str) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise SystemExit("docker-registry is missing: run scripts/install.sh (Debian package docker-registry)")
        self.dir = os.path.join(work, "registry")
        os.makedirs(self.dir)
        cfg = {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": False}},
               "storage": {"filesystem": {"rootdirectory": os.path.join(self.dir, "data")},
                           "redirect": {"disable": True}, "maintenance": {"uploadpurging": {"enabled": False}}},
               "http": {"addr": "127.0.0.1:0", "secret": os.urandom(16).hex()},
               "health": {"storagedriver": {"enabled": False}}}
        path = os.path.join(self.dir, "config.yml")
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        self.log_path = os.path.join(self.dir, "registry.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the registry
        self.proc = subprocess.Popen([binary, "serve", path], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            with open(self.log_path, errors="replace") as f:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", f.read())
            if m:
                self.host = f"127.0.0.1:{m.group(1)}"
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"docker-registry did not start; see {self.log_path}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


# -- 2. a sample OCI image -------------------------------------------------------------------------


def _tar(entries: list[tuple[str, str, bytes, int, str]]) -> bytes:
    """(name, kind, data, mode, link target) -> a reproducible tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, mode, target in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = MTIME, mode
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, target
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, target
            else:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def sample_layers() -> list[bytes]:
    """Two layer tars: a busybox root, then an app layer with OCI whiteouts and a big data file."""
    if not os.path.isfile(BUSYBOX):
        raise SystemExit(f"{BUSYBOX} is missing: run scripts/install.sh (Debian package busybox-static)")
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    base = [("bin", "dir", b"", 0o755, ""), ("bin/busybox", "file", busybox, 0o755, "")]
    base += [(f"bin/{a}", "symlink", b"", 0o777, "busybox") for a in ("sh", "ls", "cat", "echo", "uname", "stat")]
    base += [("etc", "dir", b"", 0o755, ""), ("etc/motd", "file", b"base image motd\n", 0o644, ""),
             ("etc/hostname", "file", b"nydus-py-demo\n", 0o644, ""),
             ("srv", "dir", b"", 0o755, ""), ("srv/old", "file", b"replaced by an opaque dir\n", 0o644, "")]
    app = [("etc", "dir", b"", 0o755, ""), ("etc/.wh.motd", "file", b"", 0o644, ""),
           ("srv", "dir", b"", 0o755, ""), ("srv/.wh..wh..opq", "file", b"", 0o644, ""),
           ("srv/app.sh", "file", b"#!/bin/sh\necho \"hello from $(cat /etc/hostname) on $(uname -s)\"\n", 0o755, ""),
           ("srv/app-link.sh", "link", b"", 0o755, "srv/app.sh"),
           ("srv/data.bin", "file", os.urandom(6 << 20), 0o644, "")]  # read by nobody: never fetched
    return [_tar(base), _tar(app)]


async def push_image(host: str, repo: str, tag: str, tars: list[bytes]) -> str:
    """Push gzip layers, the config and an OCI manifest with our own registry client."""
    cfg = parse_registry_config({"host": host, "repo": repo, "scheme": "http"}, env={}, docker_config_paths=[])
    client = RegistryClient(cfg)
    await client.start()
    try:
        layers = []
        for t in tars:
            blob = gzip.compress(t, mtime=0)
            layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": await client.push_blob(blob), "size": len(blob)})
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/srv/app.sh"]},
                             "rootfs": {"type": "layers",
                                        "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]}}).encode()
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": await client.push_blob(config), "size": len(config)},
                               "layers": layers}).encode()
        return await client.push_manifest(tag, manifest, OCI_MANIFEST)
    finally:
        await client.close()


# -- the job ------------------------------------------------------------------------------------------


def wait_for(path: str, proc: subprocess.Popen[bytes], log: str) -> None:
    for _ in range(400):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise SystemExit(f"nydusd-py exited early, see {log}")
        time.sleep(0.05)
    raise SystemExit(f"nydusd-py did not create {path}, see {log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("the demo mounts FUSE and uses chroot: run it as root on a machine with /dev/fuse")
    work = args.keep or tempfile.mkdtemp(prefix="nydus-py-demo-")
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    t_start = time.perf_counter()
    print("== 1. start a loopback docker-registry")
    reg = Registry(work)
    daemon = None
    api = None
    log = None
    mnt = os.path.join(work, "mnt")
    try:
        print(f"   docker-registry serving http://{reg.host}")
        print("== 2. build a sample OCI image (busybox-static root + app layer) and push it")
        tars = sample_layers()
        src = f"{reg.host}/demo/app:v1"
        digest = asyncio.run(push_image(reg.host, "demo/app", "v1", tars))
        print(f"   pushed {src} ({digest[:19]}, {len(tars)} layers, {sum(len(t) for t in tars) >> 10} KiB of tar)")

        print("== 3. convert it to a Nydus image")
        dst = f"{reg.host}/demo/app:v1-nydus"
        print(run(py, "-m", "nydus_py.cli.nydusify", "convert", "--source", src, "--target", dst,
                  "--source-insecure", "--target-insecure", "--chunk-size", "0x40000", "-q").rstrip())

        print("== 4. start nydusd-py (shared daemon, API socket) and mount the image by reference")
        os.makedirs(mnt, exist_ok=True)
        sockdir = os.path.join(work, "socket")
        os.makedirs(sockdir, mode=0o700, exist_ok=True)
        sock = os.path.join(sockdir, "api.sock")
        log_path = os.path.join(work, "nydusd.log")
        log = open(log_path, "w")  # noqa: SIM115 - lives as long as the daemon
        t0 = time.perf_counter()
        daemon = subprocess.Popen([py, "-m", "nydus_py.cli.daemon", "fuse", "--mountpoint", mnt, "--apisock", sock,
                                   "--thread-num", "4", "--log-level", "info"], stdout=log, stderr=log)
        wait_for(sock, daemon, log_path)
        api = ApiClient(sock)
        info = api.call("GET", "/api/v1/daemon")
        print(f"   API socket up after {time.perf_counter() - t0:.2f}s: state {info['state']}")
        cache = os.path.join(work, "cache")
        cfg = {"device": {"id": "/demo", "backend": {"type": "registry", "config": {"scheme": "http", "timeout": 5}},
                          "cache": {"type": "blobcache", "config": {"work_dir": cache}}},
               "mode": "direct", "digest_validate": True, "enable_xattr": True, "iostats_files": True}
        t0 = time.perf_counter()
        api.call("POST", "/api/v1/mount", {"mountpoint": "/demo"},
                 {"fs_type": "rafs", "source": f"docker://{dst}", "config": json.dumps(cfg)})
        print(f"   POST /api/v1/mount?mountpoint=/demo source docker://{dst} -> 204 in "
              f"{time.perf_counter() - t0:.2f}s; {mnt}/demo holds {sorted(os.listdir(os.path.join(mnt, 'demo')))}")
        boots = [n for n in os.listdir(cache) if n.endswith(".image.boot")]
        print(run(py, "-m", "nydus_py.cli.image", "inspect", "--stats-only", "--bootstrap",
                  os.path.join(cache, boots[0])).rstrip())

        print("== 5. run busybox from the lazily mounted image (chroot)")
        root = os.path.join(mnt, "demo")
        out = run(shutil.which("chroot") or "chroot", root, "/bin/busybox", "sh", "-c",
                  "/srv/app.sh; /srv/app-link.sh; ls /srv; test -e /etc/motd || echo '/etc/motd: whited out'; "
                  "echo \"data.bin: $(stat -c %s /srv/data.bin) bytes (not read)\"")
        print("   " + out.rstrip().replace("\n", "\n   "))

        print("== 6. metrics from the API")
        m = api.call("GET", "/api/v1/metrics", {"id": "/demo"})
        print(f"   GET /api/v1/metrics?id=/demo: data_read {m['data_read']} bytes, reads {m['fop_hits'][4]}, "
              f"lookups {m['fop_hits'][9]}, read errors {m['fop_errors'][4]}")
        be = api.call("GET", "/api/v1/metrics/backend", {"id": "/demo"})
        req = urllib.request.Request(f"http://{reg.host}/v2/demo/app/manifests/v1-nydus",
                                     headers={"Accept": OCI_MANIFEST})
        with urllib.request.urlopen(req, timeout=10) as r:
            manifest = json.loads(r.read())
        blob_bytes = sum(x["size"] for x in manifest["layers"][:-1])
        print(f"   GET /api/v1/metrics/backend?id=/demo: {be['read_count']} registry reads, "
              f"{be['read_amount_total']} bytes of {blob_bytes} blob bytes "
              f"({100 * be['read_amount_total'] / max(1, blob_bytes):.0f}% fetched), {be['read_errors']} errors")
        bc = api.call("GET", "/api/v1/metrics/blobcache", {"id": "/demo"})
        print(f"   GET /api/v1/metrics/blobcache?id=/demo: {len(bc['underlying_files'])} cache files, "
              f"{bc['whole_hits']} whole hits, {bc['partial_hits']} partial hits of {bc['total']} reads")
        status, prom = api.request("GET", "/metrics")
        lines = [ln for ln in prom.decode().splitlines() if ln.startswith("nydusd_backend_read_bytes_total")]
        print(f"   GET /metrics (Prometheus, {status}): {len(prom)} bytes, e.g. {lines[0] if lines else '-'}")

        api.call("DELETE", "/api/v1/mount", {"mountpoint": "/demo"})
        print(f"== 7. DELETE /api/v1/mount?mountpoint=/demo -> 204; {mnt} now holds {os.listdir(mnt)}")
    finally:
        if api is not None:
            api.close()
        if daemon is not None:
            daemon.terminate()
            rc = daemon.wait(timeout=20)
            print(f"   SIGTERM: nydusd-py exited {rc}, still mounted: {is_mountpoint(mnt)}")
        if log is not None:
            log.close()
        reg.stop()
        print(f"   docker-registry stopped; total {time.perf_counter() - t_start:.1f}s")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
