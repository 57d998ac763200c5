"""`build_image`: the one entry point from a build tree to a bootstrap + data blob.

Order of work: validate and lay out the tree (fails fast, before any blob byte is written),
gather the blobs that `ChunkedData` files already live in, write the new blob (chunks of
`FileData` files, deduplicated against itself and those existing blobs), then write the bootstrap.

Blob table = existing blobs first, in the order they are met (files in BFS order, each file's
`ChunkedData.blobs` in list order; only blobs some chunk uses; one entry per blob id), then the new
blob. When every chunk is empty or already stored elsewhere no blob file is written and
`BuildResult.blob_id` is None; an image without any blob has no device slots and mounts without
`device=` options.

RAFS v5 (`opts.fs_version == 5`) goes the same way through `v5_writer`; its blob is plain chunk
data (see `blob_writer`), and existing chunks must fit the image's single compressor, digester
and chunk size (`v5_writer.check_chunks`).
"""

import contextlib
import itertools
import os
import tempfile

from ..rafs.constants import Compressor
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK, CHUNK_RECORD_SIZE, pack_chunks
from ..rafs.model import BlobInfo, ChunkInfo
from .blob_writer import BlobWriter, validate_blob_id
from .chunk_records import ChunkRecords
from .options import BuildOptions, BuildResult
from .tree import ChunkedData, FileData, Inode
from .v5_writer import V5Plan, check_chunks, plan_v5, write_v5
from .v6_writer import V6Plan, plan_v6, write_v6

_BLOB_INDEX = CHUNK.view("blob_index")


def check_options(opts: BuildOptions) -> None:
    """ValueError for options this builder cannot honour."""
    if opts.fs_version not in (5, 6):
        raise ValueError(f"unknown RAFS version {opts.fs_version!r}; expected 5 or 6")
    if opts.compressor not in (Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD):
        raise ValueError(
            f"compressor {Compressor(opts.compressor).nydus_name} is not supported for RAFS "
            f"v{opts.fs_version} builds"
        )
    if opts.blob_id is not None:
        validate_blob_id(opts.blob_id)


class FileChunks:
    """The packed chunk list of each regular file of one build, for the writers: a file's own
    `ChunkedData.chunks` unless its chunks were remapped or newly written (`override`), so a
    tree of converted layers needs no dict entry per file."""

    __slots__ = ("_override",)

    def __init__(self) -> None:
        self._override: dict[int, bytes] = {}  # id(inode) -> packed chunks

    def override(self, node: Inode, chunks: bytes) -> None:
        self._override[id(node)] = chunks

    def __call__(self, node: Inode) -> bytes:
        chunks = self._override.get(id(node))
        if chunks is not None:
            return chunks
        data = node.data
        return data.chunks if isinstance(data, ChunkedData) else b""


def _existing_blobs(
    plan_files: list[tuple[bytes, Inode]], opts: BuildOptions, want_dedup: bool = True
) -> tuple[list[BlobInfo], FileChunks, ChunkRecords]:
    """Union blob table of `ChunkedData` files, their packed chunk lists remapped to it, and a
    dedup map (empty unless `want_dedup`: only new data needs one). `plan_files` lists each
    file once."""
    used: set[str] = set()
    for path, node in plan_files:
        data = node.data
        if isinstance(data, ChunkedData):
            for (bi,) in _BLOB_INDEX.iter_unpack(data.chunks):
                if not 0 <= bi < len(data.blobs):
                    raise FormatError(f"{path!r}: chunk refers to blob {bi} of {len(data.blobs)}")
                used.add(data.blobs[bi].blob_id)
    table: list[BlobInfo] = []
    pos: dict[str, int] = {}
    for _path, node in plan_files:
        data = node.data
        if isinstance(data, ChunkedData):
            for b in data.blobs:
                if b.blob_id in used and b.blob_id not in pos:
                    pos[b.blob_id] = len(table)
                    table.append(_with_index(b, len(table)))
    chunks = FileChunks()
    dedup = ChunkRecords()
    for path, node in plan_files:
        data = node.data
        if not isinstance(data, ChunkedData):
            continue
        remapped, infos = _remap(data, pos)
        if opts.fs_version == 5:
            check_chunks(path, data.size, infos, table, opts)
        else:
            _check_dense(path, data.size, infos, table, opts.chunk_size)
        if remapped is not data.chunks:
            chunks.override(node, remapped)
        if not want_dedup:
            continue
        for k, c in enumerate(infos):
            if table[c.blob_index].digester == opts.digester and c.digest not in dedup:
                dedup.add(remapped[k * CHUNK_RECORD_SIZE : (k + 1) * CHUNK_RECORD_SIZE])
    return table, chunks, dedup


def _remap(data: ChunkedData, pos: dict[str, int]) -> tuple[bytes, list[ChunkInfo]]:
    """`data`'s packed chunks in file order with blob indexes into the image's table, and the
    same decoded (transient, for the checks). The packed list is reused when nothing changes: a
    converted layer's files keep theirs."""
    infos = data.chunk_infos()
    out = [
        c if c.blob_index == (i := pos[data.blobs[c.blob_index].blob_id]) else c._replace(blob_index=i)
        for c in infos
    ]
    if any(a.file_offset > b.file_offset for a, b in itertools.pairwise(out)):
        out.sort(key=lambda c: c.file_offset)
    elif all(a is b for a, b in zip(out, infos, strict=True)):
        return data.chunks, infos
    return pack_chunks(out), out


def _check_dense(path: bytes, size: int, chunks: list[ChunkInfo], table: list[BlobInfo], cs: int) -> None:
    """v6 files are dense arrays of chunk_size chunks in ALIGNED blobs of the same chunk size;
    checked here so a bad merge fails before any blob byte is written."""
    want = (size + cs - 1) // cs
    if len(chunks) != want:
        raise FormatError(f"{path!r}: {len(chunks)} chunks for {size} bytes, expected {want} of {cs:#x}")
    for k, c in enumerate(chunks):
        blob = table[c.blob_index]
        if blob.chunk_size != cs:
            raise FormatError(
                f"{path!r}: blob {blob.blob_id} has chunk size {blob.chunk_size:#x}, the image uses {cs:#x}"
            )
        if c.file_offset != k * cs or c.uncompressed_size != min(cs, size - k * cs):
            raise FormatError(
                f"{path!r}: chunk {k} at [{c.file_offset}, +{c.uncompressed_size}) leaves a hole"
            )
        if c.uncompressed_offset % 4096:
            raise FormatError(f"{path!r}: chunk {k} of blob {blob.blob_id} is not 4K aligned (v5-only blob?)")


def _with_index(b: BlobInfo, index: int) -> BlobInfo:
    if b.index == index:
        return b
    from dataclasses import replace

    return replace(b, index=index)


def build_image(root: Inode, bootstrap_path: str, blob_dir: str, opts: BuildOptions) -> BuildResult:
    """Write `bootstrap_path` (RAFS v6, or v5 with `opts.fs_version == 5`) and, if there is new file data, one blob in `blob_dir`.

    Raises ValueError for unusable options and FormatError for trees RAFS cannot represent;
    on error no partial blob or bootstrap is left behind.
    """
    check_options(opts)
    plan: V5Plan | V6Plan = plan_v5(root, opts) if opts.fs_version == 5 else plan_v6(root, opts)
    order = plan.data_order()
    has_new = any(isinstance(n.data, FileData) for n in order)
    table, file_chunks, dedup = _existing_blobs(plan.regular_files(), opts, want_dedup=has_new)
    if opts.blob_id is not None and opts.blob_id in {b.blob_id for b in table}:
        raise FormatError(f"blob id {opts.blob_id} is already used by a blob the image references")
    if isinstance(plan, V6Plan) and len(table) >= 254:
        raise FormatError(f"image would reference {len(table) + 1} blobs; RAFS v6 allows 254")

    new_blob: BlobInfo | None = None
    with BlobWriter(blob_dir, opts, blob_index=len(table), existing=dedup) as writer:
        results = writer.add_files([n.data for n in order if isinstance(n.data, FileData)])
        for node, chunks in zip(order, results, strict=True):
            file_chunks.override(node, chunks)
        new_blob = writer.finish()
        blob_path = writer.path
    blobs = table + ([new_blob] if new_blob is not None else [])
    try:
        boot: bytes | bytearray
        if isinstance(plan, V5Plan):
            boot = write_v5(plan, blobs, file_chunks, opts)
        else:
            boot = write_v6(plan, blobs, file_chunks, opts)
        _write_atomic(bootstrap_path, boot)
    except BaseException:
        if blob_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(blob_path)
        raise
    return BuildResult(
        bootstrap_path=bootstrap_path,
        blob_id=new_blob.blob_id if new_blob else None,
        blob_path=blob_path,
        blob_ids=[b.blob_id for b in blobs],
        inodes=plan.inode_count if isinstance(plan, V5Plan) else len(plan.records),
        chunks=len(writer.chunks),
        deduplicated=writer.deduplicated,
        uncompressed_bytes=writer.stored_uncompressed,
        compressed_bytes=writer.stored_compressed,
    )


def _write_atomic(path: str, data: bytes | bytearray) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".boot-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
