"""`api.promtext` writes what prometheus_client's generate_latest writes for the same families,
byte for byte (it replaces it in the daemon: prometheus_client loads ssl, email and http.server)."""

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prometheus_client.core as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from nydus_py.api import prometheus as prom
from nydus_py.api import promtext as pt
from nydus_py.daemon.instance import MountCmd
from nydus_py.daemon.service import DaemonOptions, DaemonService
from tests.daemon.rig import make_image, snapshotter_config
from tests.waiting import wait_until


class Families:
    """A collector over prometheus_client families, for generate_latest."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families


names = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)  # quotes, backslashes, newlines...
values = st.one_of(st.integers(-(10**20), 10**20).map(float), st.floats(allow_nan=True, allow_infinity=True))
counts = st.one_of(st.integers(0, 10**15).map(float), st.floats(0, 1e30))


@st.composite
def family(draw: st.DrawFn) -> tuple[Any, Any]:
    kind = draw(st.sampled_from(["counter", "gauge", "histogram"]))
    name, doc = draw(names), draw(text)
    if kind != "histogram" and draw(st.booleans()):  # one unlabelled value
        value = draw(values)
        ours = (pt.CounterMetricFamily if kind == "counter" else pt.GaugeMetricFamily)(name, doc, value=value)
        theirs = (pc.CounterMetricFamily if kind == "counter" else pc.GaugeMetricFamily)(name, doc, value=value)
        return ours, theirs
    labels = draw(st.lists(st.from_regex(r"[a-k][a-z0-9_]{0,8}", fullmatch=True), max_size=3, unique=True))
    ours = {"counter": pt.CounterMetricFamily, "gauge": pt.GaugeMetricFamily,
            "histogram": pt.HistogramMetricFamily}[kind](name, doc, labels=labels)
    theirs = {"counter": pc.CounterMetricFamily, "gauge": pc.GaugeMetricFamily,
              "histogram": pc.HistogramMetricFamily}[kind](name, doc, labels=labels)
    for _ in range(draw(st.integers(0, 3))):
        lv = draw(st.lists(text, min_size=len(labels), max_size=len(labels)))
        if kind == "histogram":
            bounds = sorted(draw(st.lists(st.floats(0, 1e9), max_size=4, unique=True)))
            cum = sorted(draw(st.lists(counts, min_size=len(bounds) + 1, max_size=len(bounds) + 1)))
            buckets = [(f"{b:g}", c) for b, c in zip(bounds, cum, strict=False)] + [("+Inf", cum[-1])]
            total = draw(st.one_of(st.none(), counts))
            ours.add_metric(lv, buckets, total)
            theirs.add_metric(lv, buckets, total)
        else:
            v = draw(values)
            ours.add_metric(lv, v)
            theirs.add_metric(lv, v)
    return ours, theirs


@settings(max_examples=300, deadline=None)
@given(st.lists(family(), max_size=4))
def test_the_text_is_prometheus_clients(pairs: list[tuple[Any, Any]]) -> None:
    assert pt.encode(o for o, _ in pairs) == generate_latest(Families([t for _, t in pairs]))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, 1e-7, 123456.0, 1234567.0, 1e21, 2.5e15, -3e10, math.inf,
                                   -math.inf])
def test_go_float(value: float) -> None:
    from prometheus_client.utils import floatToGoString

    assert pt.go_float(value) == floatToGoString(value)


def test_the_daemons_page_is_prometheus_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole /metrics page of a daemon with mounts, a blob cache and prefetch, against the same
    collector run over prometheus_client's families."""
    svc = DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path)))
    try:
        for i in range(2):
            img = make_image(str(tmp_path / f"img{i}"), i, files=6)
            cfg = json.loads(snapshotter_config(img.blobs, f"s{i}", cache_dir=str(tmp_path / f"cache{i}")))
            cfg["fs_prefetch"] = {"enable": True, "prefetch_all": True, "threads_count": 1}
            svc.mount(f"/s{i}", MountCmd("rafs", img.boot, json.dumps(cfg)))
            root = svc.vfs.lookup(1, f"s{i}".encode())
            ino = svc.vfs.lookup(root.ino, f"id-{i}".encode()).ino
            svc.vfs.read(ino, 0, 0, 100)
            svc.metrics.finished(svc.metrics.started(15, ino, 7 + i), (b"\x10\0\0\0\0\0\0\0" + bytes(8), b"x" * 9))
        # both snapshots must see the same counters: the background prefetch ends first
        wait_until(lambda: all(svc.metrics_blobcache(f"/s{i}")["prefetch_end_time_secs"] for i in range(2)),
                   20, "both mounts' prefetch to finish")
        monkeypatch.setattr(prom, "rss_bytes", lambda: 12345678)
        monkeypatch.setattr(prom, "time", SimpleNamespace(time=lambda: svc.started_at + 42.5))
        ours = prom.exposition(prom.make_registry(svc))
        for name in ("CounterMetricFamily", "GaugeMetricFamily", "HistogramMetricFamily"):
            monkeypatch.setattr(prom, name, getattr(pc, name))
        theirs = generate_latest(prom.DaemonCollector(svc))  # type: ignore[arg-type]
    finally:
        svc.close_all()
    for family in (b"nydusd_fuse_request_duration_seconds_bucket", b'nydusd_cache_hits_total{kind="chunk",mountpoint="/s1"}',
                   b"nydusd_backend_reads_total", b'nydusd_prefetch_chunks_total{mountpoint="/s0"}',
                   b"nydusd_rss_bytes 1.2345678e+07", b"nydusd_uptime_seconds 42.5"):
        assert family in ours, family
    assert ours == theirs
