"""Round trip and daemon CPU per 1 MiB direct READ (the guest's `dd bs=1M iflag=direct`), for a
real backend behind its vhost-user socket: nydusd-py on the RAFS image bench_virtiofs.py serves
(localfs backend, no blob cache, chunks stored uncompressed), nydusd-py on the unpacked tree
(passthrough), and QEMU's C virtiofsd (`--virtiofsd`) on the same tree. No guest: the Python
front-end of tests/transport drives each server one READ at a time, as dd does.

Each READ is the chain a Linux 6.1 guest puts on the request queue for it (logged from the
bench's TCG guest): one indirect table of 259 descriptors, the 40-byte in header and read_in,
the 16-byte out header, then 256 writable 4 KiB pages at scattered guest-physical addresses
(the same pages every time: dd reuses its buffer), with EVENT_IDX and an interrupt asked for
after every request. Servers take turns for `--rounds` rounds (every other round in reverse
order), so drifts of a shared machine fall on all of them; the median over rounds counts.
Daemon CPU is the sum of its threads' (and children's) on-CPU time from /proc/*/schedstat.

`--interleave`: every server is started once and their passes alternate (`--rounds` times),
closer in time than a server per round.

`--cold`: before every READ the server's files (the blob, or the tree's file) leave the host's
page cache (POSIX_FADV_DONTNEED), so each READ waits on the disk: a READ the dispatcher can't
answer from the page cache (RWF_NOWAIT), as 9 of 250 were in a guest run while other processes
dropped caches.

python3 benchmarks/virtio_dd_micro.py [--mib 50] [--passes 4] [--rounds 4] [--virtiofsd] [--cold] [--interleave]
    [--baseline-repo DIR] [--json out.json]
"""

import argparse
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nydus_py.fuse.abi import Opcode  # noqa: E402
from tests.transport import vhost_frontend as F  # noqa: E402

MIB = 1 << 20
NUM = 1024
RAM = 64 << 20
IN_HEADER = struct.Struct("<IIQQIIIHH")
READ_IN = struct.Struct("<QQIIQII")
PAGES = 16 << 20  # guest-physical offset of dd's buffer pages
REQ = 8 << 20  # of the request (in header + read_in) and the out header


def cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of `pid`'s threads and of its descendants (virtiofsd forks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(cpu_ns(int(c)) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class Server:
    """One backend process behind its socket, set up and INITed, `big.bin` looked up and opened."""

    def __init__(self, label: str, cmd: list[str], sock: str, repo: Path = REPO) -> None:
        self.label = label
        # (cwd: `python -m` puts it first on sys.path, before PYTHONPATH)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=repo,
                                     env={**os.environ, "PYTHONPATH": str(repo)})
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"{label} did not start: {err}")
            time.sleep(0.05)
        while True:  # (the socket file appears at bind, before listen)
            try:
                self.fe = F.Frontend(sock, mem_size=RAM)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.fe.setup(nqueues=2, num=NUM, features=F.F_VERSION_1 | F.F_PROTOCOL | F.F_INDIRECT | F.F_EVENT_IDX)
        self.q = self.fe.queues[1]
        self.unique = 10
        pages = list(range(256))
        random.Random(1).shuffle(pages)
        self.pages = pages
        init = IN_HEADER.pack(104, Opcode.INIT, 1, 0, 0, 0, 1, 0, 0) + struct.pack("<IIIII44x", 7, 38, MIB,
                                                                                     0x73FFFFFB, 0)
        self.simple([init], [16, 256])
        out = self.simple([IN_HEADER.pack(48, Opcode.LOOKUP, 2, 1, 0, 0, 1, 0, 0) + b"big.bin\0"], [16, 128])
        self.nodeid = struct.unpack_from("<Q", out, 16)[0]
        out = self.simple([IN_HEADER.pack(48, Opcode.OPEN, 3, self.nodeid, 0, 0, 1, 0, 0)
                           + struct.pack("<II", os.O_RDONLY | os.O_DIRECT, 0)], [16, 16], check=False)
        err = struct.unpack_from("<i", out, 4)[0]
        assert err in (0, -38), (label, err)
        self.fh = 0 if err else struct.unpack_from("<Q", out, 16)[0]

    def simple(self, readable: list[bytes], writable: list[int], check: bool = True) -> bytes:
        q = self.q
        struct.pack_into("<H", self.fe.mem, q.avail + 4 + 2 * q.num, q.last_used)  # used_event
        head, w_offs = q.add(readable, writable, indirect=True)
        q.do_kick()
        got, length = q.wait_used(30.0)
        assert got == head
        q.free.append(head)
        out = b"".join(bytes(self.fe.mem[o : o + s]) for o, s in zip(w_offs, writable, strict=True))[:length]
        if check:
            assert struct.unpack_from("<i", out, 4)[0] == 0, (self.label, out[:16])
        return out

    def reads(self, mib: int, passes: int, cold: list[str] | None = None) -> tuple[float, float]:
        """(wall us, daemon CPU us) per 1 MiB READ over `passes` passes of the first `mib` MiB;
        the files `cold` leave the page cache before each READ."""
        fds = [os.open(p, os.O_RDONLY) for p in cold or ()]
        fe, q = self.fe, self.q
        mem = fe.mem
        descs = [(F.GPA_BASE + REQ, 40, 0), (F.GPA_BASE + REQ + 64, 40, 0), (F.GPA_BASE + REQ + 128, 16, F.WRITE)]
        descs += [(F.GPA_BASE + PAGES + p * 4096, 4096, F.WRITE) for p in self.pages]
        c0 = cpu_ns(self.proc.pid)
        t0 = time.perf_counter()
        n = 0
        for _ in range(passes):
            fe.brk = 0x10000  # (the front-end's allocator: keep the indirect tables below REQ)
            for k in range(mib):
                self.unique += 2
                mem[REQ : REQ + 40] = IN_HEADER.pack(80, Opcode.READ, self.unique, self.nodeid, 0, 0, 1, 0, 0)
                mem[REQ + 64 : REQ + 104] = READ_IN.pack(self.fh, k * MIB, MIB, 0, 0, os.O_RDONLY | os.O_DIRECT, 0)
                struct.pack_into("<H", mem, q.avail + 4 + 2 * q.num, q.last_used)  # used_event
                for fd in fds:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                head, _ = q.add([], [], indirect=True, raw=descs)
                q.do_kick()
                got, length = q.wait_used(30.0)
                assert got == head and length == 16 + MIB, (self.label, got, head, length)
                q.free.append(head)
                n += 1
        wall = (time.perf_counter() - t0) / n * 1e6
        for fd in fds:
            os.close(fd)
        return wall, (cpu_ns(self.proc.pid) - c0) / n / 1e3

    def close(self) -> None:
        self.fe.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=50)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--virtiofsd", action="store_true")
    ap.add_argument("--servers", default="rafs,passthrough", help="nydusd-py servers (rafs, passthrough)")
    ap.add_argument("--baseline-repo", help="also run the rafs server of this checkout (`rafs-base`)")
    ap.add_argument("--cold", action="store_true", help="every READ misses the host's page cache")
    ap.add_argument("--interleave", action="store_true",
                    help="start every server once and alternate their passes (rounds: alternations)")
    ap.add_argument("--json")
    args = ap.parse_args()
    results: dict[str, object] = {"mib": args.mib, "passes": args.passes, "rounds": args.rounds, "cold": args.cold,
                                  "interleave": args.interleave,
                                  "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="virtio-dd-micro-") as tmp:
        root = Path(tmp)
        (root / "tree").mkdir()
        with open(root / "tree" / "big.bin", "wb") as f:
            block = os.urandom(MIB)
            for i in range(args.mib):
                f.write(block[i:] + block[:i])  # as bench_virtiofs.make_tree
        boot, blobs = root / "image.boot", root / "blobs"
        blobs.mkdir()
        subprocess.run([sys.executable, "-m", "nydus_py.cli.image", "create", "--bootstrap", str(boot), "--blob-dir",
                        str(blobs), str(root / "tree")], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        cfg = root / "config.json"
        cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}},
                                   "mode": "direct"}))

        def daemon(sock: str, *extra: str) -> list[str]:
            return [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--log-level", "warn",
                    *extra]

        cmds: dict[str, tuple[list[str], str, Path]] = {}
        for name in args.servers.split(","):
            sock = f"{tmp}/{name}.sock"
            extra = (["--bootstrap", str(boot), "--config", str(cfg)] if name == "rafs"
                     else ["--shared-dir", str(root / "tree")])
            cmds[name] = (daemon(sock, *extra), sock, REPO)
        if args.baseline_repo:
            sock = f"{tmp}/rafs-base.sock"
            cmds["rafs-base"] = (daemon(sock, "--bootstrap", str(boot), "--config", str(cfg)), sock,
                                 Path(args.baseline_repo).resolve())
        if args.virtiofsd:
            sock = f"{tmp}/c.sock"
            cmds["virtiofsd"] = (["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o",
                                  f"source={root / 'tree'}", "-o", "cache=auto"], sock, REPO)
        raw: dict[str, list[tuple[float, float]]] = {n: [] for n in cmds}

        def cold_files(name: str) -> list[str] | None:
            if not args.cold:
                return None
            return [str(p) for p in blobs.iterdir()] if name.startswith("rafs") else [str(root / "tree" / "big.bin")]

        def report(rnd: int, name: str) -> None:
            wall, cpu = raw[name][-1]
            print(f"round {rnd} {name:12s} round trip {wall:7.1f} us/READ  daemon CPU {cpu:7.1f} us/READ", flush=True)

        if args.interleave:  # every server up at once, their passes alternated
            servers: dict[str, Server] = {}
            try:
                for name, (cmd, sock, repo) in cmds.items():
                    servers[name] = Server(name, cmd, sock, repo)
                    servers[name].reads(args.mib, 1)  # warm
                for rnd in range(args.rounds):
                    for name in (list(cmds) if rnd % 2 == 0 else list(cmds)[::-1]):
                        raw[name].append(servers[name].reads(args.mib, args.passes, cold_files(name)))
                        report(rnd, name)
            finally:
                for name, srv in servers.items():
                    srv.close()
                    if os.path.exists(cmds[name][1]):
                        os.unlink(cmds[name][1])
        for rnd in range(0 if args.interleave else args.rounds):
            names = list(cmds) if rnd % 2 == 0 else list(cmds)[::-1]
            for name in names:
                cmd, sock, repo = cmds[name]
                srv = Server(name, cmd, sock, repo)
                try:
                    srv.reads(args.mib, 1)  # warm: the host's page cache, the first touch of guest pages
                    raw[name].append(srv.reads(args.mib, args.passes, cold_files(name)))
                finally:
                    srv.close()
                    if os.path.exists(sock):
                        os.unlink(sock)
                report(rnd, name)
    summary = {n: {"round_trip_us": statistics.median(w for w, _ in v), "daemon_cpu_us": statistics.median(c for _, c in v)}
               for n, v in raw.items()}
    for n, s in summary.items():
        print(f"{n:12s} median round trip {s['round_trip_us']:7.1f} us/READ  daemon CPU {s['daemon_cpu_us']:7.1f} us/READ")
    results.update({"median": summary, "raw": {n: [list(x) for x in v] for n, v in raw.items()},
                    "loadavg_end": os.getloadavg()})
    print("load average", results["loadavg"], "->", results["loadavg_end"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
