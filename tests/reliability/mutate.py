"""Seeded bootstrap mutations for the reliability sweep (pure: bytes in, bytes out).

Case `i` of seed `s` is a function of (s, i) and the base images alone, so any failure the sweep
reports can be replayed on its own (`python -m tests.reliability.sweep --seed s --case i`).

Mutations, stacked 1..3 per case: bit flips, truncation (and v6 re-padding to a block), field
overwrites with boundary values (mostly at offsets where the format keeps structure: superblocks,
tables, inode records), small arithmetic on existing fields, byte insertion/deletion (shifts
every offset behind it), and splicing between two base images (same or other version).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from nydus_py.rafs.loader import open_bytes
from nydus_py.rafs.v5 import V5Image
from nydus_py.rafs.v6 import V6Image

BOUNDARY = (
    0, 1, 2, 3, 7, 8, 0x10, 0x20, 0x3F, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x1001, 0xFFF, 0x7FFF,
    0x8000, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF, 1 << 32, 1 << 40,
    (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
)  # fmt: skip
WIDTHS = {"<B": 1, "<H": 2, "<I": 4, "<Q": 8}
KINDS = ("flip", "overwrite", "overwrite", "overwrite", "arith", "truncate", "splice", "shift")


@dataclass(frozen=True)
class Base:
    """One unmutated bootstrap, its blobs, and the offsets where its structure lives."""

    name: str
    data: bytes
    version: int
    hot: tuple[int, ...]
    blobs: Mapping[str, bytes] = field(default_factory=dict)


def make_base(name: str, data: bytes, blobs: Mapping[str, bytes] | None = None) -> Base:
    img = open_bytes(data)
    try:
        return Base(name, data, img.version, hot_offsets(img, len(data)), dict(blobs or {}))
    finally:
        img.close()


def hot_offsets(img: object, size: int) -> tuple[int, ...]:
    """Offsets of superblock, table and inode-record fields of a valid image (private reader
    attributes are fine here: this only picks where to aim)."""
    hot: set[int] = set()
    if isinstance(img, V5Image):
        hot |= set(range(0, 128, 2))
        hot |= {img._itab + 4 * k for k in range(img.slot_count)}
        hot |= {img._ptab + 4 * k for k in range(img._ptab_entries)}
        hot |= set(range(img._btab, img._btab + min(img._btab_size, 512), 4))
        for slot in range(1, img.slot_count + 1):
            rec = img._record_offset(slot)
            hot |= set(range(rec, rec + 128 + 4 * 60, 4))
    elif isinstance(img, V6Image):
        hot |= set(range(1024, 1024 + 128, 2)) | set(range(1152, 1152 + 64, 4)) | set(range(1408, 1408 + 128, 4))
        hot |= set(range(img._blob_off, img._blob_off + min(img._blob_size, 512), 4))
        hot |= set(range(img._ct_off, img._ct_off + min(img._ct_size, 80 * 16), 4))
        hot |= set(range(img._pf_off, img._pf_off + img._pf_size, 4))
        for _, nid in img.walk():
            start = img._meta_start + 32 * nid
            hot |= set(range(start, start + 192, 2))
    return tuple(sorted(o for o in hot if 0 <= o < size))


def _offset(rng: random.Random, base: Base, n: int, width: int) -> int:
    hot = [o for o in base.hot if o + width <= n] if rng.random() < 0.8 else []
    pos = rng.choice(hot) if hot else rng.randrange(max(1, n - width + 1))
    return pos - pos % width if rng.random() < 0.9 else pos


def mutate_once(rng: random.Random, data: bytearray, base: Base, bases: list[Base]) -> str:
    """Apply one mutation to `data` in place; return its description."""
    n = len(data)
    if n == 0:
        return "empty"
    kind = rng.choice(KINDS)
    if kind == "flip":
        flips = []
        for _ in range(rng.randint(1, 8)):
            pos = rng.choice(base.hot) if base.hot and rng.random() < 0.5 else rng.randrange(n)
            if pos < n:
                bit = rng.randrange(8)
                data[pos] ^= 1 << bit
                flips.append(f"{pos}.{bit}")
        return "flip(" + ",".join(flips) + ")"
    if kind in ("overwrite", "arith"):
        fmt = rng.choice(list(WIDTHS))
        width = WIDTHS[fmt]
        if n < width:
            return "skip"
        pos = _offset(rng, base, n, width)
        mask = (1 << (8 * width)) - 1
        if kind == "overwrite":
            value = rng.choice((*BOUNDARY, n, n // 8, n // 4096, rng.getrandbits(8 * width))) & mask
        else:
            value = (struct.unpack_from(fmt, data, pos)[0] + rng.choice((-1, 1)) * rng.randint(1, 35)) & mask
        struct.pack_into(fmt, data, pos, value)
        return f"{kind}{fmt[1]}@{pos}={value:#x}"
    if kind == "truncate":
        cut = rng.choice((rng.randrange(n), rng.choice(base.hot or (0,)), n - rng.randint(1, 64), n // 2))
        cut = max(0, min(n, cut))
        del data[cut:]
        if base.version == 6 and rng.random() < 0.5:
            data.extend(b"\0" * (-len(data) % 4096))
        return f"truncate({cut}->{len(data)})"
    if kind == "shift":
        pos = rng.randrange(n)
        k = rng.choice((1, 2, 4, 8, 32, 4096))
        if rng.random() < 0.5:
            del data[pos : pos + k]
            return f"delete({pos},+{k})"
        data[pos:pos] = rng.randbytes(k)
        return f"insert({pos},+{k})"
    # splice: a window of another base image over ours, same offset or not; or our prefix + its tail
    other = rng.choice(bases)
    m = len(other.data)
    if rng.random() < 0.3:
        cut = rng.randrange(min(n, m))
        data[cut:] = other.data[cut:]
        return f"splice-tail({other.name}@{cut})"
    w = rng.choice((8, 32, 64, 128, 512, 4096))
    src = rng.choice(other.hot) if other.hot and rng.random() < 0.7 else rng.randrange(m)
    dst = src if rng.random() < 0.5 else _offset(rng, base, n, 1)
    chunk = other.data[src : src + w]
    data[dst : dst + len(chunk)] = chunk
    return f"splice({other.name}[{src}:+{len(chunk)}]->{dst})"


def make_case(bases: list[Base], seed: int, index: int) -> tuple[Base, bytes, str]:
    """Case `index` of sweep `seed`: (base, mutated bootstrap, description)."""
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(bases)
    data = bytearray(base.data)
    ops = [mutate_once(rng, data, base, bases) for _ in range(rng.choice((1, 1, 1, 2, 2, 3)))]
    return base, bytes(data), f"{base.name}: {'; '.join(ops)}"
