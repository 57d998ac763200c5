"""The one exception a reader or builder raises for bad images or bad sources."""


class FormatError(ValueError):
    """A bootstrap, blob or source archive is not what the RAFS format says it must be.

    Raised for truncated, corrupt or hostile input; the message says what is wrong and where.
    """


class DigestMismatch(FormatError):
    """A chunk's data does not match its recorded digest or CRC (the caller maps this to EIO)."""
