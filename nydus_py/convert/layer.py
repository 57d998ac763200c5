"""Layer streams: decompression that checks what it reads, and the Nydus bootstrap layer tar.

`decompress_to` copies a (gzip | zstd | plain) layer into a file while hashing the tar (the
diff_id), in bounded pieces: memory use does not depend on the layer size or its compression
ratio. A stream that ends before its end-of-stream marker (truncated), corrupt data, or junk after
the last member is a FormatError; zero padding after a gzip member is allowed as gzip(1) does.
A layer that expands past its `ExpansionLimits` (a decompression bomb, see `builder.limits`) is
refused while it expands, before the piece that would pass the cap is written.

The bootstrap layer is what nydusify pushes: a gzip tar with a directory `image` and the file
`image/image.boot` (mode 0644, mtime 0, root-owned), so the same bootstrap always gives the same
layer digest and re-running a conversion reuses it.
"""

import gzip
import hashlib
import io
import tarfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from ..builder.limits import ExpansionLimits, ExpansionMeter, remaining_size
from ..builder.sources import DEFAULT_LIMITS, GZIP_MAGIC, detect_compression
from ..rafs.errors import FormatError
from .bootstrap_layer import extract_bootstrap as extract_bootstrap  # (re-exported: checker, tests)
from .oci import BOOTSTRAP_NAME

PIECE = 1 << 20
_ZSTD_FEED = 512  # compressed bytes per zstd call: caps one call's output near 16 MiB (RLE blocks); ~1 GB/s
_GZIP_OUT = 1 << 20


class _HashWriter(io.RawIOBase):
    """Writes through to `dst`, hashing and counting what passes; `meter` may refuse a write."""

    def __init__(self, dst: BinaryIO, meter: ExpansionMeter | None = None) -> None:
        self.dst = dst
        self.hash = hashlib.sha256()
        self.size = 0
        self.meter = meter

    def writable(self) -> bool:
        return True

    def write(self, b: "bytes | bytearray | memoryview") -> int:  # type: ignore[override]
        data = bytes(b)
        if self.meter is not None:
            self.meter.produce(len(data))
        self.dst.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def decompress_to(
    src: BinaryIO,
    dst: BinaryIO,
    progress: Callable[[int], None] | None = None,
    limits: ExpansionLimits | None = DEFAULT_LIMITS,
) -> tuple[str, int, str]:
    """Copy layer `src` (detected by magic) into `dst` uncompressed.

    Returns (sha256 hex of the tar = diff_id, tar size, "gzip" | "zstd" | "tar"). `progress` gets
    the compressed bytes consumed. A layer expanding past `limits` (None: no caps; the ratio is
    taken against `src`'s size when it is seekable) is an `ExpansionLimitError`, raised before
    the piece that would pass the cap is written.
    """
    meter = ExpansionMeter(limits, remaining_size(src))
    out = _HashWriter(dst, meter)
    first = src.read(PIECE)
    kind = detect_compression(first[:4]) or "tar"

    def consumed(n: int) -> None:  # before the bytes are expanded, so the ratio sees them
        meter.consumed(n)
        if progress is not None:
            progress(n)

    if kind == "gzip":
        _gunzip(src, first, out, consumed)
    elif kind == "zstd":
        _unzstd(src, first, out, consumed)
    else:
        data = first
        while data:
            consumed(len(data))
            out.write(data)
            data = src.read(PIECE)
    dst.flush()
    return out.hash.hexdigest(), out.size, kind


def _gunzip(src: BinaryIO, first: bytes, out: _HashWriter, progress: Callable[[int], None]) -> None:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = first
    while data:
        progress(len(data))
        buf = data
        while buf:
            if d.eof:  # after a member: zero padding, or the next member
                rest = buf.lstrip(b"\0")
                if not rest:
                    break
                if not (rest.startswith(GZIP_MAGIC) or GZIP_MAGIC.startswith(rest)):
                    raise FormatError("corrupt gzip layer: junk after the end of the gzip stream")
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                buf = rest
            try:
                out.write(d.decompress(buf, _GZIP_OUT))
            except zlib.error as e:
                raise FormatError(f"corrupt gzip layer: {e}") from None
            buf = d.unused_data if d.eof else d.unconsumed_tail
        data = src.read(PIECE)
    if not d.eof:
        raise FormatError("truncated gzip layer: the stream ends before its end-of-stream marker")


def _unzstd(src: BinaryIO, first: bytes, out: _HashWriter, progress: Callable[[int], None]) -> None:
    d = zstandard.ZstdDecompressor().decompressobj()
    data = first
    while data:
        progress(len(data))
        for pos in range(0, len(data), _ZSTD_FEED):
            buf = data[pos:pos + _ZSTD_FEED]
            while buf:
                if d.eof:  # the next frame
                    d = zstandard.ZstdDecompressor().decompressobj()
                try:
                    out.write(d.decompress(buf))
                except zstandard.ZstdError as e:
                    raise FormatError(f"corrupt zstd layer: {e}") from None
                buf = d.unused_data if d.eof else b""
        data = src.read(PIECE)
    if not d.eof:
        raise FormatError("truncated zstd layer: the last frame is incomplete")


# -- the bootstrap layer --------------------------------------------------------------------------


def write_bootstrap_layer(boot: BinaryIO, boot_size: int, dst: BinaryIO) -> tuple[str, int, str]:
    """Write the bootstrap layer (gzip tar with `image/image.boot`) into `dst`.

    Returns (sha256 hex of the gzip = layer digest, its size, sha256 hex of the tar = diff_id).
    """
    outer = _HashWriter(dst)
    with gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0) as gz:
        inner = _HashWriter(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            d = tarfile.TarInfo("image")
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
            f = tarfile.TarInfo(BOOTSTRAP_NAME)
            f.size, f.mode = boot_size, 0o644
            tar.addfile(f, boot)
    dst.flush()
    return outer.hash.hexdigest(), outer.size, inner.hash.hexdigest()

