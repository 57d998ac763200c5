"""`tar_headers.plain_next` reads plain member headers itself and leaves every other header to
tarfile: for each archive here (every tar format, extension headers, odd numbers, signed and bad
checksums, V7 directories, prefix names, truncation) the members, their fields and offsets, and
the errors are the ones tarfile alone gives."""

import io
import tarfile

import pytest

from nydus_py.builder import sources
from nydus_py.builder.sources import SourceStats, tree_from_tar
from nydus_py.builder.tar_headers import plain_next

FIELDS = ("name", "type", "mode", "uid", "gid", "size", "mtime", "chksum", "linkname", "uname", "gname",
          "devmajor", "devminor", "offset", "offset_data", "pax_headers", "sparse")


def _members(data: bytes, plain: bool) -> tuple[list[tuple], int, str]:
    """(fields of each member, the archive's final offset, the error's text or '')."""
    out: list[tuple] = []
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except tarfile.TarError as e:
        return out, 0, f"open: {e}"
    try:
        while True:
            m = (plain_next(tar) if plain else None) or tar.next()
            if m is None:
                break
            out.append(tuple(getattr(m, f) for f in FIELDS) + (m.isreg(), m.isdir()))
    except (tarfile.TarError, ValueError) as e:
        return out, tar.offset, f"{type(e).__name__}: {e}"
    return out, tar.offset, ""


def _tar(fmt: int, members: list[tuple[tarfile.TarInfo, bytes | None]], **kw) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **attrs) -> tarfile.TarInfo:  # type: ignore[no-untyped-def]
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime, ti.mode = kind, size, 1_700_000_000, 0o644
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti


def _common() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    long_dir = "/".join(["d" * 40] * 4)
    return [
        (_info("dir", tarfile.DIRTYPE, mode=0o755), None),
        (_info("dir/a.txt", size=5, uname="root", gname="wheel"), b"hello"),
        (_info("dir/empty"), b""),
        (_info("dir/big", size=1300), b"x" * 1300),
        (_info("dir/link", tarfile.SYMTYPE, linkname="a.txt"), None),
        (_info("dir/hard", tarfile.LNKTYPE, linkname="dir/a.txt"), None),
        (_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (_info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
        (_info("fifo", tarfile.FIFOTYPE), None),
        (_info(long_dir + "/under-a-prefix", size=3), b"abc"),  # ustar: prefix + name
        (_info(long_dir + "/" + "n" * 120, size=2), b"zz"),  # too long: GNU L or pax path
        (_info("caf\xe9/\udcff-not-utf8", size=1), b"c"),
    ]


ARCHIVES = {
    "ustar": _tar(tarfile.USTAR_FORMAT, _common()[:10]),
    "gnu": _tar(tarfile.GNU_FORMAT, _common()),
    "pax": _tar(tarfile.PAX_FORMAT, _common()),
    "pax-xattrs": _tar(tarfile.PAX_FORMAT, [(_info("x", size=1, pax_headers={"SCHILY.xattr.user.a": "1"}), b"1"),
                                             (_info("y", size=1), b"2")]),
    "pax-global": _tar(tarfile.PAX_FORMAT, [(_info("a", size=1), b"1"), (_info("b", size=1), b"2")],
                       pax_headers={"comment": "global"}),
    "gnu-base256": _tar(tarfile.GNU_FORMAT, [(_info("big-uid", size=1, uid=1 << 40), b"1"), (_info("z"), b"")]),
}


def _raw_header(name: bytes, kind: bytes, size: int = 0, signed: bool = False, bad: bool = False,
                prefix: bytes = b"", size_field: bytes | None = None) -> bytes:
    """A hand-made ustar header (V7 directory forms, prefixes, odd numbers, signed or wrong
    checksums)."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    assert len(h) == 512
    h[136:148] = b"14557244000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"        "
    total = sum(h) if not signed else sum(b - 256 if b > 127 else b for b in h)
    if bad:
        total += 1
    h[148:156] = b"%06o\0 " % (total & 0o777777) if total >= 0 else b"%07o\0" % (total + (1 << 21))
    return bytes(h)


def _raw(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(1024)


ARCHIVES.update({
    "v7-dir": _raw(_raw_header(b"olddir/", tarfile.AREGTYPE), _raw_header(b"olddir/f", tarfile.AREGTYPE)),
    "bad-checksum-later": _raw(_raw_header(b"a", tarfile.REGTYPE), _raw_header(b"b", tarfile.REGTYPE, bad=True),
                               _raw_header(b"c", tarfile.REGTYPE)),
    "high-bytes": _raw(_raw_header("h\xe9llo".encode("latin-1"), tarfile.REGTYPE), _raw_header(b"z", tarfile.REGTYPE)),
    "signed-checksum": _raw(_raw_header("s\xe9\xff".encode("latin-1"), tarfile.REGTYPE, signed=True),
                            _raw_header(b"z", tarfile.REGTYPE)),
    "odd-numbers": _raw(_raw_header(b"a", tarfile.REGTYPE), _raw_header(b"b", tarfile.REGTYPE, size_field=b"1_1 \0       "),
                        bytes(512), _raw_header(b"c", tarfile.REGTYPE, size_field=b"\x1c7\0         "),
                        bytes(512), _raw_header(b"d", tarfile.REGTYPE, size_field=b"+7\0         "),
                        bytes(512), _raw_header(b"e", tarfile.REGTYPE, size_field=b"7\xff\0         ")),
    "prefix-dirs": _raw(_raw_header(b"f", tarfile.REGTYPE), _raw_header(b"", tarfile.DIRTYPE, prefix=b"pfx/sub"),
                        _raw_header(b"name/", tarfile.DIRTYPE, prefix=b"pfx"), _raw_header(b"z", tarfile.REGTYPE)),
    "sized-non-files": _raw(_raw_header(b"f", tarfile.REGTYPE), _raw_header(b"d", tarfile.DIRTYPE, size=600),
                            _raw_header(b"z", tarfile.REGTYPE), _raw_header(b"s", tarfile.SYMTYPE, size=10),
                            _raw_header(b"y", tarfile.REGTYPE)),
})
ARCHIVES["truncated-data"] = ARCHIVES["ustar"][:2048 + 700]
ARCHIVES["truncated-header"] = ARCHIVES["ustar"][:512 * 3 + 100]
ARCHIVES["no-end-blocks"] = ARCHIVES["ustar"][:-1024]


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_plain_headers_read_as_tarfile_reads_them(name: str) -> None:
    data = ARCHIVES[name]
    assert _members(data, plain=True) == _members(data, plain=False)


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_trees_are_the_same_with_and_without_plain_headers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ARCHIVES[name]
    got = []
    for plain in (True, False):
        monkeypatch.setattr(sources, "PLAIN_HEADERS", plain)
        try:
            tree = tree_from_tar(io.BytesIO(data), SourceStats())
            got.append(("tree", [(tree.name(n), tree.mode[n], tree.size[n]) for n in range(len(tree))]))
        except Exception as e:  # noqa: BLE001 (the same error either way is what is checked)
            got.append(("error", f"{type(e).__name__}: {e}"))
    assert got[0] == got[1]


def test_a_layer_of_plain_members_skips_tarfiles_header_decoding() -> None:
    """The members of an ordinary layer (ustar and pax without extensions) are read here."""
    stats = SourceStats()
    tree_from_tar(io.BytesIO(ARCHIVES["ustar"]), stats)
    assert stats.entries == 10
    assert stats.plain_headers == stats.entries - 1  # (tarfile.open reads the first one itself)
    stats = SourceStats()
    tree_from_tar(io.BytesIO(ARCHIVES["pax-global"]), stats)
    assert stats.plain_headers == 0  # a global pax header amends every member: tarfile's
