"""Build settings, mirroring `nydus-image create` flags (defaults as Nydus >= 2.2)."""

from dataclasses import dataclass, field

from ..rafs.constants import DEFAULT_CHUNK_SIZE, Compressor, Digester


@dataclass
class BuildOptions:
    fs_version: int = 6
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # `--repeatable` clears EXPLICIT_UID_GID: uid/gid are then reported as the daemon's own.
    repeatable: bool = False
    # Name the new blob explicitly instead of sha256(blob file).
    blob_id: str | None = None
    # `--features blob-toc`: blob.digest array, ToC and tar headers (on by default here, like the
    # nydus-snapshotter converter).
    blob_toc: bool = True
    # Paths (absolute, inside the image) whose inodes go into the prefetch table.
    prefetch_paths: list[bytes] = field(default_factory=list)
    # `--aligned-chunk`: chunks start at 4 KiB-aligned uncompressed offsets. RAFS v5 only; v6 blobs
    # are always aligned (nydus-image forces it there too).
    aligned_chunk: bool = False


@dataclass
class BuildResult:
    bootstrap_path: str
    # id of the blob this build wrote, or None when every chunk was already in an existing blob
    blob_id: str | None
    blob_path: str | None
    blob_ids: list[str]  # the image's whole blob table, in order
    inodes: int
    chunks: int  # distinct chunks written into the new blob
    deduplicated: int  # chunk references satisfied by an earlier identical chunk
    uncompressed_bytes: int
    compressed_bytes: int
