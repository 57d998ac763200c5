"""The Windows virtio-fs driver's requests (tests/transport/viofs_windows.py) replayed through the
vhost-user-fs backend: queue size 1024, page-split descriptors, 1 MiB READs, for a RAFS image and
a passthrough share. Every reply is checked: header, sizes, struct contents, bytes against the
source tree. Driven by the Python front-end, no QEMU."""

import errno
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.api.client import ApiClient
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.api import Filesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.vhost_user import virtiofs_server

from ..conftest import REPO
from ..fs.mountrig import build, write_config
from ..waiting import wait_until
from . import vhost_frontend as F
from . import viofs_windows as W
from .vhost_frontend import Frontend
from .viofs_windows import FuseReplyError, ViofsGuest
from .virtio_rig import stop_pid

BIG = 3 * (1 << 20) + 12345  # three full 1 MiB READs and a short one
MANY = 400  # entries: several READDIRPLUS rounds of 8 KiB
MiB = 1 << 20


def make_share(root: Path) -> dict[str, bytes]:
    """A Windows user's share: a large file, a big directory, nesting, a relative symlink to a
    directory, mixed-case and non-ASCII names. Returns file contents by relative path."""
    rng = random.Random(15)
    files = {
        "Docs/ReadMe.TXT": b"read me\r\n" * 100,
        "Docs/big.bin": rng.randbytes(BIG),
        "Docs/Sub/leaf.txt": b"leaf\n",
        "Programme/Übersicht.txt": "ÄÖÜ\n".encode(),
        "empty": b"",
    }
    files.update({f"many/file-{i:04d}-{'x' * (i % 40)}": rng.randbytes(i % 300) for i in range(MANY)})
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.symlink("Docs/Sub", root / "link-to-sub")
    os.symlink("t" * 300, root / "long-link")  # a target longer than the service's 260-byte buffer
    os.chmod(root / "Docs" / "ReadMe.TXT", 0o444)
    return files


@dataclass
class Share:
    kind: str
    src: Path
    files: dict[str, bytes]
    sock: str


def _serve(fs: Filesystem, sock: str) -> Iterator[None]:
    srv = virtiofs_server(FuseSession(fs), sock, queue_size=1024).start()
    try:
        yield
    finally:
        srv.stop()


@pytest.fixture(params=["rafs", "passthrough"])
def share(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Share]:
    src = tmp_path / "src"
    src.mkdir()
    files = make_share(src)
    sock = str(tmp_path / "vfs.sock")
    fs: Filesystem
    if request.param == "rafs":
        img = build(str(src), str(tmp_path / "img"), views=False)
        image = open_bootstrap(img.boot)
        fs = RafsFilesystem(image, BlobDevice(image, LocalBlobDir(img.blob_dir), validate=True))
    else:
        fs = PassthroughFilesystem(str(src))
    gen = _serve(fs, sock)
    next(gen)
    try:
        yield Share(request.param, src, files, sock)
    finally:
        next(gen, None)


def connect(sock: str, *, indirect: bool, num: int = 1024) -> tuple[Frontend, ViofsGuest]:
    """The driver's bring-up: VERSION_1 (+ INDIRECT_DESC), hiprio + one request queue."""
    fe = Frontend(sock, mem_size=24 << 20)
    features = F.F_VERSION_1 | F.F_PROTOCOL | (F.F_INDIRECT if indirect else 0)
    fe.setup(nqueues=2, num=num, features=features, protocol=F.PF_REPLY_ACK | F.PF_MQ)
    guest = ViofsGuest(fe)
    guest.indirect = indirect
    return fe, guest


def check_attr(share: Share, rel: str, a: W.Attr) -> None:
    """An attribute reply against the source tree (what the Windows FileInfo is made from)."""
    st = os.lstat(share.src / rel) if rel else os.lstat(share.src)
    assert stat.S_IFMT(a.mode) == stat.S_IFMT(st.st_mode), rel
    assert stat.S_IMODE(a.mode) == stat.S_IMODE(st.st_mode), rel
    assert (a.uid, a.gid) == (st.st_uid, st.st_gid), rel
    assert a.mtime == int(st.st_mtime), rel
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        assert a.size == st.st_size, rel
        assert a.nlink == st.st_nlink, rel
    if stat.S_ISREG(st.st_mode):
        assert a.blocks * 512 >= st.st_size, rel  # AllocationSize >= FileSize on Windows
    if share.kind == "passthrough":
        assert a.ino == st.st_ino, rel


def list_and_check(share: Share, guest: ViofsGuest, path: str, rel: str, buffer_length: int) -> list[W.DirEntryPlus]:
    """svc:Open + ReadDirectory of a directory; every entry checked against the source and
    against a LOOKUP of the same name."""
    ctx = guest.open(path)
    assert ctx.is_directory
    check_attr(share, rel, guest.getattr(ctx))
    entries = guest.read_directory(ctx, buffer_length)
    guest.close(ctx)
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "an entry was listed twice"
    expect = {b".", b".."} | {os.fsencode(n) for n in os.listdir(share.src / rel if rel else share.src)}
    assert set(names) == expect
    offs = [e.off for e in entries]
    assert offs == sorted(offs) and len(set(offs)) == len(offs), "offsets must grow"
    for e in entries:
        if e.name in (b".", b".."):
            assert e.type == stat.S_IFDIR >> 12
            continue
        child = os.path.join(rel, os.fsdecode(e.name)) if rel else os.fsdecode(e.name)
        assert e.entry.nodeid != 0, child
        assert e.type == stat.S_IFMT(os.lstat(share.src / child).st_mode) >> 12, child
        check_attr(share, child, e.entry.attr)
        looked = guest.lookup(ctx.node_id, e.name)
        assert looked.nodeid == e.entry.nodeid, child
        assert looked.attr == e.entry.attr, child
    return entries


@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_windows_session(share: Share, indirect: bool) -> None:
    fe, guest = connect(share.sock, indirect=indirect)
    try:
        # -- mount: INIT, STATFS, LOOKUP "." of the root ------------------------------------
        init, kstatfs, root = guest.mount()
        major, minor, readahead, flags, _bg, _ct, max_write, _gran, max_pages, _align = init
        assert (major, minor, readahead) == (7, 31, 0)
        assert flags == W.FUSE_DO_READDIRPLUS | W.FUSE_MAX_PAGES  # only what the service offered
        assert (max_write, max_pages) == (MiB, 256)  # -> 1 MiB READs (svc:Read)
        blocks, _bfree, _bavail, _files, _ffree, bsize, namelen, _frsize = kstatfs
        assert bsize > 0 and namelen == 255
        if share.kind == "passthrough":
            v = os.statvfs(share.src)
            assert (blocks, bsize) == (v.f_blocks, v.f_bsize)
        assert root.nodeid == W.FUSE_ROOT_ID
        check_attr(share, "", root.attr)

        # -- directory listing: the root, then one that takes several READDIRPLUS rounds --------
        list_and_check(share, guest, "\\", "", 4096)
        before = len(guest.sent)
        many = list_and_check(share, guest, "\\many", "many", 4096)
        rounds = sum(1 for op, *_ in guest.sent[before:] if op == W.READDIRPLUS)
        assert rounds >= 5, rounds  # 402 entries of >= 160 bytes in 8 KiB replies, then the empty one
        assert len(many) == MANY + 2

        # -- stat and open/read of a large file in 1 MiB READs ---------------------------------
        ctx = guest.open("\\Docs\\big.bin")
        assert not ctx.is_directory
        a = guest.getattr(ctx)
        check_attr(share, "Docs/big.bin", a)
        want = share.files["Docs/big.bin"]
        before = len(guest.sent)
        got = guest.read(ctx, 0, BIG + 4 * MiB)  # Windows asks for more than the file holds
        assert got == want
        reads = [s for s in guest.sent[before:] if s[0] == W.READ]
        assert len(reads) == 4  # 1 MiB x 3, then the short one that ends the loop
        for _, in_len, frags, ind in reads:
            assert in_len == 80
            assert frags >= 1 + 1 + 256  # in + out header + 256 data pages (page-split)
            assert ind == indirect
        assert guest.read(ctx, 1_000_001, MiB) == want[1_000_001 : 1_000_001 + MiB]
        assert guest.read(ctx, BIG - 10, MiB) == want[-10:]
        assert guest.read(ctx, BIG + 5, MiB) == b""  # past the end: STATUS_END_OF_FILE
        guest.close(ctx)

        # -- small files, mixed case and non-ASCII names, read-only attribute ------------------
        for rel in ("Docs/ReadMe.TXT", "Programme/Übersicht.txt", "empty", "many/file-0007-xxxxxxx"):
            ctx = guest.open("\\" + rel.replace("/", "\\"))
            check_attr(share, rel, guest.getattr(ctx))
            assert guest.read(ctx, 0, 64 << 10) == share.files[rel]
            guest.close(ctx)
        ro = guest.lookup_path("\\Docs\\ReadMe.TXT")
        assert not ro.attr.mode & 0o222  # -> FILE_ATTRIBUTE_READONLY

        # -- a symlinked directory in the middle of a path: READLINK (with its 260-byte tail) ---
        link = guest.lookup_path("\\link-to-sub")
        assert stat.S_ISLNK(link.attr.mode)
        assert guest.readlink(link.nodeid) == b"Docs/Sub"
        leaf = guest.lookup_path("\\link-to-sub\\leaf.txt")
        assert leaf.attr.size == 5
        ctx = guest.open("\\link-to-sub\\leaf.txt")
        assert guest.read(ctx, 0, 4096) == b"leaf\n"
        guest.close(ctx)

        long_link = guest.lookup_path("\\long-link")
        assert long_link.attr.size == 300
        with pytest.raises(FuseReplyError) as ei:
            guest.readlink(long_link.nodeid)  # 316 bytes of reply for a 276-byte buffer
        assert ei.value.errno == errno.EIO

        # -- errors the service maps to NTSTATUS ----------------------------------------------
        with pytest.raises(FuseReplyError) as ei:
            guest.lookup_path("\\Docs\\missing.txt")
        assert ei.value.errno == errno.ENOENT  # -> STATUS_OBJECT_NAME_NOT_FOUND
        with pytest.raises(FuseReplyError) as ei:
            guest.lookup_path("\\Docs\\readme.txt")  # case-sensitive by default
        assert ei.value.errno == errno.ENOENT

        # -- request sizes are the service's fixed structs -------------------------------------
        sizes = {op: {n for o, n, _, _ in guest.sent if o == op} for op in
                 (W.INIT, W.STATFS, W.OPEN, W.OPENDIR, W.GETATTR, W.READDIRPLUS, W.READ, W.READLINK, W.RELEASE)}
        assert sizes == {W.INIT: {56}, W.STATFS: {40}, W.OPEN: {48}, W.OPENDIR: {48}, W.GETATTR: {56},
                         W.READDIRPLUS: {80}, W.READ: {80}, W.READLINK: {300}, W.RELEASE: {64}}

        # -- FORGET (hiprio, no reply) and stop -------------------------------------------------
        assert guest.forget(leaf.nodeid, 1) == 0
        guest.destroy()
    finally:
        fe.close()


@pytest.mark.parametrize("share", ["rafs"], indirect=True)  # a property of the ring, not of the filesystem
def test_queue_of_128_needs_indirect_for_1mib_reads(share: Share) -> None:
    """QEMU's default queue-size=128: a 1 MiB READ (258+ page fragments) only fits through an
    indirect table; without one the driver gets -ENOSPC (hence queue-size=1024)."""
    for indirect in (True, False):
        fe, guest = connect(share.sock, indirect=indirect, num=128)
        try:
            guest.init()
            ctx = guest.open("\\Docs\\big.bin")
            if indirect:
                assert guest.read(ctx, 0, MiB) == share.files["Docs/big.bin"][:MiB]
            else:
                with pytest.raises(OSError, match="ENOSPC"):
                    guest.read(ctx, 0, MiB)
                # what still fits: 128 - 2 fragments of data
                assert guest.read(ctx, 0, 100 * 4096 - 0x9F0) == share.files["Docs/big.bin"][: 100 * 4096 - 0x9F0]
        finally:
            fe.close()


# -- the case-insensitive option, through the daemon's command line ------------------------------------


def start_daemon(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    sock, api, logf = str(tmp / "vfs.sock"), str(tmp / "api.sock"), tmp / "daemon.log"
    cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--apisock", api,
           "--log-file", str(logf), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {logf.read_text(errors='replace')}")
        return os.path.exists(api) and os.path.exists(sock)

    wait_until(up, 30, "the daemon's sockets")
    return proc, sock, api, logf


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rafs-config-key", "passthrough-cli-flag"])
def test_case_insensitive_share_for_windows(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = make_share(src)
    (src / "Makefile").write_bytes(b"upper\n")
    (src / "makefile").write_bytes(b"lower\n")
    if kind.startswith("rafs"):
        img = build(str(src), str(tmp_path / "img"), views=False)
        config = write_config(str(tmp_path / "config.json"), img.blob_dir, case_insensitive=True)
        args: tuple[str, ...] = ("--config", config, "--bootstrap", img.boot)
    else:
        args = ("--shared-dir", str(src), "--case-insensitive")
    proc, sock, api, logf = start_daemon(tmp_path, *args)
    try:
        fe, guest = connect(sock, indirect=True)
        try:
            guest.mount()
            # a path typed in another case: one LOOKUP per component, not the service's
            # OPENDIR + READDIR pages + LOOKUP + RELEASEDIR fallback
            before = len(guest.sent)
            ctx = guest.open("\\docs\\README.txt")
            assert [op for op, *_ in guest.sent[before:]] == [W.LOOKUP, W.LOOKUP, W.OPEN]
            assert guest.read(ctx, 0, MiB) == files["Docs/ReadMe.TXT"]
            guest.close(ctx)
            ctx = guest.open("\\DOCS\\BIG.BIN")
            assert guest.read(ctx, 0, BIG) == files["Docs/big.bin"]
            guest.close(ctx)
            assert guest.lookup_path("\\programme\\übersicht.TXT").attr.size == len("ÄÖÜ\n".encode())
            # the listing shows the names as they are
            listing = {e.name for e in guest.read_directory(guest.open("\\dOcS"), 4096)}
            assert listing == {b".", b"..", b"ReadMe.TXT", b"big.bin", b"Sub"}
            # names that differ only in case: exact lookups only
            for name, data in ((b"Makefile", b"upper\n"), (b"makefile", b"lower\n")):
                ctx = guest.open("\\" + name.decode())
                assert guest.read(ctx, 0, 4096) == data
                guest.close(ctx)
            for _ in range(2):
                with pytest.raises(FuseReplyError) as ei:
                    guest.lookup_path("\\MAKEFILE")
                assert ei.value.errno == errno.ENOENT
            with pytest.raises(FuseReplyError):
                guest.lookup_path("\\docs\\nothing-like-it")
        finally:
            fe.close()
        client = ApiClient(api)
        try:
            counters = client.call("GET", "/api/v1/metrics")["case_insensitive"]
            status, prom = client.request("GET", "/metrics")
        finally:
            client.close()
        assert counters["collisions"] == 1 and counters["ambiguous_lookups"] == 2
        assert counters["fallback_hits"] >= 6 and counters["misses"] == 1
        assert logf.read_text(errors="replace").count("differ only in case") == 1
        assert status == 200
        assert b'nydusd_case_insensitive_collisions_total{mountpoint="/"} 1.0' in prom
        assert b'nydusd_case_insensitive_lookups_total{mountpoint="/",result="ambiguous"} 2.0' in prom
    finally:
        stop_pid(proc)


def test_case_insensitive_costs_one_lookup_instead_of_a_directory_scan(tmp_path: Path) -> None:
    """A mixed-case path on a case-sensitive image with the service's own `-i`: per miss an
    OPENDIR, READDIR pages until the match, a LOOKUP and a RELEASEDIR. With the daemon's option
    the first LOOKUP of each component answers."""
    src = tmp_path / "src"
    src.mkdir()
    files = make_share(src)
    img = build(str(src), str(tmp_path / "img"), views=False)
    path, rel = "\\MANY\\FILE-0399-" + "X" * (399 % 40), f"many/file-0399-{'x' * (399 % 40)}"
    counts = {}
    for ci in (False, True):
        image = open_bootstrap(img.boot)
        fs = RafsFilesystem(image, BlobDevice(image, LocalBlobDir(img.blob_dir)), case_insensitive=ci)
        sock = str(tmp_path / f"vfs-{ci}.sock")
        gen = _serve(fs, sock)
        next(gen)
        try:
            fe, guest = connect(sock, indirect=True)
            try:
                guest.case_insensitive = True  # the service's -i, in both runs
                guest.init()
                before = len(guest.sent)
                ctx = guest.open(path)
                ops = [op for op, *_ in guest.sent[before:]]
                assert guest.read(ctx, 0, MiB) == files[rel]
                guest.close(ctx)
            finally:
                fe.close()
        finally:
            next(gen, None)
        counts[ci] = ops
    assert counts[True] == [W.LOOKUP, W.LOOKUP, W.OPEN]
    service = counts[False]
    assert service.count(W.LOOKUP) == 4 and service.count(W.OPENDIR) == 2 and service.count(W.RELEASEDIR) == 2
    assert service.count(W.READDIR) >= 6  # the root's one page, then `many` up to its last entry
    assert len(service) >= 5 * len(counts[True])
