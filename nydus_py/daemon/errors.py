"""Errors of the daemon's control API, one status each, rendered as nydusd's `{code, message}`.

HTTP and gRPC both call the same service methods and map these the same way, so a bad request is
a 4xx on both and a failure inside the daemon a 5xx.
"""

from typing import Any

ERROR_CODE = "UNDEFINED"  # what upstream puts in `code` for every error; clients only log it


class ApiError(Exception):
    status = 500
    kind = "Internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"code": ERROR_CODE, "message": f"{self.kind}: {self.message}"}


class BadRequest(ApiError):
    """Malformed input: bad JSON, missing or ill-typed fields, a bad query, a bad config."""

    status = 400
    kind = "BadRequest"


class UnexpectedEvent(ApiError):
    """A state transition the daemon's state machine does not allow (upstream: 400)."""

    status = 400
    kind = "UnexpectedEvent"


class NotFound(ApiError):
    """An unknown route, mountpoint or metrics id (upstream's NoCounter)."""

    status = 404
    kind = "NotFound"


class Conflict(ApiError):
    """The mountpoint is already in use."""

    status = 409
    kind = "AlreadyExists"


class InternalError(ApiError):
    status = 500
    kind = "Internal"


class Unsupported(ApiError):
    status = 501
    kind = "Unsupported"


class Timeout(ApiError):
    """An operation (a mount building its instance) did not finish within its deadline."""

    status = 504
    kind = "Timeout"


class NotReady(ApiError):
    status = 503
    kind = "NotReady"
