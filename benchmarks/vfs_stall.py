"""bench_virtiofs.py's `stall_4readers_5000` workload: a RAFS share lazily served from a registry
while one of its two blobs is stalled.

The image: the 5,000 six-byte files of many/d00..d49, built as two layers, so two blobs: d00..d39
(4,000 files) and d40..d49 (1,000 files, the stalled blob). It is pushed to a local Debian
`docker-registry` (tests/storage/registry_rig.py) and served by `nydusd-py virtiofs` with a
registry backend and an empty blob cache, through the fault proxy of tests/storage/fault_proxy.py,
which holds every GET of the stalled blob's data region and lets them through `stall_seconds`
after the first one arrived (a bounded stall, so a server that waits for it still finishes).

In the guest: one file of blob 0 is read first, so the figure measures the worker pool alone
(before storage/registry/http bounded how long other requests wait for a client's first one, a
stalled first GET held up all fetches whatever the transport: 3 readers took about the stall
with 4 workers; now they would wait FIRST_WAIT). Then, after drop_caches, a 4th reader `cat`s the stalled blob's 1,000 files in the
background; once it has been in D state for 5 samples 0.1 s apart (blocked in the held READ), 3
readers `cat` the other 4,000 files (13, 13 and 14 directories) in parallel. The figure is the time
from their start until all 3 have finished (`readers3_ms`); `reader4_ms` is when the 4th finished
(from the same start), and `reader4_blocked_at_end` whether it was still blocked when the 3 were
done (what a worker pool should achieve). The 3 readers' chunks come from the registry too, on
demand and not held: a few amplified GETs fetch blob 0's data, the other reads are blob-cache hits.

QEMU's virtiofsd serves directories only, not a lazily fetched registry image, and
`nydus_py passthrough` serves a host directory: neither runs this workload, so there is no ratio,
only absolute guest ms per nydus_py RAFS configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.rafs import open_bootstrap  # noqa: E402
from nydus_py.storage.prefetch import resolve_path  # noqa: E402
from nydus_py.storage.registry import RegistryBackend, parse_registry_config  # noqa: E402
from tests.storage import images  # noqa: E402
from tests.storage import registry_rig as rig  # noqa: E402
from tests.storage.fault_proxy import FaultProxy, Request  # noqa: E402
from tests.transport.virtio_rig import run_guest, stop_pid  # noqa: E402
from tests.waiting import WaitTimeout, wait_until  # noqa: E402

WORKLOAD = "stall_4readers_5000"
NOT_APPLICABLE = ("not applicable: QEMU's virtiofsd serves a host directory and cannot serve a lazily "
                  "fetched registry image (and nydus_py passthrough serves a directory too); no ratio, "
                  "absolute guest ms only")
STALLED_DIRS = range(40, 50)  # many/d40..d49: the second layer, the stalled blob
REPO_NAME = "bench/vfs-stall"

GUEST = r"""
now() { awk '/^now at/ {print $3; exit}' /proc/timer_list; }
span() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", (b - a) / 1e6}'; }
st() { if [ -e /proc/$1/stat ]; then awk '{print $3}' /proc/$1/stat; else echo gone; fi; }
cat many/d00/f000 > /dev/null
echo 3 > /proc/sys/vm/drop_caches
cat many/d4?/* > /tmp/o4 &
p4=$!
k=0; i=0
while [ $k -lt 5 ] && [ $i -lt 1500 ]; do
  if [ "$(st $p4)" = D ]; then k=$((k+1)); else k=0; fi
  usleep 100000; i=$((i+1))
done
echo "reader4_waiting samples=$k state=$(st $p4) wchan=$(cat /proc/$p4/wchan 2>/dev/null)"
a=$(now)
cat many/d0?/* many/d1[0-2]/* > /tmp/o1 &
p1=$!
cat many/d1[3-9]/* many/d2[0-5]/* > /tmp/o2 &
p2=$!
cat many/d2[6-9]/* many/d3?/* > /tmp/o3 &
p3=$!
wait $p1; wait $p2; wait $p3
b=$(now); s4=$(st $p4)
echo "readers3 $(span $a $b) $s4 $(wc -c < /tmp/o1) $(wc -c < /tmp/o2) $(wc -c < /tmp/o3)"
wait $p4
c=$(now)
echo "reader4 $(span $a $c) $(wc -c < /tmp/o4)"
"""
# bytes each reader must have read: six bytes a file
EXPECT = {"o1": 6 * 1300, "o2": 6 * 1300, "o3": 6 * 1400, "o4": 6 * 1000}


@dataclass
class StallImage:
    boot: Path
    blob_dir: Path
    blob_ids: list[str]
    stalled: str  # blob id of the stalled blob
    stalled_end: int  # end of its data region (chunks); its meta lies after and is not held


def write_layers(root: Path) -> None:
    """many/dNN/fNNN as in bench_virtiofs.make_tree, d40..d49 in the second layer."""
    for d in range(50):
        sub = root / ("l1" if d in STALLED_DIRS else "l0") / "many" / f"d{d:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(100):
            (sub / f"f{i:03d}").write_bytes(b"%05d\n" % (d * 100 + i))


def build_image(root: Path) -> StallImage:
    """Two layers, two blobs: the second built on the first's bootstrap (`--parent-bootstrap`)."""
    boot, blobs = root / "image.boot", root / "blobs"
    if not boot.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_layers(root / "src")
        blobs.mkdir(parents=True)
        create = [sys.executable, "-m", "nydus_py.cli.image", "create", "--blob-dir", str(blobs)]
        subprocess.run([*create, "--bootstrap", str(root / "l0.boot"), str(root / "src" / "l0")], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*create, "--bootstrap", str(root / "tmp.boot"), "--parent-bootstrap",
                        str(root / "l0.boot"), str(root / "src" / "l1")], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        (root / "tmp.boot").rename(boot)
    with open_bootstrap(str(boot)) as image:
        ids = [b.blob_id for b in image.blobs]
        chunks = []
        for d in STALLED_DIRS:
            for i in range(100):
                ino = resolve_path(image, f"/many/d{d:02d}/f{i:03d}".encode())
                if ino is None:
                    raise RuntimeError(f"many/d{d:02d}/f{i:03d} is not in {boot}")
                chunks += image.chunks(ino)
    if len(ids) != 2 or {c.blob_index for c in chunks} != {1}:
        raise RuntimeError(f"expected 2 blobs with d40..d49 in the second: {ids}, "
                           f"{sorted({c.blob_index for c in chunks})}")
    end = max(c.compressed_offset + c.compressed_size for c in chunks)
    return StallImage(boot, blobs, ids, ids[1], end)


def push(image: StallImage, registry_host: str) -> None:
    from bench_lazy_registry import push_nydus

    cfg = parse_registry_config(images.registry_config(registry_host, REPO_NAME, timeout=120), env={},
                                docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        push_nydus(b, image.boot, image.blob_dir, image.blob_ids, "v1")


def holds(image: StallImage) -> Callable[[Request], bool]:
    """hold_if for the proxy: GETs of the stalled blob whose range starts in its data region."""
    def pick(r: Request) -> bool:
        if r.method != "GET" or f"/blobs/sha256:{image.stalled}" not in r.path:
            return False
        if r.range is None:
            return True
        return int(r.range.split("=")[1].split("-")[0]) < image.stalled_end
    return pick


@dataclass
class Release:
    """Lets the held GETs through `seconds` after the first one arrived (or at stop())."""
    proxy: FaultProxy
    seconds: float
    held_at: float | None = None
    released_at: float | None = None
    note: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            wait_until(lambda: self.proxy.held or self._stop.is_set(), 300, "the stalled blob's first GET")
            if self.proxy.held:
                self.held_at = time.monotonic()
                self._stop.wait(self.seconds)  # the bounded stall: a deadline, not an ordering
            else:
                self.note = "stopped before any GET of the stalled blob was held"
        except WaitTimeout as e:
            self.note = str(e)
        finally:
            self.released_at = time.monotonic()
            self.proxy.release_held()

    def stop(self) -> None:
        self._stop.set()


def parse(name: str, out: str) -> dict[str, object]:
    r: dict[str, object] = {}
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "reader4_waiting":
            r["reader4_waiting"] = " ".join(parts[1:])
        elif parts[0] == "readers3":
            r["readers3_ms"] = float(parts[1])
            r["reader4_state_at_end"] = parts[2]
            r["reader4_blocked_at_end"] = parts[2] == "D"
            got = dict(zip(("o1", "o2", "o3"), (int(x) for x in parts[3:6]), strict=True))
            if any(got[k] != EXPECT[k] for k in got):
                raise RuntimeError(f"{name}: the 3 readers read {got}, expected {EXPECT}")
        elif parts[0] == "reader4":
            r["reader4_ms"] = float(parts[1])
            if int(parts[2]) != EXPECT["o4"]:
                raise RuntimeError(f"{name}: the 4th reader read {parts[2]} bytes, expected {EXPECT['o4']}")
    if "readers3_ms" not in r or "reader4_ms" not in r:
        raise RuntimeError(f"{name}: incomplete guest output:\n{out[-2000:]}")
    return r


class StallRig:
    """The registry with the image pushed; `measure` runs one server configuration once."""

    def __init__(self, work: Path, stall_seconds: float) -> None:
        self.image = build_image(work / "stall-image")
        self.stall_seconds = stall_seconds
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-vfs-stall-"))
        self.registry = rig.plain_registry(binary, self.tmp / "registry")
        try:
            push(self.image, self.registry.host)
        except BaseException:
            self.registry.stop()
            raise

    def close(self) -> None:
        self.registry.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def measure(self, name: str, daemon_args: list[str], device_opts: str = "") -> dict[str, object]:
        """One VM, one daemon with a fresh blob cache, one proxy holding the stalled blob."""
        run = self.tmp / name.replace(" ", "_")
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        proxy = FaultProxy(self.registry.url)
        proxy.hold_if = holds(self.image)
        backend = images.registry_config(proxy.host, REPO_NAME, timeout=self.stall_seconds + 60,
                                         read_deadline=self.stall_seconds + 120)
        cfg = run / "config.json"
        cfg.write_text(json.dumps(images.nydusd_config(backend, str(run / "cache"))))
        sock = str(run / "vfs.sock")
        cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--log-level", "warn",
               "--bootstrap", str(self.image.boot), "--config", str(cfg), *daemon_args]
        release = Release(proxy, self.stall_seconds)
        t = threading.Thread(target=release.run, name="stall-release", daemon=True)
        with open(run / "daemon.log", "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=logf, env=images.env_without_auth())
        t.start()
        try:
            r = run_guest(sock, GUEST, run / "vm", timeout=self.stall_seconds + 400, watch_pid=proc.pid,
                          device_opts=device_opts)
        finally:
            release.stop()
            t.join(15)
            stop_pid(proc)
            proxy.stop()
        res = parse(name, r.check())
        res["held_gets"] = proxy.held
        if release.held_at is not None and release.released_at is not None:
            res["stall_s"] = round(release.released_at - release.held_at, 2)
        if release.note:
            res["release_note"] = release.note
        return res
