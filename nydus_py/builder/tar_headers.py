"""The plain tar headers of a layer read without `tarfile`'s per-field decoding.

`tarfile.TarFile.next` costs about 16 us per member here (half of it the header checksum, summed
as two 504-item tuples), which for a layer of many small files is most of its parse. Most
members of a layer are plain: one ustar/GNU header of a built-in type, octal numbers, a right
unsigned checksum, no pax or GNU extension headers before them and no global pax header in the
archive. `plain_next` reads exactly those and builds the `TarInfo` that `tarfile` would (the same
fields, decoded the same way); anything else (extension headers, base-256 or odd numbers, a
signed or bad checksum, the end of the archive, a short read) is left to `tarfile.next` at the
same offset, so what is accepted, refused or reported is tarfile's own.
"""

import tarfile
from typing import Any

# built-in member types that take no extension processing (tarfile's _proc_builtin)
_PLAIN_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                          tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE))
_REGULAR = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE))
_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(_BLOCK)


def _octal(field: bytes) -> int:
    """tarfile's `nti` for an octal field (ValueError where it would differ or refuse)."""
    if field[0] in (0o200, 0o377):
        raise ValueError("base-256 number")
    end = field.find(b"\0")
    if end != -1:
        field = field[:end]
    return int(field.decode("ascii").strip() or "0", 8)  # (UnicodeDecodeError is a ValueError)


def plain_next(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    """The next member of `tar` if its header is plain (see the module docstring), as
    `tar.next()` would return it, with `tar.offset` moved past its data; None to leave this
    member to `tar.next()` (nothing consumed that it would not read again)."""
    if getattr(tar, "firstmember", None) is not None or tar.pax_headers:  # (global pax headers amend every member)
        return None
    fileobj: Any = tar.fileobj
    off = tar.offset
    if off != fileobj.tell():  # as tar.next(): the previous member's data must be there
        if off == 0:
            return None
        fileobj.seek(off - 1)
        if not fileobj.read(1):
            raise tarfile.ReadError("unexpected end of data")
    buf = fileobj.read(_BLOCK)
    try:
        member = _parse(buf, tar.encoding, tar.errors)
    except ValueError:
        member = None
    if member is None:
        fileobj.seek(off)  # tar.next() reads this header again
        return None
    member.offset = off
    member.offset_data = off + _BLOCK
    tar.offset = off + _BLOCK + (-(-member.size // _BLOCK) * _BLOCK if member.type in _REGULAR else 0)
    return member


def _parse(buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo | None:
    """tarfile's `TarInfo.frombuf` for a plain header; None (or ValueError) for any other."""
    if len(buf) != _BLOCK or buf == _ZEROS:
        return None
    kind = buf[156:157]
    if kind not in _PLAIN_TYPES:
        return None
    chksum = _octal(buf[148:156])
    if chksum != 256 + sum(buf) - sum(buf[148:156]):  # (a signed checksum: tarfile decides)
        return None
    nts = tarfile.nts  # type: ignore[attr-defined]
    m = tarfile.TarInfo()
    name = nts(buf[0:100], encoding, errors)
    m.mode = _octal(buf[100:108])
    m.uid = _octal(buf[108:116])
    m.gid = _octal(buf[116:124])
    m.size = _octal(buf[124:136])
    m.mtime = _octal(buf[136:148])
    m.chksum = chksum
    m.linkname = nts(buf[157:257], encoding, errors)
    m.uname = nts(buf[265:297], encoding, errors)
    m.gname = nts(buf[297:329], encoding, errors)
    m.devmajor = _octal(buf[329:337])
    m.devminor = _octal(buf[337:345])
    prefix = nts(buf[345:500], encoding, errors)
    if kind == tarfile.AREGTYPE and name.endswith("/"):  # old V7 form of a directory
        kind = tarfile.DIRTYPE
    m.type = kind
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    if prefix:  # (no plain type is a GNU one)
        name = prefix + "/" + name
        if kind == tarfile.DIRTYPE:  # (as tarfile's _proc_builtin does after the join)
            name = name.rstrip("/")
    m.name = name
    return m
