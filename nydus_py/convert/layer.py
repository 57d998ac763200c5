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

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import zstandard
from zlib_ng import gzip_ng, zlib_ng

from ..builder.limits import ExpansionLimits, ExpansionMeter, remaining_size
from ..builder.sources import DEFAULT_LIMITS, GZIP_MAGIC, detect_compression
from ..rafs.errors import FormatError
from .bootstrap_layer import extract_bootstrap as extract_bootstrap  # (re-exported: checker, tests)
from .oci import BOOTSTRAP_NAME

PIECE = 1 << 20
_ZSTD_FEED = 512  # compressed bytes per zstd call: caps one call's output near 16 MiB (RLE blocks); ~1 GB/s
_GZIP_OUT = 256 << 10  # output per inflate call: less held at once (a bigger one is no faster)


class _HashWriter(io.RawIOBase):
    """Writes through to `dst`, hashing (unless `hashing` is off) and counting what passes;
    `meter` may refuse a write."""

    def __init__(self, dst: BinaryIO, meter: ExpansionMeter | None = None, hashing: bool = True) -> None:
        self.dst = dst
        self.hash = hashlib.sha256()
        self.hashing = hashing
        self.size = 0
        self.meter = meter

    def writable(self) -> bool:
        return True

    def write(self, b: "bytes | bytearray | memoryview") -> int:  # type: ignore[override]
        n = len(b)
        if self.meter is not None:
            self.meter.produce(n)
        self.dst.write(b)
        if self.hashing:
            self.hash.update(b)
        self.size += n
        return n


class Inflater:
    """Push-style decompression of one layer: `feed` it the compressed bytes as they arrive (from
    a download, in any piece sizes), then `finish`. The tar goes to `dst`, hashed (the diff_id);
    the compressed bytes are hashed too (the layer digest), and copied to `keep` if given (the
    original layer, when it is pushed as well). Not thread-safe: one feeder at a time.

    Bad data (corrupt, truncated, past the expansion limits) stops the inflating but not the
    hashing: the error is raised by `finish`, so that a caller can first compare the layer digest
    (a registry that sent the wrong bytes is the better message).

    gzip goes through zlib-ng (same format as zlib, about 3x faster to inflate).

    With `diff_id` False the tar is not hashed and `finish` gives "" for its digest: a caller
    that checks no diff_id saves a sha256 pass over the uncompressed bytes (about 0.5 ms per
    MiB, a tenth of a conversion's CPU)."""

    def __init__(self, dst: BinaryIO, limits: ExpansionLimits | None = DEFAULT_LIMITS,
                 compressed_size: int | None = None, keep: BinaryIO | None = None, diff_id: bool = True) -> None:
        self.meter = ExpansionMeter(limits, compressed_size)
        self.out = _HashWriter(dst, self.meter, diff_id)
        self.dst = dst
        self.keep = keep
        self.layer_hash = hashlib.sha256()
        self.layer_size = 0
        self.kind = ""  # gzip | zstd | tar, once the first 4 bytes are in
        self._head = b""
        self._gz: Any = None
        self._zs: Any = None
        self.error: FormatError | None = None

    def feed(self, data: bytes) -> None:
        for _ in self.steps(data):
            pass

    def steps(self, data: bytes) -> Iterator[None]:
        """`feed`, one step per write of output (at most 256 KiB from gzip): a reader that
        inflates as it reads (`converter._InflateSink.pull`) takes only what it needs, so a
        piece that expands a thousandfold (zeros) is not held whole. The compressed piece is
        hashed (and kept) at the first step."""
        self.layer_hash.update(data)
        self.layer_size += len(data)
        if self.keep is not None:
            self.keep.write(data)
        if self.error is not None:
            return
        try:
            yield from self._inflate(data)
        except FormatError as e:
            self.error = e

    def _inflate(self, data: bytes) -> Iterator[None]:
        if not self.kind:
            self._head += data
            if len(self._head) < 4:
                return
            data, self._head = self._head, b""
            self.kind = detect_compression(data[:4]) or "tar"
        self.meter.consumed(len(data))  # before the bytes are expanded, so the ratio sees them
        if self.kind == "gzip":
            yield from self._gunzip(data)
        elif self.kind == "zstd":
            yield from self._unzstd(data)
        else:
            self.out.write(data)
            yield

    def _gunzip(self, buf: bytes) -> Iterator[None]:
        d = self._gz
        if d is None:
            d = self._gz = zlib_ng.decompressobj(16 + zlib_ng.MAX_WBITS)
        while buf:
            if d.eof:  # after a member: zero padding, or the next member
                rest = buf.lstrip(b"\0")
                if not rest:
                    return
                if not (rest.startswith(GZIP_MAGIC) or GZIP_MAGIC.startswith(rest)):
                    raise FormatError("corrupt gzip layer: junk after the end of the gzip stream")
                d = self._gz = zlib_ng.decompressobj(16 + zlib_ng.MAX_WBITS)
                buf = rest
            try:
                out = d.decompress(buf, _GZIP_OUT)
            except zlib_ng.error as e:  # type: ignore[misc]  # (the stub types it as a value)
                raise FormatError(f"corrupt gzip layer: {e}") from None
            buf = d.unused_data if d.eof else d.unconsumed_tail
            if out:
                self.out.write(out)
                yield

    def _unzstd(self, data: bytes) -> Iterator[None]:
        for pos in range(0, len(data), _ZSTD_FEED):
            buf = data[pos:pos + _ZSTD_FEED]
            while buf:
                if self._zs is None or self._zs.eof:  # the (next) frame
                    self._zs = zstandard.ZstdDecompressor().decompressobj()
                try:
                    out = self._zs.decompress(buf)
                except zstandard.ZstdError as e:
                    raise FormatError(f"corrupt zstd layer: {e}") from None
                buf = self._zs.unused_data if self._zs.eof else b""
                if out:
                    self.out.write(out)
                    yield

    def finish(self) -> tuple[str, int, str]:
        """(sha256 hex of the tar = diff_id, "" if not hashed; tar size, kind); the FormatError
        of bad data."""
        if self.error is not None:
            raise self.error
        if not self.kind:  # fewer than 4 bytes in all
            data, self._head = self._head, b""
            self.kind = detect_compression(data) or "tar"
            if data:
                self.meter.consumed(len(data))
                self.out.write(data)
        if self.kind == "gzip" and (self._gz is None or not self._gz.eof):
            raise FormatError("truncated gzip layer: the stream ends before its end-of-stream marker")
        if self.kind == "zstd" and (self._zs is None or not self._zs.eof):
            raise FormatError("truncated zstd layer: the last frame is incomplete")
        self.dst.flush()
        if self.keep is not None:
            self.keep.flush()
        return self.out.hash.hexdigest() if self.out.hashing else "", self.out.size, self.kind


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
    inflater = Inflater(dst, limits, remaining_size(src))
    while data := src.read(PIECE):
        if progress is not None:
            progress(len(data))
        inflater.feed(data)
    return inflater.finish()


# -- the bootstrap layer --------------------------------------------------------------------------


def write_bootstrap_layer(boot: BinaryIO, boot_size: int, dst: BinaryIO) -> tuple[str, int, str]:
    """Write the bootstrap layer (gzip tar with `image/image.boot`) into `dst`.

    Returns (sha256 hex of the gzip = layer digest, its size, sha256 hex of the tar = diff_id).
    """
    outer = _HashWriter(dst)
    # level 6 (as Go's gzip.DefaultCompression, which nydusify uses): 9 costs ~0.7 s on a 1 MiB
    # bootstrap (its tables make deflate's lazy matching crawl) for <1% less size. zlib-ng's
    # deflate: 13 ms instead of 28 on a 1.3 MiB bootstrap (on every conversion's serial tail)
    with gzip_ng.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=6) as gz:
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

