"""The seeded bootstrap mutation sweep (issue 16, "keep it from coming back").

3000 mutants of the real Nydus fixtures and of v5/v6 images built by our builder; each must parse
and walk fully or raise FormatError, within a per-case deadline and an address-space limit (see
sweep.py). The counts are printed whatever the outcome. Bigger runs and replays of one case:
`python3 -m tests.reliability.sweep --help`.
"""

import os
from pathlib import Path

import pytest

from ..conftest import NYDUS_FIXTURES
from .sweep import RSS_BOUND, prepare, run_sweep

CASES = int(os.environ.get("NYDUS_SWEEP_CASES", "3000"))
SEED = int(os.environ.get("NYDUS_SWEEP_SEED", "16"))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, nydus_fixtures: Path) -> Path:
    return prepare(tmp_path_factory.mktemp("sweep"), NYDUS_FIXTURES)


@pytest.mark.slow
def test_mutated_bootstraps_parse_or_raise_format_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_sweep(config, SEED, CASES, tmp_path / "worker.log")
    with capsys.disabled():
        print("\n" + report.summary())
    assert report.tried == CASES
    assert not report.failures, report.summary()
    # the sweep must reach both outcomes on every base, or it tests nothing
    for base, counts in report.by_base.items():
        assert counts["ok"] and counts["format"], (base, counts)
    assert report.counts["format in walk"] > 0 and report.restarts == 0


def test_harness_reports_every_failure_kind_and_carries_on(config: Path, tmp_path: Path) -> None:
    """Reader bugs of each kind, injected into single cases, are counted as failures of that
    kind; the worker is restarted after the ones that take it down and the other cases still run."""
    inject = {2: "error", 4: "hang", 6: "memory", 8: "crash", 10: "stuck"}
    report = run_sweep(config, SEED, 14, tmp_path / "worker.log", deadline=1.0, stuck_after=8.0,
                       inject=",".join(f"{i}:{k}" for i, k in inject.items()))
    assert report.tried == 14
    assert {int(str(f["i"])): f["kind"] for f in report.failures} == inject, report.summary()
    assert report.counts["ok"] + report.counts["format"] == 14 - len(inject)
    assert report.restarts == 3  # after memory, crash and stuck


def test_worker_peak_is_its_own_not_its_parents(config: Path, tmp_path: Path) -> None:
    """A sweep started from a parent that once held more than the RSS bound (a long pytest run
    does) still judges each case by the worker's own peak; ru_maxrss would carry the parent's
    pre-exec peak over and call every case `memory` (what CI saw)."""
    ballast = bytearray(RSS_BOUND + (64 << 20))
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    report = run_sweep(config, SEED, 6, tmp_path / "worker.log")
    del ballast
    assert report.tried == 6
    assert not report.failures, report.summary()
