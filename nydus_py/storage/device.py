"""File reads over chunks: the layer between a filesystem and a blob backend.

Maps a file range to chunks (through the image), loads each chunk once through the chunk cache,
decodes and validates it, and assembles the bytes. Digest failures surface as DigestMismatch so
the filesystem can answer EIO and never hand out wrong bytes.

Random readers without digest validation, once the in-memory chunk cache is full (so a chunk
would likely be evicted before its neighbours are read), decode only the head of a chunk they
need: a 4 KiB read at offset k of a 1 MiB zstd chunk decodes about k bytes, not 1 MiB, and the
cache keeps that prefix (smaller entries: more chunks fit). While the cache has room, chunks
are decoded whole, as neighbours will hit them. A second miss in the same
chunk decodes all of it, so a chunk never costs more than prefix + whole, and a reader that
enters a chunk at its start (any sequential reader) decodes it whole at once. With validation
on, every chunk is decoded whole and checked once; the cache remembers the checked bytes.
"""

import errno
import logging
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Protocol, runtime_checkable

from ..fuse.iovec import split, trim
from ..rafs.chunkdata import BlobSource, decode_chunk, decode_chunk_prefix
from ..rafs.errors import FormatError
from ..rafs.model import BlobInfo, ChunkFlags, ChunkInfo, RafsImage
from .cache.chunk_cache import ChunkCache
from .warm import WarmStore

log = logging.getLogger(__name__)

# a partial decode stops at the needed end rounded up to this (zstd decodes whole blocks of up
# to 128 KiB anyway; the next read just past the end should hit)
PARTIAL_STEP = 128 << 10
# Without a blob cache, the runs of a file's chunks stored uncompressed in a local blob are kept
# per window of RAW_WINDOW chunks, for at most RAW_WINDOWS windows (oldest out first): a
# sequential reader of a big file then maps each READ to its preadv in a bisect instead of
# decoding and checking the chunk records again (about 5 us of Python per chunk per READ).
RAW_WINDOW = 64
RAW_WINDOWS = 256
# a file's bytes whose chunks a directory-aware read-around looks at (its budget is far smaller)
AROUND_FILE_BYTES = 8 << 20
# (inode, size) of the regular files after the one being read in its directory, in order
Siblings = Callable[[], Iterable[tuple[int, int]]]
# chunk flags whose stored bytes are not the file's bytes
_NOT_RAW = int(ChunkFlags.COMPRESSED | ChunkFlags.ENCRYPTED)

# (file offset, end, blob index, blob offset) of bytes stored as they are, contiguous in one blob
_Run = tuple[int, int, int, int]


@runtime_checkable
class ChunkSource(Protocol):
    """A source that hands out decoded, validated chunks itself (the persistent blob cache).

    `extra` are chunks the reader will probably want next (read amplification): fetched along
    when that is cheap, not returned. `follow(c)` yields the chunks stored after `c` in its
    blob (of any file), for amplification across files; `follow_late` opens that window one
    sequential miss later. `table(blob)` lists all the blob's chunks in blob order (for
    adaptive fetching: a blob read densely streams what is missing of it). `around(c)` yields
    the chunks of the files after the one being read in its directory, in directory order (`c`:
    the last chunk claimed), for directory-aware read-around of a random miss.
    """

    def read_chunks(self, blob: BlobInfo, chunks: Sequence[ChunkInfo], extra: Sequence[ChunkInfo] = (),
                    prefetch: bool = False,
                    follow: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None,
                    follow_late: bool = False,
                    table: Callable[[BlobInfo], Iterable[ChunkInfo]] | None = None,
                    around: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None) -> list[bytes]:
        """Decoded bytes of `chunks`, all of `blob`; OSError(EIO) or FormatError, never wrong bytes."""


class BlobDevice:
    def __init__(self, image: RafsImage, source: BlobSource | ChunkSource, *, validate: bool = True,
                 cache: ChunkCache | None = None, amplify_io: int = 0) -> None:
        self.image = image
        self.source = source
        self.validate = validate
        self.cache = cache or ChunkCache()
        self.amplify_io = max(0, amplify_io)
        self.read_errors = 0
        self.bytes_read = 0
        # READs answered by preadv from the blob cache's data file into the caller's buffers, and
        # those that tried and fell back to the decoded-chunk copy (a chunk not ready, a hole,
        # a chunk not in the cache's layout, the bytes not in the page cache with `nowait`)
        self.direct_reads = 0
        self.direct_fallbacks = 0
        # chunk loads from the plain backend (misses of the chunk cache), how many of them
        # decoded only a prefix, and the uncompressed bytes they produced: the decode work
        self.chunk_loads = 0
        self.partial_loads = 0
        self.decoded_bytes = 0
        self.warmed = WarmStore()  # small files decoded right after their LOOKUP (`warm`)
        self.released_chunks = 0  # dropped from the chunk cache behind sequential readers
        self._stats_lock = threading.Lock()
        # the chunks of the last range asked for: a READ asks `range_ready` (read_waits), then
        # reads (a nowait try, maybe a blocking one): one decode of its chunk records, not three.
        # One tuple, replaced whole (a reader compares its key, so threads never mix ranges).
        self._last_chunks: tuple[int, int, int, list[ChunkInfo]] = (-1, 0, 0, [])
        self._chunked = source if isinstance(source, ChunkSource) else None
        ready = getattr(self._chunked, "chunks_ready", None)  # (range_ready's bitmap lookup)
        self._chunks_ready: Callable[[BlobInfo, Sequence[ChunkInfo]], bool] | None = ready if callable(ready) else None
        # the blob cache's preadv into caller buffers: not with validation on (every cached read
        # is digest-checked there, which needs the bytes in our hands first)
        ready_into = getattr(self._chunked, "read_ready_into", None)
        self._ready_into: Callable[..., bool] | None = (
            ready_into if callable(ready_into) and not getattr(self._chunked, "validate", True) else None)
        # without a blob cache, and with validation off: chunks stored uncompressed are preadv'ed
        # from the backend's local blob file (localfs) straight into the caller's buffers
        raw_into = getattr(source, "preadv_into", None) if self._chunked is None and not validate else None
        self._raw_into: Callable[..., bool] | None = raw_into if callable(raw_into) else None
        # (ino, window) -> (run starts, runs) for `_raw_pieces`; images do not change
        self._raw_windows: dict[tuple[int, int], tuple[list[int], list[_Run]]] = {}
        self._raw_lock = threading.Lock()
        if callable(ready_into) and self._ready_into is None:
            log.info("blob cache digest validation is on: cached READs are checked and copied, not read "
                     "straight into the caller's buffers")
        # the blob's following chunks, for amplification across files (v6 chunk table)
        self._follow: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = (
            getattr(image, "chunks_after", None) if self.amplify_io else None)
        blob_chunks = getattr(image, "blob_chunks", None)
        self._table: Callable[[BlobInfo], Iterable[ChunkInfo]] | None = (
            (lambda b: blob_chunks(b.index, 0, b.uncompressed_size) if b.uncompressed_size > 0 else [])
            if callable(blob_chunks) else None)

    def load_chunk(self, chunk: ChunkInfo) -> bytes:
        return self._load([chunk])[0]

    def _load(self, chunks: list[ChunkInfo], extra: Sequence[ChunkInfo] = (),
              spans: Sequence[tuple[int, int]] | None = None, siblings: Siblings | None = None) -> list[bytes]:
        """Decoded chunks: through the ChunkSource (the blob cache), else once each through the
        in-memory chunk cache from the plain backend. `spans[k]`: the range [lo, hi) of chunk
        k the reader needs (chunk-relative); without validation only that much is promised,
        and the result may be a prefix of the chunk covering it; a chunk a span takes whole is
        handed over, not kept in the chunk cache. Without `spans`, whole chunks, kept.
        `siblings`: the files after this one in its directory (`read`), for the blob cache."""
        if self._chunked is not None:
            return self._load_chunks(chunks, extra, around=None if siblings is None else self._around(siblings))
        get = self.cache.get
        if spans is None:
            return [get(_key(c), partial(self._fetch, c, c.uncompressed_size), c.uncompressed_size) for c in chunks]
        if self.validate:
            return [get(_key(c), partial(self._fetch, c, c.uncompressed_size), c.uncompressed_size,
                        lo > 0 or hi < c.uncompressed_size) for c, (lo, hi) in zip(chunks, spans, strict=True)]
        out: list[bytes] = []
        for c, (lo, hi) in zip(chunks, spans, strict=True):
            key = _key(c)
            size = c.uncompressed_size
            if lo <= 0 and hi >= size:
                # One read takes the whole chunk (a small file read at once): the kernel's page
                # cache holds these bytes now, so the chunk is not kept. Kept, every such chunk
                # was fresh memory: a page fault per 4 KiB decoded (9.5k for 35 MB of small
                # files, 6% of the daemon's CPU) until the cache's budget was full.
                out.append(get(key, partial(self._fetch, c, size), size, False))
                continue
            if lo <= 0 or hi >= size:
                want = size  # entered at its start (a sequential reader), or needed to its end
            elif self.cache.peek(key) is not None:
                want = size  # a second miss in this chunk: decode it whole once, not in steps
            elif self.cache.size + size <= self.cache.capacity:
                want = size  # room to keep it whole without evicting: neighbours will hit
            else:
                want = min(size, -(-hi // PARTIAL_STEP) * PARTIAL_STEP)
            out.append(get(key, partial(self._fetch, c, want), min(hi, size)))
        return out

    def _fetch(self, chunk: ChunkInfo, want: int) -> bytes:
        """Chunk `chunk` decoded (and validated, when on) through its first `want` bytes, or whole."""
        blobs = self.image.blobs
        if not 0 <= chunk.blob_index < len(blobs):
            raise FormatError(f"chunk refers to blob index {chunk.blob_index}, image has {len(blobs)}")
        blob = blobs[chunk.blob_index]
        whole = self.validate or want >= chunk.uncompressed_size
        try:
            # an uncompressed chunk's prefix is a shorter read of the backend
            n = chunk.compressed_size if whole or chunk.compressed else want
            raw = self.source.read(blob, chunk.compressed_offset, n)  # type: ignore[union-attr]
            data = (decode_chunk(raw, chunk, blob, self.validate) if whole
                    else decode_chunk_prefix(raw, chunk, blob, want))
        except (FormatError, OSError) as e:
            with self._stats_lock:
                self.read_errors += 1
            log.error("blob %s chunk at offset %d (size %d): %s", blob.blob_id, chunk.compressed_offset,
                      chunk.compressed_size, e)
            raise
        with self._stats_lock:
            self.chunk_loads += 1
            self.partial_loads += len(data) < chunk.uncompressed_size
            self.decoded_bytes += len(data)
        return data

    def _chunks(self, ino: int, offset: int, size: int) -> list[ChunkInfo]:
        """`image.chunks(ino, offset, size)` (clipped to the file by the image), the last
        range's answer again when it is asked twice in a row. Callers never change the list."""
        last = self._last_chunks
        if last[0] == ino and last[1] == offset and last[2] == size:
            return last[3]
        chunks = self.image.chunks(ino, offset, size)
        self._last_chunks = (ino, offset, size, chunks)
        return chunks

    def read(self, ino: int, offset: int, size: int, file_size: int | None = None,
             siblings: Siblings | None = None) -> bytes | memoryview:
        """Bytes [offset, offset+size) of regular file `ino`, clipped to its size; holes are zeros.
        `siblings()`: (inode, size) of the regular files after `ino` in its directory, in
        order, for a blob cache's directory-aware read-around (called only on a random miss)."""
        if file_size is None:
            file_size = self.image.getattr(ino).size
        end = min(file_size, offset + size)
        if offset >= end:
            return b""
        if self._ready_into is not None:
            # ready in the blob cache: exactly the range, by one preadv per run, not each chunk
            # read whole from the data file (a 4 KiB random READ read and copied its 1 MiB chunk:
            # 2.4x the time of decoding chunks from a local blob into the chunk cache)
            buf = bytearray(end - offset)
            if self.read_ready_into(ino, offset, end - offset, file_size, [memoryview(buf)]) == end - offset:
                return memoryview(buf)
        chunks = self._chunks(ino, offset, size)
        extra = (self.image.chunks(ino, end, self.amplify_io)
                 if self._chunked is not None and self.amplify_io and end < file_size else [])
        spans = [(offset - c.file_offset, end - c.file_offset) for c in chunks]
        out = _assemble(chunks, self._load(chunks, extra, spans, siblings), offset, end)
        with self._stats_lock:
            self.bytes_read += len(out)
        return out

    def _around(self, siblings: Siblings) -> Callable[[ChunkInfo], Iterator[ChunkInfo]]:
        """`around` for the blob cache: the chunks of the files `siblings()` lists, file by
        file, decoded only as far as the blob cache takes them (it stops at the first that does
        not continue the blob). The first AROUND_FILE_BYTES of each file at most: a guess's
        budget is a few hundred KiB."""
        def around(_last: ChunkInfo) -> Iterator[ChunkInfo]:
            for ino, size in siblings():
                if size > 0:
                    yield from self.image.chunks(ino, 0, min(size, AROUND_FILE_BYTES))
        return around

    def read_whole(self, ino: int, file_size: int, siblings: Siblings | None = None) -> bytes | memoryview:
        """All of file `ino` (`file_size` bytes): `read(ino, 0, file_size)`, or what `warm`
        read for it, with a shortcut for what a cold small file's one READ asks (no blob cache,
        the file in one chunk): that chunk through the chunk cache as `_load` takes a chunk read
        whole (decoded, handed over, not kept; concurrent readers share one load), without the
        per-range lists, the `functools.partial` and the assembly. Per small file that is a few
        Python calls and objects fewer, which on a CPU whose caches the client and the kernel
        just went through count double."""
        if 0 < file_size <= self.image.chunk_size:
            data = self.take_warmed(ino, file_size)
            if data is not None and len(data) == file_size:
                return data
            if self._chunked is None:
                c = self._whole_chunk(ino, file_size)
                if c is not None:
                    data = self.cache.get(_key(c), lambda: self._fetch(c, file_size), file_size, False)
                    with self._stats_lock:
                        self.bytes_read += file_size
                    return data if len(data) == file_size else memoryview(data)[:file_size]
        return self.read(ino, 0, file_size, file_size, siblings)

    def take_warmed(self, ino: int, room: int) -> bytes | memoryview | None:
        """All of file `ino` as `warm` read it, for a READ of at most `room` bytes from its
        start (None: not kept, or larger than `room`). (An empty store costs one check.)"""
        data = self.warmed.take(ino, room)
        if data is not None:
            with self._stats_lock:
                self.bytes_read += len(data)
        return data

    def _whole_chunk(self, ino: int, file_size: int) -> ChunkInfo | None:
        """The one chunk that holds all of file `ino`, if one does."""
        chunks = self.image.chunks(ino, 0, file_size)
        if len(chunks) == 1:
            c = chunks[0]
            if c.file_offset == 0 and c.uncompressed_size == file_size:
                return c
        return None

    def warm(self, ino: int, file_size: int) -> bool:
        """Read all of small file `ino` for the `read_whole` that likely follows, and keep it
        for that one READ (`WarmStore`), when that needs no waiting: without a blob cache, a
        file in one chunk of a local blob (decoded); with one, a file whose chunks are all
        ready in it. Called right after the file's LOOKUP reply, while the process that asked
        wakes up, so the READ's reply costs a dict pop instead of the chunk lookup and the
        decode (or the cache read). Whether it did."""
        if not 0 < file_size <= self.image.chunk_size:
            return False
        if self._chunked is not None:
            if not self.range_ready(ino, 0, file_size):
                return False
            data = self.read(ino, 0, file_size, file_size)
            if len(data) != file_size:
                return False
            # a view may hold a larger buffer alive (a chunk the file is a part of): keep a copy
            self.warmed.put(ino, bytes(data) if isinstance(data, memoryview) else data)
            return True
        if not self.local:
            return False
        c = self._whole_chunk(ino, file_size)
        if c is None:
            return False
        self.warmed.put(ino, self.cache.get(_key(c), lambda: self._fetch(c, file_size), file_size, False))
        return True

    def holds(self, chunk: ChunkInfo) -> bool:
        """Whether `chunk` is decoded in the in-memory chunk cache now (a cheap check; False
        with a blob cache, whose readiness costs a read)."""
        if self._chunked is not None:
            return False
        return self.cache.peek(_key(chunk), chunk.uncompressed_size) is not None

    def loading(self, chunk: ChunkInfo) -> bool:
        """Whether a reader is loading `chunk` into the in-memory chunk cache right now (False
        with a blob cache)."""
        return self._chunked is None and self.cache.loading(_key(chunk))

    def release(self, chunk: ChunkInfo) -> bool:
        """Drop `chunk` from the in-memory chunk cache (a sequential reader has passed it, the
        kernel's page cache holds its bytes now): the memory goes to the next chunks, whose
        decode then writes pages already mapped (fresh pages cost about a third of a 1 MiB
        zstd decode in page faults). No-op with a blob cache. Whether it was held."""
        if self._chunked is not None or not self.cache.discard(_key(chunk)):
            return False
        with self._stats_lock:
            self.released_chunks += 1
        return True

    def read_cached(self, ino: int, offset: int, size: int, file_size: int) -> bytes | memoryview | None:
        """Like `read`, from the caches alone (chunks held in memory, or ready in the blob
        cache): never waits for the backend; None when a chunk is not at hand."""
        end = min(file_size, offset + size)
        if offset >= end:
            return b""
        chunks = self._chunks(ino, offset, size)
        datas = self._peek(chunks, end)
        if datas is None:
            return None
        out = _assemble(chunks, datas, offset, end)
        with self._stats_lock:
            self.bytes_read += len(out)
        return out

    def range_ready(self, ino: int, offset: int, size: int) -> bool:
        """Whether a read of [offset, +size) of file `ino` would be answered from local data now,
        without waiting for the backend: every chunk of the range ready in the blob cache (its
        chunk-map bits, `chunks_ready`) or, without a blob cache, held in the in-memory chunk
        cache (far enough for the read). A cheap hint asked before a READ (no per-chunk object
        beyond the range's own, no file read): a chunk being fetched is not ready until stored;
        one evicted between this answer and the read is fetched by that read all the same."""
        end = offset + size
        chunks = self._chunks(ino, offset, size)
        if self._chunked is None:
            peek = self.cache.peek
            return all(peek(_key(c), min(c.uncompressed_size, end - c.file_offset)) is not None for c in chunks)
        ready = self._chunks_ready
        if ready is None:
            return False
        blobs = self.image.blobs
        for c in chunks:
            if not 0 <= c.blob_index < len(blobs) or not ready(blobs[c.blob_index], (c,)):
                return False
        return True

    @property
    def dir_aware(self) -> bool:
        """Whether reads take the following files of their directory along (a blob cache with
        `dir_around`): the filesystem then tells `read` a file's siblings."""
        return self._chunked is not None and getattr(self._chunked, "dir_around", 0) > 0

    @property
    def local(self) -> bool:
        """Whether a read waits on a local disk at most: a local backend without a blob cache
        (whose fills write and sync files). Transports answer such READs without a hand-off."""
        return self._chunked is None and bool(getattr(self.source, "local", False))

    @property
    def direct(self) -> bool:
        """Whether `read_ready_into` can answer (a blob cache without digest validation, or a
        local backend's uncompressed chunks without it)."""
        return self._ready_into is not None or self._raw_into is not None

    @property
    def raw_direct(self) -> bool:
        """Whether `read_ready_into` reads the backend's own blob files (no blob cache): the
        host's page cache is the cache then, and readahead into the chunk cache is wasted."""
        return self._ready_into is None and self._raw_into is not None

    def read_ready_into(self, ino: int, offset: int, size: int, file_size: int, bufs: list[memoryview],
                        nowait: bool = False) -> int:
        """Bytes [offset, offset+size) of file `ino`, clipped to its size, read by preadv from the
        blob cache's data files straight into `bufs` (exactly `size` bytes), one preadv per run of
        chunks contiguous in one data file: no copy in Python. -1 when any chunk is not ready
        (or the range has a hole): the caller takes the decoded-chunk path, which overwrites
        whatever landed in `bufs`. `nowait`: BlockingIOError when the bytes are not in the
        page cache. Without a blob cache (`raw_direct`), the same from the local backend's
        blob files for chunks stored uncompressed (-1 for a compressed one)."""
        end = min(file_size, offset + size)
        if offset >= end:
            return 0
        direct = self._ready_into
        if direct is None:
            return -1 if self._raw_into is None else self._raw_read_into(ino, offset, end, size, file_size, bufs, nowait)
        blobs = self.image.blobs
        # runs: (blob index, data file offset, length, chunks), contiguous in file and data file
        runs: list[tuple[int, int, int, list[ChunkInfo]]] = []
        pos = offset
        for c in self._chunks(ino, offset, size):
            lo = max(pos, c.file_offset)
            hi = min(end, c.file_offset + c.uncompressed_size)
            if hi <= lo:
                continue
            if lo != pos or not 0 <= c.blob_index < len(blobs):
                return self._fallback()  # a hole (zeros), out of order, or a bad blob index
            at = c.uncompressed_offset + lo - c.file_offset
            if runs and runs[-1][0] == c.blob_index and runs[-1][1] + runs[-1][2] == at:
                b, o, n, cs = runs[-1]
                cs.append(c)
                runs[-1] = (b, o, n + hi - lo, cs)
            else:
                runs.append((c.blob_index, at, hi - lo, [c]))
            pos = hi
        if pos != end:
            return self._fallback()
        return self._read_pieces(end - offset, size, bufs, [n for _b, _o, n, _cs in runs],
                                 lambda i, v: direct(blobs[runs[i][0]], runs[i][3], runs[i][1], v, runs[i][2], nowait))

    def _raw_read_into(self, ino: int, offset: int, end: int, size: int, file_size: int, bufs: list[memoryview],
                       nowait: bool) -> int:
        """read_ready_into without a blob cache: preadv from the local backend's blob files,
        one per piece of the range contiguous in one blob; -1 when a chunk of the range is
        not stored as it is (compressed, encrypted, a hole)."""
        pieces = self._raw_pieces(ino, offset, end, file_size)
        if pieces is None:
            return self._fallback()
        raw = self._raw_into
        assert raw is not None
        blobs = self.image.blobs
        return self._read_pieces(end - offset, size, bufs, [n for _b, _o, n in pieces],
                                 lambda i, v: raw(blobs[pieces[i][0]], pieces[i][1], v, pieces[i][2], nowait))

    def _read_pieces(self, total: int, size: int, bufs: list[memoryview], lengths: list[int],
                     read_one: Callable[[int, list[memoryview]], bool]) -> int:
        """`total` bytes into `bufs` (`size` bytes), piece i of `lengths` by `read_one(i, views)`;
        -1 (counted as a fallback) when a piece cannot be read that way."""
        if len(lengths) > 1:
            views = split(bufs, lengths)
        else:  # `bufs` are `size` bytes: as they are unless the file ends first
            views = [bufs if total == size else trim(bufs, 0, total, size)]
        try:
            for i, v in enumerate(views):
                if not read_one(i, v):
                    return self._fallback()
        except BlockingIOError:
            self._fallback()
            raise
        with self._stats_lock:
            self.direct_reads += 1
            self.bytes_read += total
        return total

    def _raw_pieces(self, ino: int, offset: int, end: int, file_size: int) -> list[tuple[int, int, int]] | None:
        """(blob index, blob offset, length) pieces of file bytes [offset, end), in order, each
        contiguous in its blob's stored bytes; None when some byte of the range is not stored
        as it is (compressed, encrypted, a hole, a bad blob index)."""
        span = RAW_WINDOW * self.image.chunk_size
        pieces: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            w = pos // span
            starts, runs = self._raw_windows.get((ino, w)) or self._raw_window(ino, w, span, file_size)
            k = bisect_right(starts, pos) - 1
            if k < 0:
                return None
            lo, hi, b, o = runs[k]
            if pos >= hi:
                return None
            stop = min(end, hi)
            at = o + pos - lo
            if pieces and pieces[-1][0] == b and pieces[-1][1] + pieces[-1][2] == at:
                pieces[-1] = (b, pieces[-1][1], pieces[-1][2] + stop - pos)  # (a run cut by the window's end)
            else:
                pieces.append((b, at, stop - pos))
            pos = stop
        return pieces

    def _raw_window(self, ino: int, w: int, span: int, file_size: int) -> tuple[list[int], list[_Run]]:
        """The runs of window `w` (file bytes [w * span, +span)) of file `ino` whose chunks are
        stored as they are in a local blob, merged where contiguous in one blob, and their
        starts; kept unless the file is one chunk (small files are read once: not worth an
        entry). FormatError from a damaged chunk table propagates (nothing is kept)."""
        wlo = w * span
        whi = min(file_size, wlo + span)
        nblobs = len(self.image.blobs)
        starts: list[int] = []
        runs: list[_Run] = []
        for c in self.image.chunks(ino, wlo, whi - wlo):
            lo = max(wlo, c.file_offset)
            hi = min(whi, c.file_offset + c.uncompressed_size)
            if (hi <= lo or int(c.flags) & _NOT_RAW or c.compressed_size != c.uncompressed_size
                    or not 0 <= c.blob_index < nblobs):
                continue  # not the file's bytes as stored: a gap, READs over it take the decoded path
            at = c.compressed_offset + lo - c.file_offset
            if runs:
                rlo, rhi, rb, ro = runs[-1]
                if rhi == lo and rb == c.blob_index and ro + (lo - rlo) == at:
                    runs[-1] = (rlo, hi, rb, ro)
                    continue
            runs.append((lo, hi, c.blob_index, at))
            starts.append(lo)
        got = (starts, runs)
        if file_size > self.image.chunk_size:
            with self._raw_lock:
                cache = self._raw_windows
                if len(cache) >= RAW_WINDOWS:
                    del cache[next(iter(cache))]
                cache[(ino, w)] = got
        return got

    def _fallback(self) -> int:
        with self._stats_lock:
            self.direct_fallbacks += 1
        return -1

    def read_blob(self, blob_index: int, offset: int, size: int, view_size: int, *,
                  cached_only: bool = False) -> bytes | memoryview:
        """Bytes [offset, offset+size) of a blob's uncompressed view, clipped to `view_size`: what
        the kernel EROFS driver reads from the blob's device file. Same chunk machinery as
        `read` (lazy, digest-checked, EIO never wrong bytes); ranges without a chunk are zeros.
        `cached_only`: from the caches alone, OSError(EIO) when a chunk would need the backend."""
        chunks_of = getattr(self.image, "blob_chunks", None)
        if not callable(chunks_of):
            raise FormatError(f"RAFS v{self.image.version} has no blob-wide chunk table; blob views need RAFS v6")
        end = min(view_size, offset + size)
        if offset >= end:
            return b""
        chunks: list[ChunkInfo] = chunks_of(blob_index, offset, end - offset)
        if cached_only:
            datas = self._peek(chunks)
            if datas is None:
                raise OSError(errno.EIO, "not in the cache, and not fetched: this range failed moments ago")
            return _assemble(chunks, datas, offset, end)
        # No blind `extra` here: what follows in the blob is mostly other files. EROFS already
        # asks for the rest of the file being read (its readahead stops at the file's end), in a
        # few READs: the second of them is a sequential miss that should not fetch the next
        # file's chunks, so the cross-file window (`follow`) opens one sequential miss later. A
        # long stream, within a big file or across files, still grows it.
        if self._chunked is not None:
            datas = self._load_chunks(chunks, (), follow_late=True)
        else:
            datas = self._load(chunks)
        out = _assemble(chunks, datas, offset, end)
        with self._stats_lock:
            self.bytes_read += len(out)
        return out

    def _peek(self, chunks: list[ChunkInfo], end: int | None = None) -> list[bytes] | None:
        """Decoded chunks from the blob cache or the in-memory chunk cache, without fetching;
        None when any is missing. A held prefix will do when it covers file bytes up to `end`
        (None: the whole chunk)."""
        blobs = self.image.blobs
        out: list[bytes] = []
        for c in chunks:
            if not 0 <= c.blob_index < len(blobs):
                return None
            if self._chunked is not None:
                cached = getattr(self._chunked, "cached_chunks", None)
                got = cached(blobs[c.blob_index], [c]) if callable(cached) else None
                data = got[0] if got else None
            else:
                need = c.uncompressed_size if end is None else min(c.uncompressed_size, end - c.file_offset)
                data = self.cache.peek(_key(c), need)
            if data is None:
                return None
            out.append(data)
        return out

    def _load_chunks(self, chunks: list[ChunkInfo], extra: Sequence[ChunkInfo] = (), *,
                     follow_late: bool = False,
                     around: Callable[[ChunkInfo], Iterable[ChunkInfo]] | None = None) -> list[bytes]:
        """Decoded chunks through the ChunkSource, one call per blob (so it can merge them)."""
        assert self._chunked is not None
        blobs = self.image.blobs
        out: list[bytes] = [b""] * len(chunks)
        groups: dict[int, list[int]] = {}
        for k, c in enumerate(chunks):
            if not 0 <= c.blob_index < len(blobs):
                raise FormatError(f"chunk refers to blob index {c.blob_index}, image has {len(blobs)}")
            groups.setdefault(c.blob_index, []).append(k)
        for bi, ks in groups.items():
            more = [c for c in extra if c.blob_index == bi]
            try:
                got = self._chunked.read_chunks(blobs[bi], [chunks[k] for k in ks], more, follow=self._follow,
                                                follow_late=follow_late, table=self._table, around=around)
            except (FormatError, OSError) as e:
                with self._stats_lock:
                    self.read_errors += 1
                log.error("blob %s: %s", blobs[bi].blob_id, e)
                raise
            for k, data in zip(ks, got, strict=True):
                out[k] = data
        return out


def _key(c: ChunkInfo) -> tuple[int, int, int, int]:
    return (c.blob_index, c.compressed_offset, c.compressed_size, c.uncompressed_size)


def _assemble(chunks: list[ChunkInfo], datas: list[bytes], offset: int, end: int) -> bytes | memoryview:
    """File bytes [offset, end) from its overlapping chunks; holes stay zero. Within one chunk a
    view, not a copy: the FUSE reply is gathered straight from the decoded chunk. Across chunks
    one join of views (a 1 MiB READ spanning two chunks is one copy, not four)."""
    if len(chunks) == 1:
        c = chunks[0]
        if c.file_offset <= offset and end <= c.file_offset + c.uncompressed_size:
            return memoryview(datas[0])[offset - c.file_offset : end - c.file_offset]
    parts: list[bytes | memoryview] = []
    pos = offset
    for c, data in sorted(zip(chunks, datas, strict=True), key=lambda cd: cd[0].file_offset):
        lo = max(pos, c.file_offset)
        hi = min(end, c.file_offset + c.uncompressed_size)
        if hi <= lo:
            continue
        if lo > pos:
            parts.append(bytes(lo - pos))  # a hole
        parts.append(memoryview(data)[lo - c.file_offset : hi - c.file_offset])
        pos = hi
    if pos < end:
        parts.append(bytes(end - pos))
    return b"".join(parts)
