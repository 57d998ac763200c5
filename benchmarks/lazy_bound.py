"""The best time any lazy reader can reach on a random startup set (issue 12's no-hints goal).

The startup set of `bench_lazy_registry.py` is drawn uniformly at random over the image's files
and read one file at a time in that random order, so no daemon can predict the next file: each
read either finds its file already fetched (it was fetched blindly before) or waits at least one
on-demand latency L (one round trip plus a small transfer). Over a link of B bytes/s, a daemon
that streams from daemon start (time 0) has received B*tau bytes at time tau; the reader starts
at t0 (the mount). If the files received by tau are a fraction c(tau) of the N files the set is
drawn from, the next read waits with probability 1 - c(tau) (n << N: mean field), so

    dn/dtau = 1 / (L * (1 - c(tau)))                                              (1)

and the read time is the tau - t0 at which n reaches the set's file count.

Blob order (a stream of the blobs as stored, S = blob_bytes / B): c(tau) = tau / S, and (1)
integrates to n = (S/L) * ln((S - t0) / (S - t0 - t)), i.e.

    t = (S - t0) * (1 - exp(-n * L / S))           (0 once t0 >= S)               (2)

Any order: c is a step function (file k of the fetch order arrives at a_k = bytes up to and
including it / B); (1) is then piecewise linear and `read_bound` integrates it exactly. The
smallest files first maximise c(tau) at every tau (the most files per byte), so with that order
(`best_order_arrivals`) (1) gives the lower bound for any daemon that knows only the file sizes
(the bootstrap has them). Both ignore the bandwidth the waited-for reads take and all CPU time,
so they are lower bounds of the expected read time, not predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def blob_order_bound(n: int, latency_s: float, stream_s: float, t0: float = 0.0) -> float:
    """(2): read time of `n` random files while the blobs (`stream_s` seconds at the link rate)
    stream in stored order from time 0 and the reader starts at `t0`."""
    if n <= 0 or t0 >= stream_s:
        return 0.0
    return (stream_s - t0) * (1.0 - math.exp(-n * latency_s / stream_s))


def read_bound(n: int, latency_s: float, arrivals: Sequence[float], t0: float = 0.0) -> float:
    """(1) integrated exactly: read time of `n` files drawn at random from the len(arrivals)
    files of the set's pool, file k being fetched at arrivals[k] (ascending; seconds from daemon
    start), the reader starting at `t0`."""
    total = len(arrivals)
    if n <= 0 or total == 0:
        return 0.0
    covered = sum(1 for a in arrivals if a <= t0)
    tau, done = t0, 0.0
    for k in range(covered, total + 1):
        if k == total:  # everything fetched: the remaining reads wait on nothing
            return tau - t0
        rate = 1.0 / (latency_s * (1.0 - k / total))  # files read per second while k are fetched
        end = arrivals[k]
        if end > tau:
            if done + rate * (end - tau) >= n:
                return tau + (n - done) / rate - t0
            done += rate * (end - tau)
            tau = end
    return tau - t0


def best_order_arrivals(sizes: Sequence[float], bandwidth_bps: float) -> list[float]:
    """Arrival times (s) of files of stored `sizes` fetched smallest first over `bandwidth_bps`
    bytes/s from time 0: the fetch order that covers the most files at every moment."""
    out, acc = [], 0.0
    for s in sorted(sizes):
        acc += s
        out.append(acc / bandwidth_bps)
    return out


def bounds(n: int, latency_s: float, bandwidth_bps: float, blob_bytes: int, stored_sizes: Sequence[float],
           t0: float, full_pull_s: float) -> dict[str, object]:
    """The bound fields saved beside a `no_hints_1_reader*` result: read and from-start times
    (from-start = t0 + read) for the best fetch order and for blob order, and the speedups over
    `full_pull_s` they allow."""
    best = read_bound(n, latency_s, best_order_arrivals(stored_sizes, bandwidth_bps), t0)
    blob = blob_order_bound(n, latency_s, blob_bytes / bandwidth_bps, t0)

    def pair(read: float) -> dict[str, float]:
        return {"read": read, "from_start": t0 + read}

    def speedup(read: float) -> dict[str, float | None]:
        # (None, not inf: JSON has no infinity) the bound's read takes no time when all arrives first
        return {"read": full_pull_s / read if read > 0 else None, "from_start": full_pull_s / (t0 + read)}

    return {"bound_s": pair(best), "bound_speedup": speedup(best),
            "bound_blob_order_s": pair(blob), "bound_blob_order_speedup": speedup(blob)}
