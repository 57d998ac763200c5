"""The builder's output bytes, pinned: sha256 of bootstrap + blobs for a range of option sets and
sources (v5/v6, compressors, digesters, chunk sizes, tar/dir/bootstrap sources, hard links,
xattrs, whiteouts, multi-layer stacks). Recorded before the tree went packed (issue 16, item 10);
any change to the tree model must leave every digest as it was.

Regenerate (only for an intended format change): NYDUS_PY_REGOLD=1 pytest this file.
"""

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.merge import merge_layers, tree_from_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory, tree_from_tar
from nydus_py.builder.tree import FileData, Inode
from nydus_py.convert.stack import LayerStack
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.constants import Compressor, Digester

from .treeutil import make_tar, member

GOLDEN = Path(__file__).with_name("golden_outputs.json")
_RECORDED: dict[str, str] = {}


def _blob(i: int, n: int) -> bytes:
    return bytes((i * 7 + k * 13) % 251 for k in range(n))


def _layer0() -> bytes:
    big = _blob(1, 0x5000) + _blob(2, 0x100) * 3
    return make_tar(
        [
            member("etc", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0),
            member("etc/passwd", data=b"root:x:0:0\n", uid=0, gid=0),
            member("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o600, uid=5, gid=6),
            member("usr/bin/tool", data=big, mode=0o755, pax={"SCHILY.xattr.user.k": "v", "mtime": "1600000000.123456789"}),
            member("usr/bin/tool2", tarfile.LNKTYPE, linkname="usr/bin/tool"),
            member("usr/bin/link", tarfile.SYMTYPE, linkname="tool"),
            member("usr/share/dup", data=b"first"),
            member("usr/share/dup", data=b"second, longer"),
            member("usr/share/same1", data=_blob(3, 0x1800)),
            member("usr/share/same2", data=_blob(3, 0x1800)),
            member("usr/share/empty", data=b""),
            member("dev/null", tarfile.CHRTYPE, dev=(1, 3), mode=0o666),
            member("dev/loop0", tarfile.BLKTYPE, dev=(7, 0), mode=0o660),
            member("run/fifo", tarfile.FIFOTYPE, mode=0o644),
            member("opt/dir", tarfile.DIRTYPE, mode=0o700, pax={"SCHILY.xattr.trusted.x": "1", "SCHILY.xattr.security.y": "22"}),
            member("opt/dir/f", data=b"f" * 5000, uid=1000, gid=1000),
            member("var/lib/a", data=b"a-data"),
            member("var/lib/b", tarfile.LNKTYPE, linkname="var/lib/a"),
            member("var/lib/c", tarfile.LNKTYPE, linkname="var/lib/b"),
        ]
    )


def _layer1() -> bytes:
    return make_tar(
        [
            member("etc/.wh.hosts", data=b""),
            member("usr/share/.wh..wh..opq", data=b""),
            member("usr/share/new", data=b"new in layer 1" * 100),
            member("usr/bin/tool", data=b"replaced"),
            member("opt/dir", tarfile.DIRTYPE, mode=0o750),
            member("opt/dir/g", data=_blob(3, 0x1800)),
            member("var/.wh.lib", data=b""),
            member("var/lib2/x", data=b"x" * 9000),
        ]
    )


def _layer2() -> bytes:
    return make_tar(
        [
            member("etc", tarfile.DIRTYPE, mode=0o711),
            member("etc/hosts", data=b"back again\n"),
            member("usr/.wh.bin", data=b""),
            member("usr/bin", data=b"now a file"),
            member("var/lib2/x", tarfile.SYMTYPE, linkname="/etc/passwd"),
        ]
    )


OPTION_SETS = {
    "v6-zstd-blake3": BuildOptions(),
    "v6-none-sha256-4k": BuildOptions(compressor=Compressor.NONE, digester=Digester.SHA256, chunk_size=0x1000),
    "v6-lz4-blake3-8k-prefetch": BuildOptions(
        compressor=Compressor.LZ4_BLOCK, chunk_size=0x2000, prefetch_paths=[b"/usr/bin", b"/etc/passwd", b"/nope"]
    ),
    "v6-zstd-notoc-repeatable": BuildOptions(blob_toc=False, repeatable=True),
    "v5-zstd-blake3": BuildOptions(fs_version=5),
    "v5-lz4-sha256-4k-prefetch": BuildOptions(
        fs_version=5, compressor=Compressor.LZ4_BLOCK, digester=Digester.SHA256, chunk_size=0x1000,
        prefetch_paths=[b"/opt", b"/usr/share/same2"],
    ),
    "v5-none-blake3-repeatable": BuildOptions(fs_version=5, compressor=Compressor.NONE, repeatable=True),
}


def _digests(boot: str, blob_dir: str, blob_ids: list[str]) -> str:
    h = hashlib.sha256(Path(boot).read_bytes())
    for b in blob_ids:
        p = Path(blob_dir) / b
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()


def _check(key: str, digest: str) -> None:
    if os.environ.get("NYDUS_PY_REGOLD"):
        _RECORDED[key] = digest
        old = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        old[key] = digest
        GOLDEN.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(GOLDEN.read_text())
    assert digest == want[key], key


def _write_dir(top: Path) -> None:
    (top / "a/b").mkdir(parents=True)
    (top / "a/b/file").write_bytes(_blob(9, 0x3000))
    (top / "a/small").write_bytes(b"small")
    os.link(top / "a/small", top / "a/hard")
    os.symlink("b/file", top / "a/sym")
    (top / "empty").write_bytes(b"")
    os.mkfifo(top / "fifo")
    for p in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_000_000), follow_symlinks=False)
        os.lchown(p, 0, 0)
    os.utime(top, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


@pytest.mark.parametrize("opts_name", sorted(OPTION_SETS))
def test_tar_layer_outputs(opts_name: str, tmp_path: Path) -> None:
    tar = tmp_path / "l0.tar"
    tar.write_bytes(_layer0())
    r = build_image(tree_from_tar(str(tar)), str(tmp_path / "boot"), str(tmp_path / "blobs"), OPTION_SETS[opts_name])
    _check(f"tar/{opts_name}", _digests(r.bootstrap_path, str(tmp_path / "blobs"), r.blob_ids))


@pytest.mark.parametrize("opts_name", ["v6-zstd-blake3", "v5-zstd-blake3", "v6-none-sha256-4k"])
def test_merged_tar_layers_outputs(opts_name: str, tmp_path: Path) -> None:
    trees = []
    for i, data in enumerate((_layer0(), _layer1(), _layer2())):
        p = tmp_path / f"l{i}.tar"
        p.write_bytes(data)
        trees.append(tree_from_tar(str(p)))
    r = build_image(merge_layers(trees), str(tmp_path / "boot"), str(tmp_path / "blobs"), OPTION_SETS[opts_name])
    _check(f"merge/{opts_name}", _digests(r.bootstrap_path, str(tmp_path / "blobs"), r.blob_ids))


@pytest.mark.parametrize("opts_name", ["v6-zstd-blake3", "v5-zstd-blake3", "v6-lz4-blake3-8k-prefetch"])
def test_directory_outputs(opts_name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write_dir(src)
    r = build_image(tree_from_directory(src), str(tmp_path / "boot"), str(tmp_path / "blobs"), OPTION_SETS[opts_name])
    _check(f"dir/{opts_name}", _digests(r.bootstrap_path, str(tmp_path / "blobs"), r.blob_ids))


@pytest.mark.parametrize("opts_name", ["v6-zstd-blake3", "v5-zstd-blake3"])
def test_bootstrap_merge_outputs(opts_name: str, tmp_path: Path) -> None:
    """A parent bootstrap read back (chunks reused) with a tar layer with whiteouts on top."""
    opts = OPTION_SETS[opts_name]
    blobs = str(tmp_path / "blobs")
    l0, l1 = tmp_path / "l0.tar", tmp_path / "l1.tar"
    l0.write_bytes(_layer0())
    l1.write_bytes(_layer1())
    base = build_image(tree_from_tar(str(l0)), str(tmp_path / "base.boot"), blobs, opts)
    with open_bootstrap(base.bootstrap_path) as img:
        parent = tree_from_image(img, blobs)
        r = build_image(merge_layers([parent, tree_from_tar(str(l1))]), str(tmp_path / "boot"), blobs, opts)
    _check(f"bootmerge/{opts_name}", _digests(r.bootstrap_path, blobs, r.blob_ids))


@pytest.mark.parametrize("opts_name", ["v6-zstd-blake3", "v5-zstd-blake3", "v6-lz4-blake3-8k-prefetch"])
def test_layer_stack_outputs(opts_name: str, tmp_path: Path) -> None:
    blobs = str(tmp_path / "blobs")
    stack = LayerStack(OPTION_SETS[opts_name], blobs)
    for i, data in enumerate((_layer0(), _layer1(), _layer2())):
        p = tmp_path / f"l{i}.tar"
        p.write_bytes(data)
        with open(p, "rb") as f:
            stack.add_layer(f)
    r = stack.finish(str(tmp_path / "boot"))
    _check(f"stack/{opts_name}", _digests(r.bootstrap_path, blobs, r.blob_ids))


@pytest.mark.parametrize("opts_name", ["v6-zstd-blake3", "v5-zstd-blake3"])
def test_hand_built_tree_outputs(opts_name: str, tmp_path: Path) -> None:
    import io

    def data(b: bytes) -> FileData:
        return FileData(size=len(b), open=lambda: io.BytesIO(b))

    shared = Inode(mode=stat.S_IFREG | 0o644, uid=1, gid=2, mtime=5, data=data(b"shared" * 999))
    root = Inode.directory(0o755, mtime=7)
    assert root.children is not None
    sub = Inode.directory(0o700, xattrs={b"user.a": b"1", b"user.b": b""})
    assert sub.children is not None
    root.children.update(
        {b"sub": sub, b"h1": shared, b"z": Inode(mode=stat.S_IFLNK | 0o777, symlink=b"/" * 300)}
    )
    sub.children.update({b"h2": shared, b"dev": Inode(mode=stat.S_IFCHR | 0o600, rdev=0x0501)})
    r = build_image(root, str(tmp_path / "boot"), str(tmp_path / "blobs"), OPTION_SETS[opts_name])
    _check(f"hand/{opts_name}", _digests(r.bootstrap_path, str(tmp_path / "blobs"), r.blob_ids))
