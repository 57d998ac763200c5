"""`nydus-image stat`: chunk and size statistics of RAFS images, alone and against each other.

Same model as upstream's `stat.rs`: each "base" bootstrap (`--bootstrap`, or every file without
an extension in `--blob-dir`) is walked; regular files count once per inode (hard links once);
its distinct chunks (keyed by chunk digest and uncompressed size) are its "own" chunks and go
into a global dictionary that counts how many base images hold each chunk. A `--target`
bootstrap is then split into chunks found in that dictionary ("ref") and the rest ("own"). The
dedup table says, for a global threshold N, what the bases would take if chunks held by at least
N images were stored once.

Added here: per blob of each image, chunk references, distinct chunks and sizes, so a
dedup ratio (share of references served by a chunk already stored) can be read per blob too.
"""

import os
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

from ..rafs.loader import open_bootstrap
from ..rafs.model import RafsImage

FILE_SIZE_BUCKETS = 45  # bit length of the size, capped at 44
CHUNK_BITS = range(12, 21)  # 4 KiB .. 1 MiB
DEDUP_THRESHOLDS = 20
PAGE = 0x1000

ChunkKey = tuple[bytes, int]  # digest, uncompressed size


@dataclass
class BlobStat:
    blob_id: str
    chunk_count: int  # what the blob table says the blob holds
    compressed_size: int
    uncompressed_size: int
    chunk_refs: int = 0  # references from files of this image
    distinct_chunks: int = 0  # distinct chunks of this blob those references use
    referenced_compressed: int = 0  # sum over distinct chunks used
    referenced_uncompressed: int = 0

    @property
    def dedup_ratio(self) -> float:
        return 1 - self.distinct_chunks / self.chunk_refs if self.chunk_refs else 0.0


@dataclass
class ImageStat:
    """upstream's ImageInfo, plus the bootstrap path and per-blob numbers."""

    bootstrap: str = ""
    dirs: int = 0
    files: int = 0
    symlinks: int = 0
    chunks: int = 0  # chunk references of all (distinct-inode) files
    file_size: int = 0
    comp_size: int = 0
    uncomp_size: int = 0  # chunk bytes + padding (after finalize)
    padding_size: int = 0
    chunk_sizes: list[int] = field(default_factory=lambda: [0] * len(CHUNK_BITS))
    file_sizes: list[int] = field(default_factory=lambda: [0] * FILE_SIZE_BUCKETS)
    dedup_chunks: int = 0
    dedup_comp_size: int = 0
    dedup_uncomp_size: int = 0
    own_chunks: int = 0
    own_comp_size: int = 0
    own_uncomp_size: int = 0
    ref_chunks: int = 0
    ref_comp_size: int = 0
    ref_uncomp_size: int = 0
    distinct_chunks: int = 0
    blobs: list[BlobStat] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        """Share of this image's chunk references that reuse a chunk it stores once."""
        return 1 - self.distinct_chunks / self.chunks if self.chunks else 0.0


@dataclass
class DedupInfo:
    raw_chunks: int = 0
    dedup_chunks: int = 0
    comp_content_size: int = 0
    comp_base_size: int = 0
    comp_image_size: int = 0
    uncomp_content_size: int = 0
    uncomp_base_size: int = 0
    uncomp_image_size: int = 0


@dataclass
class StatResult:
    base_images: list[ImageStat] = field(default_factory=list)
    target_images: list[ImageStat] = field(default_factory=list)
    base_image: ImageStat = field(default_factory=ImageStat)  # the bases summed, as upstream prints
    dedup_info: list[DedupInfo] = field(default_factory=list)


class Stat:
    def __init__(self) -> None:
        self.result = StatResult()
        # chunk -> [compressed size, uncompressed size, base images holding it]
        self.dict: dict[ChunkKey, list[int]] = {}

    def add_base(self, path: str) -> ImageStat:
        with open_bootstrap(path) as image:
            st, chunks = _walk(image, path)
        for key, (comp, uncomp) in chunks.items():
            st.own_chunks += 1
            st.own_comp_size += comp
            st.own_uncomp_size += uncomp
            entry = self.dict.setdefault(key, [comp, uncomp, 0])
            entry[2] += 1
        self.result.base_images.append(st)
        return st

    def add_target(self, path: str) -> ImageStat:
        with open_bootstrap(path) as image:
            st, chunks = _walk(image, path)
        for key, (comp, uncomp) in chunks.items():
            if key in self.dict:
                st.ref_chunks += 1
                st.ref_comp_size += comp
                st.ref_uncomp_size += uncomp
            else:
                st.own_chunks += 1
                st.own_comp_size += comp
                st.own_uncomp_size += uncomp
        self.result.target_images.append(st)
        return st

    def finalize(self, dedup: bool) -> StatResult:
        r = self.result
        for st in (*r.base_images, *r.target_images):
            st.uncomp_size += st.padding_size
        total = r.base_image
        total.bootstrap = ",".join(s.bootstrap for s in r.base_images)
        for s in r.base_images:
            for name in ("dirs", "files", "symlinks", "chunks", "file_size", "comp_size", "uncomp_size",
                         "padding_size", "own_chunks", "own_comp_size", "own_uncomp_size", "distinct_chunks"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
            total.chunk_sizes = [a + b for a, b in zip(total.chunk_sizes, s.chunk_sizes, strict=True)]
            total.file_sizes = [a + b for a, b in zip(total.file_sizes, s.file_sizes, strict=True)]
        if dedup:
            r.dedup_info = [DedupInfo() for _ in range(DEDUP_THRESHOLDS)]
            for comp, uncomp, count in self.dict.values():
                thresh = min(DEDUP_THRESHOLDS, count)
                for i, info in enumerate(r.dedup_info):
                    info.raw_chunks += count
                    info.uncomp_content_size += count * uncomp
                    info.comp_content_size += count * comp
                    if i < thresh:  # held by more images than the threshold: stored once in the base
                        info.dedup_chunks += 1
                        info.uncomp_base_size += uncomp
                        info.comp_base_size += comp
                    else:  # stays in each image
                        info.dedup_chunks += count
                        info.uncomp_image_size += count * uncomp
                        info.comp_image_size += count * comp
                total.dedup_chunks += 1
                total.dedup_comp_size += comp
                total.dedup_uncomp_size += uncomp
            while r.dedup_info and r.dedup_info[-1].dedup_chunks == 0:
                r.dedup_info.pop()
        return r


def _walk(image: RafsImage, path: str) -> tuple[ImageStat, dict[ChunkKey, tuple[int, int]]]:
    """One image's numbers and its distinct chunks."""
    st = ImageStat(bootstrap=path)
    blobs = [BlobStat(b.blob_id, b.chunk_count, b.compressed_size, b.uncompressed_size) for b in image.blobs]
    chunks: dict[ChunkKey, tuple[int, int]] = {}
    per_blob: set[tuple[int, int, int]] = set()  # blob index, compressed offset, uncompressed offset
    seen: set[int] = set()
    stack = [image.root_ino]
    st.dirs += 1
    while stack:
        ino = stack.pop()
        for ent in image.readdir(ino):
            if ent.name in (b".", b".."):
                continue
            a = image.getattr(ent.ino)
            if stat.S_ISDIR(a.mode):
                st.dirs += 1
                stack.append(ent.ino)
                continue
            if stat.S_ISLNK(a.mode):
                st.symlinks += 1
                continue
            if not stat.S_ISREG(a.mode):
                continue
            st.files += 1
            if ent.ino in seen:
                continue  # another name of a counted inode
            seen.add(ent.ino)
            size = a.size
            st.file_sizes[min(size.bit_length(), FILE_SIZE_BUCKETS - 1)] += 1
            st.file_size += size
            st.padding_size += ((size + PAGE - 1) & ~(PAGE - 1)) - size
            for i, bits in enumerate(CHUNK_BITS):
                st.chunk_sizes[i] += (size + (1 << bits) - 1) >> bits
            for c in image.chunks(ent.ino):
                st.chunks += 1
                st.comp_size += c.compressed_size
                st.uncomp_size += c.uncompressed_size
                chunks.setdefault((c.digest, c.uncompressed_size), (c.compressed_size, c.uncompressed_size))
                if 0 <= c.blob_index < len(blobs):
                    b = blobs[c.blob_index]
                    b.chunk_refs += 1
                    where = (c.blob_index, c.compressed_offset, c.uncompressed_offset)
                    if where not in per_blob:
                        per_blob.add(where)
                        b.distinct_chunks += 1
                        b.referenced_compressed += c.compressed_size
                        b.referenced_uncompressed += c.uncompressed_size
    st.distinct_chunks = len(chunks)
    st.blobs = blobs
    return st, chunks


def bootstraps_in(blob_dir: str) -> list[str]:
    """upstream's --blob-dir: every regular file without an extension, sorted."""
    out = []
    for name in sorted(os.listdir(blob_dir)):
        path = os.path.join(blob_dir, name)
        if os.path.isfile(path) and not os.path.splitext(name)[1]:
            out.append(path)
    return out


def as_json(r: StatResult) -> dict[str, Any]:
    def image(s: ImageStat) -> dict[str, Any]:
        d = asdict(s)
        d["dedup_ratio"] = s.dedup_ratio
        for b, bd in zip(s.blobs, d["blobs"], strict=True):
            bd["dedup_ratio"] = b.dedup_ratio
        return d

    return {"dedup_enabled": bool(r.dedup_info), "target_enabled": bool(r.target_images),
            "base_image": image(r.base_image), "base_images": [image(s) for s in r.base_images],
            "target_images": [image(s) for s in r.target_images],
            "dedup_info": [asdict(i) for i in r.dedup_info]}
