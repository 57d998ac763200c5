"""The persistent blob cache (`blobcache`/`filecache` in nydusd configs)."""

from .blobcache import BlobCacheManager, CacheStats, CompleteData
from .chunk_map import ChunkMap

__all__ = ["BlobCacheManager", "CacheStats", "ChunkMap", "CompleteData"]
