"""The daemon's virtual filesystem: a pseudo root routing sub-trees to mounted filesystems."""

from .vfs import INO_MASK, INO_SHIFT, MAX_INDEX, ROOT_ID, Vfs, VfsError, normalize_path

__all__ = ["INO_MASK", "INO_SHIFT", "MAX_INDEX", "ROOT_ID", "Vfs", "VfsError", "normalize_path"]
