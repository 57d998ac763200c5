"""POSIX ACLs in the kernel's xattr form (sans-IO): what `system.posix_acl_access` and
`system.posix_acl_default` hold on disk (EROFS/RAFS store them verbatim) and what a FUSE server
must answer to GETXATTR once FUSE_POSIX_ACL is negotiated.

The form is `struct posix_acl_xattr_header` (le32 version 2) followed by `struct
posix_acl_xattr_entry` records (le16 tag, le16 perm, le32 id). The kernel's permission check walks
the entries in canonical order (USER_OBJ, USER by id, GROUP_OBJ, GROUP by id, MASK, OTHER), so
`acl_xattr_problem` checks what `posix_acl_valid()` checks: a value that fails it would make every
permission check on the inode fail (EINVAL) or, worse, be evaluated in the wrong order.

`acl_from_text` turns the text form of GNU tar / star PAX records (`SCHILY.acl.access`,
`SCHILY.acl.default`, e.g. "user::rw-,user:1000:r--,group::r--,mask::r--,other::---") into it.
"""

from collections.abc import Callable

from .layout_common import ACL_XATTR_ENTRY as _ENTRY
from .layout_common import ACL_XATTR_HEADER as _HEADER

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
ACL_NAMES = (ACL_ACCESS, ACL_DEFAULT)
NameToId = Callable[[str], int]  # a user or group name to its id (KeyError/ValueError if unknown)

XATTR_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
# canonical position of each tag (posix_acl_valid's state machine)
_RANK = {USER_OBJ: 0, USER: 1, GROUP_OBJ: 2, GROUP: 3, MASK: 4, OTHER: 5}
_TAGS = {"user": (USER_OBJ, USER), "u": (USER_OBJ, USER), "group": (GROUP_OBJ, GROUP), "g": (GROUP_OBJ, GROUP),
         "mask": (MASK, MASK), "m": (MASK, MASK), "other": (OTHER, OTHER), "o": (OTHER, OTHER)}


def acl_entries(value: bytes) -> list[tuple[int, int, int]]:
    """(tag, perm, id) records of an ACL xattr value; ValueError if the framing is wrong."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"{len(value)} bytes is not a header plus whole entries")
    (version,) = _HEADER.unpack_from(value)
    if version != XATTR_VERSION:
        raise ValueError(f"version {version}, not {XATTR_VERSION}")
    return [_ENTRY.unpack_from(value, off) for off in range(_HEADER.size, len(value), _ENTRY.size)]


def acl_xattr_problem(value: bytes) -> str | None:
    """Why the kernel could not use this ACL xattr value (None: it can). An empty ACL (header
    only) is valid: it means "no ACL", as the kernel reads it."""
    try:
        entries = acl_entries(value)
    except ValueError as e:
        return str(e)
    if not entries:
        return None
    seen: list[int] = []
    last: tuple[int, int] = (-1, -1)
    for tag, perm, ident in entries:
        rank = _RANK.get(tag)
        if rank is None:
            return f"unknown tag {tag:#x}"
        if perm & ~7:
            return f"permission bits {perm:#x} outside rwx"
        key = (rank, ident if tag in (USER, GROUP) else 0)
        if key <= last:
            return "entries are not in canonical order (or repeat)"
        last = key
        seen.append(tag)
    for required in (USER_OBJ, GROUP_OBJ, OTHER):
        if seen.count(required) != 1:
            return f"needs exactly one entry of tag {required:#x}"
    if (USER in seen or GROUP in seen) and MASK not in seen:
        return "named user/group entries without a mask entry"
    return None


def acl_to_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    """The xattr value for (tag, perm, id) records, sorted into canonical order."""
    ordered = sorted(entries, key=lambda e: (_RANK[e[0]], e[2] if e[0] in (USER, GROUP) else 0))
    out = [_HEADER.pack(XATTR_VERSION)]
    for tag, perm, ident in ordered:
        out.append(_ENTRY.pack(tag, perm, ident if tag in (USER, GROUP) else UNDEFINED_ID))
    value = b"".join(out)
    problem = acl_xattr_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _perm(text: str) -> int:
    bits = 0
    for ch in text:
        if ch == "r":
            bits |= 4
        elif ch == "w":
            bits |= 2
        elif ch == "x":
            bits |= 1
        elif ch != "-":
            raise ValueError(f"bad permission {text!r}")
    return bits


def acl_from_text(text: str, *, user_id: NameToId | None = None, group_id: NameToId | None = None) -> bytes:
    """The xattr value of an ACL in text form (entries separated by ',' or newlines, '#'
    comments). A qualifier is a numeric id, star's `user:name:perm:id` (the id wins), or a
    name, which only `user_id` / `group_id` can turn into an id: GNU tar writes names, and
    which passwd they belong to (the image's own, the build host's) is the caller's decision.
    Without a resolver a name is a ValueError, as is anything malformed."""
    entries: list[tuple[int, int, int]] = []
    for raw in text.replace("\n", ",").split(","):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (3, 4) or fields[0] not in _TAGS:
            raise ValueError(f"bad ACL entry {item!r}")
        obj_tag, named_tag = _TAGS[fields[0]]
        qual = fields[1]
        if not qual:
            entries.append((obj_tag, _perm(fields[2]), UNDEFINED_ID))
            continue
        if obj_tag in (MASK, OTHER):
            raise ValueError(f"ACL entry {item!r}: mask/other take no qualifier")
        ident = fields[3] if len(fields) == 4 else qual
        if ident.isdigit():
            number = int(ident)
        else:
            resolve = user_id if named_tag == USER else group_id
            if resolve is None:
                raise ValueError(f"ACL entry {item!r}: a name, and no id to resolve it to")
            number = resolve(ident)
        if not 0 <= number < UNDEFINED_ID:
            raise ValueError(f"ACL entry {item!r}: id {number} out of range")
        entries.append((named_tag, _perm(fields[2]), number))
    return acl_to_xattr(entries)
