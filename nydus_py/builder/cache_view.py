"""The uncompressed, 4K-aligned view of a data blob (spec 5.2).

Every chunk is decompressed to its `uncompressed_offset`; gaps stay zero (sparse). This is what
nydusd keeps in its blob cache and what the kernel EROFS driver reads through a device slot:
mount a v6 bootstrap with `device=<view>` (one per blob, blob-table order) to get file data.

Chunks come from the blob's own blob.meta array, so this works for any v6 blob with blob.meta,
not only ones this builder wrote. When the blob carries a digest array (INLINED_CHUNK_DIGEST,
found through the ToC) every chunk is verified against it.
"""

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from ..rafs import codec
from ..rafs.constants import BlobFeatures, Compressor, Digester
from ..rafs.errors import DigestMismatch, FormatError
from ..rafs.layout_blob import DIGEST_NAME, TAR_HEADER_SIZE, TOC_ENTRY, TOC_ENTRY_SIZE
from ..rafs.layout_common import U32
from ..rafs.layout_v6 import (
    BLOB_ENTRY,
    EROFS_MAGIC,
    EROFS_SUPER_OFFSET,
    EXT_SUPERBLOCK,
    RAFS_V6_EXT_SUPER_OFFSET,
    V6_BLOB_ENTRY_SIZE,
)
from ..rafs.model import BlobInfo, RafsImage
from .atomic import atomic_output
from .blob_writer import decode_ci_array


def v6_blob_table(boot: bytes) -> list[BlobInfo]:
    """Blob table of a RAFS v6 bootstrap (only what locating blob data needs)."""
    if len(boot) < 4096 or U32.unpack_from(boot, EROFS_SUPER_OFFSET)[0] != EROFS_MAGIC:
        raise FormatError("not a RAFS v6 bootstrap (no EROFS superblock)")
    ext = EXT_SUPERBLOCK.unpack_dict(boot, RAFS_V6_EXT_SUPER_OFFSET)
    off, size = ext["blob_table_offset"], ext["blob_table_size"]
    if size % V6_BLOB_ENTRY_SIZE or off + size > len(boot):
        raise FormatError(f"blob table at {off}+{size} outside the {len(boot)}-byte bootstrap")
    out = []
    for i in range(size // V6_BLOB_ENTRY_SIZE):
        f = BLOB_ENTRY.unpack_dict(boot, off + i * V6_BLOB_ENTRY_SIZE)
        try:
            out.append(
                BlobInfo(
                    index=i,
                    blob_id=f["blob_id"].rstrip(b"\0").decode("ascii"),
                    compressor=Compressor(f["compression_algo"]),
                    digester=Digester(f["digest_algo"]),
                    chunk_size=f["chunk_size"],
                    chunk_count=f["chunk_count"],
                    features=BlobFeatures(f["features"]),
                    compressed_size=f["compressed_size"],
                    uncompressed_size=f["uncompressed_size"],
                    blob_toc_size=f["blob_toc_size"],
                    ci_compressor=Compressor(f["ci_compressor"]),
                    ci_offset=f["ci_offset"],
                    ci_compressed_size=f["ci_compressed_size"],
                    ci_uncompressed_size=f["ci_uncompressed_size"],
                    blob_toc_digest=f["blob_toc_digest"],
                )
            )
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"blob table entry {i}: {e}") from None
    return out


def _blob_info(source: str | os.PathLike[str] | bytes | RafsImage, blob_id: str) -> BlobInfo:
    if isinstance(source, RafsImage):
        blobs = list(source.blobs)
    else:
        if isinstance(source, bytes):
            boot = source
        else:
            with open(source, "rb") as f:
                boot = f.read()
        blobs = v6_blob_table(boot)
    for b in blobs:
        if b.blob_id == blob_id:
            return b
    raise FormatError(f"blob {blob_id} is not in the image's blob table")


def _pread(fd: int, size: int, off: int, what: str) -> bytes:
    data = os.pread(fd, size, off)
    if len(data) != size:
        raise FormatError(f"{what}: short read of {size} bytes at {off} (truncated blob?)")
    return data


def read_toc(fd: int, info: BlobInfo, blob_size: int) -> dict[str, tuple[int, bytes, int, int, int]]:
    """ToC entries by name: (flags, sha256, compressed_offset, compressed_size, uncompressed_size)."""
    size = info.blob_toc_size
    if (
        size < TAR_HEADER_SIZE + TOC_ENTRY_SIZE
        or (size - TAR_HEADER_SIZE) % TOC_ENTRY_SIZE
        or size > blob_size
    ):
        raise FormatError(f"blob {info.blob_id}: bad ToC size {size}")
    raw = _pread(fd, size, blob_size - size, f"blob {info.blob_id} ToC")
    if info.blob_toc_digest != b"\0" * 32 and hashlib.sha256(raw).digest() != info.blob_toc_digest:
        raise DigestMismatch(f"blob {info.blob_id}: ToC digest mismatch")
    out = {}
    for i in range((size - TAR_HEADER_SIZE) // TOC_ENTRY_SIZE):
        flags, name, digest, off, csize, usize = TOC_ENTRY.unpack_from(raw, i * TOC_ENTRY_SIZE)
        out[name.rstrip(b"\0").decode("ascii", "replace")] = (flags, digest, off, csize, usize)
    return out


def write_cache_view(
    bootstrap_or_image: str | os.PathLike[str] | bytes | RafsImage,
    blob_dir: str,
    blob_id: str,
    out_path: str,
    workers: int | None = None,
) -> int:
    """Write the uncompressed view of blob `blob_id` to `out_path`; returns its size."""
    info = _blob_info(bootstrap_or_image, blob_id)
    if info.ci_uncompressed_size == 0 or info.ci_compressed_size == 0:
        raise FormatError(f"blob {blob_id} has no blob.meta chunk table; cannot build its cache view")
    fd = os.open(os.path.join(blob_dir, blob_id), os.O_RDONLY | os.O_CLOEXEC)
    try:
        blob_size = os.fstat(fd).st_size
        ci_raw = _pread(fd, info.ci_compressed_size, info.ci_offset, f"blob {blob_id} blob.meta")
        entries = decode_ci_array(ci_raw, info)
        digests: bytes | None = None
        if info.features & BlobFeatures.INLINED_CHUNK_DIGEST and info.features & BlobFeatures.HAS_TOC:
            toc = read_toc(fd, info, blob_size)
            ent = toc.get(DIGEST_NAME)
            if ent is not None:
                _f, sha, off, csize, _u = ent
                digests = _pread(fd, csize, off, f"blob {blob_id} blob.digest")
                if hashlib.sha256(digests).digest() != sha or len(digests) != 32 * len(entries):
                    raise DigestMismatch(f"blob {blob_id}: blob.digest array does not match its ToC entry")
        size = info.uncompressed_size
        for i, (_co, _cs, uoff, usize) in enumerate(entries):
            if uoff + usize > size:
                raise FormatError(
                    f"blob {blob_id}: chunk {i} ends at {uoff + usize}, past the view size {size}"
                )
        with atomic_output(out_path, ".view-", size) as ofd:

            def one(i: int) -> None:
                coff, csize, uoff, usize = entries[i]
                raw = _pread(fd, csize, coff, f"blob {blob_id} chunk {i}")
                data = raw if csize == usize else codec.decompress(info.compressor, raw, usize)
                if digests is not None and codec.digest(info.digester, data) != digests[32 * i : 32 * i + 32]:
                    raise DigestMismatch(f"blob {blob_id}: chunk {i} does not match its digest")
                os.pwrite(ofd, data, uoff)

            nworkers = workers or max(1, min(8, os.cpu_count() or 1))
            with ThreadPoolExecutor(nworkers, thread_name_prefix="nydus-view") as pool:
                inflight: deque[Future[None]] = deque()
                for i in range(len(entries)):
                    inflight.append(pool.submit(one, i))
                    while len(inflight) > 4 * nworkers:
                        inflight.popleft().result()
                while inflight:
                    inflight.popleft().result()
        return size
    finally:
        os.close(fd)
