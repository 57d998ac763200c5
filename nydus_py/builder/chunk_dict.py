"""Chunk dictionaries (nydus-image's `--chunk-dict bootstrap=PATH`): the chunks of an existing
image a build may reference instead of storing them again.

A dictionary is a bootstrap: every chunk its files reference becomes a dedup candidate, with the
blob it lives in. A build whose chunk matches one by digest writes the dictionary's record (its
blob, offsets and chunk index) into the file instead of compressing the data anew, so the new
image lists the dictionary's blob in its blob table and reads that chunk from it.

Only a dictionary built the way the new image is can serve it: the same RAFS version (v5 and
v6 blobs differ in layout), chunk size (files are arrays of chunk-size chunks) and digest
algorithm (digests compare only then). The compressor may differ: each blob names its own.
"""

from dataclasses import replace

from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK, CHUNK_RECORD_SIZE, U32
from ..rafs.model import BlobInfo, RafsImage
from .chunk_records import ChunkRecords
from .merge import tree_from_image
from .options import BuildOptions
from .packed import K_CHUNKS

_BLOB_INDEX = CHUNK.offset("blob_index")


class ChunkDictError(ValueError):
    """The dictionary cannot serve this build (its format differs)."""


def check_dict(image: RafsImage, opts: BuildOptions) -> None:
    """ChunkDictError unless `image` was built with `opts`' version, chunk size and digester."""
    if image.version != opts.fs_version:
        raise ChunkDictError(f"chunk dict is RAFS v{image.version}, the image is built as v{opts.fs_version}")
    if image.chunk_size != opts.chunk_size:
        raise ChunkDictError(f"chunk dict has chunk size {image.chunk_size:#x}, the image uses {opts.chunk_size:#x}")
    for b in image.blobs:
        if b.digester != opts.digester:
            raise ChunkDictError(f"chunk dict blob {b.blob_id} uses {b.digester.name} digests, "
                                 f"the image {opts.digester.name}")


def load_chunk_dict(image: RafsImage, opts: BuildOptions, first_index: int = 0) -> tuple[list[BlobInfo], ChunkRecords]:
    """The dictionary's blobs (numbered from `first_index`, the position they take in the
    build's blob list) and its distinct chunks, their records pointing at those numbers."""
    check_dict(image, opts)
    blobs = [replace(b, index=first_index + i) for i, b in enumerate(image.blobs)]
    records = ChunkRecords()
    tree = tree_from_image(image)
    view = memoryview(tree.chunks)
    kind = tree.kind
    for n in range(len(tree)):
        if kind[n] != K_CHUNKS:
            continue
        a, size = tree.a[n], tree.b[n]
        for off in range(a, a + size, CHUNK_RECORD_SIZE):
            rec = bytearray(view[off:off + CHUNK_RECORD_SIZE])
            (bi,) = U32.unpack_from(rec, _BLOB_INDEX)
            if not 0 <= bi < len(blobs):
                raise FormatError(f"chunk dict: {tree.path(n)!r} refers to blob {bi} of {len(blobs)}")
            U32.pack_into(rec, _BLOB_INDEX, first_index + bi)
            records.add(rec)
    view.release()
    return blobs, records


