"""nydus_py over /dev/fuse against native ext4, kernel EROFS and squashfuse_ll, side by side.

One tree (gen_tree.py), seven servers: the directory itself, the same RAFS v6 bootstrap mounted by
the kernel EROFS driver (file-backed, device=<cache view>), a mksquashfs image under
squashfuse_ll, `nydusd-py fuse` on the bootstrap + blob (a bare localfs backend: each read
decompresses its chunk), the same over a blob cache made complete first (`nydus_py_cached`: decoded
chunks, as a registry image is served by default), `nydusd-py fuse --fs-driver erofs`
(the kernel EROFS driver on the bootstrap, data lazily through the daemon's blob views, no blob
cache), and the same over a blob cache made complete before the first measurement
(`nydus_py_erofs_cached`: the blobs go to EROFS as the cache's data files). Workloads, cold (unmount,
drop_caches, mount) and warm (the same again right away): sequential read of the 100 MiB file,
reading every small file, `find`, `ls -lR`, 4 KiB random reads. Servers take turns on every
workload and the starting server rotates per rep; each value is reported as the median of the
per-rep ratios server/native (time ratio: >1 is slower than native).

A second tree (`--xattr-tree`, on by default) is the same one with an xattr on 1% of its files
(`user.bench.*`, and one `security.capability`), as an image with a capability binary is: there
the FUSE driver can no longer tell the kernel "no xattrs here", and every `ls -l` costs
GETXATTR round trips that the kernel never caches. The same servers run the same workloads on it.

Also: nydus_py daemon RSS after a cold `ls -lR` (this tree, and a flat 100k-file image), and
one GETATTR round trip (stat in a loop against a daemon with attr_timeout 0, so every stat is
exactly one GETATTR; native stat cost subtracted). Run as root (mounts, drop_caches).

`--io-uring` adds `nydus_py_uring` (`nydusd-py fuse --io-uring`: FUSE over io_uring) beside
`nydus_py` (/dev/fuse reads) and measures its GETATTR round trip too; the bench sets
fuse.enable_uring=Y for the run and restores it after (the daemon never writes it). `--servers`
limits the run to some servers (native is always there: ratios are to it).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import api_get, drop_caches, fuse_uring_enabled, grouped_bar_plot, save
from gen_tree import generate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.builder.build import build_image  # noqa: E402
from nydus_py.builder.cache_view import write_cache_view  # noqa: E402
from nydus_py.builder.options import BuildOptions  # noqa: E402
from nydus_py.builder.sources import tree_from_directory  # noqa: E402
from nydus_py.transport.mount import is_mountpoint, sys_mount, sys_umount  # noqa: E402

BIG = "opt/models/bigfile_100m.bin"
SMALL_MAX = 1 << 20
RAND_IOS = 4096
GOALS = {  # (workload, temperature) -> max ratio to native
    ("seq", "cold"): 1.3,
    ("small", "cold"): 1.0,
    ("lsR", "warm"): 1.2,
    ("small", "warm"): 1.2,
}
GETATTR_GOAL_US = 50.0
RSS_GOAL_MIB = 48.0
EROFS_DRIVER_WARM_GOAL = 1.0  # issue 10: the erofs driver's warm ls -lR, find, small files, both trees
XATTR_EVERY = 100  # 1% of files carry an xattr
# security.capability: vfs_cap_data v2, effective, cap_net_bind_service permitted (setcap ...=ep)
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)

RAND_PROBE = r"""
import os, random, sys, time
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
rng = random.Random(1)
offs = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
t = time.perf_counter()
for off in offs:
    if len(os.pread(fd, 4096, off)) != 4096:
        raise SystemExit("short read")
print(time.perf_counter() - t)
"""

STAT_PROBE = r"""
import os, sys, time
path, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.stat(path)
per = []
for _ in range(reps):
    t = time.perf_counter()
    for _ in range(n):
        os.stat(path)
    per.append((time.perf_counter() - t) / n * 1e6)
print(" ".join(map(str, per)))
"""


# -- servers ------------------------------------------------------------------------------------------


class Server:
    name = ""

    def __init__(self, mnt: str) -> None:
        self.root = mnt

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


class Native(Server):
    name = "native"


class Erofs(Server):
    name = "erofs"

    def __init__(self, mnt: str, boot: str, views: list[str]) -> None:
        super().__init__(mnt)
        self.boot, self.views = boot, views

    def start(self) -> None:
        sys_mount(self.boot, self.root, "erofs", 1, ",".join(f"device={v}" for v in self.views))

    def stop(self) -> None:
        if is_mountpoint(self.root):
            sys_umount(self.root)


class FuseProcess(Server):
    """A FUSE server in a child process, ready when its mountpoint shows up."""

    def __init__(self, mnt: str, log: str, cmd: list[str], probe: str = "opt") -> None:
        super().__init__(mnt)
        self.log = log
        self.cmd = cmd
        self.probe = probe
        self.sigterm = False
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))
        deadline = time.monotonic() + 30
        while not (is_mountpoint(self.root) and os.path.exists(os.path.join(self.root, self.probe))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount; see {self.log}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Ask the server to go (SIGTERM for nydus_py, which unmounts itself; umount for the rest)."""
        if self.proc is None:
            return
        if self.sigterm:
            self.proc.send_signal(signal.SIGTERM)
        elif is_mountpoint(self.root):
            subprocess.run(["umount", self.root], check=True)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if is_mountpoint(self.root):
            subprocess.run(["umount", "-l", self.root], check=False)
        self.proc = None

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server process in MiB."""
        assert self.proc is not None
        vals = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    vals[k] = int(v.split()[0]) / 1024
        return vals["VmRSS"], vals["VmHWM"]


class Squashfuse(FuseProcess):
    name = "squashfuse_ll"

    def __init__(self, mnt: str, image: str, log: str) -> None:
        super().__init__(mnt, log, ["squashfuse_ll", "-f", "-o", "allow_other", image, mnt])


class NydusPy(FuseProcess):
    name = "nydus_py"

    extra: tuple[str, ...] = ()

    def __init__(self, mnt: str, boot: str, config: str, log: str, threads: int, probe: str = "opt",
                 apisock: str | None = None) -> None:
        api = ["--apisock", apisock] if apisock else []
        super().__init__(mnt, log, [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--config", config,
                                    "--bootstrap", boot, "--mountpoint", mnt, "--thread-num", str(threads),
                                    "--log-level", "warn", *api, *self.extra], probe)
        self.sigterm = True
        self.apisock = apisock


class NydusPyBase(NydusPy):
    """`--baseline REPO`: the same daemon from another checkout (the code before a change), run
    beside nydus_py in the same rounds so that old and new meet the same machine load."""

    name = "nydus_py_base"

    def __init__(self, repo: str, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.repo = repo

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.repo,
                                         env={**os.environ, "PYTHONPATH": self.repo})
        deadline = time.monotonic() + 30
        while not (is_mountpoint(self.root) and os.path.exists(os.path.join(self.root, self.probe))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount; see {self.log}")
            time.sleep(0.01)


class NydusPyUring(NydusPy):
    """`nydusd-py fuse --io-uring`: the same daemon, requests over FUSE io_uring queues."""

    name = "nydus_py_uring"
    extra = ("--io-uring",)

    def start(self) -> None:
        super().start()
        with open(self.log, errors="replace") as f:  # a fallback is logged at warn level
            if "io_uring not used" in f.read():
                self.stop()
                raise RuntimeError(f"{self.name} fell back to /dev/fuse reads; see {self.log}")


class NydusPyUringBase(NydusPyBase):
    """`--baseline REPO --io-uring`: the baseline checkout's daemon with `--io-uring`."""

    name = "nydus_py_uring_base"
    extra = ("--io-uring",)

    def start(self) -> None:
        super().start()
        with open(self.log, errors="replace") as f:
            if "io_uring not used" in f.read():
                self.stop()
                raise RuntimeError(f"{self.name} fell back to /dev/fuse reads; see {self.log}")


class NydusPyErofs(FuseProcess):
    """`nydusd-py fuse --fs-driver erofs`: the same config, served by the kernel EROFS driver."""

    name = "nydus_py_erofs"

    def __init__(self, mnt: str, boot: str, config: str, log: str, threads: int) -> None:
        super().__init__(mnt, log, [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--fs-driver", "erofs",
                                    "--config", config, "--bootstrap", boot, "--mountpoint", mnt,
                                    "--thread-num", str(threads), "--log-level", "warn"])
        self.sigterm = True


class _FilledCache:
    """A daemon over a blob cache that is complete before the first measurement: filled once by
    reading every file, then remounted and the page cache dropped. (Mixed in before a daemon
    class: `super()` is that daemon.)"""

    root: str

    def __init__(self, mnt: str, boot: str, config: str, log: str, threads: int, cache_dir: str) -> None:
        super().__init__(mnt, boot, config, log, threads)  # type: ignore[call-arg]
        self.cache_dir = cache_dir
        self.filled = False

    def start(self) -> None:
        super().start()  # type: ignore[misc]
        if self.filled:
            return
        subprocess.run(["sh", "-c", "find . -type f -exec cat {} + > /dev/null"], cwd=self.root, check=True)
        self.stop()  # type: ignore[attr-defined]  # (the cache flushes its chunk maps on the way out)
        maps = [e.path for e in os.scandir(self.cache_dir) if e.name.endswith(".chunk_map")]
        for path in maps:
            with open(path, "rb") as f:
                if struct.unpack("<4I", f.read(16))[3] != 0x4D4D4150:  # the map's "all ready" magic
                    raise RuntimeError(f"{path}: reading every file did not complete the blob")
        if not maps:
            raise RuntimeError(f"no blob cache in {self.cache_dir}")
        self.filled = True
        drop_caches()
        super().start()  # type: ignore[misc]


class NydusPyErofsCached(_FilledCache, NydusPyErofs):
    """`--fs-driver erofs` over a complete blob cache (`_FilledCache`): each blob is handed to
    EROFS as the cache's data file itself, so cold reads never reach the daemon."""

    name = "nydus_py_erofs_cached"


class NydusPyCached(_FilledCache, NydusPy):
    """`nydusd-py fuse` over a complete blob cache (`_FilledCache`), as a registry image is served
    by default (`--image` configs have a blob cache): reads come from the cache's decoded chunks,
    not decompressed from the blob on each read as with a bare localfs backend."""

    name = "nydus_py_cached"


# -- workloads ----------------------------------------------------------------------------------------


def timed(cmd: list[str], cwd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def w_seq(root: str, ctx: dict) -> float:
    return timed(["dd", f"if={BIG}", "of=/dev/null", "bs=1M", "status=none"], root)


def w_small(root: str, ctx: dict) -> float:
    return timed(["xargs", "-0", "-a", ctx["small_list"], "cat"], root)


def w_find(root: str, ctx: dict) -> float:
    return timed(["find", ".", "-type", "f"], root)


def w_lsR(root: str, ctx: dict) -> float:
    return timed(["ls", "-lR"], root)


def w_rand(root: str, ctx: dict) -> float:
    out = subprocess.run([sys.executable, "-c", RAND_PROBE, os.path.join(root, BIG), str(RAND_IOS)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout)


WORKLOADS: dict[str, tuple[Callable[[str, dict], float], int]] = {
    # name: (run, warm repeats)
    "seq": (w_seq, 3),
    "small": (w_small, 1),
    "find": (w_find, 3),
    "lsR": (w_lsR, 3),
    "rand": (w_rand, 1),
}


# -- images ---------------------------------------------------------------------------------------------


def make_xattr_tree(tree: str, dest: str) -> int:
    """`tree` copied to `dest` (modes, mtimes, symlinks kept) with an xattr on every
    XATTR_EVERY-th regular file (`user.bench.n`; the first of them also `security.capability`).
    Returns how many files carry one."""
    if not os.path.isdir(dest):
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tree, tmp, symlinks=True)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp) for f in fs
                       if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))
        for k, p in enumerate(files[::XATTR_EVERY]):
            st = os.lstat(p)
            os.setxattr(p, "user.bench.n", b"%d" % k)
            if k == 0:
                os.setxattr(p, "security.capability", CAPABILITY)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(tmp, dest)
    return sum(1 for d, _, fs in os.walk(dest) for f in fs
               if not os.path.islink(os.path.join(d, f)) and os.listxattr(os.path.join(d, f)))


def build_images(tree: str, work: str, name: str = "img") -> dict[str, object]:
    """RAFS v6 bootstrap + blob + cache view, and a squashfs image (reused if present)."""
    img = os.path.join(work, name)
    stamp = os.path.join(img, "done.json")
    if os.path.exists(stamp):
        return json.loads(Path(stamp).read_text())
    shutil.rmtree(img, ignore_errors=True)
    os.makedirs(img)
    t = time.perf_counter()
    res = build_image(tree_from_directory(tree), os.path.join(img, "boot"), os.path.join(img, "blobs"),
                      BuildOptions())
    t_build = time.perf_counter() - t
    views = []
    for bid in res.blob_ids:
        views.append(os.path.join(img, f"view-{bid[:16]}"))
        write_cache_view(os.path.join(img, "boot"), os.path.join(img, "blobs"), bid, views[-1])
    sqfs = os.path.join(img, "image.sqfs")
    subprocess.run(["mksquashfs", tree, sqfs, "-comp", "zstd", "-noappend", "-quiet", "-no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    info = {"boot": os.path.join(img, "boot"), "blobs": os.path.join(img, "blobs"), "views": views, "sqfs": sqfs,
            "inodes": res.inodes, "blob_bytes": res.compressed_bytes, "data_bytes": res.uncompressed_bytes,
            "build_s": t_build}
    Path(stamp).write_text(json.dumps(info))
    return info


def write_config(path: str, blob_dir: str, **extra: object) -> str:
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": blob_dir}}}, "mode": "direct",
           "digest_validate": False, "enable_xattr": True, **extra}
    Path(path).write_text(json.dumps(cfg))
    return path


# -- measurements ---------------------------------------------------------------------------------------


def run_workloads(servers: list[Server], reps: int, ctx: dict, workloads: list[str]) -> dict:
    """raw[workload][temp][server] = [seconds per rep]; plus nydus_py RSS after cold ls -lR."""
    raw: dict = {w: {"cold": {}, "warm": {}} for w in workloads}
    rss: list[tuple[float, float]] = []
    for rep in range(reps):
        order = servers[rep % len(servers):] + servers[: rep % len(servers)]
        for wname in workloads:
            fn, warm_n = WORKLOADS[wname]
            for s in order:
                s.stop()
                drop_caches()
                s.start()
                cold = fn(s.root, ctx)
                if wname == "lsR" and s.name == "nydus_py":
                    rss.append(s.rss_mib())
                warm = statistics.median(fn(s.root, ctx) for _ in range(warm_n))
                raw[wname]["cold"].setdefault(s.name, []).append(cold)
                raw[wname]["warm"].setdefault(s.name, []).append(warm)
                print(f"  rep {rep} {wname:5s} {s.name:13s} cold {cold * 1e3:9.1f} ms  warm {warm * 1e3:9.1f} ms",
                      flush=True)
        for s in servers:
            s.stop()
    return {"raw": raw, "rss_after_lsR": rss}


def summarize(raw: dict, names: list[str]) -> dict:
    out: dict = {}
    for wname, temps in raw.items():
        for temp, per in temps.items():
            base = per["native"]
            for name in names:
                vals = per[name]
                ratios = [v / b for v, b in zip(vals, base, strict=True)]
                out.setdefault(wname, {}).setdefault(temp, {})[name] = {
                    "median_s": statistics.median(vals),
                    "ratio": statistics.median(ratios),
                    "ratios": ratios,
                }
    return out


def _stat_batches(path: str, n: int, reps: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", STAT_PROBE, path, str(n), str(reps)], check=True,
                         capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


def getattr_rtt(server: NydusPy, native_root: str, n: int = 2000, reps: int = 15) -> dict[str, object]:
    """One GETATTR round trip: µs per stat(2) on the mount with attr_timeout 0, minus the same on
    ext4, divided by the GETATTRs the daemon counted per stat (its API metrics). A stat of a path
    `a/b/c` is one GETATTR per directory walked (the permission check refreshes its expired
    attributes) plus one for the file: four here, not one. Median and best of `reps` batches."""
    server.start()
    try:
        assert server.apisock is not None
        deadline = time.monotonic() + 30
        while not os.path.exists(server.apisock):  # bound after the mount (nydusd's order)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no API socket at {server.apisock}")
            time.sleep(0.01)
        before = _fop_count(server.apisock)
        fuse = _stat_batches(os.path.join(server.root, BIG), n, reps)
        requests = _fop_count(server.apisock) - before
    finally:
        server.stop()
    per_stat = requests / (n * reps + 1)  # (+1: the probe's warm-up stat)
    native = statistics.median(_stat_batches(os.path.join(native_root, BIG), n, reps))
    med = statistics.median(fuse)
    return {"stat_us": med, "native_stat_us": native, "requests_per_stat": per_stat,
            "getattr_rtt_us": (med - native) / per_stat, "getattr_rtt_best_us": (min(fuse) - native) / per_stat,
            "batches_us": fuse}


def _median_rtt(runs: list[dict[str, object]]) -> dict[str, object]:
    """The run of median round trip among `runs` (of getattr_rtt), with every run's figure."""
    ordered = sorted(runs, key=lambda r: float(r["getattr_rtt_us"]))  # type: ignore[arg-type]
    return {**ordered[len(ordered) // 2], "runs_us": [r["getattr_rtt_us"] for r in runs]}


def _fop_count(apisock: str | None) -> int:
    """FUSE requests the daemon has answered so far (sum of `fop_hits` of GET /api/v1/metrics)."""
    assert apisock is not None
    return sum(api_get(apisock, "/api/v1/metrics")["fop_hits"])


def rss_for_flat_image(work: str, files: int, threads: int) -> dict[str, float]:
    """nydus_py RSS after a cold ls -lR of a flat `files`-file image (built once, reused)."""
    base = os.path.join(work, f"flat{files}")
    boot, blobs = os.path.join(base, "boot"), os.path.join(base, "blobs")
    if not os.path.exists(boot):
        tree = os.path.join(base, "tree")
        shutil.rmtree(base, ignore_errors=True)
        per_dir = 1000
        for i in range(files):
            d = os.path.join(tree, f"d{i // per_dir:04d}")
            if i % per_dir == 0:
                os.makedirs(d)
            with open(os.path.join(d, f"file{i:06d}"), "wb") as f:
                f.write(b"x" * (i % 64))
        build_image(tree_from_directory(tree), boot, blobs, BuildOptions())
        shutil.rmtree(tree)
    mnt = os.path.join(base, "mnt")
    os.makedirs(mnt, exist_ok=True)
    cfg = write_config(os.path.join(base, "config.json"), blobs)
    srv = NydusPy(mnt, boot, cfg, os.path.join(base, "nydusd.log"), threads, probe="d0000")
    srv.start()
    try:
        before, _ = srv.rss_mib()
        t = time.perf_counter()
        subprocess.run(["ls", "-lR"], cwd=mnt, check=True, stdout=subprocess.DEVNULL)
        ls_s = time.perf_counter() - t
        after, peak = srv.rss_mib()
    finally:
        srv.stop()
    return {"files": files, "rss_after_mount_mib": before, "rss_after_lsR_mib": after, "peak_rss_mib": peak,
            "lsR_s": ls_s}


def small_files(tree: str, work: str, name: str) -> tuple[int, str]:
    """The files under SMALL_MAX of `tree`, as a NUL-separated list file for `xargs -0`."""
    small = sorted(os.path.relpath(os.path.join(d, f), tree) for d, _, fs in os.walk(tree) for f in fs
                   if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
                   and os.path.getsize(os.path.join(d, f)) < SMALL_MAX)
    path = os.path.join(work, f"small-{name}.list")
    Path(path).write_bytes(b"\0".join(os.fsencode(p) for p in small))
    return len(small), path


def bench_tree(tree: str, work: str, name: str, args: argparse.Namespace, workloads: list[str]) -> dict:
    """Every server on `tree` (images built under work/name), the workloads `reps` times."""
    n_small, small_list = small_files(tree, work, name)
    print(f"[{name}] building images ...", flush=True)
    info = build_images(tree, work, f"img-{name}")
    mnts = {n: os.path.join(work, f"mnt-{name}-{n}") for n in ("erofs", "squashfuse_ll", "nydus_py", "nydus_py_uring",
                                                               "nydus_py_erofs", "nydus_py_erofs_cached", "nydus_py_cached",
                                                               "nydus_py_base", "nydus_py_uring_base")}
    for m in mnts.values():
        os.makedirs(m, exist_ok=True)
        if is_mountpoint(m):
            subprocess.run(["umount", "-l", m], check=False)
    cfg = write_config(os.path.join(work, f"nydusd-{name}.json"), str(info["blobs"]))
    cache_dir = os.path.join(work, f"cache-{name}")
    shutil.rmtree(cache_dir, ignore_errors=True)  # filled afresh by the first start
    cached_cfg = os.path.join(work, f"nydusd-cached-{name}.json")
    Path(cached_cfg).write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(info["blobs"])}},
                   "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}},
        "mode": "direct", "digest_validate": False, "enable_xattr": True}))
    fuse_cache_dir = os.path.join(work, f"fuse-cache-{name}")  # (its own: the erofs one is handed to the kernel)
    shutil.rmtree(fuse_cache_dir, ignore_errors=True)
    fuse_cached_cfg = os.path.join(work, f"nydusd-fuse-cached-{name}.json")
    Path(fuse_cached_cfg).write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(info["blobs"])}},
                   "cache": {"type": "blobcache", "config": {"work_dir": fuse_cache_dir}}},
        "mode": "direct", "digest_validate": False, "enable_xattr": True}))
    servers: list[Server] = [
        Native(tree),
        Erofs(mnts["erofs"], str(info["boot"]), list(info["views"])),  # type: ignore[arg-type]
        Squashfuse(mnts["squashfuse_ll"], str(info["sqfs"]), os.path.join(work, f"squashfuse-{name}.log")),
        NydusPy(mnts["nydus_py"], str(info["boot"]), cfg, os.path.join(work, f"nydusd-{name}.log"), args.threads),
        NydusPyBase(args.baseline or "", mnts["nydus_py_base"], str(info["boot"]), cfg,
                    os.path.join(work, f"nydusd-base-{name}.log"), args.threads),
        NydusPyUring(mnts["nydus_py_uring"], str(info["boot"]), cfg, os.path.join(work, f"nydusd-uring-{name}.log"),
                     args.threads),
        NydusPyUringBase(args.baseline or "", mnts["nydus_py_uring_base"], str(info["boot"]), cfg,
                         os.path.join(work, f"nydusd-uring-base-{name}.log"), args.threads),
        NydusPyErofs(mnts["nydus_py_erofs"], str(info["boot"]), cfg, os.path.join(work, f"nydusd-erofs-{name}.log"),
                     args.threads),
        NydusPyErofsCached(mnts["nydus_py_erofs_cached"], str(info["boot"]), cached_cfg,
                           os.path.join(work, f"nydusd-erofs-cached-{name}.log"), args.threads, cache_dir),
        NydusPyCached(mnts["nydus_py_cached"], str(info["boot"]), fuse_cached_cfg,
                      os.path.join(work, f"nydusd-cached-{name}.log"), args.threads, fuse_cache_dir),
    ]
    servers = [s for s in servers if s.name == "native" or s.name in args.servers]
    names = [s.name for s in servers]
    print(f"[{name}] {n_small} small files, {info['inodes']} inodes; {args.reps} reps", flush=True)
    try:
        res = run_workloads(servers, args.reps, {"small_list": small_list}, workloads)
    finally:
        for s in servers:
            s.stop()
    return {"image": info, "small_files": n_small, "names": names, "summary": summarize(res["raw"], names),
            "raw": res["raw"], "rss_after_lsR": res["rss_after_lsR"]}


def print_table(title: str, names: list[str], summary: dict, workloads: list[str]) -> None:
    cols = [(w, t) for w in workloads for t in ("cold", "warm")]
    print(f"\n{title}")
    print(f"{'server':14s}" + "".join(f"{w + ' ' + t:>12s}" for w, t in cols))
    for name in names:
        print(f"{name:14s}" + "".join(f"{summary[w][t][name]['ratio']:12.2f}" for w, t in cols))
    print(f"{'native (ms)':14s}" + "".join(f"{summary[w][t]['native']['median_s'] * 1e3:12.1f}" for w, t in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="tree size (1.0 = ~1 GiB, ~20k files)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="nydus_py FUSE worker threads")
    ap.add_argument("--rss-files", type=int, default=100_000, help="flat image size for the RSS goal (0: skip)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    ap.add_argument("--xattr-tree", action=argparse.BooleanOptionalAction, default=True,
                    help="also run on the tree with an xattr on 1%% of its files")
    ap.add_argument("--getattr", action=argparse.BooleanOptionalAction, default=True,
                    help="measure one GETATTR round trip")
    ap.add_argument("--workdir", help="keep the tree and images here (reused across runs)")
    ap.add_argument("--tag", default="fusedev", help="name of the JSON/PNG result files")
    ap.add_argument("--io-uring", action="store_true", help="also nydus_py_uring (FUSE over io_uring)")
    ap.add_argument("--servers", default="erofs,squashfuse_ll,nydus_py,nydus_py_cached,nydus_py_erofs,nydus_py_erofs_cached",
                    help="comma-separated servers besides native (nydus_py_uring is added by --io-uring)")
    ap.add_argument("--baseline", help="another checkout (the code before a change): adds nydus_py_base, run "
                    "in the same rounds as nydus_py, GETATTR round trip included (alternated)")
    ap.add_argument("--rtt-rounds", type=int, default=1, help="GETATTR measurements per daemon (alternated)")
    args = ap.parse_args()
    args.servers = (set(args.servers.split(",")) | ({"nydus_py_uring"} if args.io_uring else set())
                    | ({"nydus_py_base"} if args.baseline else set())
                    | ({"nydus_py_uring_base"} if args.baseline and args.io_uring else set()))
    with fuse_uring_enabled(args.io_uring):
        run(args)


def uring_ratios(runs: dict, workloads: list[str], uring: str = "nydus_py_uring", dev: str = "nydus_py") -> dict:
    """`uring` / `dev` time per workload (nydus_py_uring / nydus_py, or the baseline's pair):
    median of the per-rep ratios (<1: the ring is faster)."""
    out = {}
    for tname, run in runs.items():
        for w in workloads:
            for t in ("cold", "warm"):
                per = run["raw"][w][t]
                ratios = [u / f for u, f in zip(per[uring], per[dev], strict=True)]
                out[f"{tname} {w} {t}"] = statistics.median(ratios)
    return out


def run(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        sys.exit("bench_fusedev needs root (mounts and drop_caches)")
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        sys.exit(f"unknown workloads: {', '.join(sorted(unknown))}")
    t_start = time.perf_counter()
    work = args.workdir or tempfile.mkdtemp(prefix="nydus-bench-fusedev-")
    os.makedirs(work, exist_ok=True)
    tree = os.path.join(work, f"tree-{args.scale:g}")
    if not os.path.isdir(tree):
        print(f"generating tree at scale {args.scale:g} ...", flush=True)
        generate(tree, args.scale)
    trees = {"plain": tree}
    xattr_files = 0
    if args.xattr_tree:
        trees["xattr"] = os.path.join(work, f"tree-{args.scale:g}-xattr")
        xattr_files = make_xattr_tree(tree, trees["xattr"])
        print(f"xattr tree: {xattr_files} files carry an xattr (one also security.capability)", flush=True)
    runs = {name: bench_tree(t, work, name, args, workloads) for name, t in trees.items()}
    main_run = runs["plain"]
    names, summary, info = main_run["names"], main_run["summary"], main_run["image"]

    rtt = rtt_uring = None
    if args.getattr and args.io_uring:
        mnt = os.path.join(work, "mnt-nydus_py_uring_rtt")
        os.makedirs(mnt, exist_ok=True)
        rtt_cfg = write_config(os.path.join(work, "nydusd-rtt.json"), str(info["blobs"]), attr_timeout=0)
        rtt_uring = getattr_rtt(NydusPyUring(mnt, str(info["boot"]), rtt_cfg, os.path.join(work, "nydusd-rtt-uring.log"),
                                             args.threads, apisock=os.path.join(work, "rtt-uring-api.sock")), tree)
    rtt_base = None
    if args.getattr and "nydus_py" in args.servers:
        mnt = os.path.join(work, "mnt-nydus_py_rtt")
        os.makedirs(mnt, exist_ok=True)
        rtt_cfg = write_config(os.path.join(work, "nydusd-rtt.json"), str(info["blobs"]), attr_timeout=0)
        rtts: dict[str, list[dict[str, object]]] = {"nydus_py": [], "nydus_py_base": []}
        for r in range(args.rtt_rounds):
            pair: list[tuple[str, NydusPy]] = [("nydus_py", NydusPy(
                mnt, str(info["boot"]), rtt_cfg, os.path.join(work, "nydusd-rtt.log"), args.threads,
                apisock=os.path.join(work, "rtt-api.sock")))]
            if args.baseline:
                pair.append(("nydus_py_base", NydusPyBase(
                    args.baseline, mnt, str(info["boot"]), rtt_cfg, os.path.join(work, "nydusd-rtt-base.log"),
                    args.threads, apisock=os.path.join(work, "rtt-api-base.sock"))))
            for label, srv in (pair if r % 2 == 0 else pair[::-1]):
                Path(srv.apisock or "").unlink(missing_ok=True)
                rtts[label].append(getattr_rtt(srv, tree))
                print(f"  GETATTR round trip {label}: {rtts[label][-1]['getattr_rtt_us']:.1f} us", flush=True)
        rtt = _median_rtt(rtts["nydus_py"])
        rtt_base = _median_rtt(rtts["nydus_py_base"]) if rtts["nydus_py_base"] else None
    flat = rss_for_flat_image(work, args.rss_files, args.threads) if args.rss_files else None
    rss = main_run["rss_after_lsR"]
    rss_tree = max(r[0] for r in rss) if rss else None

    # -- report --
    for tname, run in runs.items():
        print_table(f"[{tname} tree] ratio to native (median of per-rep ratios; time, >1 = slower), {args.reps} reps, "
                    f"scale {args.scale:g}", names, run["summary"], workloads)
    if "seq" in summary and "nydus_py" in names:
        seq_native = summary["seq"]["cold"]["native"]["median_s"]
        print(f"native seq cold {100 / seq_native:.0f} MiB/s; nydus_py seq cold "
              f"{100 / summary['seq']['cold']['nydus_py']['median_s']:.0f} MiB/s")
    goals = {}
    for (w, t), limit in GOALS.items():
        if w in summary and "nydus_py" in names:
            r = summary[w][t]["nydus_py"]["ratio"]
            goals[f"{w} {t} <= {limit}x"] = {"value": r, "met": r <= limit}
    if rtt is not None:
        rtt_us = float(rtt["getattr_rtt_us"])  # type: ignore[arg-type]
        goals[f"GETATTR round trip <= {GETATTR_GOAL_US:g} us"] = {"value": rtt_us, "met": rtt_us <= GETATTR_GOAL_US}
        print(f"\nGETATTR: {rtt['stat_us']:.1f} us per stat of {BIG} on the mount (median of batches), "
              f"{rtt['native_stat_us']:.1f} us on ext4, {rtt['requests_per_stat']:.2f} GETATTRs per stat -> "
              f"round trip {rtt['getattr_rtt_us']:.1f} us (best batch {rtt['getattr_rtt_best_us']:.1f} us)")
    if rtt_base is not None:
        print(f"GETATTR round trip of the baseline ({args.baseline}): {rtt_base['getattr_rtt_us']:.1f} us "
              f"(best batch {rtt_base['getattr_rtt_best_us']:.1f} us; runs {rtt_base['runs_us']}); "
              f"nydus_py runs {rtt['runs_us'] if rtt else None}")
    uring = None
    if args.io_uring and "nydus_py" in names:
        uring = {"time_ratio_uring_to_fusedev": uring_ratios(runs, workloads), "getattr": rtt_uring}
        base = "nydus_py_uring_base" in names and "nydus_py_base" in names
        if base:
            uring["baseline_time_ratio_uring_to_fusedev"] = uring_ratios(runs, workloads, "nydus_py_uring_base",
                                                                          "nydus_py_base")
        print("\nnydus_py_uring / nydus_py time (median of per-rep ratios; <1: io_uring faster)"
              + (", and the same of the baseline" if base else ""))
        for k, v in uring["time_ratio_uring_to_fusedev"].items():
            old = f"   baseline {uring['baseline_time_ratio_uring_to_fusedev'][k]:6.2f}" if base else ""
            print(f"  {k:24s} {v:6.2f}{old}")
        if rtt_uring is not None:
            print(f"GETATTR over io_uring: round trip {rtt_uring['getattr_rtt_us']:.1f} us (best batch "
                  f"{rtt_uring['getattr_rtt_best_us']:.1f} us)" + (
                      f"; /dev/fuse {rtt['getattr_rtt_us']:.1f} us -> ratio "
                      f"{float(rtt_uring['getattr_rtt_us']) / float(rtt['getattr_rtt_us']):.2f}" if rtt else ""))
    if flat:
        goals[f"RSS after ls -lR, {flat['files']} files <= {RSS_GOAL_MIB:g} MiB"] = {
            "value": flat["rss_after_lsR_mib"], "met": flat["rss_after_lsR_mib"] <= RSS_GOAL_MIB}
    if rss_tree is not None:
        print(f"nydus_py RSS after cold ls -lR of this tree: {rss_tree:.1f} MiB")
    if flat:
        print(f"nydus_py RSS after ls -lR of a {flat['files']}-file image: {flat['rss_after_lsR_mib']:.1f} MiB "
              f"(after mount {flat['rss_after_mount_mib']:.1f}, peak {flat['peak_rss_mib']:.1f}; "
              f"ls -lR {flat['lsR_s']:.2f} s)")
    for tname, run in runs.items():
        if not {"nydus_py", "nydus_py_erofs", "nydus_py_erofs_cached"} <= set(names):
            break
        for w in workloads:
            for t in ("cold", "warm"):
                e = run["summary"][w][t]["nydus_py_erofs"]["ratio"]
                f = run["summary"][w][t]["nydus_py"]["ratio"]
                c = run["summary"][w][t]["nydus_py_erofs_cached"]["ratio"]
                if (w, t) in GOALS:
                    goals[f"erofs driver, complete cache [{tname}]: {w} {t} <= {GOALS[(w, t)]:g}x"] = {
                        "value": c, "met": c <= GOALS[(w, t)]}
                if t == "warm" and w in ("lsR", "find", "small"):
                    goals[f"erofs driver [{tname}]: {w} warm <= {EROFS_DRIVER_WARM_GOAL:g}x (fusedev {f:.2f}x)"] = {
                        "value": e, "met": e <= EROFS_DRIVER_WARM_GOAL}
                else:
                    goals[f"erofs driver [{tname}]: {w} {t} (vs fusedev {f:.2f}x)"] = {"value": e, "met": e <= f}
    print("\ngoals:")
    for k, v in goals.items():
        print(f"  {k:60s} {v['value']:8.2f}  {'met' if v['met'] else 'NOT met'}")
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.0f} s")
    payload = {"scale": args.scale, "reps": args.reps, "threads": args.threads, "workloads": workloads,
               "image": info, "small_files": main_run["small_files"], "summary": summary, "raw": main_run["raw"],
               "rss_after_lsR_tree_mib": rss, "getattr": rtt, "getattr_baseline": rtt_base,
               "baseline": args.baseline, "loadavg_end": os.getloadavg(), "rss_flat": flat, "goals": goals,
               "xattr_tree": ({"files_with_xattr": xattr_files, "image": runs["xattr"]["image"],
                               "summary": runs["xattr"]["summary"], "raw": runs["xattr"]["raw"]}
                              if "xattr" in runs else None),
               "io_uring": uring, "elapsed_s": elapsed}
    path = save(args.tag, payload)
    cols = [(tn, w, t) for tn in runs for w in workloads for t in ("cold", "warm")]
    labels = [f"{w} {t}\n{tn}" for tn, w, t in cols]
    png = grouped_bar_plot(args.tag, f"Ratio to native (scale {args.scale:g}, {args.reps} reps)", labels,
                           {n: [runs[tn]["summary"][w][t][n]["ratio"] for tn, w, t in cols]
                            for n in names if n != "native"},
                           "x native time (log)", log=True)
    print(f"saved {path} and {png}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
