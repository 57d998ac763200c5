"""vhost-user-fs: serve FUSE filesystems to virtual machines over virtio-fs.

`messages` (wire codec), `backend` (protocol state machine), `virtqueue` (split rings over guest
memory), `server` (socket loop + queue workers), `virtiofs` (FUSE on top).
"""

from .backend import Backend
from .messages import VhostUserError
from .server import VhostUserServer
from .virtiofs import fuse_request_handler, virtiofs_server

__all__ = ["Backend", "VhostUserError", "VhostUserServer", "fuse_request_handler", "virtiofs_server"]
