"""`nydus-image optimize`: move the chunks of the files a workload reads at start into one new
blob, so that they come in a few large reads instead of scattered ones.

As nydus-image's `OptimizePrefetch` (policy "separated-blob-with-prefetch-files"): the chunks of
each listed file (only those that overlap the file's `ranges`, when given) are copied, stored
bytes as they are, into a new blob appended to the blob table; the files' chunk records point
there, everything else stays where it was. Differences, by decision:

- a chunk shared by several listed files is stored once (nydus-image copies it per file);
- the listed files become the bootstrap's prefetch table, so a daemon prefetching the image's
  own table reads exactly that blob's data, in list order;
- only chunks of one blob kind (the compressor, digester and chunk size of the first moved
  chunk) go into the new blob; others stay in place, each file logged and counted.

Blobs are read through a `BlobSource` (the stored bytes of each chunk), so the source may be a
local blob directory or file (`nydus-image-py optimize -D/-b`) or the ranges `nydusify-py
optimize` fetched from a registry into sparse files. The hint file is upstream's JSON (`{"version": "v1", "files": [{"path": "/abs",
"ranges": [[offset, size], ...]}]}`) or, as its help text says, one absolute path per line.
"""

from __future__ import annotations

import json
import logging
import stat
from dataclasses import dataclass, field

from ..rafs.chunkdata import BlobSource
from ..rafs.constants import BlobFeatures, ChunkFlags
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK_RECORD_SIZE, pack_chunk, unpack_chunk
from ..rafs.model import BlobInfo, RafsImage
from .blob_writer import BlobWriter
from .build import build_image
from .merge import tree_from_image
from .options import BuildOptions
from .packed import K_CHUNKS, Tree

log = logging.getLogger(__name__)

@dataclass
class PrefetchFile:
    path: bytes
    ranges: list[tuple[int, int]] | None = None  # (offset, size); None: the whole file


@dataclass
class OptimizeResult:
    bootstrap_path: str
    blob_id: str | None  # the new blob, None when no listed file had data to move
    blob_path: str | None
    blob_ids: list[str]
    files: int = 0  # listed files whose chunks moved
    chunks_moved: int = 0  # distinct chunks now in the new blob
    bytes_moved: int = 0  # their stored bytes
    skipped: list[str] = field(default_factory=list)  # listed paths not moved, with why
    chunks_left: int = 0  # chunks of another blob kind, left where they were


def parse_prefetch_files(data: bytes) -> list[PrefetchFile]:
    """The hint file: upstream's JSON v1, or one absolute path per line. Relative paths are
    skipped with a warning, as nydus-image does."""
    text = data.strip()
    if not text:
        return []
    if text.startswith(b"{"):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ValueError(f"prefetch files: not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != "v1" or not isinstance(doc.get("files"), list):
            raise ValueError('prefetch files: expected {"version": "v1", "files": [...]}')
        out: list[PrefetchFile] = []
        for i, f in enumerate(doc["files"]):
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                raise ValueError(f"prefetch files: entry {i} has no path")
            ranges = f.get("ranges")
            if ranges is not None:
                if not isinstance(ranges, list) or not all(
                        isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x >= 0 for x in r)
                        for r in ranges):
                    raise ValueError(f"prefetch files: {f['path']}: ranges must be [[offset, size], ...]")
                ranges = [(r[0], r[1]) for r in ranges]
            out.append(PrefetchFile(f["path"].encode(), ranges))
    else:
        out = [PrefetchFile(line.strip()) for line in text.splitlines() if line.strip()]
    kept = []
    for f in out:
        if f.path.startswith(b"/"):
            kept.append(f)
        else:
            log.warning("prefetch file path is not absolute, skipped: %s", f.path.decode(errors="replace"))
    return kept


def _overlaps(offset: int, size: int, ranges: list[tuple[int, int]] | None) -> bool:
    return ranges is None or any(max(offset, o) < min(offset + size, o + s) for o, s in ranges)


def _kind(b: BlobInfo) -> tuple[object, ...]:
    return (b.compressor, b.digester, b.chunk_size)


def planned_ranges(image: RafsImage, files: list[PrefetchFile]) -> dict[str, list[tuple[int, int]]]:
    """The stored ranges (offset, size) of each blob that optimizing `files` will read: what a
    remote source must fetch first."""
    tree = tree_from_image(image)
    out: dict[str, set[tuple[int, int]]] = {}
    for hint, n in _listed(tree, files, []):
        own = tree.chunk_bytes(n)
        blobs = tree.blobs_of(n)
        for off in range(0, len(own), CHUNK_RECORD_SIZE):
            c = unpack_chunk(own, off)
            if _overlaps(c.file_offset, c.uncompressed_size, hint.ranges):
                out.setdefault(blobs[c.blob_index].blob_id, set()).add((c.compressed_offset, c.compressed_size))
    return {b: sorted(r) for b, r in out.items()}


def _listed(tree: Tree, files: list[PrefetchFile], skipped: list[str]) -> list[tuple[PrefetchFile, int]]:
    """The regular files with data among `files`, as (hint, tree entry); the rest go to `skipped`."""
    out: list[tuple[PrefetchFile, int]] = []
    seen: set[int] = set()
    for f in files:
        name = f.path.decode(errors="replace")
        n = tree.find(f.path)
        if n < 0:
            skipped.append(f"{name}: not in the image")
            continue
        n = tree.resolve(n)
        if not stat.S_ISREG(tree.mode[n]):
            skipped.append(f"{name}: not a regular file")
            continue
        if tree.kind[n] != K_CHUNKS:
            skipped.append(f"{name}: no data")
            continue
        if n not in seen:
            seen.add(n)
            out.append((f, n))
    return out


def optimize_image(image: RafsImage, files: list[PrefetchFile], bootstrap_path: str, blob_dir: str,
                   source: BlobSource) -> OptimizeResult:
    """Write `bootstrap_path` and the new blob (in `blob_dir`) for `image` with `files` moved."""
    tree = tree_from_image(image)
    skipped: list[str] = []
    listed = _listed(tree, files, skipped)
    for s in skipped:
        log.warning("optimize: %s; skipped", s)
    table = list(image.blobs)
    first: BlobInfo | None = None
    for _f, n in listed:
        own = tree.chunk_bytes(n)
        if own:
            first = tree.blobs_of(n)[unpack_chunk(own, 0).blob_index]
            break
    result = OptimizeResult(bootstrap_path, None, None, [], skipped=skipped)
    prefetch = [f.path for f, _n in listed]
    if first is not None:
        opts = BuildOptions(fs_version=image.version, compressor=first.compressor, digester=first.digester,
                            chunk_size=first.chunk_size, blob_toc=bool(first.features & BlobFeatures.HAS_TOC))
        moved: dict[tuple[str, int], bytes] = {}  # (blob id, compressed offset) -> the record in the new blob
        with BlobWriter(blob_dir, opts, blob_index=len(table)) as writer:
            rewritten: list[tuple[int, bytearray]] = []
            for f, n in listed:
                own = tree.chunk_bytes(n)
                blobs = tree.blobs_of(n)
                out = bytearray(own)
                changed = left = 0
                for off in range(0, len(own), CHUNK_RECORD_SIZE):
                    c = unpack_chunk(own, off)
                    if not _overlaps(c.file_offset, c.uncompressed_size, f.ranges):
                        continue
                    if c.flags & (ChunkFlags.ENCRYPTED | ChunkFlags.BATCH):
                        raise FormatError(f"{tree.path(n)!r}: encrypted or batch chunks cannot be moved")
                    src = blobs[c.blob_index]
                    if _kind(src) != _kind(first):
                        left += 1
                        continue
                    key = (src.blob_id, c.compressed_offset)
                    rec = moved.get(key)
                    if rec is None:
                        stored = source.read(src, c.compressed_offset, c.compressed_size)
                        if len(stored) != c.compressed_size:
                            raise FormatError(f"blob {src.blob_id}: chunk at {c.compressed_offset} "
                                              f"(+{c.compressed_size}) is past its end")
                        rec = writer.add_stored(c, stored)
                        moved[key] = rec
                        result.bytes_moved += c.compressed_size
                    new = unpack_chunk(rec, 0)._replace(file_offset=c.file_offset)
                    out[off:off + CHUNK_RECORD_SIZE] = pack_chunk(new)
                    changed += 1
                if left:
                    result.chunks_left += left
                    log.warning("optimize: %s: %d chunks are in a blob of another kind and stay there",
                                tree.path(n).decode(errors="replace"), left)
                if changed:
                    result.files += 1
                    rewritten.append((n, out))
            info = writer.finish()
            blob_path = writer.path
        if info is not None:
            result.chunks_moved = len(moved)
            result.blob_id, result.blob_path = info.blob_id, blob_path
            new_table = [*table, info]
            bset = tree.blob_set(new_table)
            for n, out in rewritten:
                # records of other blobs keep their index: the old table is the new one's head
                tree.set_chunks(n, out, tree.size[n], bset)
    build_opts = BuildOptions(fs_version=image.version, compressor=image.compressor, digester=image.digester,
                              chunk_size=image.chunk_size, prefetch_paths=prefetch)
    built = build_image(tree, bootstrap_path, blob_dir, build_opts)
    if built.blob_id is not None:  # every file is chunk records: new data means a bug here
        raise AssertionError("optimize wrote new file data")
    result.blob_ids = built.blob_ids
    return result
