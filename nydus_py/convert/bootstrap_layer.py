"""The bootstrap out of a Nydus bootstrap layer (a gzip or plain tar with `image/image.boot`).

Apart from `layer` because a daemon mounting an image by reference needs only this: `layer`
brings the builder's sources, zstandard and the expansion limits, ~20 ms of start-up.
"""

import tarfile
import zlib
from typing import BinaryIO

from ..rafs.errors import FormatError
from .oci import BOOTSTRAP_NAME, LEGACY_BOOTSTRAP_NAME

PIECE = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


def extract_bootstrap(layer: BinaryIO, dst: BinaryIO, max_size: int = 1 << 31) -> int:
    """Copy `image/image.boot` (or the legacy top-level `image.boot`) out of a bootstrap layer
    (gzip or plain tar) into `dst`; returns its size. FormatError when it is missing or the
    layer is corrupt."""
    head = layer.read(4)
    layer.seek(0)
    mode = "r|gz" if head.startswith(GZIP_MAGIC) else "r|"
    wanted = (BOOTSTRAP_NAME, LEGACY_BOOTSTRAP_NAME)
    try:
        with tarfile.open(fileobj=layer, mode=mode) as tar:  # type: ignore[call-overload]
            for member in tar:
                name = member.name.lstrip("/")
                while name.startswith("./"):
                    name = name[2:]
                if name not in wanted or not member.isreg():
                    continue
                if member.size > max_size:
                    raise FormatError(f"bootstrap layer: {name} is {member.size} bytes, more than {max_size}")
                f = tar.extractfile(member)
                assert f is not None
                n = 0
                while True:
                    block = f.read(PIECE)
                    if not block:
                        break
                    dst.write(block)
                    n += len(block)
                if n != member.size:
                    raise FormatError(f"bootstrap layer: {name} ends after {n} of {member.size} bytes")
                dst.flush()
                return n
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise FormatError(f"bootstrap layer is not a valid tar.gz: {e}") from None
    raise FormatError(f"bootstrap layer has no {BOOTSTRAP_NAME}")
