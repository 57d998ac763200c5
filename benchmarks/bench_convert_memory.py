"""Peak RSS of building one layer of many small entries (issue 16, item 10).

A synthetic layer tar of --entries entries (directories of 100 entries each: small regular files
with distinct content, every 10th a symlink, every 25th a hard link; --xattrs gives every file a
PAX xattr) is built in fresh child processes, each reporting its own peak RSS (VmHWM):

  * `imports`: only the modules imported (the interpreter's share of the numbers below);
  * `create`: `nydus-image-py create` of the gzip layer (bootstrap + blob, RAFS v6);
  * `convert-layer`: what `nydusify-py convert` does per layer: `LayerStack.add_layer` of the
    tar, then `LayerStack.finish` (no registry);
  * `nydusify`: `nydusify-py convert` end to end through a loopback docker-registry (skipped
    when `docker-registry` is not installed, or with --no-registry).

Not a test: it prints numbers (and saves them with --save). VmHWM, not wait4's ru_maxrss: Linux
carries a parent's high-water mark over fork+exec.

    python3 benchmarks/bench_convert_memory.py [--entries 100000] [--xattrs] [--save [--save-as NAME]]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import save  # noqa: E402

MTIME = 1_700_000_000
PER_DIR = 100

# Each child runs one workload, then prints its own VmHWM (kB) as the last stdout line.
CHILD = """
import sys
mode, args = sys.argv[1], sys.argv[2:]
if mode == "imports":
    import nydus_py.cli.image, nydus_py.cli.nydusify, nydus_py.convert.stack  # noqa: F401
elif mode == "create":
    from nydus_py.cli.image import main
    assert main(["create", "--bootstrap", args[1] + "/image.boot", "--blob-dir", args[1], args[0]]) == 0
elif mode == "convert-layer":
    from nydus_py.builder.options import BuildOptions
    from nydus_py.convert.stack import LayerStack
    stack = LayerStack(BuildOptions(), args[1])
    with open(args[0], "rb") as f:
        stack.add_layer(f)
    stack.finish(args[1] + "/image.boot")
elif mode == "nydusify":
    from nydus_py.cli.nydusify import main
    assert main(["convert", "-q", "--source", args[0], "--target", args[1], "--source-insecure",
                 "--target-insecure", "--work-dir", args[2]]) == 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(line.split()[1])
"""


def make_tar(path: Path, entries: int, xattrs: bool = False) -> None:
    """`entries` tar members: per directory one dir entry, then its files."""
    n = 0
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = 0
        while n < entries:
            dname = f"usr/share/pkg{d:05d}"
            info = tarfile.TarInfo(dname)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
            n += 1
            for k in range(PER_DIR - 1):
                if n >= entries:
                    break
                name = f"{dname}/file-{k:03d}.txt"
                info = tarfile.TarInfo(name)
                info.mtime, info.mode = MTIME, 0o644
                if k % 10 == 9:
                    info.type, info.linkname = tarfile.SYMTYPE, f"file-{k - 1:03d}.txt"
                    tar.addfile(info)
                elif k % 25 == 24:
                    info.type, info.linkname = tarfile.LNKTYPE, f"{dname}/file-000.txt"
                    tar.addfile(info)
                else:
                    data = f"{dname}/{k} {'x' * (k * 7 % 300)}\n".encode()
                    info.size = len(data)
                    if xattrs:
                        info.pax_headers = {"SCHILY.xattr.user.pkg": f"pkg{d:05d}"}
                    tar.addfile(info, io.BytesIO(data))
                n += 1
            d += 1


def run_child(mode: str, *args: str) -> tuple[float, float]:
    """(peak RSS MiB, wall seconds) of one workload in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DOCKER_CONFIG": "/nonexistent-docker-config"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, *args], capture_output=True, text=True, env=env,
                       cwd=str(REPO))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{mode} failed: {r.stderr[-2000:]}")
    return int(r.stdout.split()[-1]) / 1024, wall


def push_image(reg_host: str, layer_gz: bytes, diff_id: str) -> None:
    from nydus_py.convert import oci
    from nydus_py.storage.registry import RegistryBackend, parse_registry_config

    cfg = parse_registry_config({"host": reg_host, "repo": "bench/many", "scheme": "http"}, env={},
                                docker_config_paths=[])
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    with RegistryBackend(cfg) as b:
        layer = b.push_blob(layer_gz)
        cdig = b.push_blob(config)
        man = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                          "config": {"mediaType": oci.OCI_CONFIG, "digest": cdig, "size": len(config)},
                          "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                      "digest": layer, "size": len(layer_gz)}]}).encode()
        b.push_manifest("v1", man, oci.OCI_MANIFEST)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--xattrs", action="store_true", help="a PAX xattr on every regular file")
    ap.add_argument("--no-registry", action="store_true", help="skip the end-to-end nydusify-py run")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/<--save-as>.json")
    ap.add_argument("--save-as", default="convert_memory", help="results file name (default convert_memory)")
    ap.add_argument("--note", default="", help="free text saved with the results")
    a = ap.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        work = Path(tmp)
        tar = work / "layer.tar"
        make_tar(tar, a.entries, a.xattrs)
        tar_bytes = tar.read_bytes()
        layer_gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
        (work / "layer.tar.gz").write_bytes(layer_gz)
        print(f"layer: {a.entries} entries, {len(tar_bytes) / 2**20:.1f} MiB tar, {len(layer_gz) / 2**20:.1f} MiB gzip")
        for d in ("create", "convert"):
            (work / d).mkdir()
        runs: dict[str, tuple[str, ...]] = {
            "imports": (),
            "create": (str(work / "layer.tar.gz"), str(work / "create")),
            "convert-layer": (str(tar), str(work / "convert")),
        }
        registry = None if a.no_registry else shutil.which("docker-registry")
        reg = None
        try:
            if registry:
                from tests.storage import registry_rig as rig

                reg = rig.plain_registry(registry, work)
                push_image(reg.host, layer_gz, "sha256:" + hashlib.sha256(tar_bytes).hexdigest())
                (work / "nydusify").mkdir()
                runs["nydusify"] = (f"{reg.host}/bench/many:v1", f"{reg.host}/bench/many:v1-nydus",
                                    str(work / "nydusify"))
            del tar_bytes, layer_gz
            for mode, args in runs.items():
                rss, wall = run_child(mode, *args)
                results[mode] = rss
                print(f"{mode:>14}: peak RSS {rss:7.1f} MiB  ({wall:.1f} s)")
        finally:
            if reg is not None:
                reg.stop()
    if a.save:
        payload: dict[str, object] = {"entries": a.entries, "xattrs": a.xattrs, "peak_rss_mib": results}
        if a.note:
            payload["note"] = a.note
        print(save(a.save_as, payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
