"""CPU per request of a guest's cold `find` over a virtio-fs passthrough share, ring to ring, in one
process (no kernel, no QEMU, no thread wake-ups).

The share is put together as `nydusd-py virtiofs --shared-dir` does (DaemonService, the directory
mounted at /, the metrics observer), and a queue's real dispatcher (`QueueWorker._drain`) answers
chains laid out as the Linux virtio-fs driver does (one indirect table each). A pass replays what
benchmarks/virtio_find_requests.py counted for bench_virtiofs's `find many` after drop_caches:
LOOKUP of `many`, GETATTR, then per directory (`many` and its 50 subdirectories) OPENDIR,
READDIRPLUS (4 KiB) until the empty reply, RELEASEDIR; then a FORGET of every inode the pass
looked up (what the guest's drop_caches before the next find sends, one FORGET per inode on the
hiprio queue; deferred and applied by the idle hook, as the server does). Times are the
thread's CPU clock (time.thread_time_ns), so other processes do not count. `--rafs` replays the
same over a RAFS image of the tree (`virtiofs --bootstrap`) for comparison.

`--repo DIR` imports nydus_py from another checkout (e.g. /work/main) to compare versions: run
it alternately with and without.

python3 benchmarks/virtio_find_micro.py [--passes 5] [--repo DIR] [--profile] [--rafs]
"""

import argparse
import contextlib
import cProfile
import json
import mmap
import os
import pstats
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IN_HEADER = struct.Struct("<IIQQIIIHH")
INIT_IN = struct.Struct("<IIIII44x")
OPEN_IN = struct.Struct("<II")
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
RELEASE_IN = struct.Struct("<QIIQ")
FORGET_IN = struct.Struct("<Q")
NUM = 1024
RAM = 16 << 20
OPS = ("LOOKUP", "GETATTR", "OPENDIR", "READDIRPLUS", "RELEASEDIR", "FORGET")
CODES = {"LOOKUP": 1, "FORGET": 2, "GETATTR": 3, "OPENDIR": 27, "READDIRPLUS": 44, "RELEASEDIR": 29}
OUT_SIZE = {"LOOKUP": [16, 128], "GETATTR": [16, 104], "OPENDIR": [16, 16], "READDIRPLUS": [16, 4096],
            "RELEASEDIR": [16], "FORGET": []}
DIRENTPLUS = 152  # fuse_entry_out (128) + fuse_dirent head (24)


def make_tree(root: Path) -> None:
    """bench_virtiofs's `many`: 50 directories of 100 six-byte files."""
    for d in range(50):
        sub = root / "many" / f"d{d:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(100):
            (sub / f"f{i:03d}").write_bytes(b"%05d\n" % (d * 100 + i))


class Driver:
    """Sends a find's requests on a driver queue one at a time, asking for an interrupt after
    each (EVENT_IDX used_event), as a guest waiting on each does; `serve(queue)` gets each one
    answered and returns what it measured (ns). FORGETs go on `hiprio`, as the guest sends them."""

    def __init__(self, q: Any, serve: Callable[[Any], int], hiprio: Any = None) -> None:
        self.q = q
        self.hiprio = q if hiprio is None else hiprio
        self.serve = serve
        self.unique = 100
        self.ns: dict[str, list[int]] = {op: [] for op in OPS}

    def request(self, op: str, nodeid: int, body: bytes, ok: tuple[int, ...] = (0,)) -> bytes:
        """One request, answered; the reply (b"" for FORGET). An error other than those in
        `ok` fails the run."""
        q = self.hiprio if op == "FORGET" else self.q
        struct.pack_into("<H", q.fe.mem, q.avail + 4 + 2 * q.num, q.last_used)  # used_event: interrupt me
        self.unique += 2
        hdr = IN_HEADER.pack(40 + len(body), CODES[op], self.unique, nodeid, 0, 0, 1, 0, 0)
        if op == "FORGET":  # (the driver sends it as one readable descriptor, not indirect)
            head, w_offs = q.add([hdr + body], [])
        else:
            head, w_offs = q.add([hdr, body], OUT_SIZE[op], indirect=True)
        self.ns[op].append(self.serve(q))
        got, length = _used(q)
        assert got == head, (got, head)
        q.free.append(head)
        if op == "FORGET":
            return b""
        out = b"".join(bytes(q.fe.mem[o : o + s]) for o, s in zip(w_offs, OUT_SIZE[op], strict=True))[:length]
        err = struct.unpack_from("<i", out, 4)[0]
        assert err in ok and length >= 16, (op, err, length)
        return out

    def find(self) -> Counter[int]:
        """One cold `find many`; the lookups it took, per nodeid."""
        looked: Counter[int] = Counter()
        r = self.request("LOOKUP", 1, b"many\0")
        many = struct.unpack_from("<Q", r, 16)[0]
        looked[many] += 1
        self.request("GETATTR", many, struct.pack("<IIQ", 0, 0, 0))
        dirs = [many]
        while dirs:
            d = dirs.pop(0)
            r = self.request("OPENDIR", d, OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0), (0, -38))
            # ENOSYS: a read-only image as the share (NO_OPENDIR): the kernel sends no more
            fh = struct.unpack_from("<Q", r, 16)[0] if len(r) > 16 else -1
            offset = 0
            while True:
                r = self.request("READDIRPLUS", d, READ_IN.pack(max(fh, 0), offset, 4096, 0, 0, 0, 0))
                if len(r) == 16:
                    break
                pos = 16
                while pos < len(r):
                    nodeid = struct.unpack_from("<Q", r, pos)[0]
                    off, namelen, typ = struct.unpack_from("<QII", r, pos + 128 + 8)
                    name = r[pos + DIRENTPLUS : pos + DIRENTPLUS + namelen]
                    if nodeid:
                        looked[nodeid] += 1
                        if typ == 4 and d == many:
                            dirs.append(nodeid)
                    assert name not in (b".", b"..") or not nodeid
                    offset = off
                    pos += (DIRENTPLUS + namelen + 7) & ~7
            if fh >= 0:
                self.request("RELEASEDIR", d, RELEASE_IN.pack(fh, 0, 0, 0))
        return looked

    def forget(self, looked: Counter[int]) -> None:
        for nodeid, n in looked.items():
            self.request("FORGET", nodeid, FORGET_IN.pack(n))


def _used(q: Any) -> tuple[int, int]:
    assert q.used_idx() != q.last_used, "no used element"
    elem = struct.unpack_from("<II", q.fe.mem, q.used + 4 + 8 * (q.last_used % q.num))
    q.last_used = (q.last_used + 1) & 0xFFFF
    return int(elem[0]), int(elem[1])


class InProcess:
    """A driver queue in memfd 'guest RAM' and a queue's real dispatcher behind it, run in this
    thread: `serve` is one `_drain` and returns its thread CPU time."""

    def __init__(self, session: Any) -> None:
        from nydus_py.transport.vhost_user.server import QueueWorker
        from nydus_py.transport.vhost_user.virtiofs import fuse_into_handler, fuse_offload
        from nydus_py.transport.vhost_user.virtqueue import GuestMemory, Region, Virtqueue
        from tests.transport import vhost_frontend as F

        class Ram:
            def __init__(self) -> None:
                self.memfd = os.memfd_create("guest-ram")
                os.ftruncate(self.memfd, RAM)
                self.mem = mmap.mmap(self.memfd, RAM)
                self.mem_size = RAM
                self.brk = 0x10000

            alloc = F.Frontend.alloc

        class FakeVring:
            def __init__(self, queue: Any, call: int) -> None:
                self.index, self.queue, self.kick, self.num, self.call = 1, queue, None, queue.num, call

            def signal(self) -> None:
                os.eventfd_write(self.call, 1)

        self.ram = Ram()
        q = F.DriverQueue(self.ram, 1, NUM, 0, 0x4000, 0x8000)  # type: ignore[arg-type]
        mem = GuestMemory([Region(F.GPA_BASE, RAM, F.UVA_BASE, memoryview(self.ram.mem))])
        vq = Virtqueue(mem, NUM, F.UVA_BASE, F.UVA_BASE + 0x4000, F.UVA_BASE + 0x8000, indirect=True,
                       event_idx=True)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.w = QueueWorker(FakeVring(vq, self.call), lambda r, n: None, "micro", workers=1,  # type: ignore[arg-type]
                             offload=fuse_offload, into=fuse_into_handler(session), on_idle=session.flush_forgets)
        self.prof: cProfile.Profile | None = None
        self.driver = Driver(q, self.serve)

    def serve(self, q: Any) -> int:
        t = time.thread_time_ns()
        if self.prof is not None:
            self.prof.enable()
        self.w._drain()
        if self.prof is not None:
            self.prof.disable()
        return time.thread_time_ns() - t


def cpu_ns(pid: int) -> int:
    """CPU time of `pid`'s threads and its children's (virtiofsd serves from a forked child),
    in ns (schedstat: finer than the 10 ms ticks of /proc/PID/stat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(cpu_ns(int(c)) for c in f.read().split())
    return total


def daemon(root: Path, cmd: list[str], sock: str, passes: int, env: dict[str, str], cwd: str) -> dict[str, object]:
    """Round trip per request and the process's CPU per pass of a real backend behind its socket
    (`python -m` imports from `cwd` first: the checkout to run)."""
    from tests.transport import vhost_frontend as F

    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.05)
        fe = F.Frontend(sock, mem_size=RAM)
        fe.setup(nqueues=2, num=NUM, features=F.F_VERSION_1 | F.F_PROTOCOL | F.F_INDIRECT | F.F_EVENT_IDX)
        hiprio, q = fe.queues[0], fe.queues[1]

        def serve(queue: Any) -> int:  # the round trip, as the guest waits for it
            t = time.perf_counter_ns()
            queue.do_kick()
            queue.wait_used(30.0)
            queue.last_used = (queue.last_used - 1) & 0xFFFF  # (Driver reads the element itself)
            return time.perf_counter_ns() - t

        init = IN_HEADER.pack(104, 26, 1, 0, 0, 0, 1, 0, 0) + INIT_IN.pack(7, 38, 1 << 20, 0x7BFFFFFB, 0)
        head, _w = q.add([init], [16, 256], indirect=True)
        q.do_kick()
        q.wait_used()
        q.free.append(head)
        driver = Driver(q, serve, hiprio)
        driver.forget(driver.find())  # warm
        driver.ns = {op: [] for op in OPS}
        pid = proc.pid
        per_pass = []
        for _ in range(passes):
            c0, t0 = cpu_ns(pid), time.perf_counter_ns()
            looked = driver.find()
            c1, t1 = cpu_ns(pid), time.perf_counter_ns()
            driver.forget(looked)
            c2 = cpu_ns(pid)
            per_pass.append({"find_wall_ms": (t1 - t0) / 1e6, "find_cpu_ms": (c1 - c0) / 1e6,
                             "forget_cpu_ms": (c2 - c1) / 1e6})
        fe.close()
        return {"round_trip_us_median": {op: statistics.median(v) / 1e3 for op, v in driver.ns.items() if v},
                "find_wall_ms_median": statistics.median(p["find_wall_ms"] for p in per_pass),
                "find_cpu_ms_median": statistics.median(p["find_cpu_ms"] for p in per_pass),
                "forget_cpu_ms_median": statistics.median(p["forget_cpu_ms"] for p in per_pass),
                "passes": per_pass}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def in_process(root: Path, tmp: str, passes: int, rafs: bool, profile: bool) -> dict[str, object]:
    """CPU per request of the dispatcher's own code, one thread, no kick or wake-up."""
    from nydus_py.config import parse_any
    from nydus_py.daemon.instance import MountCmd
    from nydus_py.daemon.service import DaemonOptions, DaemonService

    svc = DaemonService(DaemonOptions(mode="virtiofs", mountpoint="", threads=1))
    if rafs:
        svc.default_config = parse_any(json.dumps({"device": {"backend": {"type": "localfs", "config": {
            "dir": f"{tmp}/blobs"}}}, "mode": "direct"}))
        svc.mount("/", MountCmd("rafs", f"{tmp}/boot", ""))
    else:
        svc.mount("/", MountCmd("passthrough_fs", str(root), ""))
    s = svc.session
    s.handle(IN_HEADER.pack(IN_HEADER.size + INIT_IN.size, 26, 2, 0, 0, 0, 1, 0, 0)
             + INIT_IN.pack(7, 38, 1 << 20, 0x73FFFFFB, 0))
    rig = InProcess(s)
    d = rig.driver
    d.forget(d.find())  # warm: the host's dentries and inodes, as the guest's earlier passes did
    d.ns = {op: [] for op in OPS}
    per_pass = []
    for _ in range(passes):
        before = {op: sum(v) for op, v in d.ns.items()}
        d.forget(d.find())
        per_pass.append({op: (sum(v) - before[op]) / 1e6 for op, v in d.ns.items()})
    res: dict[str, object] = {
        "requests_per_pass": {op: len(v) // passes for op, v in d.ns.items()},
        "cpu_ms_per_pass_median": statistics.median(sum(p.values()) for p in per_pass),
        "cpu_ms_per_pass_by_op_median": {op: statistics.median(p[op] for p in per_pass) for op in OPS},
        "cpu_us_per_request_median": {op: statistics.median(v) / 1e3 for op, v in d.ns.items() if v},
        "passes": per_pass}
    if profile:
        rig.prof = cProfile.Profile()
        d.forget(d.find())
        pstats.Stats(rig.prof).sort_stats("tottime").print_stats(35)
    svc.umount("/")
    return res


def _fmt(d: object) -> str:
    assert isinstance(d, dict)
    return ", ".join(f"{k} {v:.1f}" for k, v in d.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--repo", help="import nydus_py from this checkout (in-process mode)")
    ap.add_argument("--rafs", action="store_true", help="a RAFS image of the tree instead (virtiofs --bootstrap)")
    ap.add_argument("--profile", action="store_true", help="in-process: cProfile one more pass (the dispatcher only)")
    ap.add_argument("--daemons", help="daemon mode: comma-separated checkouts whose `nydusd-py virtiofs` to drive "
                    "through the socket, and/or `virtiofsd` (QEMU's, -o cache=auto)")
    ap.add_argument("--rounds", type=int, default=3, help="daemon mode: run the daemons in turn this many times")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    repo = Path(args.repo).resolve() if args.repo else HERE.parent
    sys.path.insert(0, str(repo))
    os.environ["PYTHONPATH"] = str(repo)
    res: dict[str, object] = {"share": "rafs" if args.rafs else "passthrough", "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="virtio-find-micro-") as tmp:
        root = Path(tmp) / "tree"
        make_tree(root)
        if args.rafs:
            from nydus_py.builder.build import build_image
            from nydus_py.builder.options import BuildOptions
            from nydus_py.builder.sources import tree_from_directory

            build_image(tree_from_directory(str(root)), f"{tmp}/boot", f"{tmp}/blobs", BuildOptions())
            (Path(tmp) / "config.json").write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {
                "dir": f"{tmp}/blobs"}}}, "mode": "direct"}))
        if not args.daemons:
            r = in_process(root, tmp, args.passes, args.rafs, args.profile)
            res.update(repo=str(repo), **r)
            print(f"{res['share']} {repo}: {r['cpu_ms_per_pass_median']:.1f} ms CPU per find pass; per request "
                  f"(median us): {_fmt(r['cpu_us_per_request_median'])}; per pass (ms): "
                  f"{_fmt(r['cpu_ms_per_pass_by_op_median'])}")
        else:
            runs: dict[str, list[dict[str, object]]] = {}
            for rnd in range(args.rounds):
                names = args.daemons.split(",")
                for name in names if rnd % 2 == 0 else names[::-1]:
                    sock = f"{tmp}/d.sock"
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(sock)
                    env = dict(os.environ)
                    cwd = tmp
                    if name == "virtiofsd":
                        cmd = ["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o", f"source={root}", "-o",
                               "cache=auto"]
                    else:
                        env["PYTHONPATH"] = cwd = str(Path(name).resolve())
                        src = ["--bootstrap", f"{tmp}/boot", "--config", f"{tmp}/config.json"] if args.rafs else \
                            ["--shared-dir", str(root)]
                        cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--log-level",
                               "warn", *src]
                    r = daemon(root, cmd, sock, args.passes, env, cwd)
                    runs.setdefault(name, []).append(r)
                    print(f"round {rnd} {name}: find {r['find_wall_ms_median']:.1f} ms wall, daemon CPU "
                          f"{r['find_cpu_ms_median']:.1f} ms (forgets {r['forget_cpu_ms_median']:.1f} ms); round trip "
                          f"(median us): {_fmt(r['round_trip_us_median'])}", flush=True)
            res["daemons"] = runs
            for name, rs in runs.items():
                print(f"{name}: find wall {statistics.median(float(r['find_wall_ms_median']) for r in rs):.1f} ms, "  # type: ignore[arg-type]
                      f"CPU {statistics.median(float(r['find_cpu_ms_median']) for r in rs):.1f} ms, forgets "  # type: ignore[arg-type]
                      f"{statistics.median(float(r['forget_cpu_ms_median']) for r in rs):.1f} ms (medians of rounds)")  # type: ignore[arg-type]
    res["loadavg_end"] = os.getloadavg()
    print("load average", res["loadavg"], "->", res["loadavg_end"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
