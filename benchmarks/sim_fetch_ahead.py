"""Would fetch-ahead in blob order help a no-hints first command? (issue 12, start-up)

Builds the image of `bench_image_start.py` ("plain": no prefetch table) and replays its first
command's reads against a model of the blob cache, with no registry: each read of a chunk not yet
fetched is one GET, which also takes the chunks that follow it in the blob within a forward window
of W bytes (W = 0 is on-demand alone). For each W it prints the GETs a single reader waits for
one after another and the bytes fetched over the bytes read (the issue's bound: <= 1.3x). It also
prints how often a read lands within 64 KiB after the previous one in the same blob, i.e. how
often the reader follows blob order at all.

    python3 benchmarks/sim_fetch_ahead.py [ENTRIES]
"""

from __future__ import annotations

import bisect
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_image_start as bench  # noqa: E402

from nydus_py.rafs import open_bootstrap  # noqa: E402

Chunk = tuple[int, int, int]  # blob index, compressed offset, compressed size
WINDOWS = (0, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10)


def replay(reads: list[Chunk], blob_order: list[Chunk], window: int) -> tuple[int, int]:
    """(GETs, bytes fetched) of `reads` when each miss also takes the following chunks of its
    blob that end within `window` bytes after it."""
    have: set[Chunk] = set()
    gets = fetched = 0
    for r in reads:
        if r in have:
            continue
        gets += 1
        i = bisect.bisect_left(blob_order, r)
        end = r[1] + r[2] + window
        j = i
        while j < len(blob_order) and (j == i or (blob_order[j][0] == r[0] and blob_order[j][1] + blob_order[j][2] <= end)):
            if blob_order[j] not in have:
                have.add(blob_order[j])
                fetched += blob_order[j][2]
            j += 1
    return gets, fetched


def main(entries: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="nydus-sim-fetch-ahead-"))
    try:
        first = bench.make_layers(work / "src", entries)
        boot, _blobs, _ids = bench.build_nydus(work / "src", work / "nydus", [])
        with open_bootstrap(str(boot)) as img:
            files = {p.decode(): ino for p, ino in img.walk() if (img.getattr(ino).mode & 0o170000) == 0o100000}
            blob_order = sorted({(c.blob_index, c.compressed_offset, c.compressed_size)
                                 for ino in files.values() for c in img.chunks(ino)})
            reads = [(c.blob_index, c.compressed_offset, c.compressed_size) for rel in first
                     for c in img.chunks(files["/" + rel])]
        read_bytes = sum(c[2] for c in set(reads))
        follows = sum(1 for a, b in zip(reads, reads[1:], strict=False)
                      if a[0] == b[0] and 0 <= b[1] - (a[1] + a[2]) <= 64 << 10)
        print(f"{len(first)} files, {len(set(reads))} chunks, {read_bytes} bytes read; "
              f"{follows} of {len(reads) - 1} reads land within 64 KiB after the previous one")
        for w in WINDOWS:
            gets, fetched = replay(reads, blob_order, w)
            print(f"forward window {w >> 10:4d} KiB: {gets:4d} GETs one after another, fetched/read {fetched / read_bytes:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9000)
