"""CPU per small virtio-fs request on a passthrough share: what a guest's `cat` of many small files
costs the backend per file (LOOKUP, OPEN, READ 4 KiB, FLUSH, RELEASE), split by stage.

Chains are laid out as the Linux virtio-fs driver does (one indirect table per request: the in
header, each in argument, the out header, each out argument: 3 to 4 descriptors), on a queue
with EVENT_IDX and indirect descriptors, and the driver asks for an interrupt after every
request (used_event = its last used index), as a guest waiting on one request at a time does.

* `stages`: one thread, no kernel in the loop: the queue's real dispatcher code
  (`QueueWorker._drain`, its pool never started: every request here is answered inline) is run
  once per request for its CPU time, and a mirror of `_dispatch_available` with a probe around
  each stage (pop + descriptor walk, read_all, the FUSE handler, complete: reply write + used
  ring + interrupt decision + call eventfd, arm: the pop that finds the ring empty, avail_event
  and the re-check, the idle hook). All times are the thread's CPU clock
  (time.thread_time_ns), so other processes do not count; each probe costs about 0.5-1.5 us
  of its own (a syscall). Medians per request.
* `daemon`: the real `nydusd-py virtiofs --shared-dir` in a subprocess, driven through its
  vhost-user socket by the Python front-end of tests/transport (kick eventfd, call eventfd),
  one request at a time; the daemon's CPU (utime+stime of the process, all threads) and the
  round trip per request. `--virtiofsd` runs QEMU's C virtiofsd the same way for comparison.
`--profile` prints a cProfile of the `stages` run.

python3 benchmarks/virtio_small_micro.py [--files 2000] [--modes stages,daemon] [--virtiofsd]
"""

import argparse
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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from read_into_micro import IN_HEADER, INIT_IN, MIB, session  # noqa: E402

from nydus_py.fs.passthrough import PassthroughFilesystem  # noqa: E402
from nydus_py.fs.writable_vfs import WritableVfs  # noqa: E402
from nydus_py.fuse.abi import Opcode  # noqa: E402
from nydus_py.fuse.iovec import WouldBlock  # noqa: E402
from nydus_py.fuse.protocol import FuseSession  # noqa: E402
from nydus_py.metrics.fsstats import FsStats, FuseMetrics  # noqa: E402
from nydus_py.transport.vhost_user.server import QueueWorker  # noqa: E402
from nydus_py.transport.vhost_user.virtiofs import fuse_into_handler, fuse_offload  # noqa: E402
from nydus_py.transport.vhost_user.virtqueue import GuestMemory, Region, Virtqueue  # noqa: E402
from nydus_py.vfs.vfs import INO_MASK, Vfs  # noqa: E402
from tests.transport import vhost_frontend as F  # noqa: E402

NUM = 1024
RAM = 16 << 20
OPEN_IN = struct.Struct("<II")
READ_IN = struct.Struct("<QQIIQII")
FH_IN = struct.Struct("<QIIQ")  # flush_in / release_in
OPS = ("LOOKUP", "OPEN", "READ", "FLUSH", "RELEASE")
FOPEN_NOFLUSH = 1 << 5  # an OPEN reply with it: the guest sends no FLUSH on close
STAGES = ("pop", "read_all", "handler", "complete", "arm", "idle")
# out sizes per request (out header, then the argument): the writable descriptors
WRITABLE = {"LOOKUP": [16, 128], "OPEN": [16, 16], "READ": [16, 4096], "FLUSH": [16], "RELEASE": [16]}


def make_tree(root: Path, files: int) -> list[bytes]:
    """`files` six-byte files in directories of 100 (the bench's shape); their paths."""
    names = []
    for i in range(files):
        d = root / f"d{i // 100:03d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}").write_bytes(b"%05d\n" % i)
        names.append(f"d{i // 100:03d}/f{i:05d}".encode())
    return names


def request(op: str, unique: int, nodeid: int, arg: bytes | int) -> list[bytes]:
    """The readable descriptors of one request: in header, then each in argument."""
    if op == "LOOKUP":
        assert isinstance(arg, bytes)
        body = arg + b"\0"
        code = Opcode.LOOKUP
    elif op == "OPEN":
        body, code = OPEN_IN.pack(os.O_RDONLY, 0), Opcode.OPEN
    elif op == "READ":
        body, code = READ_IN.pack(arg, 0, 4096, 0, 0, os.O_RDONLY, 0), Opcode.READ
    elif op == "FLUSH":
        body, code = FH_IN.pack(arg, 0, 0, 0), Opcode.FLUSH
    else:
        body, code = FH_IN.pack(arg, os.O_RDONLY, 0, 0), Opcode.RELEASE
    return [IN_HEADER.pack(40 + len(body), code, unique, nodeid, 0, 0, 1, 0, 0), body]


class Ram:
    """Guest RAM (a memfd mapping) for DriverQueue, with a bump allocator that wraps."""

    def __init__(self) -> None:
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, RAM)
        self.mem = mmap.mmap(self.memfd, RAM)
        self.mem_size = RAM
        self.brk = 0x10000

    alloc = F.Frontend.alloc


class Driver:
    """Submits one request at a time on `q`, asking for an interrupt after it (EVENT_IDX)."""

    # --reuse-buffers: each opcode's request and reply buffers at fixed places (below the bump
    # allocator's area), as Linux's allocators hand a guest sending one request at a time the
    # same fuse_req and argument buffer again; a READ's data page is fresh each time (the page
    # cache's). Then an opcode's indirect table is the same bytes every time (but a READ's).
    reuse = False

    def __init__(self, q: F.DriverQueue, fixed_base: int = 0) -> None:
        self.q = q
        self.unique = 100
        self.sent = 0  # requests submitted
        self.fixed_base = fixed_base  # 2 KiB for --reuse-buffers
        self.fixed: dict[str, tuple[list[int], list[int]]] = {}

    def submit(self, op: str, nodeid: int, arg: bytes | int) -> tuple[int, list[int]]:
        q = self.q
        F.store16(q.fe.mem, q.avail + 4 + 2 * q.num, q.last_used)  # used_event
        self.unique += 2
        self.sent += 1
        readable = request(op, self.unique, nodeid, arg)
        if not self.reuse:
            return q.add(readable, WRITABLE[op], indirect=True)
        places = self.fixed.get(op)
        if places is None:  # 96 bytes per readable part, 16 or 128 per writable one
            base = self.fixed_base + 384 * OPS.index(op)
            places = self.fixed[op] = ([base, base + 96], [base + 192, base + 208])
        mem = q.fe.mem
        descs = []
        for off, data in zip(places[0], readable, strict=True):
            mem[off : off + len(data)] = data
            descs.append((F.GPA_BASE + off, len(data), 0))
        w_offs = []
        for off, size in zip(places[1], WRITABLE[op], strict=False):
            if size > 128:  # (a READ's page)
                off = q.fe.alloc(size)
            mem[off : off + size] = b"\xee" * size
            w_offs.append(off)
            descs.append((F.GPA_BASE + off, size, F.WRITE))
        head, _ = q.add([], [], indirect=True, raw=descs)
        return head, w_offs

    def reply(self, head: int, w_offs: list[int]) -> bytes:
        q = self.q
        got, length = q.wait_used(30.0) if q.call >= 0 else self.used()
        assert got == head, (got, head)
        q.free.append(head)
        out = b"".join(bytes(q.fe.mem[o : o + s]) for o, s in zip(w_offs, [16, 4096], strict=False))
        err = struct.unpack_from("<i", out, 4)[0]
        assert err == 0 and length >= 16, (err, length)
        return out[:length]

    def used(self) -> tuple[int, int]:
        q = self.q
        deadline = time.monotonic() + 5
        while q.used_idx() == q.last_used:  # (a READ the pool answers: the host's page cache was dropped)
            assert time.monotonic() < deadline, "no used element"
            time.sleep(0.0001)
        elem = struct.unpack_from("<II", q.fe.mem, q.used + 4 + 8 * (q.last_used % q.num))
        q.last_used = (q.last_used + 1) & 0xFFFF
        return int(elem[0]), int(elem[1])


def per_file(driver: Driver, name: bytes, serve: Callable[[str], None]) -> None:
    """LOOKUP, OPEN, READ, FLUSH, RELEASE of root/`name` (one directory level: LOOKUP of the
    directory is done once by the caller through `dirs`)."""
    d, f = name.split(b"/")
    nodeid = driver.dirs[d]  # type: ignore[attr-defined]
    out = driver.reply(*_go(driver, serve, "LOOKUP", nodeid, f))
    ino = struct.unpack_from("<Q", out, 16)[0]
    out = driver.reply(*_go(driver, serve, "OPEN", ino, 0))
    fh, open_flags = struct.unpack_from("<QI", out, 16)
    out = driver.reply(*_go(driver, serve, "READ", ino, fh))
    assert len(out) == 22, out
    if not open_flags & FOPEN_NOFLUSH:  # (as the kernel does: no FLUSH on close then)
        driver.reply(*_go(driver, serve, "FLUSH", ino, fh))
    driver.reply(*_go(driver, serve, "RELEASE", ino, fh))


def _go(driver: Driver, serve: Callable[[str], None], op: str, nodeid: int, arg: bytes | int) -> tuple[int, list[int]]:
    got = driver.submit(op, nodeid, arg)
    serve(op)
    return got


class StagedWorker:
    """`QueueWorker._dispatch_available` + `on_idle` step by step, with a probe per stage
    (the same calls in the same order: keep in step with server.py). Probes read the thread's
    CPU clock, so time on other processes does not count; medians per request."""

    def __init__(self, w: QueueWorker) -> None:
        self.w = w
        self.ns: dict[str, dict[str, list[int]]] = {op: {st: [] for st in STAGES} for op in OPS}
        self.waited = 0

    def drain(self, op: str) -> None:
        w, ring, clock = self.w, self.w.ring, time.thread_time_ns
        acc = dict.fromkeys(STAGES, 0)
        pop_or_arm = getattr(ring, "pop_or_arm", None)  # (older code: pop, then arm when empty)
        while True:
            t0 = clock()
            chain = ring.pop() if pop_or_arm is None else pop_or_arm()
            t1 = clock()
            if chain is None:
                if pop_or_arm is None:
                    acc["pop"] += t1 - t0
                    more = ring.arm()
                    acc["arm"] += clock() - t1
                    if more:
                        continue
                else:
                    acc["arm"] += t1 - t0  # (the pop that found nothing and armed)
                break
            acc["pop"] += t1 - t0
            into = w.into
            assert into is not None
            nowait = bool(w.pool) and (w.offload is None or w.offload(chain))
            req = memoryview(chain.read_all())
            t2 = clock()
            acc["read_all"] += t2 - t1
            try:
                reply = into(req, chain, ring.guard(chain), nowait)
            except WouldBlock:  # (the host's page cache was dropped: as the pool would)
                self.waited += 1
                reply = into(req, chain, ring.guard(chain), False)
            t3 = clock()
            acc["handler"] += t3 - t2
            if isinstance(reply, int):
                ring.complete_written(chain, reply)
            else:
                ring.complete(chain, reply)
            acc["complete"] += clock() - t3
        t4 = clock()
        if w.on_idle is not None:
            w.on_idle()
        acc["idle"] += clock() - t4
        for st, v in acc.items():
            self.ns[op][st].append(v)


class FakeVring:
    """What QueueWorker takes from a backend Vring: the queue, its index and the call signal."""

    def __init__(self, queue: Virtqueue, call: int) -> None:
        self.index = 1
        self.queue = queue
        self.kick = None
        self.num = queue.num
        self.call = call

    def signal(self) -> None:
        os.eventfd_write(self.call, 1)


def daemon_session(fs: PassthroughFilesystem) -> FuseSession:
    """The session as `nydusd-py virtiofs --shared-dir` builds it (DaemonService): the share at /
    of a WritableVfs, and the metrics observer on every request."""
    vfs: Vfs = WritableVfs()
    vfs.mount("/", fs)
    s = FuseSession(vfs)
    stats = FsStats("/")
    s.set_observer(FuseMetrics(lambda nodeid: (stats, nodeid & INO_MASK)))
    s.handle(IN_HEADER.pack(IN_HEADER.size + INIT_IN.size, Opcode.INIT, 2, 0, 0, 0, 1, 0, 0)
             + INIT_IN.pack(7, 45, MIB, 0x73FFFFFB | (1 << 30), 0x5FD))
    return s


def stages(root: Path, names: list[bytes], profile: bool, stack: str = "plain") -> dict[str, object]:
    """CPU per request of the dispatcher's own code, one thread, no kick/poll. `stack`: plain
    (a read-only share in a Vfs, no observer) or daemon (as the daemon: `daemon_session`)."""
    global session
    if stack == "daemon":
        session = daemon_session  # (also for _reinit)
    ram = Ram()
    q = F.DriverQueue(ram, 1, NUM, 0, 0x4000, 0x8000)  # type: ignore[arg-type]
    mem = GuestMemory([Region(F.GPA_BASE, RAM, F.UVA_BASE, memoryview(ram.mem))])
    vq = Virtqueue(mem, NUM, F.UVA_BASE, F.UVA_BASE + 0x4000, F.UVA_BASE + 0x8000, indirect=True, event_idx=True)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fs = PassthroughFilesystem(str(root), writable=stack == "daemon")
    s = session(fs)
    w = QueueWorker(FakeVring(vq, call), lambda r, n: None, "micro", workers=4,  # type: ignore[arg-type]
                    offload=fuse_offload, into=fuse_into_handler(s), on_idle=s.flush_forgets)
    for t in w.pool:  # (for READs whose data left the host's page cache: other processes drop it)
        t.start()
    driver = Driver(q, fixed_base=0xC000)  # (after the rings at 0, 0x4000, 0x8000)
    driver.dirs = _lookup_dirs(s, names)  # type: ignore[attr-defined]
    for n in names:  # warm: the host page cache and the dentries, as after the guest's first pass
        per_file(driver, n, lambda op: w._drain())
    s = _reinit(w, fs)
    driver.dirs = _lookup_dirs(s, names)  # type: ignore[attr-defined]
    per_op: dict[str, list[int]] = {op: [] for op in OPS}
    for n in names:
        per_file(driver, n, lambda op: _timed(per_op, op, w._drain))
    staged = StagedWorker(w)
    s = _reinit(w, fs)
    driver.dirs = _lookup_dirs(s, names)  # type: ignore[attr-defined]
    for n in names:
        per_file(driver, n, staged.drain)
    nfiles = len(names)
    out: dict[str, object] = {
        "handed_over": w.handed_over, "staged_waited": staged.waited,
        "cpu_us_per_file": sum(map(sum, per_op.values())) / nfiles / 1e3,
        "requests_per_file": sum(map(len, per_op.values())) / nfiles,
        "cpu_us_per_request_median": {op: statistics.median(per_op[op]) / 1e3 for op in OPS if per_op[op]},
        "stage_us_median": {op: {st: statistics.median(staged.ns[op][st]) / 1e3 for st in STAGES}
                            for op in OPS if staged.ns[op]["pop"]},
    }
    if profile:
        s = _reinit(w, fs)
        driver.dirs = _lookup_dirs(s, names)  # type: ignore[attr-defined]
        prof = cProfile.Profile()

        def profiled(op: str) -> None:  # the dispatcher only, not the driver's side
            prof.enable()
            w._drain()
            prof.disable()

        for n in names:
            per_file(driver, n, profiled)
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)
    for _ in w.pool:
        w.jobs.put(None)
    os.close(call)
    fs.close()
    return out


def _timed(acc: dict[str, list[int]], op: str, fn: Callable[[], object]) -> None:
    t = time.thread_time_ns()
    fn()
    acc[op].append(time.thread_time_ns() - t)


def _reinit(w: QueueWorker, fs: PassthroughFilesystem) -> FuseSession:
    """A fresh session on the same filesystem behind worker `w` (forgets every inode)."""
    fs.destroy()
    s = session(fs)
    w.into = fuse_into_handler(s)
    w.on_idle = s.flush_forgets
    return s


def _lookup_dirs(s: FuseSession, names: list[bytes]) -> dict[bytes, int]:
    dirs = {}
    for d in sorted({n.split(b"/")[0] for n in names}):
        r = bytes(s.handle(IN_HEADER.pack(41 + len(d), Opcode.LOOKUP, 3, 1, 0, 0, 1, 0, 0) + d + b"\0") or b"")
        dirs[d] = struct.unpack_from("<Q", r, 16)[0]
    return dirs


def _cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` and its descendants (virtiofsd serves from a forked child)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            ticks += sum(_cpu_ticks(int(c)) for c in f.read().split())
    return ticks


def daemon(root: Path, names: list[bytes], cmd: list[str], sock: str, label: str,
           spy: str | None = None) -> dict[str, object]:
    """Round trip and process CPU per request of a real backend behind its socket."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.05)
        fe = F.Frontend(sock, mem_size=RAM)
        fe.setup(nqueues=2, num=NUM, features=F.F_VERSION_1 | F.F_PROTOCOL | F.F_INDIRECT | F.F_EVENT_IDX)
        q = fe.queues[1]
        driver = Driver(q, fixed_base=fe.ring_alloc(2048, 16))
        init = IN_HEADER.pack(104, Opcode.INIT, 1, 0, 0, 0, 1, 0, 0) + struct.pack("<IIIII44x", 7, 38, 1 << 20,
                                                                                     0x73FFFFFB, 0)
        head, w = q.add([init], [16, 256], indirect=True)
        struct.pack_into("<H", fe.mem, q.avail + 4 + 2 * q.num, q.last_used)
        q.do_kick()
        q.wait_used()
        q.free.append(head)
        dirs = {}
        for d in sorted({n.split(b"/")[0] for n in names}):
            h, w = driver.submit("LOOKUP", 1, d)
            q.do_kick()
            dirs[d] = struct.unpack_from("<Q", driver.reply(h, w), 16)[0]
        driver.dirs = dirs  # type: ignore[attr-defined]
        kick = q.do_kick
        for n in names:  # warm
            per_file(driver, n, lambda op: kick())
        spy_proc = None
        if spy:  # sampled stacks of the daemon's threads (raw: one collapsed stack per line)
            spy_proc = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate", "1000", "--nonblocking",
                                         "--threads", "--format", "raw", "-o", spy], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            time.sleep(1)
        runs = []
        driver.sent = 0
        for _ in range(3):
            c0 = _cpu_ticks(proc.pid)
            t0 = time.perf_counter()
            for n in names:
                per_file(driver, n, lambda op: kick())
            runs.append(((time.perf_counter() - t0), _cpu_ticks(proc.pid) - c0))
        if spy_proc is not None:
            spy_proc.send_signal(2)
            spy_proc.wait(30)
        hz = os.sysconf("SC_CLK_TCK")
        nreq = driver.sent // len(runs)
        fe.close()
        return {"requests_per_file": nreq / len(names), "round_trip_us_per_request": statistics.median(r[0] for r in runs) / nreq * 1e6,
                "daemon_cpu_us_per_request": statistics.median(r[1] for r in runs) / hz / nreq * 1e6,
                "runs": [{"wall_s": r[0], "cpu_ticks": r[1]} for r in runs]}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--modes", default="stages,daemon")
    ap.add_argument("--virtiofsd", action="store_true", help="also drive QEMU's virtiofsd in daemon mode")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--reuse-buffers", action="store_true",
                    help="each opcode's request buffers at fixed places, as a guest's allocators give them back (its "
                    "indirect table then repeats byte for byte, a READ's excepted)")
    ap.add_argument("--stack", choices=("plain", "daemon"), default="plain",
                    help="stages: a read-only share in a plain Vfs without observer, or the daemon's session "
                    "(writable share in a WritableVfs, metrics observer)")
    ap.add_argument("--py-spy", help="daemon mode: sample nydusd-py with py-spy into this file (raw format)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    modes = args.modes.split(",")
    Driver.reuse = args.reuse_buffers
    results: dict[str, object] = {"files": args.files, "stack": args.stack, "reuse_buffers": args.reuse_buffers, "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="virtio-small-micro-") as tmp:
        root = Path(tmp) / "tree"
        root.mkdir()
        names = make_tree(root, args.files)
        if "stages" in modes:
            r = stages(root, names, args.profile, args.stack)
            results["stages"] = r
            print(f"stages: dispatcher CPU per file {r['cpu_us_per_file']:.1f} us ({r['requests_per_file']:.0f} "
                  "requests: mean); "
                  f"per request (median): {r['cpu_us_per_request_median']}")
            st = r["stage_us_median"]
            assert isinstance(st, dict)
            print(f"{'us':8s}" + "".join(f"{s:>10s}" for s in STAGES) + f"{'sum':>10s}")
            for op in st:
                print(f"{op:8s}" + "".join(f"{st[op][s]:10.1f}" for s in STAGES) + f"{sum(st[op].values()):10.1f}")
        if "daemon" in modes:
            sock = f"{tmp}/nydus.sock"
            cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--log-level", "warn",
                   "--shared-dir", str(root)]
            r = daemon(root, names, cmd, sock, "nydusd-py", args.py_spy)
            results["daemon"] = r
            print(f"daemon nydusd-py: round trip {r['round_trip_us_per_request']:.1f} us/request, process CPU "
                  f"{r['daemon_cpu_us_per_request']:.1f} us/request")
            if args.virtiofsd:
                sock = f"{tmp}/c.sock"
                cmd = ["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o", f"source={root}", "-o", "cache=auto"]
                r = daemon(root, names, cmd, sock, "virtiofsd")
                results["virtiofsd"] = r
                print(f"daemon virtiofsd: round trip {r['round_trip_us_per_request']:.1f} us/request, process CPU "
                      f"{r['daemon_cpu_us_per_request']:.1f} us/request")
    results["loadavg_end"] = os.getloadavg()
    print("load average", results["loadavg"], "->", results["loadavg_end"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
