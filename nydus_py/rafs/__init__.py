"""RAFS v5/v6 bootstrap readers (from an mmap, decoded on demand) and chunk decoding."""

from .errors import DigestMismatch, FormatError
from .model import Attr, BlobInfo, ChunkInfo, DirEntry, RafsImage

__all__ = ["Attr", "BlobInfo", "ChunkInfo", "DigestMismatch", "DirEntry", "FormatError", "RafsImage", "open_bootstrap"]


def open_bootstrap(path: str) -> RafsImage:
    """Open a v5 or v6 bootstrap, detected from its magic numbers."""
    from .loader import open_bootstrap as _open

    return _open(path)
