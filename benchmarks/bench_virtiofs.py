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

`stall_4readers_5000` (benchmarks/vfs_stall.py): the 5,000 files as a two-blob RAFS image lazily
served from a local docker-registry through a fault proxy that stalls one blob for
`--stall-seconds`; 4 guest readers, one blocked on the stalled blob, and the time for the other 3
to read the rest. Run by the RAFS servers only (`nydus_py rafs`, `1w`, `2q4w`), one VM per rep:
virtiofsd cannot serve a registry image, so it has no ratio; the JSON and the output say so.
`--workloads` picks workloads (default: all); `--save-as` names the results files.
`--baseline-repo DIR` adds `nydus_py passthrough baseline`, the passthrough server of another
checkout (its own PYTHONPATH), run right after `nydus_py passthrough` (`--baseline-first`: right
before), to compare two versions of the code in one run against the same virtiofsd;
`--baseline-server rafs` does the same for the RAFS server (`nydus_py rafs baseline`).

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
from vfs_stall import NOT_APPLICABLE, StallRig
from vfs_stall import WORKLOAD as STALL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.transport.virtio_rig import run_guest, stop_pid  # noqa: E402

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
WORKLOADS = ("dd_direct_50MB", "find_5000", "cat_5000")
STALL_SERVERS = ("nydus_py rafs", "nydus_py rafs 1w", "nydus_py rafs 2q4w")  # the others can't serve a registry

GUEST_HEAD = r"""
now() { awk '/^now at/ {print $3; exit}' /proc/timer_list; }
span() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", (b - a) / 1e6}'; }
for r in $(seq @REPS@); do
"""
GUEST_STEPS = {
    "dd_direct_50MB": r"""  echo 3 > /proc/sys/vm/drop_caches; a=$(now)
  dd if=big.bin of=/dev/null bs=1M iflag=direct 2>/dev/null; b=$(now); echo "dd_direct_50MB $(span $a $b)"
""",
    "find_5000": r"""  echo 3 > /proc/sys/vm/drop_caches; a=$(now)
  n=$(find many | wc -l); b=$(now); echo "find_5000 $(span $a $b) $n"
""",
    "cat_5000": r"""  echo 3 > /proc/sys/vm/drop_caches; a=$(now)
  cat many/*/* | wc -c > /dev/null; b=$(now); echo "cat_5000 $(span $a $b)"
""",
}


def guest_script(workloads: list[str], reps: int) -> str:
    return GUEST_HEAD.replace("@REPS@", str(reps)) + "".join(GUEST_STEPS[w] for w in workloads) + "done\n"


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


def measure(name: str, cmd: list[str], sock: str, work: Path, reps: int, workloads: list[str],
            device_opts: str = "", repo: Path = REPO) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(repo)} if repo != REPO else None
    with open(work / f"{name}.log", "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=repo, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                                env=env)
    try:
        r = run_guest(sock, guest_script(workloads, reps), work / f"vm-{name}", timeout=600,
                      watch_pid=proc.pid, device_opts=device_opts)
    finally:
        stop_pid(proc)
    out: dict[str, list[float]] = {w: [] for w in workloads}
    for line in r.check().splitlines():
        parts = line.split()
        if parts and parts[0] in out:
            out[parts[0]].append(float(parts[1]))
            if parts[0] == "find_5000" and parts[2] != "5051":
                raise RuntimeError(f"{name}: find saw {parts[2]} entries")
    return out


def plot(servers: dict[str, dict[str, float]], workloads: list[str], stall: dict[str, dict[str, object]],
         name: str) -> Path:
    """The classic workloads as grouped bars (left), the stall workload's figures (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(workloads and servers)) + int(bool(stall))
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 4.5), squeeze=False)
    k0 = 0
    if workloads and servers:
        ax = axes[0][0]
        k0 = 1
        names = list(servers)
        width = 0.8 / len(names)
        for k, sname in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(workloads))]
            vals = [servers[sname][w] for w in workloads]
            ax.bar(xs, vals, width, label=sname)
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads)
        ax.set_ylabel("guest ms (median, lower is better)")
        ax.set_title("virtio-fs in a TCG guest: nydus_py vs QEMU virtiofsd")
        ax.legend()
    if stall:
        ax = axes[0][k0]
        names = list(stall)
        for k, key in enumerate(("readers3_ms", "reader4_ms")):
            xs = [i + (k - 0.5) * 0.4 for i in range(len(names))]
            vals = [float(stall[n][key]) for n in names]  # type: ignore[arg-type]
            ax.bar(xs, vals, 0.4, label={"readers3_ms": "3 readers done (the figure)",
                                         "reader4_ms": "4th reader (stalled blob) done"}[key])
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel("guest ms from the 3 readers' start (median)")
        ax.set_title(f"{STALL}: one blob stalled (virtiofsd: n/a, no registry)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stall_summary(runs: list[dict[str, object]]) -> dict[str, object]:
    """Medians over the reps of one server, with every rep kept."""
    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)  # type: ignore[arg-type]

    out: dict[str, object] = {"readers3_ms": med("readers3_ms"), "reader4_ms": med("reader4_ms"),
                              "reader4_blocked_at_end": [r["reader4_blocked_at_end"] for r in runs],
                              "stall_s": [r.get("stall_s") for r in runs], "runs": runs}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "virtiofs"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", default="", help="comma-separated subset of the servers to run (virtiofsd "
                    "is always run for the classic workloads: ratios are to it)")
    ap.add_argument("--workloads", default="", help=f"comma-separated subset of {[*WORKLOADS, STALL]} "
                    "(default: all)")
    ap.add_argument("--stall-seconds", type=float, default=30.0,
                    help=f"{STALL}: the proxy lets the stalled blob through this long after its first GET")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the servers' sequence this many times, every other round in reverse order, and "
                         "pool each server's reps: servers then share the machine's drifts (each round boots a "
                         "guest per server with --reps reps)")
    ap.add_argument("--save-as", default="bench_virtiofs", help="results name under benchmarks/results")
    ap.add_argument("--baseline-repo", help="also run `nydus_py passthrough baseline`: the passthrough server of "
                    "another checkout (e.g. the main branch), in the same run, to compare code versions")
    ap.add_argument("--baseline-server", choices=("passthrough", "rafs"), default="passthrough",
                    help="which server --baseline-repo runs with the other checkout's code")
    ap.add_argument("--baseline-first", action="store_true",
                    help="run the baseline before `nydus_py passthrough` (alternate the order across runs)")
    args = ap.parse_args()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()] or [*WORKLOADS, STALL]
    if unknown_w := set(chosen) - {*WORKLOADS, STALL}:
        ap.error(f"unknown workloads {sorted(unknown_w)}; known: {[*WORKLOADS, STALL]}")
    classic = [w for w in WORKLOADS if w in chosen]
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
    repos: dict[str, Path] = {}
    base = f"nydus_py {args.baseline_server} baseline"
    if args.baseline_repo:
        repos[base] = Path(args.baseline_repo).resolve()
        base_sock = str(tmp / "base.sock")
        base_run = (base_sock, [*daemon(base_sock), "--shared-dir", str(work / "tree")]
                    if args.baseline_server == "passthrough"
                    else [*daemon(base_sock), "--bootstrap", str(boot), "--config", str(cfg)])
        order = list(runs)
        at = order.index(f"nydus_py {args.baseline_server}") + (0 if args.baseline_first else 1)
        order.insert(at, base)
        runs = {n: base_run if n == base else runs[n] for n in order}
    # the RAFS servers' options beyond --bootstrap/--config, for the stall workload's own daemons
    stall_args = {"nydus_py rafs": [], "nydus_py rafs 1w": ["--virtio-workers", "1"],
                  "nydus_py rafs 2q4w": ["--virtio-queues", "2", "--virtio-workers", "4"]}
    device_opts = {"nydus_py rafs 2q4w": "num-request-queues=2"}
    wanted = {"virtiofsd", *(n.strip() for n in args.servers.split(",") if n.strip())} if args.servers else set(runs)
    if unknown := wanted - set(runs):
        ap.error(f"unknown servers {sorted(unknown)}; known: {list(runs)}")
    payload: dict[str, object] = {"accel": "tcg", "smp": 1, "reps": args.reps, "rounds": args.rounds,
                                  "unit": "guest ms",
                                  "workloads": chosen, "server_order": [n for n in runs if n in wanted],
                                  "loadavg_start": os.getloadavg()}
    if args.baseline_repo:
        payload["baseline_repo"] = str(repos[base])
    med: dict[str, dict[str, float]] = {}
    if classic:
        raw: dict[str, dict[str, list[float]]] = {}
        for rnd in range(max(1, args.rounds)):
            names = [n for n in runs if n in wanted]
            for name in names if rnd % 2 == 0 else names[::-1]:
                sock, cmd = runs[name]
                if "@blobcache" in cmd:
                    cmd = [str(warm_cache(work, boot, work / "blobs")) if a == "@blobcache" else a for a in cmd]
                got = measure(name.replace(" ", "_"), cmd, sock, tmp, args.reps, classic,
                              device_opts.get(name, ""), repos.get(name, REPO))
                for w, vals in got.items():
                    raw.setdefault(name, {}).setdefault(w, []).extend(vals)
                print(f"round {rnd}", name, {w: [round(v) for v in vals] for w, vals in got.items()}, flush=True)
        med = {name: {w: statistics.median(v) for w, v in vals.items()} for name, vals in raw.items()}
        ratios = {name: {w: med[name][w] / med["virtiofsd"][w] for w in classic} for name in med}
        for name in med:
            print(f"{name:22s}", "  ".join(f"{w} {med[name][w]:8.1f} ms x{ratios[name][w]:.2f}" for w in classic))
        payload.update({"median_ms": med, "ratio_to_virtiofsd": ratios, "raw_ms": raw})
    stall: dict[str, dict[str, object]] = {}
    if STALL in chosen:
        rig = StallRig(work, args.stall_seconds)
        try:
            for name in STALL_SERVERS:
                if name not in wanted:
                    continue
                reps = [rig.measure(name, stall_args[name], device_opts.get(name, "")) for _ in range(args.reps)]
                stall[name] = stall_summary(reps)
                print(f"{STALL} {name}: " + "; ".join(
                    f"3 readers {r['readers3_ms']} ms, 4th reader {r['reader4_ms']} ms, 4th still blocked when "
                    f"the 3 finished: {r['reader4_blocked_at_end']}, stall {r.get('stall_s')} s"
                    for r in reps), flush=True)
        finally:
            rig.close()
        print(f"{STALL} virtiofsd: {NOT_APPLICABLE}")
        payload[STALL] = {"stall_seconds": args.stall_seconds, "unit": "guest ms from the 3 readers' start",
                          "servers": stall, "virtiofsd": NOT_APPLICABLE, "ratio_to_virtiofsd": None}
    payload["loadavg_end"] = os.getloadavg()
    save(args.save_as, payload)
    plot(med, classic, stall, args.save_as)
    return 0


if __name__ == "__main__":
    sys.exit(main())
