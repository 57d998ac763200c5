"""THE ORACLE: trees built on disk -> build tree -> RAFS v6 image -> Linux EROFS mount, compared
field by field with the source (stat, xattrs, link targets, hard links, data); fsck.erofs and
dump.erofs must accept the image too."""

import io
import os
import random
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.build import build_image
from nydus_py.builder.cache_view import write_cache_view
from nydus_py.builder.options import BuildOptions, BuildResult
from nydus_py.builder.tree import FileData, Inode
from nydus_py.cli.image import main as image_cli
from nydus_py.rafs.constants import Compressor, Digester
from nydus_py.rafs.layout_common import pack_chunks
from tests.conftest import require_tool

from .erofs_rig import compare_trees, erofs_available, erofs_mount, tree_from_directory

pytestmark = pytest.mark.slow

POOL = [os.urandom(0x4000 + 17), b"\0" * 0x9000, b"nydus " * 3000]


# -- on-disk tree description ---------------------------------------------------------------------


@dataclass
class Meta:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_700_000_000_123_456_789
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def content(kind: str, size: int, seed: int) -> bytes:
    if kind == "zero":
        return b"\0" * size
    if kind == "pool":
        return POOL[seed % len(POOL)]
    if kind == "text":
        return (b"chunk%d " % seed * (size // 6 + 1))[:size]
    return random.Random(seed).randbytes(size)


def materialise(path: str, spec: tuple, files: list[str], post: list[tuple[str, str, Meta]]) -> None:
    """Create `spec` at `path`; metadata is applied later, children before parents."""
    kind = spec[0]
    meta: Meta = spec[-1]
    if kind == "dir":
        os.mkdir(path)
        entries = spec[1].items() if isinstance(spec[1], dict) else spec[1]
        used: set[bytes] = set()
        for i, (name, child) in enumerate(entries):
            if name in used:
                name = name[:240] + b"~%d" % i
            used.add(name)
            materialise(os.path.join(os.fsencode(path), name), child, files, post)
        for i in range(spec[2]):  # wide directories: many entries, several dirent blocks
            p = os.path.join(os.fsencode(path), b"w%04d-" % i + b"e" * (i % 40))
            with open(p, "wb") as f:
                f.write(b"%d" % i if i % 3 else b"")
    elif kind == "file":
        with open(path, "wb") as f:
            f.write(content(*spec[1]))
        files.append(path)
    elif kind == "link":
        if files:
            os.link(files[spec[1] % len(files)], path)
            return  # metadata belongs to the target
        with open(path, "wb") as f:
            f.write(b"orphan link")
        files.append(path)
    elif kind == "symlink":
        os.symlink(spec[1], path)
    elif kind in ("chr", "blk"):
        os.mknod(path, (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | 0o600, os.makedev(*spec[1]))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "sock":
        os.mknod(path, stat.S_IFSOCK | 0o600)
    post.append((path, kind, meta))


def apply_meta(post: list[tuple[str, str, Meta]]) -> None:
    for path, kind, meta in post:  # post-order: children were appended before their parent
        for name, value in meta.xattrs.items():
            if kind in ("dir", "file", "link") or name.startswith(b"trusted."):
                os.setxattr(path, name, value, follow_symlinks=False)
        os.chown(path, meta.uid, meta.gid, follow_symlinks=False)
        if kind != "symlink":
            os.chmod(path, meta.mode)
        os.utime(path, ns=(meta.mtime_ns, meta.mtime_ns), follow_symlinks=False)


# -- hypothesis strategies ------------------------------------------------------------------------


def _long(base: bytes, n: int) -> bytes:
    return (base + b"L" * n)[:255]


# names stay cheap to draw (a few random bytes, sometimes padded to 200-255 bytes); duplicates
# within one directory are renamed when the tree is created
names = (
    st.one_of(
        st.builds(_long, st.binary(min_size=1, max_size=8), st.sampled_from([0, 0, 0, 0, 200, 254])),
        st.sampled_from([b"!", b"-", b".hidden", b"...", b"\xff\xfe", b"a" * 255]),
    )
    .map(lambda n: n.replace(b"/", b"s").replace(b"\0", b"z"))
    .filter(lambda n: n not in (b".", b".."))
)
targets = st.builds(
    lambda b, n: (b + b"t" * n).replace(b"\0", b"z"),
    st.binary(min_size=1, max_size=16),
    st.sampled_from([0, 0, 40, 190, 280]),
)

metas = st.builds(
    Meta,
    mode=st.integers(0, 0o7777),
    uid=st.sampled_from([0, 1, 1000, 65534, 70000, 2**31]),
    gid=st.sampled_from([0, 100, 65535, 99999]),
    mtime_ns=st.integers(0, 2**33 * 10**9 - 1),
    xattrs=st.dictionaries(
        st.sampled_from([b"user.a", b"user.long." + b"n" * 60, b"trusted.t", b"trusted.ovl"]),
        st.binary(max_size=16),
        max_size=3,
    ),
)

contents = st.tuples(
    st.sampled_from(["random", "zero", "pool", "text"]),
    st.one_of(st.sampled_from([0, 1, 0xFFF, 0x1000, 0x1001, 0x4000, 0x4001]), st.integers(0, 5 * 0x4000 + 7)),
    st.integers(0, 2**16),
)

leaves = st.one_of(
    st.tuples(st.just("file"), contents, metas),
    st.tuples(st.just("file"), contents, metas),
    st.tuples(st.just("link"), st.integers(0, 100), metas),
    st.tuples(st.just("symlink"), targets, metas),
    st.tuples(
        st.sampled_from(["chr", "blk"]), st.tuples(st.integers(0, 4095), st.integers(0, 2**20 - 1)), metas
    ),
    st.tuples(st.sampled_from(["fifo", "sock"]), metas),
)


def dirs(children: st.SearchStrategy, min_size: int = 0, max_size: int = 6) -> st.SearchStrategy:
    return st.tuples(
        st.just("dir"),
        st.lists(st.tuples(names, children), min_size=min_size, max_size=max_size),
        st.sampled_from([0] * 7 + [300]),
        metas,
    )


# the root always has a dozen or more entries (hypothesis would otherwise try tiny trees first)
trees = dirs(st.recursive(leaves, dirs, max_leaves=40), min_size=12, max_size=24)

build_opts = st.builds(
    BuildOptions,
    compressor=st.sampled_from([Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE]),
    digester=st.sampled_from([Digester.BLAKE3, Digester.SHA256]),
    chunk_size=st.sampled_from([0x1000, 0x4000]),
    blob_toc=st.booleans(),
)


# -- the oracle -----------------------------------------------------------------------------------


def build_and_check(src: str, work: str, opts: BuildOptions, root: Inode | None = None) -> BuildResult:
    """Build `src` (or `root`), mount it with the kernel, compare with `src`, fsck and dump."""
    if root is None:
        root = tree_from_directory(src)
    boot, blobs, mnt = os.path.join(work, "boot"), os.path.join(work, "blobs"), os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    result = build_image(root, boot, blobs, opts)
    views = []
    for bid in result.blob_ids:
        view = os.path.join(work, f"view-{bid[:12]}")
        write_cache_view(boot, blobs, bid, view)
        views.append(view)
    with erofs_mount(boot, views, mnt):
        n = compare_trees(src, mnt)
        assert n >= 1
    # The same image through `nydus-image-py unpack`, extracted by GNU tar, must match too.
    out_tar, out_dir = os.path.join(work, "unpacked.tar"), os.path.join(work, "unpacked")
    assert image_cli(["unpack", "--bootstrap", boot, "--blob-dir", blobs, "--output", out_tar]) == 0
    os.makedirs(out_dir)
    subprocess.run([require_tool("tar"), "--xattrs", "--xattrs-include=*", "--same-owner", "--numeric-owner",
                    "-xpf", out_tar, "-C", out_dir], check=True)
    compare_trees(src, out_dir, without_sockets=True)
    dev_args = [f"--device={v}" for v in views]
    fsck = subprocess.run([require_tool("fsck.erofs"), *dev_args, boot], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = subprocess.run([require_tool("dump.erofs"), *dev_args, "-s", boot], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert f"Filesystem inode count:                       {result.inodes}" in dump.stdout
    assert "Filesystem root nid:                          128" in dump.stdout
    return result


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(spec=trees, opts=build_opts)
def test_random_trees_mount_identically(spec, opts):
    erofs_available()
    with tempfile.TemporaryDirectory(prefix="nydus-oracle-") as work:
        src = os.path.join(work, "src")
        post: list = []
        materialise(src, spec, [], post)
        apply_meta(post)
        build_and_check(src, work, opts)


def everything_tree(src: str) -> None:
    """One tree with every feature the brief lists, deterministic."""
    meta = Meta
    spec = (
        "dir",
        {
            b"empty": ("file", ("zero", 0, 0), meta(0o644)),
            b"big-random": ("file", ("random", 9 * 0x4000 + 123, 1), meta(0o755, 1000, 1000, 5)),
            b"zeros": ("file", ("zero", 6 * 0x4000, 0), meta(0o600)),
            b"dup-of-pool": ("file", ("pool", 0, 0), meta(0o644)),
            b"dup-of-pool-2": ("file", ("pool", 0, 0), meta(0o4755, 0, 0, 1, {b"user.x": b"y" * 900})),
            b"hard": ("link", 1, meta()),
            b"hard2": ("link", 1, meta()),
            b"setgid-sticky": ("file", ("text", 100, 3), meta(0o3777, 70000, 99999, 2**33 * 10**9 - 1)),
            b"short": ("symlink", b"big-random", meta()),
            b"long": ("symlink", b"L" * 300, meta()),
            b"longest": ("symlink", b"/".join([b"p" * 200] * 19) + b"/end", meta()),
            b"chr": ("chr", (1, 3), meta(0o666, 0, 0, 7)),
            b"blk": ("blk", (259, 1 << 19), meta(0o660, 0, 6)),
            b"fifo": ("fifo", meta(0o644, 1, 2)),
            b"sock": ("sock", meta(0o755)),
            b"n" * 255: ("file", ("text", 10, 4), meta(0o644, xattrs={b"trusted.t": b"1", b"user.u": b"2"})),
            b"wide": ("dir", {}, 300, meta(0o1777, xattrs={b"trusted.big": b"v" * 2000})),
            b"deep": _deep(12),
            b"!before-dot": ("dir", {b"x": ("file", ("text", 5, 5), meta())}, 0, meta(0o700)),
        },
        0,
        meta(0o755, 0, 0, 1_600_000_000_000_000_001),
    )
    post: list = []
    materialise(src, spec, [], post)
    apply_meta(post)


def _deep(n: int) -> tuple:
    node: tuple = ("file", ("text", 77, 9), Meta())
    for i in range(n):
        node = ("dir", {b"d%d" % i: node, b"f": ("file", ("random", 10 + i, i), Meta())}, 0, Meta(0o755))
    return node


def test_everything_tree(tmp_path):
    erofs_available()
    src = str(tmp_path / "src")
    everything_tree(src)
    for opts in (
        BuildOptions(chunk_size=0x4000),
        BuildOptions(chunk_size=0x1000, compressor=Compressor.LZ4_BLOCK),
    ):
        work = tmp_path / f"w{opts.chunk_size}"
        work.mkdir()
        r = build_and_check(src, str(work), opts)
        assert r.deduplicated > 0 and r.compressed_bytes < r.uncompressed_bytes


def test_layered_image_uses_existing_blobs(tmp_path):
    """A tree mixing `ChunkedData` (already in a lower blob) and new files mounts with two devices."""
    erofs_available()
    src = tmp_path / "src"
    src.mkdir()
    lower = random.Random(7).randbytes(5 * 0x1000 + 9)
    (src / "lower").write_bytes(lower)
    (src / "upper").write_bytes(lower[:0x2000] + b"new data" * 100)
    for p in src.iterdir():
        os.utime(p, ns=(0, 1_000_000_000))
    opts = BuildOptions(chunk_size=0x1000)
    blobs = str(tmp_path / "w" / "blobs")
    w = BlobWriter(blobs, opts, blob_index=0)
    chunks = w.add_file(FileData(len(lower), lambda: io.BytesIO(lower)))
    info = w.finish()
    assert info is not None
    root = tree_from_directory(str(src))
    root.set_chunks(root.find(b"/lower"), pack_chunks(chunks), len(lower), root.blob_set([info]))
    r = build_and_check(str(src), str(tmp_path / "w"), opts, root=root)
    assert r.blob_ids == [info.blob_id, r.blob_id]
    assert r.deduplicated == 2  # the two leading chunks of "upper" are the lower blob's


def test_image_without_data_mounts_without_devices(tmp_path):
    erofs_available()
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "empty").write_bytes(b"")
    os.symlink("d/empty", src / "s")
    r = build_and_check(str(src), str(tmp_path), BuildOptions())
    assert r.blob_ids == [] and r.blob_id is None
