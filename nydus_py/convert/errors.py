"""The one error type conversion and reference resolution report to users."""


class ConvertError(Exception):
    """A conversion or image lookup cannot go on; the message says why, for a person to read
    (missing image, no matching platform, a layer that does not match its descriptor...)."""
