"""File reads over chunks: the layer between a filesystem and a blob backend.

Maps a file range to chunks (through the image), loads each chunk once through the chunk cache,
decodes and validates it, and assembles the bytes. Digest failures surface as DigestMismatch so
the filesystem can answer EIO and never hand out wrong bytes.
"""

import logging
import threading

from ..rafs.chunkdata import BlobSource, decode_chunk
from ..rafs.errors import FormatError
from ..rafs.model import ChunkInfo, RafsImage
from .chunk_cache import ChunkCache

log = logging.getLogger(__name__)


class BlobDevice:
    def __init__(self, image: RafsImage, source: BlobSource, *, validate: bool = True,
                 cache: ChunkCache | None = None) -> None:
        self.image = image
        self.source = source
        self.validate = validate
        self.cache = cache or ChunkCache()
        self.read_errors = 0
        self.bytes_read = 0
        self._stats_lock = threading.Lock()

    def load_chunk(self, chunk: ChunkInfo) -> bytes:
        key = (chunk.blob_index, chunk.compressed_offset, chunk.compressed_size, chunk.uncompressed_size)
        return self.cache.get(key, lambda: self._fetch(chunk))

    def _fetch(self, chunk: ChunkInfo) -> bytes:
        blobs = self.image.blobs
        if not 0 <= chunk.blob_index < len(blobs):
            raise FormatError(f"chunk refers to blob index {chunk.blob_index}, image has {len(blobs)}")
        blob = blobs[chunk.blob_index]
        try:
            raw = self.source.read(blob, chunk.compressed_offset, chunk.compressed_size)
            return decode_chunk(raw, chunk, blob, self.validate)
        except (FormatError, OSError) as e:
            with self._stats_lock:
                self.read_errors += 1
            log.error("blob %s chunk at offset %d (size %d): %s", blob.blob_id, chunk.compressed_offset,
                      chunk.compressed_size, e)
            raise

    def read(self, ino: int, offset: int, size: int, file_size: int | None = None) -> bytes:
        """Bytes [offset, offset+size) of regular file `ino`, clipped to its size; holes are zeros."""
        if file_size is None:
            file_size = self.image.getattr(ino).size
        end = min(file_size, offset + size)
        if offset >= end:
            return b""
        chunks = self.image.chunks(ino, offset, end - offset)
        if len(chunks) == 1:
            c = chunks[0]
            if c.file_offset <= offset and end <= c.file_offset + c.uncompressed_size:
                data = self.load_chunk(c)
                out = data[offset - c.file_offset : end - c.file_offset]
                with self._stats_lock:
                    self.bytes_read += len(out)
                return out
        buf = bytearray(end - offset)
        for c in chunks:
            data = self.load_chunk(c)
            lo = max(offset, c.file_offset)
            hi = min(end, c.file_offset + c.uncompressed_size)
            if hi > lo:
                buf[lo - offset : hi - offset] = data[lo - c.file_offset : hi - c.file_offset]
        with self._stats_lock:
            self.bytes_read += len(buf)
        return bytes(buf)
