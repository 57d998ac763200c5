"""`nydus-image compact`: rewrite an image whose blobs are mostly dead into fewer blobs.

After many merges (or whiteouts over lower layers) a bootstrap references only part of the
chunks its blobs hold. Compaction, as nydus-image's `BlobCompactor` does it:

1. every chunk the bootstrap references is found, per blob (a chunk is its place in its blob:
   blob index + compressed offset), and the blob's used bytes summed (compressed sizes);
2. a blob with no referenced chunk is dropped;
3. a blob whose used ratio (used bytes * 100 // blob size) is below `min_used_ratio` is
   rebuilt with only its used chunks (0 turns this off);
4. blobs (kept or rebuilt) smaller than `compact_blob_size` are merged, smallest first, into one
   rebuilt blob as long as it stays within `max_compact_size` of used data (then the next one
   starts a new merged blob);
5. nothing is done unless the image has at least `layers_to_compact` blobs (0: always).

Rebuilt blobs copy the stored (compressed) chunk bytes as they are, in (old blob, offset) order,
so nothing is recompressed; only blobs of the same compressor, digester and chunk size are
merged together (nydus-image merges regardless; here each kind is merged on its own). The new bootstrap keeps the tree and every chunk digest; chunk records point
at the new blobs. Old blob files are left where they are (other images may use them).
Only local blobs (`--blob-dir`) are read; new blobs are written there too.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..rafs.constants import BlobFeatures, ChunkFlags
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK_RECORD_SIZE, pack_chunk, unpack_chunk
from ..rafs.model import BlobInfo, ChunkInfo, RafsImage
from ..storage.localfs import LocalBlobDir
from .blob_writer import BlobWriter
from .build import build_image
from .merge import tree_from_image
from .options import BuildOptions
from .packed import K_CHUNKS

log = logging.getLogger(__name__)

DEFAULT_COMPACT_BLOB_SIZE = 10 << 20
DEFAULT_MAX_COMPACT_SIZE = 100 << 20


@dataclass(frozen=True)
class CompactConfig:
    """nydus-image's compact config (its JSON keys)."""

    min_used_ratio: int = 0  # 0..99; 0: never rebuild for the ratio alone
    compact_blob_size: int = DEFAULT_COMPACT_BLOB_SIZE  # blobs below this are merged
    max_compact_size: int = DEFAULT_MAX_COMPACT_SIZE  # a merged blob holds at most this much
    layers_to_compact: int = 0  # compact only with at least this many blobs; 0: always
    blobs_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("min_used_ratio", "compact_blob_size", "max_compact_size", "layers_to_compact"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"compact config: {name} must be a non-negative integer, not {v!r}")
        if self.min_used_ratio > 99:
            raise ValueError(f"compact config: min_used_ratio must be in 0..99, not {self.min_used_ratio}")
        if not isinstance(self.blobs_dir, str):
            raise ValueError(f"compact config: blobs_dir must be a string, not {self.blobs_dir!r}")


def config_from_json(text: str, where: str = "compact config") -> CompactConfig:
    """A `CompactConfig` from nydus-image's JSON form; unknown keys and bad values are a
    ValueError of one line."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return config_from_mapping(doc, where)


def config_from_mapping(doc: Mapping[str, Any], where: str = "compact config") -> CompactConfig:
    known = {f.name for f in dataclasses.fields(CompactConfig)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return CompactConfig(**doc)


@dataclass
class CompactResult:
    bootstrap_path: str | None  # None: nothing was written (fewer blobs than layers_to_compact)
    blob_ids: list[str]  # the new image's blob table
    new_blobs: list[str]  # blobs written by the compaction
    dropped: list[str]  # old blobs the new image no longer references
    blobs_before: int
    bytes_before: int  # sizes of the old image's blob files
    bytes_after: int  # sizes of the new image's blob files
    used_ratio: dict[str, int] = field(default_factory=dict)  # old blob -> used percent


@dataclass
class _Blob:
    info: BlobInfo
    size: int  # the blob file's size
    used: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (compressed offset, size) -> a record
    used_bytes: int = 0
    state: str = "keep"  # keep | pinned | drop | rebuild | merged (into `into`)
    into: int = -1
    group: list[int] = field(default_factory=list)  # rebuild: the old blobs whose chunks it takes

    def total(self, blobs: "list[_Blob]") -> int:
        """Used bytes of this blob's output (itself plus what was merged into it)."""
        return sum(blobs[i].used_bytes for i in self.group) if self.group else self.used_bytes


def _kind(b: BlobInfo) -> tuple[Any, ...]:
    """Blobs of one kind can be merged (their stored chunks copied as they are)."""
    return b.compressor, b.digester, b.chunk_size, b.features & BlobFeatures.ALIGNED


def plan(blobs: list[_Blob], cfg: CompactConfig) -> None:
    """Decide each blob's state (drop / keep / rebuild / merged), as nydus-image's `do_compact`."""
    for b in blobs:
        if not b.used and b.state != "pinned":
            b.state = "drop"
    if cfg.min_used_ratio:
        for b in blobs:
            if b.state == "keep" and b.size and b.used_bytes * 100 // b.size < cfg.min_used_ratio:
                b.state, b.group = "rebuild", [blobs.index(b)]
    small: dict[tuple[Any, ...], list[tuple[int, int]]] = {}  # per compatible kind: (size, blob)
    for i, b in enumerate(blobs):
        size = b.size if b.state == "keep" else b.total(blobs) if b.state == "rebuild" else -1
        if 0 <= size < cfg.compact_blob_size:
            small.setdefault(_kind(b.info), []).append((size, i))
    for group in small.values():
        group.sort()
        to = group[0][1]
        for _size, i in group[1:]:
            target = blobs[to]
            if target.total(blobs) + blobs[i].total(blobs) <= cfg.max_compact_size:
                if target.state == "keep":
                    target.state, target.group = "rebuild", [to]
                target.group += blobs[i].group or [i]
                blobs[i].state, blobs[i].into, blobs[i].group = "merged", to, []
            else:
                to = i


def compact_image(image: RafsImage, bootstrap_path: str, cfg: CompactConfig, blob_dir: str | None = None,
                  pinned: frozenset[str] = frozenset()) -> CompactResult:
    """Compact `image` (its blobs in `blob_dir`, default `cfg.blobs_dir`) into `bootstrap_path`.

    Blobs named in `pinned` (a chunk dictionary's, shared with other images) stay as they are."""
    blob_dir = blob_dir or cfg.blobs_dir
    if not blob_dir:
        raise ValueError("compact needs the blob directory (--blob-dir or blobs_dir in the config)")
    tree = tree_from_image(image, blob_dir)  # checks every blob file is there
    infos = list(image.blobs)
    blobs = [_Blob(b, os.path.getsize(os.path.join(blob_dir, b.blob_id)), state="pinned" if b.blob_id in pinned else "keep")
             for b in infos]
    files = [n for n in range(len(tree)) if tree.kind[n] == K_CHUNKS]
    for n in files:
        own = tree.chunk_bytes(n)
        for off in range(0, len(own), CHUNK_RECORD_SIZE):
            c = unpack_chunk(own, off)
            if c.flags & (ChunkFlags.ENCRYPTED | ChunkFlags.BATCH):
                raise FormatError(f"{tree.path(n)!r}: encrypted or batch chunks cannot be compacted")
            b = blobs[c.blob_index]
            key = (c.compressed_offset, c.compressed_size)
            if key not in b.used:
                b.used[key] = own[off:off + CHUNK_RECORD_SIZE]
                b.used_bytes += c.compressed_size
    result = CompactResult(
        bootstrap_path=None, blob_ids=[b.blob_id for b in infos], new_blobs=[], dropped=[],
        blobs_before=len(infos), bytes_before=sum(b.size for b in blobs), bytes_after=sum(b.size for b in blobs),
        used_ratio={b.info.blob_id: (b.used_bytes * 100 // b.size if b.size else 0) for b in blobs})
    if len(blobs) < cfg.layers_to_compact:
        log.info("compact: %d blobs, fewer than layers_to_compact %d: nothing to do", len(blobs), cfg.layers_to_compact)
        return result
    plan(blobs, cfg)

    # the new blob table: kept blobs and rebuilt ones, in the old order
    table: list[BlobInfo] = []
    moved: dict[tuple[int, int], ChunkInfo] = {}  # (old blob, compressed offset) -> the chunk in the new table
    new_index = [-1] * len(blobs)
    for i, b in enumerate(blobs):
        if b.state in ("keep", "pinned"):
            new_index[i] = len(table)
            table.append(dataclasses.replace(b.info, index=len(table)))
        elif b.state == "rebuild":
            info = _rebuild(blobs, i, len(table), blob_dir, image, moved)
            table.append(info)
            result.new_blobs.append(info.blob_id)
        if b.state not in ("keep", "pinned"):
            result.dropped.append(b.info.blob_id)
    bset = tree.blob_set(table)
    for n in files:
        own = tree.chunk_bytes(n)
        out = bytearray(len(own))
        for off in range(0, len(own), CHUNK_RECORD_SIZE):
            c = unpack_chunk(own, off)
            if new_index[c.blob_index] >= 0:
                c = c._replace(blob_index=new_index[c.blob_index])
            else:
                c = moved[(c.blob_index, c.compressed_offset)]._replace(file_offset=c.file_offset)
            out[off:off + CHUNK_RECORD_SIZE] = pack_chunk(c)
        tree.set_chunks(n, out, tree.size[n], bset)
    opts = BuildOptions(fs_version=image.version, compressor=image.compressor, digester=image.digester,
                        chunk_size=image.chunk_size)
    built = build_image(tree, bootstrap_path, blob_dir, opts)
    if built.blob_id is not None:  # every file is chunk records: new data means a bug here
        raise AssertionError("compaction wrote new file data")
    result.bootstrap_path = bootstrap_path
    result.blob_ids = built.blob_ids
    result.dropped = [d for d in result.dropped if d not in built.blob_ids]
    result.bytes_after = sum(os.path.getsize(os.path.join(blob_dir, b)) for b in built.blob_ids)
    return result


def _rebuild(blobs: list[_Blob], i: int, index: int, blob_dir: str, image: RafsImage,
             moved: dict[tuple[int, int], ChunkInfo]) -> BlobInfo:
    """Write the new blob of rebuilt blob `i` (its used chunks and those of the blobs merged into
    it, in old blob and offset order); fills `moved` with each old chunk's new record fields."""
    first = blobs[i].info
    opts = BuildOptions(fs_version=image.version, compressor=first.compressor, digester=first.digester,
                        chunk_size=first.chunk_size, blob_toc=bool(first.features & BlobFeatures.HAS_TOC))
    with BlobWriter(blob_dir, opts, blob_index=index) as writer:
        source = LocalBlobDir(blob_dir)  # (a short read is its FormatError)
        try:
            for old in sorted(blobs[i].group):
                b = blobs[old]
                for (coff, csize), rec in sorted(b.used.items()):
                    c: ChunkInfo = unpack_chunk(rec, 0)
                    moved[(old, coff)] = unpack_chunk(writer.add_stored(c, source.read(b.info, coff, csize)), 0)
        finally:
            source.close()
        info = writer.finish()
    assert info is not None  # a rebuilt blob has used chunks
    log.info("compact: blob %s holds the used chunks of %s", info.blob_id,
             ", ".join(blobs[o].info.blob_id[:12] for o in sorted(blobs[i].group)))
    return info
