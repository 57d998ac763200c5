"""Caps on how far a compressed layer may expand (decompression bombs).

A few MiB of gzip or zstd can expand to many GiB; a layer is refused while it is being
decompressed, before the disk fills, when either

* its expanded size passes `max_size` (default 64 GiB), or
* it has expanded past `ratio_grace` (default 64 MiB) and its expanded size is more than
  `max_ratio` (default 100) times its compressed size (for a stream of unknown size: the
  compressed bytes read so far).

Real layers compress 2-10x; the grace keeps small, very compressible layers (a file of zeros)
working. 0 turns a cap off. `nydus-image-py create` and `nydusify-py convert` take these as
`--max-expanded-size`, `--max-expansion-ratio` and `--expansion-ratio-grace`.
"""

import io
import re
from dataclasses import dataclass
from typing import Any

from ..rafs.errors import FormatError

DEFAULT_MAX_SIZE = 64 << 30
DEFAULT_MAX_RATIO = 100.0
DEFAULT_RATIO_GRACE = 64 << 20

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


class ExpansionLimitError(FormatError):
    """A layer expanded past one of the `ExpansionLimits`."""


@dataclass(frozen=True)
class ExpansionLimits:
    max_size: int = DEFAULT_MAX_SIZE  # bytes; 0 = no cap
    max_ratio: float = DEFAULT_MAX_RATIO  # expanded / compressed; 0 = no cap
    ratio_grace: int = DEFAULT_RATIO_GRACE  # the ratio is checked only past this many bytes

    def __post_init__(self) -> None:
        if self.max_size < 0 or self.max_ratio < 0 or self.ratio_grace < 0:
            raise ValueError("expansion limits must not be negative")


def parse_size(text: str) -> int:
    """Bytes from `123`, `64M`, `64MiB`, `1g` (powers of 1024); ValueError otherwise."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"invalid size {text!r} (e.g. 1048576, 512M, 64G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def remaining_size(f: Any) -> int | None:
    """Bytes from `f`'s position to its end, if it can tell (a seekable file); else None."""
    try:
        if not f.seekable():
            return None
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
    except (OSError, AttributeError, ValueError):
        return None
    return max(0, int(end) - int(pos))


def human_size(n: int) -> str:
    for unit, step in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} bytes"


class ExpansionMeter:
    """Counts compressed bytes read and expanded bytes produced; raises before a cap is passed.

    Call `consumed` with compressed bytes as they are read and `produce` with each piece of
    output before writing it: a refused piece is never written. `compressed_size` (when known)
    is the ratio's base from the start, so where the compressible part of a layer lies does not
    matter.
    """

    def __init__(self, limits: ExpansionLimits | None, compressed_size: int | None = None) -> None:
        self.limits = limits or ExpansionLimits(0, 0, 0)
        self.compressed_size = compressed_size or 0
        self.compressed = 0
        self.expanded = 0

    def consumed(self, n: int) -> None:
        self.compressed += n

    def produce(self, n: int) -> None:
        after = self.expanded + n
        lim = self.limits
        if lim.max_size and after > lim.max_size:
            raise ExpansionLimitError(
                f"expands to more than {human_size(lim.max_size)} ({lim.max_size} bytes; "
                f"limit --max-expanded-size) after {human_size(self.compressed)} of compressed input"
            )
        base = max(self.compressed, self.compressed_size)
        if lim.max_ratio and after > lim.ratio_grace and after > lim.max_ratio * base:
            raise ExpansionLimitError(
                f"expands more than {lim.max_ratio:g} times: {human_size(after)} from "
                f"{human_size(base)} of compressed input (limit --max-expansion-ratio, "
                f"checked past --expansion-ratio-grace {human_size(lim.ratio_grace)})"
            )
        self.expanded = after
