"""Shared set-up of the fuzz targets: the repo on sys.path, seed images, run counters."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("NYDUS_PY_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "nydus"


def corpus_dir(argv: list[str], default: str) -> Path:
    """The first positional libFuzzer argument (the corpus directory); appended if missing."""
    for a in argv[1:]:
        if not a.startswith("-"):
            return Path(a)
    argv.append(default)
    return Path(default)


def read_blobs(*dirs: Path) -> dict[str, bytes]:
    """Blob bytes by blob id from every directory given (file names are the 64-hex ids)."""
    out: dict[str, bytes] = {}
    for d in dirs:
        if d.is_dir():
            for p in d.iterdir():
                if len(p.name) == 64 and p.is_file():
                    out[p.name] = p.read_bytes()
    return out


class Tally:
    """Outcome counts, printed to stderr every `every` inputs (libFuzzer ends the process with
    exit(), so there is no reliable place for a final print: the last line is the count)."""

    def __init__(self, name: str, unit: str = "inputs", every: int = 10_000) -> None:
        self.name = name
        self.unit = unit
        self.every = every
        self.counts: Counter[str] = Counter()
        self.n = 0
        self.t0 = time.monotonic()

    def add(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.n += 1
        if self.n % self.every == 0:
            rate = self.n / max(1e-9, time.monotonic() - self.t0)
            parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
            print(f"[{self.name}] {self.unit} {self.n} ({rate:.0f}/s): {parts}", file=sys.stderr, flush=True)
