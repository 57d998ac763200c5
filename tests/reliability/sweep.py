"""The bootstrap mutation sweep: mutated real and built images through every reader path, in a
worker process with an address-space limit and a per-case deadline.

A case may end in exactly two ways: the image parses and the whole tree is walked (`ok`), or
the reader raises nydus_py's FormatError (`format`). Anything else is a failure, by kind:
`error` (another exception), `hang` (the per-case alarm fired), `memory` (MemoryError, or peak
RSS over the bound), `stuck` (no answer within the outer deadline: the worker is killed) and
`crash` (the worker died). After a `stuck`, `crash` or `memory` the worker is restarted at the
next case.

Outside CI, for a bigger run or to replay one case:

    PYTHONPATH=. python3 -m tests.reliability.sweep --cases 36000 --seed 7
    PYTHONPATH=. python3 -m tests.reliability.sweep --seed 7 --case 1234
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.rafs.constants import Compressor, Digester
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.loader import open_bytes
from nydus_py.rafs.model import RafsImage

from ..rafs.walk import exercise
from .mutate import Base, make_base, make_case

REPO = Path(__file__).resolve().parents[2]
FIXTURE_BOOTS = ("v5-sha256-none.boot", "v5-blake3-lz4.boot")
CASE_DEADLINE = 5.0  # seconds per case inside the worker (SIGALRM)
STUCK_AFTER = 30.0  # seconds without an answer before the parent kills the worker
ADDRESS_SPACE = 1 << 30  # RLIMIT_AS of the worker
RSS_BOUND = 512 << 20  # peak RSS a case may push the worker to
FAILURE_KINDS = ("error", "hang", "memory", "stuck", "crash")


# -- base images -----------------------------------------------------------------------------


def source_tree(root: Path) -> None:
    """Every inode kind the builder writes: nested and big directories, multi-chunk files, hard
    links, short and long symlinks, xattrs, a FIFO and a device node."""
    (root / "a/b/c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a/b/c/deep.txt").write_bytes(b"deep\n")
    (root / "zero").write_bytes(b"")
    (root / "small").write_bytes(b"hello nydus\n")
    (root / "multi").write_bytes(bytes(range(256)) * 40 + b"tail")  # three 4 KiB chunks
    (root / "random").write_bytes(bytes((i * 7919) % 251 for i in range(9000)))
    os.link(root / "small", root / "a/hardlink")
    os.symlink("small", root / "sym")
    os.symlink("x/" * 600 + "end", root / "a/longsym")
    many = root / "many"
    many.mkdir()
    for i in range(120):
        (many / f"entry-with-a-longish-name-{i:04d}").write_bytes(b"%d" % i)
    os.setxattr(root / "small", "user.one", b"1")
    os.setxattr(root / "small", "user.two", b"22" * 40)
    os.setxattr(root / "a", "user.dir", b"yes")
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "a/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))


def prepare(work: Path, fixtures: Path) -> Path:
    """Build the v5 and v6 bases next to the real fixtures; returns the sweep config file."""
    src = work / "src"
    source_tree(src)
    blobs = work / "blobs"
    blobs.mkdir()
    builds = {
        "built-v6-zstd": BuildOptions(fs_version=6, chunk_size=0x1000, prefetch_paths=[b"/a", b"/multi"]),
        "built-v6-none-sha256": BuildOptions(fs_version=6, chunk_size=0x1000, compressor=Compressor.NONE,
                                             digester=Digester.SHA256, blob_toc=False),
        "built-v5-lz4": BuildOptions(fs_version=5, chunk_size=0x1000, compressor=Compressor.LZ4_BLOCK,
                                     digester=Digester.SHA256, prefetch_paths=[b"/a"]),
    }
    bases = [{"name": name, "boot": str(fixtures / name)} for name in FIXTURE_BOOTS]
    for name, opts in builds.items():
        boot = work / f"{name}.boot"
        build_image(tree_from_directory(src), str(boot), str(blobs), opts)
        bases.append({"name": name, "boot": str(boot)})
    config = work / "sweep.json"
    config.write_text(json.dumps({"bases": bases, "blob_dirs": [str(fixtures / "blobs"), str(blobs)]}))
    return config


def load_bases(config: Path) -> list[Base]:
    cfg = json.loads(config.read_text())
    blobs: dict[str, bytes] = {}
    for d in cfg["blob_dirs"]:
        for p in Path(d).iterdir():
            if len(p.name) == 64 and p.is_file():
                blobs[p.name] = p.read_bytes()
    return [make_base(b["name"], Path(b["boot"]).read_bytes(), blobs) for b in cfg["bases"]]


# -- one case (in the worker) ------------------------------------------------------------------


class Hang(BaseException):
    """The per-case alarm (a BaseException so no `except Exception` in the code under test eats it)."""


def _on_alarm(signum: int, frame: object) -> None:
    raise Hang


Walk = Callable[[RafsImage, Mapping[str, bytes]], int]


def run_case(data: bytes, base: Base, deadline: float = CASE_DEADLINE, walk: Walk = exercise) -> tuple[str, str]:
    """(kind, detail) of one mutant: open it and walk everything. A FormatError's detail says
    whether it came from opening the image or from the walk."""
    stage = "open"
    signal.setitimer(signal.ITIMER_REAL, deadline)
    try:
        img = open_bytes(data)
        stage = "walk"
        try:
            n = walk(img, base.blobs)
        finally:
            img.close()
        return "ok", str(n)
    except FormatError as e:
        return "format", f"{stage}: {str(e)[:200]}"
    except Hang:
        return "hang", f"no result after {deadline} s ({stage})"
    except MemoryError:
        return "memory", f"MemoryError ({stage})"
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "error", f"{type(e).__name__}: {str(e)[:160]} at {Path(tb.filename).name}:{tb.lineno}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def sabotaged(fault: str) -> Walk:
    """A walk with a reader bug of kind `fault`, to prove the harness catches each kind
    (`--inject CASE:FAULT`; only the harness's own tests use it)."""

    def walk(img: RafsImage, blobs: Mapping[str, bytes]) -> int:
        if fault == "crash":
            os._exit(70)
        if fault == "stuck":  # the alarm cannot reach it, like a hang inside C code
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        if fault == "memory":
            return len(bytearray(ADDRESS_SPACE * 4))  # fails only under the RLIMIT_AS
        if fault == "hang":
            while True:
                time.sleep(0.01)
        raise KeyError(fault)

    return walk


def peak_rss() -> int:
    """This process's own peak RSS (VmHWM of its address space).

    Not ru_maxrss: Linux carries the pre-exec peak across execve, so a worker started by a big
    pytest process would report the parent's RSS before it ran a single case."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(config: Path, seed: int, start: int, stop: int, deadline: float, inject: dict[int, str]) -> None:
    """Run cases [start, stop), one JSON line per case on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    signal.signal(signal.SIGALRM, _on_alarm)
    bases = load_bases(config)
    print(json.dumps({"ready": True}), flush=True)
    for i in range(start, stop):
        base, data, desc = make_case(bases, seed, i)
        if i in inject:  # the unmutated base (it opens), walked by a broken walker
            desc = f"{base.name}: injected {inject[i]}"
            kind, detail = run_case(base.data, base, deadline, sabotaged(inject[i]))
        else:
            kind, detail = run_case(data, base, deadline)
        rss = peak_rss()
        if kind != "memory" and rss > RSS_BOUND:
            kind, detail = "memory", f"peak RSS {rss >> 20} MiB"
        line = {"i": i, "base": base.name, "kind": kind, "detail": detail}
        if kind not in ("ok", "format"):
            line["case"] = desc
        print(json.dumps(line), flush=True)
        if kind == "memory":
            return  # the parent restarts a fresh worker at the next case


# -- the parent ------------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    tried: int = 0
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    by_base: dict[str, collections.Counter[str]] = field(default_factory=dict)
    failures: list[dict[str, object]] = field(default_factory=list)
    restarts: int = 0
    seconds: float = 0.0

    def add(self, line: dict[str, object], base: str) -> None:
        kind = str(line["kind"])
        self.tried += 1
        self.counts[kind] += 1
        self.by_base.setdefault(base, collections.Counter())[kind] += 1
        if kind == "format":
            self.counts["format at open" if str(line["detail"]).startswith("open:") else "format in walk"] += 1
        if kind in FAILURE_KINDS:
            self.failures.append(line)

    def summary(self) -> str:
        fails = {k: self.counts[k] for k in FAILURE_KINDS}
        lines = [
            f"bootstrap sweep seed={self.seed}: tried {self.tried}, parsed+walked ok {self.counts['ok']}, "
            f"FormatError {self.counts['format']} (at open {self.counts['format at open']}, "
            f"in the walk {self.counts['format in walk']}), failures {sum(fails.values())} {fails}, "
            f"worker restarts {self.restarts}, {self.seconds:.1f} s",
        ]
        for base, c in sorted(self.by_base.items()):
            lines.append(f"  {base}: ok {c['ok']}, FormatError {c['format']}, "
                         f"failures {sum(c[k] for k in FAILURE_KINDS)}")
        for f in self.failures[:20]:
            lines.append(f"  FAIL case {f['i']} {f['kind']}: {f['detail']} [{f.get('case', '?')}]")
        return "\n".join(lines)


def _spawn(config: Path, seed: int, start: int, stop: int, log: Path, deadline: float,
           inject: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.sweep", "--worker", "--config", str(config),
             "--seed", str(seed), "--start", str(start), "--cases", str(stop), "--deadline", str(deadline),
             "--inject", inject],
            stdout=subprocess.PIPE, stderr=err, cwd=str(REPO), env=env,
        )  # fmt: skip


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def run_sweep(config: Path, seed: int, cases: int, log: Path, *, deadline: float = CASE_DEADLINE,
              stuck_after: float = STUCK_AFTER, inject: str = "") -> Report:
    """Cases [0, cases) in a worker, restarted after any case that took it down."""
    report = Report(seed)
    bases = [b["name"] for b in json.loads(config.read_text())["bases"]]
    t0 = time.monotonic()
    nxt = 0
    while nxt < cases:
        proc = _spawn(config, seed, nxt, cases, log, deadline, inject)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        ended = False
        try:
            while not ended:
                if not sel.select(stuck_after):
                    report.add({"i": nxt, "kind": "stuck", "detail": f"no answer in {stuck_after} s",
                                "case": _describe(config, seed, nxt)},
                               _base_of(config, seed, nxt, bases))
                    nxt += 1
                    break
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    proc.wait()
                    if nxt < cases:
                        report.add({"i": nxt, "kind": "crash", "detail": f"worker exit {proc.returncode}",
                                    "case": _describe(config, seed, nxt)},
                                   _base_of(config, seed, nxt, bases))
                        nxt += 1
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = json.loads(raw)
                    if "ready" in line:
                        continue
                    report.add(line, str(line["base"]))
                    nxt = int(line["i"]) + 1
                    if line["kind"] == "memory":
                        ended = True
        finally:
            sel.close()
            _kill(proc)
        if nxt < cases:
            report.restarts += 1
    report.seconds = time.monotonic() - t0
    return report


def _base_of(config: Path, seed: int, i: int, names: list[str]) -> str:
    """Which base case `i` mutates (the first draw of its generator, see make_case)."""
    import random

    return random.Random(f"{seed}:{i}").choice(names)


def _describe(config: Path, seed: int, i: int) -> str:
    """The mutations of case `i`, for a case whose worker died before saying (rare: load here)."""
    return make_case(load_bases(config), seed, i)[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--case", type=int, help="replay one case in this process and show its traceback")
    ap.add_argument("--config", type=Path, help="a sweep.json from prepare() (default: build one)")
    ap.add_argument("--deadline", type=float, default=CASE_DEADLINE, help="seconds per case")
    ap.add_argument("--inject", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        inject = dict(item.split(":") for item in args.inject.split(",") if item)
        worker(args.config, args.seed, args.start, args.cases, args.deadline, {int(k): v for k, v in inject.items()})
        return 0
    fixtures = Path(os.environ.get("NYDUS_PY_SHARED", REPO.parent / "shared")) / "fixtures" / "nydus"
    with tempfile.TemporaryDirectory(prefix="nydus-sweep-") as tmp:
        config = args.config or prepare(Path(tmp), fixtures)
        if args.case is not None:
            base, data, desc = make_case(load_bases(config), args.seed, args.case)
            print(desc)
            img = open_bytes(data)
            print("walked", exercise(img, base.blobs))
            return 0
        report = run_sweep(config, args.seed, args.cases, Path(tmp) / "worker.log", deadline=args.deadline)
        print(report.summary())
        return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
