"""nydus_py: a lazy-loading filesystem service for container images (Python peer of nydusd)."""

__version__ = "0.1.0"
