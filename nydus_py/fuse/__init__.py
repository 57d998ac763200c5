"""The FUSE wire protocol, sans-IO: `abi` (kernel structs and constants), `api` (the Filesystem a
handler serves), `protocol` (FuseSession: request bytes in, reply bytes out) for /dev/fuse and
virtio-fs transports alike."""

from .api import DEFAULT_WANT, Entry, Filesystem, FuseAttr, FuseError, StatFs, negative_entry
from .protocol import FuseProtocolError, FuseSession

__all__ = [
    "DEFAULT_WANT",
    "Entry",
    "Filesystem",
    "FuseAttr",
    "FuseError",
    "FuseProtocolError",
    "FuseSession",
    "StatFs",
    "negative_entry",
]
