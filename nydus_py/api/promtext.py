"""The Prometheus text format (0.0.4), written byte for byte as prometheus_client's
`generate_latest` writes the same metric families, without prometheus_client.

Why: importing prometheus_client loads ssl, email, http.server and wsgiref (about 10 MiB of a
daemon's RSS, issue 12) to write a page of text. The families take the arguments of
prometheus_client's `CounterMetricFamily`, `GaugeMetricFamily` and `HistogramMetricFamily` that
the daemon's collector uses (no exemplars, timestamps, units or created times).
"""

import math
from collections.abc import Iterable, Sequence

Sample = tuple[str, dict[str, str], float]


class MetricFamily:
    kind = "untyped"

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] | None = None) -> None:
        if labels is not None and value is not None:
            raise ValueError("Can only specify at most one of value and labels.")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labels or ())
        self.samples: list[Sample] = []
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((self.name, dict(zip(self.labelnames, labels, strict=False)), value))

    def exposed_name(self) -> str:
        return self.name


class GaugeMetricFamily(MetricFamily):
    kind = "gauge"


class CounterMetricFamily(MetricFamily):
    kind = "counter"

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__(name.removesuffix("_total"), documentation, value, labels)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((self.name + "_total", dict(zip(self.labelnames, labels, strict=False)), value))

    def exposed_name(self) -> str:
        return self.name + "_total"


class HistogramMetricFamily(MetricFamily):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, None, labels)

    def add_metric(self, labels: Sequence[str], buckets: Sequence[tuple[str, float]],  # type: ignore[override]
                   sum_value: float | None = None) -> None:
        """`buckets`: (le, cumulative count) pairs, sorted, +Inf last."""
        base = dict(zip(self.labelnames, labels, strict=False))
        for le, count in buckets:
            self.samples.append((self.name + "_bucket", {**base, "le": le}, count))
        if float(buckets[0][0]) >= 0 and sum_value is not None:  # (+Inf's count is the count)
            self.samples.append((self.name + "_count", base, buckets[-1][1]))
            self.samples.append((self.name + "_sum", base, sum_value))


def go_float(value: float) -> str:
    """A value as Go's Prometheus libraries print it (prometheus_client's floatToGoString)."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample_line(name: str, labels: dict[str, str], value: float) -> str:
    if labels:
        text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
        return f"{name}{{{text}}} {go_float(value)}\n"
    return f"{name} {go_float(value)}\n"


def encode(families: Iterable[MetricFamily]) -> bytes:
    out: list[str] = []
    for fam in families:
        name = fam.exposed_name()
        doc = fam.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {fam.kind}\n")
        out.extend(_sample_line(*s) for s in fam.samples)
    return "".join(out).encode()
