"""Turning stored chunk bytes into file bytes: decompress, then prove they are the right bytes."""

from typing import Protocol

from . import codec
from .constants import ChunkFlags
from .errors import DigestMismatch, FormatError
from .model import BlobInfo, ChunkInfo, RafsImage

_ENCRYPTED = int(ChunkFlags.ENCRYPTED)
_COMPRESSED = int(ChunkFlags.COMPRESSED)


class BlobSource(Protocol):
    """Anything that can return a byte range of a data blob (local dir, cache, registry)."""

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes: ...


def decode_chunk(raw: bytes, chunk: ChunkInfo, blob: BlobInfo, validate: bool = True) -> bytes:
    """Uncompressed bytes of `chunk` from its `raw` stored bytes.

    With `validate`, the result must match the chunk's CRC32C (when recorded) or digest; a
    mismatch raises DigestMismatch, so a caller can never hand out wrong bytes.
    """
    if len(raw) != chunk.compressed_size:
        raise FormatError(
            f"blob {blob.blob_id}: short read at offset {chunk.compressed_offset}: "
            f"got {len(raw)} of {chunk.compressed_size} bytes"
        )
    flags = int(chunk.flags)  # (int &: IntFlag's own & is Python code, on every chunk)
    if flags & _ENCRYPTED:
        raise FormatError(f"blob {blob.blob_id}: encrypted chunks are not supported")
    if flags & _COMPRESSED:
        data = codec.decompress(blob.compressor, raw, chunk.uncompressed_size)
    else:
        if chunk.compressed_size != chunk.uncompressed_size:
            raise FormatError(
                f"blob {blob.blob_id}: uncompressed chunk at {chunk.compressed_offset} has "
                f"stored size {chunk.compressed_size} != {chunk.uncompressed_size}"
            )
        data = bytes(raw)
    if validate:
        verify_chunk(data, chunk, blob)
    return data


def decode_chunk_prefix(raw: bytes, chunk: ChunkInfo, blob: BlobInfo, n: int) -> bytes:
    """At least the first `n` uncompressed bytes of `chunk` (all of it when `n` covers it or
    the compressor cannot stop early), never validated: only for readers with digest
    validation off, who then decode no more than they read. `raw` is the whole stored chunk
    when it is compressed, else its first `n` bytes or more."""
    if n >= chunk.uncompressed_size:
        return decode_chunk(raw, chunk, blob, validate=False)
    if chunk.flags & ChunkFlags.ENCRYPTED:
        raise FormatError(f"blob {blob.blob_id}: encrypted chunks are not supported")
    if not chunk.compressed:
        if chunk.compressed_size != chunk.uncompressed_size:
            raise FormatError(
                f"blob {blob.blob_id}: uncompressed chunk at {chunk.compressed_offset} has "
                f"stored size {chunk.compressed_size} != {chunk.uncompressed_size}"
            )
        if len(raw) < n:
            raise FormatError(f"blob {blob.blob_id}: short read at offset {chunk.compressed_offset}: "
                              f"got {len(raw)} of {n} bytes")
        return bytes(raw)
    if len(raw) != chunk.compressed_size:
        raise FormatError(
            f"blob {blob.blob_id}: short read at offset {chunk.compressed_offset}: "
            f"got {len(raw)} of {chunk.compressed_size} bytes"
        )
    return codec.decompress_prefix(blob.compressor, raw, chunk.uncompressed_size, n)


def verify_chunk(data: bytes, chunk: ChunkInfo, blob: BlobInfo) -> None:
    """Raise DigestMismatch unless `data` is what `chunk` records."""
    if chunk.flags & ChunkFlags.HAS_CRC32:
        got = codec.crc32c(data)
        if got != chunk.crc32:
            raise DigestMismatch(
                f"blob {blob.blob_id}: chunk at compressed offset {chunk.compressed_offset} "
                f"crc32c {got:08x} != recorded {chunk.crc32:08x}"
            )
        return
    got_digest = codec.digest(blob.digester, data)
    if got_digest != chunk.digest:
        raise DigestMismatch(
            f"blob {blob.blob_id}: chunk at compressed offset {chunk.compressed_offset} "
            f"digest {got_digest.hex()} != recorded {chunk.digest.hex()}"
        )


def read_chunk(source: BlobSource, image: RafsImage, chunk: ChunkInfo, validate: bool = True) -> bytes:
    """Fetch and decode one chunk through `source`."""
    if not 0 <= chunk.blob_index < len(image.blobs):
        raise FormatError(f"chunk refers to blob index {chunk.blob_index}, image has {len(image.blobs)}")
    blob = image.blobs[chunk.blob_index]
    raw = source.read(blob, chunk.compressed_offset, chunk.compressed_size)
    return decode_chunk(raw, chunk, blob, validate)


def read_file_range(
    source: BlobSource, image: RafsImage, ino: int, offset: int, size: int, validate: bool = True
) -> bytes:
    """Bytes [offset, offset+size) of regular file `ino`, clipped to its size; holes are zeros."""
    file_size = image.getattr(ino).size
    if offset >= file_size or size <= 0:
        return b""
    end = min(file_size, offset + size)
    out = bytearray(end - offset)
    for chunk in image.chunks(ino, offset, end - offset):
        data = read_chunk(source, image, chunk, validate)
        lo = max(offset, chunk.file_offset)
        hi = min(end, chunk.file_offset + chunk.uncompressed_size)
        if hi > lo:
            out[lo - offset : hi - offset] = data[lo - chunk.file_offset : hi - chunk.file_offset]
    return bytes(out)
