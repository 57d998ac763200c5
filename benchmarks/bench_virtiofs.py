"""nydus_py's vhost-user-fs backend against QEMU's C virtiofsd, measured inside a QEMU TCG guest.

One tree: a 50 MB file and 5,000 six-byte files in 50 directories (VIRTIOFS-NOTES.md §3's
shape). Servers, each behind its own short-lived VM (tests/transport/virtio_rig.py):
* `virtiofsd`: /usr/lib/qemu/virtiofsd -o cache=auto over the unpacked tree (the reference);
* `nydus_py rafs`: `nydusd-py virtiofs --bootstrap` on a RAFS v6 image of the same tree;
* `nydus_py passthrough`: `nydusd-py virtiofs --shared-dir` over the unpacked tree;
* `nydus_py rafs blobcache`: the RAFS server with a blob cache (`device.cache.type = blobcache`)
  filled before the VM boots, so READs are preadv'ed from `<blob>.blob.data` into guest memory
  (`BlobDevice.read_ready_into`, the steady state after a first read);
* `nydus_py rafs 1w`: the RAFS server with `--virtio-workers 1` (each queue answered in its own
  thread: what the worker pool costs or gains);
* `nydus_py rafs 2q4w`: `--virtio-queues 2 --virtio-workers 4` behind QEMU's
  `num-request-queues=2` (the guest kernel decides how many it uses; 6.1 with one vCPU uses one).
Guest workloads, each after `drop_caches` in the guest, timed with /proc/timer_list ("now at",
busybox has no %N): `dd bs=1M iflag=direct` of the 50 MB file (every byte a FUSE READ into guest
RAM: the backend-throughput probe), `find` over the 5,000 files, `cat` of all of them. Each
workload runs `--reps` times per VM; the median counts. Ratio = server / virtiofsd (goal ≤ 1.5).

TCG on 2 shared host cores: absolute numbers measure this machine; compare ratios of one run.
"""

import argparse
import json
import os
import stat
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.transport.virtio_rig import run_guest, stop_pid  # noqa: E402

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
WORKLOADS = ("dd_direct_50MB", "find_5000", "cat_5000")

GUEST = r"""
now() { awk '/^now at/ {print $3; exit}' /proc/timer_list; }
span() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", (b - a) / 1e6}'; }
for r in $(seq @REPS@); do
  echo 3 > /proc/sys/vm/drop_caches; a=$(now)
  dd if=big.bin of=/dev/null bs=1M iflag=direct 2>/dev/null; b=$(now); echo "dd_direct_50MB $(span $a $b)"
  echo 3 > /proc/sys/vm/drop_caches; a=$(now)
  n=$(find many | wc -l); b=$(now); echo "find_5000 $(span $a $b) $n"
  echo 3 > /proc/sys/vm/drop_caches; a=$(now)
  cat many/*/* | wc -c > /dev/null; b=$(now); echo "cat_5000 $(span $a $b)"
done
"""


def make_tree(root: Path) -> None:
    if (root / "done").exists():
        return
    (root / "tree" / "many").mkdir(parents=True, exist_ok=True)
    with open(root / "tree" / "big.bin", "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(50):
            f.write(block[i:] + block[:i])  # incompressible, not one repeated chunk
    for d in range(50):
        sub = root / "tree" / "many" / f"d{d:02d}"
        sub.mkdir(exist_ok=True)
        for i in range(100):
            (sub / f"f{i:03d}").write_bytes(b"%05d\n" % (d * 100 + i))
    (root / "done").write_text("")


def build_image(root: Path) -> tuple[Path, Path]:
    boot, blobs, cfg = root / "image.boot", root / "blobs", root / "config.json"
    if not boot.exists():
        blobs.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "nydus_py.cli.image", "create", "--bootstrap", str(boot),
                        "--blob-dir", str(blobs), str(root / "tree")], cwd=REPO, check=True)
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}},
                               "mode": "direct"}))
    return boot, cfg


def warm_cache(root: Path, boot: Path, blobs: Path) -> Path:
    """A config with a blob cache under `root`/cache, every file of the image read through it
    once (chunks ready and persisted), as a daemon's cache is after a first read."""
    from nydus_py.config import parse_any
    from nydus_py.rafs import open_bootstrap
    from nydus_py.storage.device import BlobDevice
    from nydus_py.storage.factory import make_source

    cfg = root / "config-blobcache.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                          "cache": {"type": "blobcache",
                                                    "config": {"work_dir": str(root / "cache")}}},
                               "mode": "direct"}))
    image = open_bootstrap(str(boot))
    source = make_source(parse_any(cfg.read_text()).rafs)
    device = BlobDevice(image, source, validate=False)
    for _path, ino in image.walk():
        attr = image.getattr(ino)
        if stat.S_ISREG(attr.mode) and attr.size:
            device.read(ino, 0, attr.size)
    close = getattr(source, "close", None)
    if callable(close):
        close()  # flushes the chunk maps
    image.close()
    return cfg


def measure(name: str, cmd: list[str], sock: str, work: Path, reps: int,
            device_opts: str = "") -> dict[str, list[float]]:
    with open(work / f"{name}.log", "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)
    try:
        r = run_guest(sock, GUEST.replace("@REPS@", str(reps)), work / f"vm-{name}", timeout=600,
                      watch_pid=proc.pid, device_opts=device_opts)
    finally:
        stop_pid(proc)
    out: dict[str, list[float]] = {w: [] for w in WORKLOADS}
    for line in r.check().splitlines():
        parts = line.split()
        if parts and parts[0] in out:
            out[parts[0]].append(float(parts[1]))
            if parts[0] == "find_5000" and parts[2] != "5051":
                raise RuntimeError(f"{name}: find saw {parts[2]} entries")
    return out


def plot(servers: dict[str, dict[str, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(servers)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(WORKLOADS))]
        vals = [servers[name][w] for w in WORKLOADS]
        ax.bar(xs, vals, width, label=name)
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(WORKLOADS)))
    ax.set_xticklabels(WORKLOADS)
    ax.set_ylabel("guest ms (median, lower is better)")
    ax.set_title("virtio-fs in a TCG guest: nydus_py vs QEMU virtiofsd")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "bench_virtiofs.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "virtiofs"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", default="", help="comma-separated subset of the servers to run (virtiofsd "
                    "is always run: ratios are to it)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    make_tree(work)
    boot, cfg = build_image(work)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vfs-"))
    socks = {k: str(tmp / f"{k}.sock") for k in ("c", "rafs", "pt", "rafs1", "rafs2q", "rafsbc")}

    def daemon(sock: str) -> list[str]:
        return [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--log-level", "warn"]

    runs = {
        "virtiofsd": (socks["c"], [VIRTIOFSD, f"--socket-path={socks['c']}", "-o", f"source={work / 'tree'}",
                                   "-o", "cache=auto"]),
        "nydus_py rafs": (socks["rafs"], [*daemon(socks["rafs"]), "--bootstrap", str(boot), "--config", str(cfg)]),
        "nydus_py rafs blobcache": (socks["rafsbc"], [*daemon(socks["rafsbc"]), "--bootstrap", str(boot),
                                                      "--config", "@blobcache"]),
        "nydus_py passthrough": (socks["pt"], [*daemon(socks["pt"]), "--shared-dir", str(work / "tree")]),
        "nydus_py rafs 1w": (socks["rafs1"], [*daemon(socks["rafs1"]), "--bootstrap", str(boot), "--config", str(cfg),
                                              "--virtio-workers", "1"]),
        "nydus_py rafs 2q4w": (socks["rafs2q"], [*daemon(socks["rafs2q"]), "--bootstrap", str(boot), "--config",
                                                 str(cfg), "--virtio-queues", "2", "--virtio-workers", "4"]),
    }
    device_opts = {"nydus_py rafs 2q4w": "num-request-queues=2"}
    wanted = {"virtiofsd", *(n.strip() for n in args.servers.split(",") if n.strip())} if args.servers else set(runs)
    if unknown := wanted - set(runs):
        ap.error(f"unknown servers {sorted(unknown)}; known: {list(runs)}")
    raw: dict[str, dict[str, list[float]]] = {}
    for name, (sock, cmd) in runs.items():
        if name not in wanted:
            continue
        if "@blobcache" in cmd:
            cmd = [str(warm_cache(work, boot, work / "blobs")) if a == "@blobcache" else a for a in cmd]
        raw[name] = measure(name.replace(" ", "_"), cmd, sock, tmp, args.reps, device_opts.get(name, ""))
        print(name, {w: [round(v) for v in vals] for w, vals in raw[name].items()}, flush=True)
    med = {name: {w: statistics.median(v) for w, v in vals.items()} for name, vals in raw.items()}
    ratios = {name: {w: med[name][w] / med["virtiofsd"][w] for w in WORKLOADS} for name in med}
    for name in med:
        print(f"{name:22s}", "  ".join(f"{w} {med[name][w]:8.1f} ms x{ratios[name][w]:.2f}" for w in WORKLOADS))
    save("bench_virtiofs", {"accel": "tcg", "smp": 1, "reps": args.reps, "unit": "guest ms",
                            "median_ms": med, "ratio_to_virtiofsd": ratios, "raw_ms": raw})
    plot(med)
    return 0


if __name__ == "__main__":
    sys.exit(main())
