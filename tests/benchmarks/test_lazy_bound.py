"""benchmarks/lazy_bound.py against a discrete-event simulation of the same model.

The model: files arrive one by one in a fetch order at the link rate from time 0; a reader
starting at t0 reads n files drawn at random without replacement, and each read of a file not
yet arrived waits one latency L (a read of an arrived file costs nothing). The formulas are the
mean field of that, so they must agree with the simulated mean within a few percent.
"""

from __future__ import annotations

import random

import pytest

from benchmarks.lazy_bound import best_order_arrivals, blob_order_bound, bounds, read_bound

L = 0.022  # s, one on-demand GET
B = 25e6  # bytes/s (200 Mbit)


def simulate(sizes: list[int], order: list[int], n: int, t0: float, trials: int, seed: int) -> float:
    """Mean read time of `n` random files while files stream in `order` (indexes into `sizes`)."""
    arrival = [0.0] * len(sizes)
    acc = 0
    for i in order:
        acc += sizes[i]
        arrival[i] = acc / B
    rng = random.Random(seed)
    total = 0.0
    for _ in range(trials):
        tau = t0
        for i in rng.sample(range(len(sizes)), n):
            if arrival[i] > tau:
                tau += L
        total += tau - t0
    return total / trials


def pool(seed: int) -> list[int]:
    """About 3000 files as the benchmark makes them: small ones of 1-48 KiB and a few of 1-4 MiB."""
    rng = random.Random(seed)
    return [rng.randrange(1 << 10, 48 << 10) for _ in range(3000)] + \
        [rng.randrange(1 << 20, 4 << 20) for _ in range(8)]


@pytest.mark.parametrize("n,t0", [(246, 0.0), (246, 0.25), (60, 0.1), (900, 0.0)])
def test_blob_order_formula_matches_simulation(n: int, t0: float) -> None:
    sizes = pool(1)
    order = list(range(len(sizes)))
    random.Random(2).shuffle(order)  # blob order: unrelated to the reader's order
    sim = simulate(sizes, order, n, t0, trials=300, seed=3)
    closed = blob_order_bound(n, L, sum(sizes) / B, t0)
    arrivals = sorted(sum(sizes[j] for j in order[:k + 1]) / B for k in range(len(order)))
    assert closed == pytest.approx(sim, rel=0.04)
    # the exact piecewise integration of the same model agrees with the closed form
    assert read_bound(n, L, arrivals, t0) == pytest.approx(closed, rel=0.04)


@pytest.mark.parametrize("n,t0", [(246, 0.0), (246, 0.25), (900, 0.0)])
def test_best_order_matches_simulation_and_beats_blob_order(n: int, t0: float) -> None:
    sizes = pool(4)
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    sim = simulate(sizes, order, n, t0, trials=300, seed=5)
    best = read_bound(n, L, best_order_arrivals(sizes, B), t0)
    assert best == pytest.approx(sim, rel=0.04)
    assert best < 0.9 * blob_order_bound(n, L, sum(sizes) / B, t0)


def test_edges() -> None:
    assert blob_order_bound(0, L, 2.0) == 0.0
    assert blob_order_bound(100, L, 2.0, t0=2.5) == 0.0  # everything arrived before the reader starts
    assert read_bound(100, L, [0.1, 0.2], t0=0.3) == 0.0
    # nothing arrives in time: every read waits
    assert read_bound(10, L, [100.0] * 1000) == pytest.approx(10 * L)
    # without any stream (S -> infinity) (2) is n * L
    assert blob_order_bound(10, L, 1e9) == pytest.approx(10 * L)


def test_bounds_fields() -> None:
    sizes = pool(6)
    out = bounds(246, L, B, sum(sizes), sizes, t0=0.25, full_pull_s=2.73)
    read = out["bound_s"]["read"]  # type: ignore[index]
    assert out["bound_s"]["from_start"] == pytest.approx(0.25 + read)  # type: ignore[index]
    assert out["bound_speedup"]["read"] == pytest.approx(2.73 / read)  # type: ignore[index]
    assert out["bound_s"]["read"] < out["bound_blob_order_s"]["read"]  # type: ignore[index]


def test_clustered_set_is_runs_of_neighbours() -> None:
    from benchmarks.bench_lazy_registry import clustered_set, random_set

    rng = random.Random(9)
    files = {f"layer{li}/d{d:02d}/f{k:05d}": rng.randrange(1 << 10, 48 << 10)
             for li in range(2) for d in range(10) for k in range(d, 400, 10)}
    files["layer0/big/f00001"] = 9 << 20  # huge files stay out, as in the random set
    total = sum(files.values())
    runs = clustered_set(files, 0.064, random.Random(1))
    flat = [rel for run in runs for rel in run]
    got = sum(files[rel] for rel in flat)
    assert total * 0.064 <= got < total * 0.064 + (48 << 10)
    assert "layer0/big/f00001" not in flat and len(set(flat)) == len(flat)
    tree = sorted(files)
    for run in runs:
        assert len({rel.rsplit("/", 1)[0] for rel in run}) == 1  # one directory
        first = tree.index(run[0])
        assert run == tree[first:first + len(run)]  # consecutive, in tree order
    assert len({run[0].rsplit("/", 1)[0] for run in runs}) == len(runs)  # each directory once
    # the random set is the one the benchmark drew before it was a function (results stay comparable)
    rng = random.Random(2)
    order = sorted(files)
    rng.shuffle(order)
    old: list[str] = []
    acc = 0
    for rel in order:
        if acc >= total * 0.064:
            break
        if files[rel] <= 8 << 20:
            old.append(rel)
            acc += files[rel]
    assert random_set(files, 0.064, random.Random(2)) == old


def test_bounds_when_everything_arrives_before_the_mount() -> None:
    out = bounds(246, L, 1e12, 50 << 20, [10 << 10] * 3000, t0=0.25, full_pull_s=0.5)
    assert out["bound_s"] == {"read": 0.0, "from_start": 0.25}
    assert out["bound_speedup"] == {"read": None, "from_start": 2.0}
