"""Where a cold pass's time goes inside the `nydusd-py fuse` daemon, by Python function.

Each round starts a daemon on bench_fusedev's image, drops the caches, and runs one cold pass
(`small`: `xargs -0 -a small-plain.list cat`; `find`: `find . -type f`) while py-spy samples the
daemon (`--native`, so C frames such as zstd and the syscalls show too). Only the FUSE workers'
samples count, and of those not the ones blocked waiting for the reader role. The result is in
three parts:
  phases    the worker's time by what it was doing: waiting in readv for a request (the client's
            turn and the wake-up), handling it, writing the reply (writev: the kernel copies it and
            wakes the client), asking read_waits;
  self      per Python function (the innermost Python frame; the C function it was in, if any);
  inclusive per Python function, with what it calls.
py-spy samples wall time but drops most samples of a thread asleep in a syscall (an idle daemon
gives ~30 samples a second), so the readv phase is the part of the wait py-spy saw as running,
not the whole wait; what the handlers cost relative to each other is what this is for (with
`fusedev_timeline` for the wake-ups). `--baseline REPO` profiles another checkout in the same
rounds (alternated).

python3 benchmarks/fusedev_profile.py --workdir W [--workload small|find] [--rounds 3] [--baseline REPO]
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import drop_caches
from fusedev_cold_ab import WORKLOADS, start, stop

REPO = Path(__file__).resolve().parents[1]
_LINE = re.compile(r":\d+\)")


def sample(repo: str, work: str, workload: str, out: str) -> None:
    """One cold pass of `workload` on a fresh daemon of `repo`, py-spy's raw samples into `out`."""
    mnt = os.path.join(work, "mnt-profile")
    os.makedirs(mnt, exist_ok=True)
    proc = start(repo, work, mnt, os.path.join(work, "profile-daemon.log"))
    try:
        drop_caches()
        spy = subprocess.Popen(["py-spy", "record", "--native", "-r", "2000", "-p", str(proc.pid), "-f", "raw",
                                "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # (py-spy attaches)
        subprocess.run(WORKLOADS[workload](work), cwd=mnt, stdout=subprocess.DEVNULL, check=True)
        spy.send_signal(2)
        spy.wait(30)
    finally:
        stop(proc, mnt)


def fold(raw: str) -> dict[str, collections.Counter[str]]:
    """The worker samples of py-spy's raw output, counted by phase, by self and inclusive frame."""
    phases: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for line in Path(raw).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "FuseDevSession._serve" not in stack or not n.isdigit():
            continue
        frames = stack.split(";")
        k = max(i for i, f in enumerate(frames) if f.startswith("FuseDevSession._serve"))
        below = frames[k + 1 :]
        if not below or below[0].startswith("lock_PyThread_acquire_lock"):
            continue  # waiting for the reader role: another worker reads
        count = int(n)
        head = " ".join(below[0].split()[:1])
        phase = {"FuseDevSession._poll_read": "read a request (readv/poll)", "os_readv": "read a request (readv/poll)",
                 "FuseSession.handle_vectored": "handle", "os_writev": "write the reply (writev)",
                 "os_write": "write the reply (writev)", "FuseSession.read_waits": "read_waits"}.get(head, "loop")
        phases[phase] += count
        py = [f for f in below if ".py:" in f]
        leaf = below[-1]
        name = _LINE.sub(")", py[-1]) if py else "(transport loop)"
        if ".py:" not in leaf:
            name += f"  [{leaf.split()[0]}]"
        own[name] += count
        for f in {_LINE.sub(")", f) for f in py}:
            incl[f] += count
    return {"phases": phases, "self": own, "inclusive": incl}


def show(name: str, got: dict[str, collections.Counter[str]], top: int) -> None:
    total = sum(got["phases"].values()) or 1
    print(f"== {name}: {total} worker samples")
    for part in ("phases", "self", "inclusive"):
        print(f"  -- {part}")
        for f, n in got[part].most_common(top):
            print(f"  {100 * n / total:5.1f}%  {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="bench_fusedev's --workdir")
    ap.add_argument("--workload", choices=["small", "find"], default="small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout, profiled in the same rounds")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("py-spy") is None:
        sys.exit("fusedev_profile needs root (mounts, drop_caches) and py-spy")
    arms = [("new", str(REPO)), *([("base", args.baseline)] if args.baseline else [])]
    with tempfile.TemporaryDirectory() as tmp:
        raws: dict[str, list[str]] = {name: [] for name, _ in arms}
        for r in range(args.rounds):
            for name, repo in arms:
                out = os.path.join(tmp, f"{name}-{r}.raw")
                sample(repo, args.workdir, args.workload, out)
                raws[name].append(out)
        for name, _repo in arms:
            total: dict[str, collections.Counter[str]] = {}
            for raw in raws[name]:
                for part, counts in fold(raw).items():
                    total.setdefault(part, collections.Counter()).update(counts)
            show(f"{name} ({args.workload}, {args.rounds} cold passes)", total, args.top)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
