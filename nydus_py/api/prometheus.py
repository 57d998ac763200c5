"""Prometheus exposition of the daemon's counters, read at scrape time.

Nothing on the request path counts for Prometheus: a collector walks the same counters
the nydusd JSON endpoints are computed from (FUSE stats per mount, the metered backend, the blob
cache, the prefetcher, the registry client's own counters) when `/metrics` is scraped. Labels are
mountpoints, operation names and HTTP statuses only: never image references or credentials.
The text is written by `promtext`, as prometheus_client would write it, without loading it (10 MiB).
"""

import os
import time
from collections.abc import Iterator
from typing import Any

from ..daemon.instance import Instance
from ..daemon.state import DaemonState
from ..daemon.version import build_info
from ..metrics.backend import BACKEND_LATENCY_BOUNDS_MS
from ..metrics.fsstats import LATENCY_BOUNDS_US, opname
from ..storage.cache import BlobCacheManager
from .promtext import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, encode
from .promtext import MetricFamily as Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_FS_LE = [f"{b / 1e6:g}" for b in LATENCY_BOUNDS_US] + ["+Inf"]
_BACKEND_LE = [f"{b / 1e3:g}" for b in BACKEND_LATENCY_BOUNDS_MS] + ["+Inf"]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _cumulative(counts: list[int], les: list[str]) -> list[tuple[str, float]]:
    out, total = [], 0
    for le, c in zip(les, counts, strict=True):
        total += c
        out.append((le, float(total)))
    return out


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class DaemonCollector:
    """Reads a DaemonService (duck-typed: state, instances, metrics, events, started_at)."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        yield from self._daemon(svc)
        instances = list(svc.instances.values())
        yield from self._fuse(instances, svc)
        yield from self._backend(instances)
        yield from self._cache(instances)
        yield from self._prefetch(instances)
        yield from self._warm(instances, svc)
        yield from self._casefold(instances)

    def _daemon(self, svc: Any) -> Iterator[Metric]:
        state = GaugeMetricFamily("nydusd_state", "Daemon state (1 for the current one)", labels=["state"])
        for s in (DaemonState.INIT, DaemonState.READY, DaemonState.RUNNING, DaemonState.STOPPED):
            state.add_metric([s.value], 1.0 if svc.state == s else 0.0)
        yield state
        b = build_info()
        info = GaugeMetricFamily("nydusd_info", "Daemon build", labels=["version", "git_commit", "daemon_id"])
        info.add_metric([b["package_ver"], b["git_commit"], svc.opts.id or ""], 1.0)
        yield info
        yield GaugeMetricFamily("nydusd_rss_bytes", "Resident set size", value=float(rss_bytes()))
        yield GaugeMetricFamily("nydusd_uptime_seconds", "Seconds since start", value=time.time() - svc.started_at)
        yield GaugeMetricFamily("nydusd_mounts", "Mounted filesystems", value=float(len(svc.instances)))
        yield GaugeMetricFamily("nydusd_fuse_inflight_requests", "FUSE requests being handled",
                                value=float(len(svc.metrics.inflight)))
        ev = CounterMetricFamily("nydusd_error_events", "Error events logged (GET /api/v1/daemon/events)")
        ev.add_metric([], float(svc.events.total_errors))
        yield ev

    def _fuse(self, instances: list[Instance], svc: Any) -> Iterator[Metric]:
        reqs = CounterMetricFamily("nydusd_fuse_requests", "FUSE requests handled", labels=["mountpoint", "op"])
        errs = CounterMetricFamily("nydusd_fuse_request_errors", "FUSE requests answered with an error",
                                   labels=["mountpoint", "op"])
        lat = HistogramMetricFamily("nydusd_fuse_request_duration_seconds", "FUSE request handling time",
                                    labels=["mountpoint", "op"])
        read = CounterMetricFamily("nydusd_read_bytes", "File bytes returned by READ", labels=["mountpoint"])
        sources = [(i.mountpoint, i.stats) for i in instances] + [("", svc.metrics.pseudo)]
        for mp, stats in sources:
            for op, hits, errors, lat_us, dist in stats.op_snapshot():
                name = opname(op)
                reqs.add_metric([mp, name], float(hits))
                errs.add_metric([mp, name], float(errors))
                lat.add_metric([mp, name], _cumulative(dist, _FS_LE), lat_us / 1e6)
            if mp:
                read.add_metric([mp], float(stats.data_read))
        yield from (reqs, errs, lat, read)

    def _backend(self, instances: list[Instance]) -> Iterator[Metric]:
        labels = ["mountpoint", "backend"]
        reads = CounterMetricFamily("nydusd_backend_reads", "Blob range reads sent to the backend", labels=labels)
        errors = CounterMetricFamily("nydusd_backend_read_errors", "Backend reads that failed", labels=labels)
        nbytes = CounterMetricFamily("nydusd_backend_read_bytes", "Bytes read from the backend", labels=labels)
        lat = HistogramMetricFamily("nydusd_backend_read_duration_seconds", "Backend read time", labels=labels)
        chunk_errors = CounterMetricFamily("nydusd_chunk_read_errors", "Chunk reads that ended in EIO",
                                           labels=["mountpoint"])
        http = CounterMetricFamily("nydusd_backend_http_responses", "Backend error answers by HTTP status",
                                   labels=["mountpoint", "status"])
        counters = CounterMetricFamily("nydusd_backend_events", "Backend client counters (retries, fallbacks, "
                                       "redirects, token fetches, ...)", labels=["mountpoint", "event"])
        for inst in instances:
            bs = inst.backend_stats
            if bs is not None:
                j = bs.json()
                lv = [inst.mountpoint, j["backend_type"]]
                reads.add_metric(lv, float(j["read_count"]))
                errors.add_metric(lv, float(j["read_errors"]))
                nbytes.add_metric(lv, float(j["read_amount_total"]))
                lat.add_metric(lv, _cumulative(j["read_cumulative_latency_millis_dist"], _BACKEND_LE),
                               j["read_cumulative_latency_millis_total"] / 1e3)
            if inst.device is not None:
                chunk_errors.add_metric([inst.mountpoint], float(inst.device.read_errors))
            snap = inst.backend_counters()
            for status, n in sorted((snap.get("errors_by_status") or {}).items()):
                http.add_metric([inst.mountpoint, str(status)], float(n))
            for k, v in sorted(snap.items()):
                if isinstance(v, int) and not isinstance(v, bool):
                    counters.add_metric([inst.mountpoint, k], float(v))
        yield from (reads, errors, nbytes, lat, chunk_errors, http, counters)

    def _cache(self, instances: list[Instance]) -> Iterator[Metric]:
        hits = CounterMetricFamily("nydusd_cache_hits", "Blob cache hits", labels=["mountpoint", "kind"])
        misses = CounterMetricFamily("nydusd_cache_misses", "Chunks not in the blob cache", labels=["mountpoint"])
        evictions = CounterMetricFamily("nydusd_cache_evictions", "Blobs evicted from the cache",
                                        labels=["mountpoint"])
        usage = GaugeMetricFamily("nydusd_cache_usage_bytes", "Bytes the blob cache uses on disk",
                                  labels=["mountpoint"])
        files = GaugeMetricFamily("nydusd_cache_files", "Blob cache data files", labels=["mountpoint"])
        fetched = CounterMetricFamily("nydusd_cache_fetched_bytes", "Bytes fetched from the backend, by mode "
                                      "(ondemand, stream: adaptive fetching, prefetch)", labels=["mountpoint", "mode"])
        streams = CounterMetricFamily("nydusd_cache_streams", "Adaptive fetching: blobs switched to streams, "
                                      "streams started, streams that broke", labels=["mountpoint", "event"])
        for inst in instances:
            src = inst.source
            if not isinstance(src, BlobCacheManager):
                continue
            stats = src.stats
            mp = inst.mountpoint
            hits.add_metric([mp, "chunk"], float(stats.chunk_hits))
            hits.add_metric([mp, "whole"], float(stats.whole_hits))
            hits.add_metric([mp, "partial"], float(stats.partial_hits))
            misses.add_metric([mp], float(stats.chunk_misses))
            evictions.add_metric([mp], float(stats.evictions))
            usage.add_metric([mp], float(src.usage()))
            files.add_metric([mp], float(len(src.underlying_files())))
            for mode, n in (("ondemand", stats.ondemand_bytes), ("stream", stats.stream_bytes),
                            ("prefetch", stats.prefetch_data_amount)):
                fetched.add_metric([mp, mode], float(n))
            for event, n in (("switch", stats.stream_switches), ("start", stats.stream_reads),
                             ("failure", stats.stream_failures)):
                streams.add_metric([mp, event], float(n))
        yield from (hits, misses, evictions, usage, files, fetched, streams)

    def _prefetch(self, instances: list[Instance]) -> Iterator[Metric]:
        chunks = CounterMetricFamily("nydusd_prefetch_chunks", "Chunks prefetched", labels=["mountpoint"])
        planned = CounterMetricFamily("nydusd_prefetch_planned_bytes", "Bytes planned for prefetch",
                                      labels=["mountpoint"])
        errors = CounterMetricFamily("nydusd_prefetch_errors", "Prefetch batches that failed", labels=["mountpoint"])
        done = GaugeMetricFamily("nydusd_prefetch_done", "1 once prefetch has finished", labels=["mountpoint"])
        for inst in instances:
            p = inst.prefetcher
            if p is None:
                continue
            mp = inst.mountpoint
            chunks.add_metric([mp], float(p.chunks_fetched))
            planned.add_metric([mp], float(p.bytes_planned))
            errors.add_metric([mp], float(p.errors))
            done.add_metric([mp], 1.0 if p.done.is_set() else 0.0)
        yield from (chunks, planned, errors, done)


    def _warm(self, instances: list[Instance], svc: Any) -> Iterator[Metric]:
        """Small files decoded right after their LOOKUP for the READ that follows (storage/warm):
        per mount; and the FUSE session's gate (fuse/warm), mountpoint "", which stops warming
        while LOOKUPs go unread."""
        fam = CounterMetricFamily("nydusd_small_file_warm", "Small files decoded after their LOOKUP: warmed, hit "
                                  "(their READ took them), wasted (pushed out unread); for mountpoint \"\" the "
                                  "session's gate: lookups it let warm or skipped (READs were not following)",
                                  labels=["mountpoint", "event"])
        for inst in instances:
            if inst.device is None:
                continue
            w = inst.device.warmed
            for event, n in (("warmed", w.warmed), ("hit", w.hits), ("wasted", w.wasted)):
                fam.add_metric([inst.mountpoint, event], float(n))
        session = getattr(svc, "session", None)
        if session is not None:
            g = session.warm_gate
            for event, n in (("lookup_warmed", g.warmed), ("lookup_skipped", g.skipped), ("followed", g.followed),
                             ("unfollowed", g.unfollowed)):
                fam.add_metric(["", event], float(n))
        yield fam

    def _casefold(self, instances: list[Instance]) -> Iterator[Metric]:
        """Case-insensitive LOOKUP (only mounts that have it on)."""
        fam = CounterMetricFamily("nydusd_case_insensitive_lookups", "LOOKUPs that fell back to a case-folded "
                                  "match, by result", labels=["mountpoint", "result"])
        col = CounterMetricFamily("nydusd_case_insensitive_collisions", "Names that differ only in case "
                                  "(folded lookups refused)", labels=["mountpoint"])
        for inst in instances:
            c = inst.casefold_counters()
            if c is None:
                continue
            for result, key in (("hit", "fallback_hits"), ("miss", "misses"), ("ambiguous", "ambiguous_lookups")):
                fam.add_metric([inst.mountpoint, result], float(c[key]))
            col.add_metric([inst.mountpoint], float(c["collisions"]))
        yield from (fam, col)


def make_registry(service: Any) -> DaemonCollector:
    return DaemonCollector(service)


def exposition(collector: DaemonCollector) -> bytes:
    return encode(collector.collect())


__all__ = ["CONTENT_TYPE", "DaemonCollector", "exposition", "make_registry", "rss_bytes"]
