"""Go's text forms that upstream's configs and flags use: `time.ParseDuration` and
`strconv.ParseBool`. Pure functions, shared by nydusify-py's flags and the snapshotter's config."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TERM = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")

def parse_go_duration(text: str) -> float:
    """Seconds in Go's `time.ParseDuration` syntax ("5s", "1m30s", "1.5h", "300ms", "0")."""
    s = text.strip()
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _TERM.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (e.g. 5s, 1m, 1h30m, 500ms)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_go_bool(text: str) -> bool:
    """strconv.ParseBool: ValueError for anything else."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false/1/0)")


_SI = "kmgtpe"
_SIZE = re.compile(r"^([0-9.,]+)\s*([a-zA-Z]*)$")


def parse_human_bytes(text: str) -> int:
    """go-humanize's `ParseBytes`, which nydusify's size flags use ("0MB", "10MB", "4MiB", "512k",
    "1048576"): k/kb/m/mb... are powers of 1000, ki/kib/mi/mib... of 1024, any case."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise ValueError(f"invalid size {text!r} (e.g. 10MB, 4MiB, 1048576)")
    try:
        num = float(m.group(1).replace(",", ""))
    except ValueError:
        raise ValueError(f"invalid size {text!r}") from None
    unit = m.group(2).lower()
    if unit in ("", "b"):
        mult = 1
    elif unit[0] in _SI and unit[1:] in ("", "b"):
        mult = 1000 ** (_SI.index(unit[0]) + 1)
    elif unit[0] in _SI and unit[1:] in ("i", "ib"):
        mult = 1024 ** (_SI.index(unit[0]) + 1)
    else:
        raise ValueError(f"invalid size {text!r}: unknown unit {m.group(2)!r}")
    return int(num * mult)
