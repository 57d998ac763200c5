"""`chunkdict generate`: a chunk dictionary image made from several Nydus images, for
`--chunk-dict` in later builds.

The chunks worth keeping are those several images share: a chunk (by digest) found in at least
`min_images` of the sources is kept, once, at the first place it was found. The dictionary
image stores no data of its own: its bootstrap has one file per kept chunk,
`/chunkdict/<blob id>/<n>`, whose only chunk record points into that source blob, so its blob
table is the sources' blobs that hold kept chunks. A build given the dictionary references those
chunks instead of storing them again (`builder/chunk_dict.py`).

Upstream's generator (nydus-image chunkdict generate over a SQLite store) picks chunks by an
exponential-smoothing score over image versions; here the rule is the plain count, documented and
deterministic. The sources must share RAFS version, chunk size and digester, as a dictionary
must with the builds that use it.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK_RECORD_SIZE, pack_chunk, unpack_chunk
from ..rafs.model import BlobInfo, RafsImage
from .build import build_image
from .merge import tree_from_image
from .options import BuildOptions
from .packed import K_CHUNKS, Tree


@dataclass
class ChunkdictResult:
    bootstrap_path: str
    blob_ids: list[str]  # the source blobs the dictionary references
    chunks: int  # chunks kept
    uncompressed_bytes: int
    images: int
    distinct_chunks: int  # distinct digests over all sources
    per_image_kept: list[int] = field(default_factory=list)  # kept chunks each source references


def check_sources(images: Sequence[RafsImage]) -> BuildOptions:
    if not images:
        raise ValueError("chunkdict needs at least one source image")
    first = images[0]
    for i, img in enumerate(images[1:], 1):
        if (img.version, img.chunk_size, img.digester) != (first.version, first.chunk_size, first.digester):
            raise ValueError(f"source {i + 1} is RAFS v{img.version}, chunk size {img.chunk_size:#x}, "
                             f"{img.digester.name}; source 1 is v{first.version}, {first.chunk_size:#x}, "
                             f"{first.digester.name}: a dictionary serves only builds like it")
    return BuildOptions(fs_version=first.version, compressor=first.compressor, digester=first.digester,
                        chunk_size=first.chunk_size)


def generate_chunkdict(images: Sequence[RafsImage], bootstrap_path: str, blob_dir: str,
                       min_images: int = 2) -> ChunkdictResult:
    """Write the dictionary bootstrap (no blob: its chunks stay in the sources' blobs)."""
    opts = check_sources(images)
    if min_images < 1:
        raise ValueError("min_images must be at least 1")
    seen_in: dict[bytes, set[int]] = {}
    first_at: dict[bytes, tuple[BlobInfo, bytes]] = {}  # digest -> (its blob, its record)
    for i, img in enumerate(images):
        tree = tree_from_image(img)
        for n in range(len(tree)):
            if tree.kind[n] != K_CHUNKS:
                continue
            own = tree.chunk_bytes(n)
            blobs = tree.blobs_of(n)
            for off in range(0, len(own), CHUNK_RECORD_SIZE):
                c = unpack_chunk(own, off)
                seen_in.setdefault(c.digest, set()).add(i)
                if c.digest not in first_at:
                    first_at[c.digest] = (blobs[c.blob_index], own[off:off + CHUNK_RECORD_SIZE])
    kept = [d for d, where in seen_in.items() if len(where) >= min_images]
    table: list[BlobInfo] = []
    index: dict[str, int] = {}
    out = Tree()
    dict_dir = out.add(0, b"chunkdict", stat.S_IFDIR | 0o755)
    dirs: dict[str, int] = {}
    files_in: dict[str, int] = {}
    total = 0
    for digest in kept:
        blob, rec = first_at[digest]
        if blob.blob_id not in index:
            index[blob.blob_id] = len(table)
            table.append(blob)
            dirs[blob.blob_id] = out.add(dict_dir, blob.blob_id.encode(), stat.S_IFDIR | 0o755)
        c = unpack_chunk(rec, 0)._replace(blob_index=index[blob.blob_id], file_offset=0)
        k = files_in[blob.blob_id] = files_in.get(blob.blob_id, -1) + 1
        f = out.add(dirs[blob.blob_id], str(k).encode(), stat.S_IFREG | 0o444)
        out.set_chunks(f, pack_chunk(c), c.uncompressed_size, out.blob_set(table))
        total += c.uncompressed_size
    if not kept:
        raise FormatError(f"no chunk is shared by {min_images} of the {len(images)} images; the dictionary "
                          "would be empty")
    built = build_image(out, bootstrap_path, blob_dir, opts)
    if built.blob_id is not None:
        raise AssertionError("the chunk dictionary wrote file data")
    keep = set(kept)
    return ChunkdictResult(bootstrap_path, built.blob_ids, len(kept), total, len(images), len(seen_in),
                           [sum(1 for d, w in seen_in.items() if i in w and d in keep) for i in range(len(images))])
