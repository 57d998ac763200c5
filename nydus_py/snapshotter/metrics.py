"""The snapshotter's own Prometheus endpoint (`[metrics] address`, upstream's ":9110" form).

Gauges are read from the store and the daemons at scrape time (nothing to keep in step); the
latencies are histograms observed where the work happens: a remote Prepare of a Nydus image
(`pull`: tag resolution plus the daemon mount) and each daemon mount call or dedicated start
(`mount`). Each snapshotter has its own registry, so two in one process (tests) do not mix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from .store import Kind

log = logging.getLogger(__name__)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class DaemonView(Protocol):
    """What the metrics read from a SharedDaemon or DedicatedDaemons."""

    def stats(self) -> dict[str, Any]:
        """{"daemons": running count, "mounts": mounted images, "recoveries": {result: count}}."""


class _StateCollector(Collector):
    def __init__(self, snapshotter: Any, daemons: DaemonView | None) -> None:
        self.sn = snapshotter
        self.daemons = daemons

    def collect(self) -> Iterator[Any]:
        snaps = GaugeMetricFamily("nydus_snapshotter_snapshots", "Snapshots in the store, by kind", labels=["kind"])
        counts = dict.fromkeys(("active", "view", "committed"), 0)
        for info in self.sn.walk():
            if info.kind in (Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED):
                counts[info.kind.name.lower()] += 1
        nydus = len(self.sn.bootstrap_snapshots())
        for kind, n in counts.items():
            snaps.add_metric([kind], n)
        yield snaps
        yield GaugeMetricFamily("nydus_snapshotter_nydus_images", "Nydus image (bootstrap) snapshots", value=nydus)
        st: dict[str, Any] = self.daemons.stats() if self.daemons is not None else {
            "daemons": 0, "mounts": 0, "recoveries": {}}
        yield GaugeMetricFamily("nydus_snapshotter_daemons", "nydusd-py daemons running", value=st["daemons"])
        yield GaugeMetricFamily("nydus_snapshotter_mounts", "Nydus images mounted by the daemons", value=st["mounts"])
        rec = CounterMetricFamily("nydus_snapshotter_daemon_recoveries", "Dead daemons recovered or not, by result "
                                  "(restart, failover, failover_failed, failed, save_failed)", labels=["result"])
        for result in ("restart", "failover", "failover_failed", "failed", "save_failed"):
            rec.add_metric([result], st["recoveries"].get(result, 0))
        yield rec


class SnapshotterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.pull = Histogram("nydus_snapshotter_pull_duration_seconds", "Remote Prepare of a Nydus image: tag "
                              "resolution and daemon mount", buckets=BUCKETS, registry=self.registry)
        self.mount = Histogram("nydus_snapshotter_mount_duration_seconds", "One image mount by a daemon (API call, "
                               "or a dedicated daemon's start)", buckets=BUCKETS, registry=self.registry)
        self._state: _StateCollector | None = None
        self.server: Any = None

    def watch(self, snapshotter: Any, daemons: DaemonView | None) -> None:
        """Export the store's and the daemons' state (read at each scrape)."""
        self._state = _StateCollector(snapshotter, daemons)
        self.registry.register(self._state)

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on `address` (`HOST:PORT`, `:PORT` for every interface); (host, port) bound."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"metrics address {address!r} must be HOST:PORT or :PORT")
        host = host.strip("[]") or "0.0.0.0"
        self.server, _thread = start_http_server(int(port), host, self.registry)
        bound = self.server.server_address
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
