"""What `plan_v5` and `plan_v6` both check in a build tree, and the path helpers they share,
so the two writers differ only where the formats do."""

from collections.abc import Mapping

from ..rafs import layout_v5, layout_v6
from ..rafs.constants import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from ..rafs.errors import FormatError
from .options import BuildOptions
from .tree import ChunkedData, FileData, Inode

MAX_NAME = min(layout_v5.MAX_NAME, layout_v6.MAX_NAME)
MAX_SYMLINK = 4095  # PATH_MAX - 1: longer targets cannot be read back by the kernel


def check_root(root_is_dir: bool, opts: BuildOptions) -> int:
    """The chunk size to plan with; ValueError for a bad one, FormatError for a bad root."""
    cs = opts.chunk_size
    if cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ValueError(
            f"chunk size {cs:#x} must be a power of two in [{MIN_CHUNK_SIZE:#x}, {MAX_CHUNK_SIZE:#x}]"
        )
    if not root_is_dir:
        raise FormatError("the root of the tree must be a directory")
    return cs


def check_name(name: object, parent: bytes) -> bytes:
    if not isinstance(name, bytes):
        raise FormatError(f"{parent!r}: entry name {name!r} is not bytes")
    if not name or len(name) > MAX_NAME or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FormatError(
            f"{parent!r}: invalid entry name {name!r} (1..255 bytes, no '/' or NUL, not . or ..)"
        )
    return name


def join(parent: bytes, name: bytes) -> bytes:
    return (parent if parent.endswith(b"/") else parent + b"/") + name


def check_attrs(path: bytes, node: Inode) -> None:
    """Owner and mtime fit both formats' fields."""
    for label, v, hi in (
        ("uid", node.uid, 0xFFFF_FFFF),
        ("gid", node.gid, 0xFFFF_FFFF),
        ("mtime", node.mtime, (1 << 64) - 1),
        ("mtime_nsec", node.mtime_nsec, 999_999_999),
    ):
        if not isinstance(v, int) or not 0 <= v <= hi:
            raise FormatError(f"{path!r}: {label} {v!r} out of range")


def symlink_size(path: bytes, node: Inode) -> int:
    target = node.symlink
    if not isinstance(target, bytes) or not 0 < len(target) <= MAX_SYMLINK or b"\0" in target:
        raise FormatError(f"{path!r}: symlink target must be 1..{MAX_SYMLINK} bytes without NUL")
    return len(target)


def file_size(path: bytes, node: Inode, limit: int | None = None) -> int:
    """A regular file's size, its data checked to be of a kind the writers know."""
    data = node.data
    if data is not None and not isinstance(data, FileData | ChunkedData):
        raise FormatError(f"{path!r}: file data of unknown kind {type(data).__name__}")
    size = 0 if data is None else data.size
    if not isinstance(size, int) or size < 0 or (limit is not None and size >= limit):
        raise FormatError(f"{path!r}: bad file size {size!r}")
    return size


def prefetch_path(raw: bytes | str, chosen: list[bytes]) -> tuple[bytes, list[bytes]] | str:
    """(normalised path, components) of a prefetch path, or why it is dropped: "relative", or
    "covered" by one of the `chosen` ones before it (nydus drops both and goes on)."""
    p = raw.encode() if isinstance(raw, str) else bytes(raw)
    if not p.startswith(b"/"):
        return "relative"
    parts = [c for c in p.split(b"/") if c and c != b"."]
    norm = b"/" + b"/".join(parts)
    if any(norm == c or norm.startswith(c.rstrip(b"/") + b"/") for c in chosen):
        return "covered"
    return norm, parts


def match_pattern(path: bytes, patterns: Mapping[bytes, int]) -> int | None:
    """Index of the prefetch pattern `path` is, or lies under; None when none covers it."""
    p = path
    while True:
        idx = patterns.get(p)
        if idx is not None:
            return idx
        if p == b"/":
            return None
        p = p.rsplit(b"/", 1)[0] or b"/"
