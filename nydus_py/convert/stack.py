"""One RAFS blob per image layer, then one merged bootstrap: nydusify's build, in process.

`LayerStack.add_layer` reads one uncompressed layer tar (whiteouts are ordinary entries at this
point), writes that layer's data blob with the chunks no lower layer already stored (chunks are
deduplicated across layers by digest), and keeps only the layer's packed tree (`packed.Tree`:
array columns, no object per entry) with every regular file's data turned into chunk records
pointing at the blobs: after it returns, the tar is no longer needed.
`finish` stacks those trees (OCI whiteouts applied, `merge.merge_layers`) and writes the image
bootstrap with `build.build_image`, which then has no new data to write.

With a chunk dictionary (`add_dict`, before the first layer), chunks the dictionary has are
referenced from its blobs instead of stored. For a build cache, `write_layer_bootstrap` keeps a
built layer's tree as a bootstrap of its own (whiteouts still entries), and `add_cached_layer`
takes such a bootstrap back in place of building the layer: its tree joins the stack and the
chunks its blob holds become dedup candidates for the layers above, exactly as if it had just
been built, so the merged bootstrap is the same byte for byte.

The blob table lists the blobs in layer order (a layer whose chunks all exist lower down, or
that has no file data, adds no blob); blobs whose every chunk was whited out or replaced by upper
layers drop out of the table, so only blobs the image uses are pushed.
"""

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from ..builder.blob_writer import BlobWriter
from ..builder.build import build_image, check_options
from ..builder.chunk_dict import load_chunk_dict
from ..builder.chunk_records import ChunkRecords
from ..builder.merge import merge_layers, tree_from_image
from ..builder.options import BuildOptions, BuildResult
from ..builder.packed import K_CHUNKS, K_TAR, Tree
from ..builder.sources import SourceStats, tree_from_tar
from ..builder.tree import FileData
from ..builder.v5_writer import plan_v5
from ..builder.v6_writer import plan_v6
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK, CHUNK_RECORD_SIZE, U32
from ..rafs.model import BlobInfo, RafsImage

_BLOB_INDEX = CHUNK.offset("blob_index")


@dataclass
class LayerResult:
    blob: BlobInfo | None  # None: nothing new to store
    blob_path: str | None
    entries: int
    file_bytes: int  # regular file bytes of the layer (hard links once)
    chunks: int  # chunk references of the layer's files
    new_chunks: int  # of which stored in this layer's blob
    deduplicated: int  # of which found in this or a lower layer's blob
    stored_compressed: int  # bytes of chunk data written
    cached: bool = False  # taken from a build cache, not built


class CacheMismatch(FormatError):
    """A cached layer bootstrap does not fit this stack (it names blobs the stack lacks)."""


class _Counted:
    """A stream of `data` that reports the bytes read (build progress)."""

    __slots__ = ("f", "progress")

    def __init__(self, f: BinaryIO, progress: Callable[[int], None]) -> None:
        self.f = f
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.progress(len(b))
        return b

    def __enter__(self) -> "_Counted":
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def close(self) -> None:
        self.f.close()


class _CountingOpener:
    """`FileData.open` wrapping another opener's streams in `_Counted` (one small object per
    file: no closure or class per file)."""

    __slots__ = ("opener", "progress")

    def __init__(self, opener: Callable[[], BinaryIO], progress: Callable[[int], None]) -> None:
        self.opener = opener
        self.progress = progress

    def __call__(self) -> BinaryIO:
        return _Counted(self.opener(), self.progress)  # type: ignore[return-value]


def _counting(data: FileData, progress: Callable[[int], None]) -> FileData:
    """`data` whose streams report the bytes read (build progress)."""
    return FileData(size=data.size, open=_CountingOpener(data.open, progress))


class LayerStack:
    """Builds the layers of one image, lowest first, into `blob_dir`."""

    def __init__(self, opts: BuildOptions, blob_dir: str) -> None:
        check_options(opts)
        if opts.blob_id is not None:
            raise ValueError("a layered build names each blob by its digest; blob_id cannot be set")
        self.opts = opts
        self.blob_dir = blob_dir
        self.blobs: list[BlobInfo] = []  # shared by every ChunkedData of the stack
        self.layers: list[Tree] = []
        self.dedup = ChunkRecords()  # every stored chunk of the stack, packed
        self.dict_blobs = 0  # the first blobs of `blobs` come from a chunk dictionary
        self._finished = False

    def add_dict(self, image: RafsImage) -> int:
        """Dedup against the chunks of chunk dictionary `image` (before any layer); returns how
        many distinct chunks it offers. ChunkDictError when its format cannot serve this build."""
        if self.layers or self.blobs:
            raise RuntimeError("the chunk dictionary goes in before the first layer")
        blobs, records = load_chunk_dict(image, self.opts)
        self.blobs.extend(blobs)
        self.dict_blobs = len(blobs)
        self.dedup.update(records)
        return len(self.dedup)

    def add_layer(self, tar: BinaryIO, progress: Callable[[int], None] | None = None) -> LayerResult:
        """Build the blob of one uncompressed layer tar (seekable, a real file is best: its data is
        read in place). `progress` gets the file bytes consumed."""
        if self._finished:
            raise RuntimeError("LayerStack already finished")
        stats = SourceStats()
        tree = tree_from_tar(tar, stats)
        opts = self._layer_options(tree)
        plan = plan_v5(tree, opts) if opts.fs_version == 5 else plan_v6(tree, opts)
        order = plan.data_order()
        del plan
        bset = tree.blob_set(self.blobs)
        refs = 0

        def stored(i: int, chunks: bytes) -> None:
            nonlocal refs
            n = order[i]
            refs += len(chunks) // CHUNK_RECORD_SIZE
            tree.set_chunks(n, chunks, tree.size[n], bset)

        datas: Iterator[FileData] = (_file_data(tree, n) for n in order)
        if progress is not None:
            datas = (_counting(d, progress) for d in datas)
        with BlobWriter(self.blob_dir, self.opts, blob_index=len(self.blobs), existing=self.dedup) as writer:
            writer.add_files_stream(datas, stored)
            blob = writer.finish()
        if blob is not None:
            self.blobs.append(blob)
        kind = tree.kind
        for n in range(len(tree)):  # empty (or unreachable) files: no chunks; let go of the tar
            if kind[n] == K_TAR:
                tree.set_chunks(n, b"", tree.size[n], bset)
        tree.backings.clear()
        tree.freeze()
        n_stored = len(writer.chunks)
        self.dedup.update(writer.chunks)  # takes the records: writer.chunks is empty afterwards
        self.layers.append(tree)
        return LayerResult(
            blob=blob,
            blob_path=writer.path,
            entries=stats.entries,
            file_bytes=writer.uncompressed_bytes,
            chunks=refs,
            new_chunks=n_stored,
            deduplicated=writer.deduplicated,
            stored_compressed=writer.stored_compressed,
        )

    def write_layer_bootstrap(self, path: str) -> list[str]:
        """The last added layer alone, as a bootstrap (whiteouts kept as entries, chunks pointing
        at the blobs the layer uses): what a build cache stores for it. Returns its blob table."""
        if self._finished or not self.layers:
            raise RuntimeError("no layer to write")
        scratch = os.path.join(self.blob_dir, ".layer")
        result = build_image(self.layers[-1], path, scratch, replace(self.opts, prefetch_paths=[]))
        if result.blob_id is not None:  # every file is ChunkedData by now
            raise AssertionError("a layer bootstrap wrote new blob data")
        return result.blob_ids

    def add_cached_layer(self, image: RafsImage, blob_id: str | None) -> LayerResult:
        """Take a layer from its cached bootstrap (`write_layer_bootstrap`'s) instead of
        building it; `blob_id` is the blob that layer stored (None: it stored nothing).

        Every other blob the bootstrap references must be one the stack has already (lower
        layers or the chunk dictionary): CacheMismatch otherwise, and the stack is unchanged."""
        if self._finished:
            raise RuntimeError("LayerStack already finished")
        known = {b.blob_id for b in self.blobs}
        own: BlobInfo | None = None
        for b in image.blobs:
            if b.blob_id == blob_id:
                own = b
            elif b.blob_id not in known:
                raise CacheMismatch(f"cached layer references blob {b.blob_id[:12]}, which no lower layer has")
        if blob_id is not None and (own is None or blob_id in known):
            raise CacheMismatch(f"cached layer does not reference its blob {blob_id[:12]} as a new one")
        if image.version != self.opts.fs_version or image.chunk_size != self.opts.chunk_size:
            raise CacheMismatch(f"cached layer is RAFS v{image.version} with chunk size {image.chunk_size:#x}")
        tree = tree_from_image(image)
        if own is not None:
            self.blobs.append(replace(own, index=len(self.blobs)))
        # the tree's chunks point into the stack's blob list, as a built layer's do (the merged
        # blob table follows the lists the files carry: the same lists, the same table)
        where = {b.blob_id: i for i, b in enumerate(self.blobs)}
        bset = tree.blob_set(self.blobs)
        own_index = where.get(blob_id or "", -1)
        new = ChunkRecords()
        refs = file_bytes = 0
        chunks = tree.chunks
        for n in range(len(tree)):
            if tree.kind[n] != K_CHUNKS:
                continue
            blobs = tree.blobs_of(n)
            a = tree.a[n]
            for off in range(a + _BLOB_INDEX, a + tree.b[n], CHUNK_RECORD_SIZE):
                refs += 1
                (bi,) = U32.unpack_from(chunks, off)
                stack_index = where[blobs[bi].blob_id]
                U32.pack_into(chunks, off, stack_index)
                if stack_index == own_index:
                    new.add(chunks[off - _BLOB_INDEX:off - _BLOB_INDEX + CHUNK_RECORD_SIZE])
            tree.bset[n] = bset
            file_bytes += tree.size[n]
        stored = len(new)
        self.dedup.update(new)
        self.layers.append(tree)
        return LayerResult(blob=own, blob_path=None, entries=len(tree), file_bytes=file_bytes, chunks=refs,
                           new_chunks=stored, deduplicated=refs - stored,
                           stored_compressed=own.compressed_size if own else 0, cached=True)

    def _layer_options(self, tree: Tree) -> BuildOptions:
        """The build options of one layer: only the prefetch paths this layer has (the others
        belong to other layers, no warning about them here). Its blob then starts with those
        files, in the given order; the merged bootstrap's prefetch table lists them all."""
        if not self.opts.prefetch_paths:
            return self.opts
        mine = [p for p in self.opts.prefetch_paths if tree.find(_normalize(p)) >= 0]
        tree.freeze()
        return replace(self.opts, prefetch_paths=mine)

    def finish(self, bootstrap_path: str) -> BuildResult:
        """Write the merged image bootstrap (whiteouts applied). No blob data is written here.

        The stack is spent afterwards: the dedup map and the layer trees are let go before the
        bootstrap is written (they would double the peak memory of a big layer)."""
        if self._finished:
            raise RuntimeError("LayerStack already finished")
        if not self.layers:
            raise ValueError("no layers were added")
        self._finished = True
        self.dedup = ChunkRecords()
        layers, self.layers = self.layers, []
        root = merge_layers(layers, "oci", consume=True)  # each layer goes once merged
        scratch = os.path.join(self.blob_dir, ".merge")
        result = build_image(root, bootstrap_path, scratch, self.opts)
        if result.blob_id is not None:  # every file is ChunkedData: a new blob means a bug here
            raise AssertionError("merging layers wrote new blob data")
        return result


def _file_data(tree: Tree, n: int) -> FileData:
    data = tree.file_data(n)
    assert data is not None  # data_order lists files with new data only
    return data


def _normalize(path: bytes) -> bytes:
    return b"/" + b"/".join(c for c in path.split(b"/") if c and c != b".")
