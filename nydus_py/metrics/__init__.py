"""Daemon metrics: FUSE request counters (nydusd's FsIoStats), backend meters, Prometheus export."""

from .backend import BackendStats, MeteredBackend, instrument
from .fsstats import FsStats, FuseMetrics

__all__ = ["BackendStats", "FsStats", "FuseMetrics", "MeteredBackend", "instrument"]
