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
from array import array
from collections.abc import Callable
from dataclasses import replace

from ..rafs.constants import Compressor
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK, CHUNK_RECORD_SIZE, U32, pack_chunks, unpack_chunks
from ..rafs.model import BlobInfo, ChunkInfo, RafsImage
from .atomic import atomic_output
from .blob_writer import BlobWriter, validate_blob_id
from .chunk_dict import load_chunk_dict
from .chunk_records import ChunkLookup, ChunkRecords
from .options import BuildOptions, BuildResult
from .packed import K_CHUNKS, Tree, as_tree
from .tree import FileData, Inode
from .v5_writer import V5Plan, check_chunks, plan_v5, write_v5
from .v6_writer import V6Plan, plan_v6, write_v6

_BLOB_INDEX = CHUNK.view("blob_index")
_BLOB_INDEX_AT = CHUNK.offset("blob_index")


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
    chunk records in the tree unless they were remapped or newly written (`override`), kept in
    one bytearray with an offset per entry, not an object per file."""

    __slots__ = ("tree", "_off", "_len", "_store")

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self._off: array[int] | None = None  # entry -> offset in _store, -1: not overridden
        self._len: array[int] | None = None
        self._store = bytearray()

    def override(self, idx: int, chunks: bytes) -> None:
        if self._off is None:
            self._off = array("q", [-1]) * len(self.tree)
            self._len = array("I", bytes(4 * len(self.tree)))
        assert self._len is not None
        self._off[idx], self._len[idx] = len(self._store), len(chunks)
        self._store += chunks

    def __call__(self, idx: int) -> bytes:
        if self._off is not None and self._off[idx] >= 0:
            assert self._len is not None
            o = self._off[idx]
            return bytes(self._store[o : o + self._len[idx]])
        return self.tree.chunk_bytes(idx)


def _with_path(tree: Tree, idx: int, check: Callable[[bytes], object]) -> object:
    """`check(path)` with the entry's path computed only when it fails (its message names it)."""
    try:
        return check(b"?")
    except FormatError:
        check(tree.path(idx))
        raise


def _existing_blobs(
    tree: Tree, files: "array[int]", opts: BuildOptions, want_dedup: bool = True
) -> tuple[list[BlobInfo], FileChunks, ChunkRecords]:
    """Union blob table of K_CHUNKS files, their packed chunk lists remapped to it, and a dedup
    map (empty unless `want_dedup`: only new data needs one). `files` lists each file once."""
    used: set[str] = set()
    kind = tree.kind
    for n in files:
        if kind[n] != K_CHUNKS:
            continue
        blobs = tree.blobs_of(n)
        a = tree.a[n]
        for (bi,) in _BLOB_INDEX.iter_unpack(memoryview(tree.chunks)[a : a + tree.b[n]]):
            if not 0 <= bi < len(blobs):
                raise FormatError(f"{tree.path(n)!r}: chunk refers to blob {bi} of {len(blobs)}")
            used.add(blobs[bi].blob_id)
    table: list[BlobInfo] = []
    pos: dict[str, int] = {}
    for n in files:
        if kind[n] == K_CHUNKS:
            for b in tree.blobs_of(n):
                if b.blob_id in used and b.blob_id not in pos:
                    pos[b.blob_id] = len(table)
                    table.append(_with_index(b, len(table)))
    chunks = FileChunks(tree)
    dedup = ChunkRecords()
    fast = opts.fs_version != 5 and not want_dedup
    for n in files:
        if kind[n] != K_CHUNKS:
            continue
        own = tree.chunk_bytes(n)
        size = tree.size[n]
        if fast and _kept_as_is(own, tree.blobs_of(n), pos, size, table, opts.chunk_size):
            continue  # (a merge of converted layers: most files, checked without decoding a record)
        remapped, infos = _remap(own, tree.blobs_of(n), pos)
        if opts.fs_version == 5:
            _with_path(tree, n, lambda p: check_chunks(p, size, infos, table, opts))  # noqa: B023
        else:
            _with_path(tree, n, lambda p: _check_dense(p, size, infos, table, opts.chunk_size))  # noqa: B023
        if remapped is not own:
            chunks.override(n, remapped)
        if not want_dedup:
            continue
        for k, c in enumerate(infos):
            if table[c.blob_index].digester == opts.digester and c.digest not in dedup:
                dedup.add(remapped[k * CHUNK_RECORD_SIZE : (k + 1) * CHUNK_RECORD_SIZE])
    return table, chunks, dedup


def _kept_as_is(own: bytes, blobs: list[BlobInfo], pos: dict[str, int], size: int, table: list[BlobInfo],
                cs: int) -> bool:
    """Whether a v6 file's packed chunks stand as they are: blob indexes already the table's,
    and a dense array of `cs` chunks in 4K-aligned blobs of that chunk size (`_check_dense`'s
    rules, on the packed records). False sends the file the long way, which says what is wrong."""
    if len(own) != (size + cs - 1) // cs * CHUNK_RECORD_SIZE:
        return False
    for k, (_d, bi, _f, _c, usize, _co, uoff, foff, _i, _crc) in enumerate(CHUNK.iter_unpack(own)):
        if pos[blobs[bi].blob_id] != bi or foff != k * cs or usize != min(cs, size - k * cs) or uoff % 4096 \
                or table[bi].chunk_size != cs:
            return False
    return True


def _remap(own: bytes, blobs: list[BlobInfo], pos: dict[str, int]) -> tuple[bytes, list[ChunkInfo]]:
    """A file's packed chunks in file order with blob indexes into the image's table, and the
    same decoded (transient, for the checks). The packed list is reused when nothing changes: a
    converted layer's files keep theirs."""
    infos = unpack_chunks(own)
    out = [
        c if c.blob_index == (i := pos[blobs[c.blob_index].blob_id]) else c._replace(blob_index=i)
        for c in infos
    ]
    if any(a.file_offset > b.file_offset for a, b in itertools.pairwise(out)):
        out.sort(key=lambda c: c.file_offset)
    elif all(a is b for a, b in zip(out, infos, strict=True)):
        return own, infos
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


def build_image(root: "Tree | Inode", bootstrap_path: str, blob_dir: str, opts: BuildOptions,
                chunk_dict: "RafsImage | None" = None) -> BuildResult:
    """Write `bootstrap_path` (RAFS v6, or v5 with `opts.fs_version == 5`) and, if there is new file data, one blob in `blob_dir`.

    With `chunk_dict` (nydus-image's `--chunk-dict bootstrap=PATH`), new data whose chunks that
    image has is referenced from its blobs instead of stored; the dictionary blobs some chunk
    uses join the blob table (after the existing blobs, before the new one), the others do not.

    Raises ValueError for unusable options (`chunk_dict.ChunkDictError` for a dictionary of
    another version, chunk size or digester) and FormatError for trees RAFS cannot represent;
    on error no partial blob or bootstrap is left behind.
    """
    check_options(opts)
    tree = as_tree(root)
    plan: V5Plan | V6Plan = plan_v5(tree, opts) if opts.fs_version == 5 else plan_v6(tree, opts)
    order = plan.data_order()
    table, file_chunks, dedup = _existing_blobs(tree, plan.regular_files(), opts, want_dedup=bool(order))
    if opts.blob_id is not None and opts.blob_id in {b.blob_id for b in table}:
        raise FormatError(f"blob id {opts.blob_id} is already used by a blob the image references")
    if isinstance(plan, V6Plan) and len(table) >= 254:
        raise FormatError(f"image would reference {len(table) + 1} blobs; RAFS v6 allows 254")

    dict_blobs: list[BlobInfo] = []
    existing: ChunkLookup = dedup
    if chunk_dict is not None and order:
        dict_blobs, dict_records = load_chunk_dict(chunk_dict, opts, first_index=len(table))
        existing = _Either(dedup, dict_records)

    new_blob: BlobInfo | None = None
    with BlobWriter(blob_dir, opts, blob_index=len(table) + len(dict_blobs), existing=existing) as writer:
        writer.add_files_stream(
            (_new_data(tree, n) for n in order), lambda i, chunks: file_chunks.override(order[i], chunks)
        )
        new_blob = writer.finish()
        blob_path = writer.path
    counts = (len(writer.chunks), writer.deduplicated, writer.stored_uncompressed, writer.stored_compressed)
    del writer, dedup, existing  # their chunk records and blob.meta buffers are not needed for the bootstrap
    if dict_blobs:
        table, new_blob = _place_dict_blobs(table, dict_blobs, new_blob, order, file_chunks)
    if isinstance(plan, V6Plan) and len(table) + (new_blob is not None) > 254:
        raise FormatError(f"image would reference {len(table) + 1} blobs; RAFS v6 allows 254")
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
        inodes=plan.inode_count if isinstance(plan, V5Plan) else len(plan),
        chunks=counts[0],
        deduplicated=counts[1],
        uncompressed_bytes=counts[2],
        compressed_bytes=counts[3],
    )


class _Either:
    """The chunks of the image's blobs, then those of a chunk dictionary."""

    def __init__(self, first: ChunkRecords, second: ChunkRecords) -> None:
        self.first, self.second = first, second

    def __contains__(self, digest: object) -> bool:
        return digest in self.first or digest in self.second

    def get(self, digest: bytes, file_offset: int) -> bytes | None:
        got = self.first.get(digest, file_offset)
        return got if got is not None else self.second.get(digest, file_offset)


def _place_dict_blobs(table: list[BlobInfo], dict_blobs: list[BlobInfo], new_blob: BlobInfo | None,
                      order: "array[int]", file_chunks: FileChunks) -> tuple[list[BlobInfo], BlobInfo | None]:
    """The blob table with the dictionary blobs the new files use (the table's own entry for one
    it has already), and the new blob after them; the new files' chunk records renumbered."""
    base, nd = len(table), len(dict_blobs)
    used: set[int] = set()
    for n in order:
        for (bi,) in _BLOB_INDEX.iter_unpack(file_chunks(n)):
            if base <= bi < base + nd:
                used.add(bi)
    at = {b.blob_id: b.index for b in table}
    mapping: dict[int, int] = {}
    added: list[BlobInfo] = []
    for i, b in enumerate(dict_blobs):
        if base + i not in used:
            continue
        if b.blob_id in at:
            mapping[base + i] = at[b.blob_id]
        else:
            mapping[base + i] = base + len(added)
            added.append(replace(b, index=base + len(added)))
    new_index = base + len(added)
    mapping[base + nd] = new_index
    for n in order:
        out = bytearray(file_chunks(n))
        for off in range(0, len(out), CHUNK_RECORD_SIZE):
            (bi,) = _BLOB_INDEX.unpack_from(out, off)
            if bi in mapping:
                U32.pack_into(out, off + _BLOB_INDEX_AT, mapping[bi])
        file_chunks.override(n, bytes(out))
    if new_blob is not None:
        new_blob = replace(new_blob, index=new_index)
    return table + added, new_blob


def _new_data(tree: Tree, idx: int) -> FileData:
    data = tree.file_data(idx)
    if data is None:
        raise FormatError(f"{tree.path(idx)!r}: file data of unknown kind")
    return data


def _write_atomic(path: str, data: bytes | bytearray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, ".boot-") as fd, open(fd, "wb", closefd=False) as f:
        f.write(data)
