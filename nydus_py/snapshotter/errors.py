"""The snapshotter's errors, one class per containerd errdefs kind.

containerd maps gRPC status codes back to errdefs (NOT_FOUND -> ErrNotFound, ...), and its
unpacker and metadata layer branch on them: ALREADY_EXISTS from Prepare means "a remote snapshot
for this layer exists", anything else fails the pull. The gRPC layer (service.py) turns `code`
into the status; the core never imports grpc.
"""


class SnapshotError(Exception):
    code = "UNKNOWN"


class NotFound(SnapshotError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotError):
    code = "INVALID_ARGUMENT"


class Unavailable(SnapshotError):
    """The image could not be mounted (daemon down, registry unreachable, bad image)."""

    code = "UNAVAILABLE"
