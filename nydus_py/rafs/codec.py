"""Chunk compression, digests and CRC32C: pure functions over bytes.

zstd, lz4, blake3, hashlib and crc32c all release the GIL on large buffers, so callers may run
these in worker threads without stalling an event loop.
"""

import contextlib
import gzip
import threading
import zlib
from collections.abc import Iterator, Sequence

import blake3
import lz4.block
import zstandard

from .constants import Compressor, Digester
from .errors import FormatError

ZSTD_LEVEL = 3

# zstd contexts are expensive to create (about half the cost of compressing a 1 MiB chunk) and
# not thread-safe, so each thread keeps its own.
_tls = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "zc", None)
    if c is None:
        c = _tls.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def compress(algo: Compressor, data: bytes) -> bytes:
    """Compress one chunk the way nydus-image does (raw LZ4 block, one zstd frame, gzip member)."""
    if algo == Compressor.NONE:
        return bytes(data)
    if algo == Compressor.LZ4_BLOCK:
        return lz4.block.compress(data, store_size=False)
    if algo == Compressor.ZSTD:
        return _zstd_compressor().compress(data)
    if algo == Compressor.GZIP:
        return gzip.compress(data, mtime=0)
    raise FormatError(f"unsupported compressor id {int(algo)}")


def compress_many(algo: Compressor, datas: "Sequence[bytes]") -> "list[bytes | memoryview]":
    """`compress` of each of `datas` (the same bytes). zstd takes them all in one call
    (`multi_compress_to_buffer`, one thread: the same frames): one GIL hand-off for a batch of
    small chunks, not one each - under contention each hand-off waits for the GIL again."""
    if algo == Compressor.ZSTD and len(datas) > 1 and all(datas):
        got = _zstd_compressor().multi_compress_to_buffer(list(datas), threads=0)
        # (each segment is a buffer into the batch's output; the stubs do not say so)
        return [memoryview(got[i]) for i in range(len(got))]  # type: ignore[arg-type]
    return [compress(algo, d) for d in datas]


@contextlib.contextmanager
def _decode_errors(algo: Compressor) -> Iterator[None]:
    """The libraries' own error types for corrupt input, as one FormatError."""
    try:
        yield
    except FormatError:
        raise
    except Exception as e:
        raise _decode_error(algo, e) from None


def _decode_error(algo: Compressor, e: Exception) -> FormatError:
    return FormatError(f"cannot decompress {Compressor(algo).nydus_name} chunk: {e}")


def decompress(algo: Compressor, data: bytes, size: int) -> bytes:
    """Decompress one chunk to exactly `size` bytes; anything else is a FormatError."""
    # (try/except, not _decode_errors: a generator context manager costs a few us per chunk)
    try:
        if algo == Compressor.ZSTD:
            out = _zstd_decompressor().decompress(data, max_output_size=size)
        elif algo == Compressor.NONE:
            out = bytes(data)
        elif algo == Compressor.LZ4_BLOCK:
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif algo == Compressor.GZIP:
            d = zlib.decompressobj(wbits=31)
            out = d.decompress(data, size)
        else:
            raise FormatError(f"unsupported compressor id {int(algo)}")
    except FormatError:
        raise
    except Exception as e:
        raise _decode_error(algo, e) from None
    if len(out) != size:
        raise FormatError(f"chunk decompressed to {len(out)} bytes, expected {size}")
    return out


def decompress_prefix(algo: Compressor, data: bytes, size: int, n: int) -> bytes:
    """The first `n` (<= `size`) bytes of one chunk, or more of it (up to all `size`) where
    the compressor cannot stop early (LZ4 blocks). A zstd frame or gzip member is decoded only
    as far as needed: a 4 KiB read near the start of a 1 MiB chunk costs a fraction of the
    whole. The bytes past `n` are never looked at, so a corruption there goes unnoticed: for
    callers that do not validate digests anyway. Short output is a FormatError."""
    n = min(n, size)
    if n >= size or algo == Compressor.LZ4_BLOCK:
        return decompress(algo, data, size)
    with _decode_errors(algo):
        if algo == Compressor.NONE:
            out = bytes(data[:n])
        elif algo == Compressor.ZSTD:
            parts: list[bytes] = []
            got = 0
            with _zstd_decompressor().stream_reader(data, read_size=32 << 10) as r:
                while got < n:
                    part = r.read(n - got)
                    if not part:
                        break
                    parts.append(part)
                    got += len(part)
            out = parts[0] if len(parts) == 1 else b"".join(parts)
        elif algo == Compressor.GZIP:
            out = zlib.decompressobj(wbits=31).decompress(data, n)
        else:
            raise FormatError(f"unsupported compressor id {int(algo)}")
    if len(out) != n:
        raise FormatError(f"chunk decompressed to {len(out)} bytes before its end, expected at least {n}")
    return out


def digest(algo: Digester, data: bytes) -> bytes:
    """The 32-byte chunk/inode digest with the image's digester."""
    if algo == Digester.BLAKE3:
        return blake3.blake3(data, max_threads=1).digest()
    if algo == Digester.SHA256:
        import hashlib  # here: OpenSSL's libcrypto is ~3.5 MiB of RSS a blake3 image never needs

        return hashlib.sha256(data).digest()
    raise FormatError(f"unsupported digester id {int(algo)}")


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of the uncompressed chunk, as nydus-image >= 2.4 stores it."""
    import google_crc32c  # (here: ~0.9 MiB of RSS that images without CRCs never need)

    return int(google_crc32c.value(bytes(data)))
