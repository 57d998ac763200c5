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

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO

from ..builder.blob_writer import BlobWatch, BlobWriter, ChunkSource, with_blob_index
from ..builder.build import build_image, check_options
from ..builder.chunk_dict import load_chunk_dict
from ..builder.chunk_records import ChunkRecords, SharedChunkRecords
from ..builder.merge import LayerMerger, tree_from_image
from ..builder.options import BuildOptions, BuildResult
from ..builder.packed import K_CHUNKS, K_TAR, Tree
from ..builder.sources import Growth, SourceStats, tree_from_tar
from ..builder.v5_writer import plan_v5
from ..builder.v6_writer import plan_v6
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK, CHUNK_RECORD_SIZE, U32
from ..rafs.model import BlobInfo, RafsImage

_BLOB_INDEX = CHUNK.offset("blob_index")


@dataclass
class PreparedLayer:
    """A layer parsed and its new chunk data written (`LayerStack.prepare_layer`), not yet placed
    in the stack."""

    tree: Tree
    writer: BlobWriter  # held: chunk data written, no trailers, no name yet
    refs: int  # chunk references of the layer's files
    entries: int
    position: int  # its place in the image, lowest 0
    streamed: bool = False  # its blob file was followed by a `BlobWatch` while written


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


log = logging.getLogger(__name__)

FILE_OFFSET = CHUNK.view("file_offset")


class _Below:
    """The chunks the layers below one being prepared hold: the committed ones, then those
    being prepared (their held blobs, looked at while they are written)."""

    def __init__(self, committed: ChunkRecords, held: list[BlobWriter]) -> None:
        self.committed = committed
        self.held = held

    def __contains__(self, digest: object) -> bool:
        if digest in self.committed:
            return True
        return isinstance(digest, bytes) and any(w.holds(digest) for w in self.held)

    def get(self, digest: bytes, file_offset: int) -> bytes | None:
        got = self.committed.get(digest, file_offset)
        for w in self.held:
            if got is not None:
                break
            got = w.held_record(digest, file_offset)
        return got

    def settle(self, digest: bytes) -> None:
        """Wait for the layers below that are still writing their blob and may store `digest`
        (spilled there): found in one then, it is referenced above, not stored twice - so the
        commit need not write this layer's blob again without it. (Layers below never wait for
        the ones above.)"""
        for w in self.held:
            if w.spill_pending(digest):
                w.wait_chunk(digest)


class _LateWatch:
    """The `BlobWatch` of a layer prepared beside layers below it: it hears how the blob file
    grows but tells `watch` nothing until every layer below has stored all its chunks (from
    then on this layer references what they hold instead of storing it) and none of them holds
    a chunk this blob stores (else the commit writes this blob again without it). Then `watch`
    hears of the file and follows it from its start: the upload runs while this layer is still
    being built instead of after its commit (in a conversion, the last layer's upload was the
    tail: ~0.24 s for a 55 MB blob to a local registry). Thread-safe: the build thread opens
    the file, the blob's writer thread reports its growth."""

    def __init__(self, watch: BlobWatch, below: _Below) -> None:
        self.watch = watch
        self.below = below
        self.writer: BlobWriter | None = None  # this layer's (set before it stores a chunk)
        self._lock = threading.Lock()
        self._path: str | None = None
        self._size = 0
        self.armed = False  # `watch` follows the file
        self._shared = False  # a layer below holds one of this blob's chunks: never armed
        self._closed = False

    def opened(self, path: str) -> None:
        with self._lock:
            self._path = path
            self._try_arm_locked()

    def grew(self, size: int) -> None:
        with self._lock:
            self._size = size
            if self.armed:
                self.watch.grew(size)
            else:
                self._try_arm_locked()

    def closed(self, blob_id: str | None) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.watch.closed(blob_id if self.armed else None)

    def settle(self) -> bool:
        """At the end of the layer's preparation: whether `watch` follows the file; if it does
        not by now, it hears `closed(None)` (the blob is pushed whole once committed)."""
        with self._lock:
            self._try_arm_locked()
            if not self.armed and not self._closed:
                self._closed = True
                self.watch.closed(None)
            return self.armed

    def _try_arm_locked(self) -> None:
        if self.armed or self._shared or self._closed or self._path is None or self.writer is None:
            return
        if not all(w.chunks_final() for w in self.below.held):
            return
        below = self.below
        if any(d in below for d in self.writer.stored_digests()):
            self._shared = True
            return
        self.armed = True
        self.watch.opened(self._path)
        if self._size:
            self.watch.grew(self._size)


class LayerStack:
    """Builds the layers of one image, lowest first, into `blob_dir`."""

    def __init__(self, opts: BuildOptions, blob_dir: str, workers: int | None = None, durable: bool = True) -> None:
        check_options(opts)
        if opts.blob_id is not None:
            raise ValueError("a layered build names each blob by its digest; blob_id cannot be set")
        self.opts = opts
        self.blob_dir = blob_dir
        self.blobs: list[BlobInfo] = []  # shared by every ChunkedData of the stack
        self.layers: list[Tree] = []
        self.workers = workers  # chunk workers per layer being prepared (None: one per core)
        self.durable = durable  # fsync each finished blob (see BlobWriter)
        # every stored chunk of the committed layers (and of a chunk dictionary), packed; read by
        # layers being prepared
        self.dedup: ChunkRecords = SharedChunkRecords()
        self.dict_blobs = 0  # the first blobs of `blobs` come from a chunk dictionary
        self._held: dict[int, BlobWriter] = {}  # layers being prepared or waiting, by position
        self.rewrites = 0  # commits that wrote a held blob again (see commit_layer)
        self._lock = threading.Lock()
        self._finished = False
        self._merger = LayerMerger("oci")  # the committed layers merged so far (`merge_committed`)

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
        return self.commit_layer(self.prepare_layer(tar, progress))

    def prepare_layer(self, tar: BinaryIO | None, progress: Callable[[int], None] | None = None,
                      position: int | None = None, growth: Growth | None = None,
                      watch: BlobWatch | None = None) -> PreparedLayer:
        """The expensive part of `add_layer` (parse, chunk, hash, compress, write the chunk data),
        independent of the other layers: several may run at once, in any order. `position` is
        the layer's place in the image (default: the next one to commit). Chunks are deduplicated
        within the layer and against what the layers below hold - committed, or being prepared -
        when a chunk is looked at; `commit_layer` does the rest.

        Files are chunked in archive order as the tar is parsed (`BlobWriter.spill_file`), and
        written into the blob in that order as they come (as upstream's tarball builder does),
        or - with prefetch paths, whose files go first - into a spill, the blob then written in
        tree order from it: with `growth` (`tar` is a plain tar
        file another thread is still writing, or no `tar` and a `sources.TarPipe` that hands it over
        in memory), all that runs while the layer downloads; a restart of the file is
        `sources.Restarted` (nothing of the layer is kept).

        `watch` follows the layer's blob file as it is written (`BlobWatch`), only when the blob
        is written in archive order. When no layer below is being prepared (the layers below are
        committed, or come from a build cache: `add_cached_layer`, maybe still joining, their
        chunks found from then on), it follows the file from its start: the blob's bytes are
        final as they come unless a cached layer joins after this one stored some of its chunks
        (the commit then writes the blob again and `watch` hears `closed(None)`: deterministic
        output, a wasted upload). When layers below are still being prepared, it follows the
        file once they have stored all their chunks, if none of those is one this blob stores
        (`_LateWatch`). Otherwise it hears `closed(None)` (at once, or at the end of the
        preparation), and the blob is pushed once committed (`PreparedLayer.streamed` says
        which)."""
        if self._finished:
            raise RuntimeError("LayerStack already finished")
        if position is None:
            position = len(self.layers)
        with self._lock:
            if position < len(self.layers) or position in self._held:
                raise ValueError(f"layer {position} is committed or being prepared already")
            below = _Below(self.dedup, [w for p, w in sorted(self._held.items()) if p < position])
            # archive order unless prefetch files go first (their order needs the whole tree)
            archive = not self.opts.prefetch_paths
            streamed = watch is not None and archive and not below.held
            late = _LateWatch(watch, below) if watch is not None and archive and below.held else None
            writer = BlobWriter(self.blob_dir, self.opts, blob_index=0, existing=below, workers=self.workers,
                                durable=self.durable, settle=below.settle, archive_order=archive,
                                watch=watch if streamed else late)
            if late is not None:
                late.writer = writer
            self._held[position] = writer
        if watch is not None and not streamed and late is None:
            watch.closed(None)
        try:
            stats = SourceStats()

            def on_file(backing: ChunkSource, offset: int, size: int) -> None:
                writer.spill_file(backing, offset, size)
                if progress is not None:
                    progress(size)

            tree = tree_from_tar(tar, stats, growth=growth, on_file=on_file)
            writer.spill_finish()
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

            kind, a, size = tree.kind, tree.a, tree.size
            for n in order:
                if kind[n] != K_TAR:
                    raise AssertionError("a layer's new data is all in its tar")
            writer.add_spilled_stream(((a[n], size[n]) for n in order), stored)
            writer.hold()
            if late is not None:
                streamed = late.settle()
        except BaseException:
            with self._lock:
                self._held.pop(position, None)
            writer.abort()
            raise
        for n in range(len(tree)):  # empty (or unreachable) files: no chunks; let go of the tar
            if kind[n] == K_TAR:
                tree.set_chunks(n, b"", tree.size[n], bset)
        tree.backings.clear()
        tree.freeze()
        return PreparedLayer(tree, writer, refs, stats.entries, position, streamed)

    def commit_layer(self, layer: PreparedLayer) -> LayerResult:
        """Add a prepared layer on top of the stack (in layer order): its blob takes the next
        place in the blob table, and chunks a lower layer stored already are referenced there.
        When there are such chunks the blob is written again without them (stored bytes copied,
        nothing recompressed), so the result is byte for byte what building the layers one after
        the other would give."""
        if self._finished:
            raise RuntimeError("LayerStack already finished")
        held, tree = layer.writer, layer.tree
        if layer.position != len(self.layers):
            raise ValueError(f"layer {layer.position} committed as layer {len(self.layers)}")
        index = len(self.blobs)
        writer = held
        try:
            if not any(d in self.dedup for d in held.chunks):
                held.set_blob_index(index)
                self._remap(tree, held, index)
            else:  # a layer below stored some of these chunks after this one looked for them
                log.debug("layer %d: its held blob is written again without the chunks of the layers below",
                          layer.position)
                self.rewrites += 1
                writer = BlobWriter(self.blob_dir, self.opts, blob_index=index, durable=self.durable)
                for chunk, data in held.stored_chunks():
                    if chunk.digest not in self.dedup:
                        writer.add_stored(chunk, data)
                self._remap(tree, held, index, writer)
                held.abort()
            blob = writer.finish()
        except BaseException:
            held.abort()
            writer.abort()
            raise
        finally:
            with self._lock:
                self._held.pop(layer.position, None)
        if blob is not None:
            self.blobs.append(blob)
        new_chunks, stored_compressed = len(writer.chunks), writer.stored_compressed
        self.dedup.update(writer.chunks)
        self.layers.append(tree)
        return LayerResult(
            blob=blob,
            blob_path=writer.path,
            entries=layer.entries,
            file_bytes=held.uncompressed_bytes,
            chunks=layer.refs,
            new_chunks=new_chunks,
            deduplicated=layer.refs - new_chunks,
            stored_compressed=stored_compressed,
        )

    def _remap(self, tree: Tree, held: BlobWriter, index: int, writer: BlobWriter | None = None) -> None:
        """Fix the chunk records of `tree`: those of its held blob point at table entry `index`
        (or, with `writer`, the held blob written again, at `writer`'s blob, or at the layer
        below that holds the chunk); the others at the chunk's record in the layers below, all
        committed by now (a record found while preparing may be of a blob that was held then)."""
        chunks = tree.chunks
        view = memoryview(chunks)
        out = bytearray(len(chunks))
        for off in range(0, len(chunks), CHUNK_RECORD_SIZE):
            rec: bytes | bytearray | memoryview | None = view[off:off + CHUNK_RECORD_SIZE]
            digest = bytes(view[off:off + 32])
            fo = FILE_OFFSET.unpack_from(view, off)[0]
            if digest in held.chunks and writer is None:  # its own (a digest is all own or all below)
                rec = with_blob_index(view[off:off + CHUNK_RECORD_SIZE], index)
            elif digest in held.chunks:
                rec = writer.chunks.get(digest, fo) if writer is not None else None
                rec = rec or self.dedup.get(digest, fo)
            else:
                rec = self.dedup.get(digest, fo)
            assert rec is not None, "a chunk of a lower layer is not in the stack"
            out[off:off + CHUNK_RECORD_SIZE] = rec
        view.release()
        tree.chunks[:] = out

    def top(self) -> Tree:
        """The last added layer's tree, for `write_layer_bootstrap` (also once later layers were
        added or the stack finished: a build-cache record is written off the commit path)."""
        if self._finished or not self.layers:
            raise RuntimeError("no layer to write")
        return self.layers[-1]

    def write_layer_bootstrap(self, path: str, layer: Tree | None = None) -> list[str]:
        """One layer alone (`layer`, from `top`; default: the last added one), as a bootstrap
        (whiteouts kept as entries, chunks pointing at the blobs the layer uses): what a build
        cache stores for it. Returns its blob table. Only reads the tree, so it may run beside
        the commits of later layers and `finish` (each call writes nothing but `path`)."""
        tree = layer if layer is not None else self.top()
        result = build_image(tree, path, path + ".scratch", replace(self.opts, prefetch_paths=[]))
        if result.blob_id is not None:  # every file is ChunkedData by now
            raise AssertionError("a layer bootstrap wrote new blob data")
        return result.blob_ids

    def add_cached_layer(self, image: RafsImage, blob_id: str | None) -> LayerResult:
        """Take a layer from its cached bootstrap (`write_layer_bootstrap`'s) instead of
        building it; `blob_id` is the blob that layer stored (None: it stored nothing).

        Every other blob the bootstrap references must be one the stack has already (lower
        layers or the chunk dictionary): CacheMismatch otherwise, and the stack is unchanged.

        It goes where its commit would (all layers below committed); layers above that are being
        prepared find its chunks from then on, and `commit_layer` rewrites a held blob that stored
        some of them before, as for a built layer committed meanwhile."""
        if self._finished:
            raise RuntimeError("LayerStack already finished")
        with self._lock:
            if len(self.layers) in self._held:
                raise ValueError(f"layer {len(self.layers)} is being prepared; it cannot come from a cache")
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
        new.reserve(len(tree.chunks) // CHUNK_RECORD_SIZE)  # (every reference of the layer, at most)
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

    def merge_committed(self) -> None:
        """Merge the layers committed (or cached) since the last call into the image tree, so
        that `finish` has only the rest to merge (a caller runs this while upper layers build).
        The same tree as merging them all in `finish`."""
        for tree in self.layers[self._merger.count:]:
            self._merger.add(tree)

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
        self.merge_committed()
        self.layers = []
        root = self._merger.result()
        scratch = os.path.join(self.blob_dir, ".merge")
        result = build_image(root, bootstrap_path, scratch, self.opts)
        if result.blob_id is not None:  # every file is ChunkedData: a new blob means a bug here
            raise AssertionError("merging layers wrote new blob data")
        return result


def _normalize(path: bytes) -> bytes:
    return b"/" + b"/".join(c for c in path.split(b"/") if c and c != b".")
