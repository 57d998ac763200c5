"""Builder -> project v6 reader round trip on in-memory trees (the nydusd data path: blob.meta),
plus cache-view checks. Cheap, so hypothesis runs many more examples than the kernel oracle."""

import io
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.builder.build import build_image
from nydus_py.builder.cache_view import write_cache_view
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.tree import FileData, Inode, link_counts, walk
from nydus_py.rafs.chunkdata import read_file_range
from nydus_py.rafs.constants import Compressor, Digester
from nydus_py.rafs.errors import DigestMismatch
from nydus_py.rafs.loader import open_bootstrap
from nydus_py.storage.localfs import LocalBlobDir


def reg(data: bytes, **kw) -> Inode:
    return Inode(
        mode=stat.S_IFREG | kw.pop("perm", 0o644), data=FileData(len(data), lambda: io.BytesIO(data)), **kw
    )


def payload(kind: int, size: int) -> bytes:
    if kind == 0:
        return b"\0" * size
    if kind == 1:
        return (b"abc%d" % size * (size // 4 + 1))[:size]
    return os.urandom(size)


attrs = st.fixed_dictionaries(
    {
        "uid": st.integers(0, 2**32 - 1),
        "gid": st.integers(0, 2**32 - 1),
        "mtime": st.integers(0, 2**40),
        "mtime_nsec": st.integers(0, 999_999_999),
        "xattrs": st.dictionaries(
            st.sampled_from([b"user.a", b"trusted.b", b"security.c", b"system.posix_acl_default"]),
            st.binary(max_size=40),
            max_size=2,
        ),
    }
)
leaf = st.one_of(
    st.builds(
        lambda k, n, p, a: reg(payload(k, n), perm=p, **a),
        st.integers(0, 2),
        st.integers(0, 0x5000),
        st.integers(0, 0o7777),
        attrs,
    ),
    st.builds(
        lambda t, a: Inode(mode=stat.S_IFLNK | 0o777, symlink=t, **a),
        st.binary(min_size=1, max_size=200).map(lambda t: t.replace(b"\0", b"0")),
        attrs,
    ),
    st.builds(
        lambda m, rd, a: Inode(mode=m | 0o640, rdev=rd, **a),
        st.sampled_from([stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]),
        st.builds(os.makedev, st.integers(0, 4095), st.integers(0, 2**20 - 1)),
        attrs,
    ),
)
names = (
    st.binary(min_size=1, max_size=30)
    .map(lambda n: n.replace(b"/", b"_").replace(b"\0", b"_"))
    .filter(lambda n: n not in (b".", b".."))
)


def mkdir(children: dict, a: dict) -> Inode:
    d = Inode.directory(0o755, **a)
    d.children.update(children)
    return d


trees = st.recursive(
    leaf, lambda ch: st.builds(mkdir, st.dictionaries(names, ch, max_size=8), attrs), max_leaves=40
)


def add_hardlinks(root: Inode, data: st.DataObject) -> None:
    dirs = [n for _p, n in walk(root) if n.is_dir]
    files = [n for _p, n in walk(root) if n.is_reg]
    for i in range(data.draw(st.integers(0, 3)) if files else 0):
        target = data.draw(st.sampled_from(files))
        data.draw(st.sampled_from(dirs)).children[b"hardlink-%d" % i] = target


def check_image(root: Inode, tmp: str, opts: BuildOptions) -> None:
    boot, blobs = os.path.join(tmp, "boot"), os.path.join(tmp, "blobs")
    build_image(root, boot, blobs, opts)
    counts = link_counts(root)
    img = open_bootstrap(boot)
    source = LocalBlobDir(blobs)
    try:
        ino_of: dict[int, int] = {}
        model = dict(walk(root))
        seen = 0
        for path, ino in img.walk():
            node = model[path]
            seen += 1
            a = img.getattr(ino)
            assert a.mode == node.mode, path
            uid, gid = (0, 0) if opts.repeatable else (node.uid, node.gid)
            assert (a.uid, a.gid, a.mtime, a.mtime_nsec) == (uid, gid, node.mtime, node.mtime_nsec), path
            assert a.nlink == counts[id(node)], path
            assert ino_of.setdefault(id(node), ino) == ino, path  # hard links share the inode
            assert sorted(img.listxattr(ino)) == sorted(node.xattrs), path
            for k, v in node.xattrs.items():
                assert img.getxattr(ino, k) == v, (path, k)
            if node.is_symlink:
                assert img.readlink(ino) == node.symlink
            elif node.is_reg:
                assert a.size == node.size
                with node.data.open() as f:  # type: ignore[union-attr]
                    want = f.read()
                assert read_file_range(source, img, ino, 0, a.size + 10) == want, path
            elif stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
                assert a.rdev == node.rdev
        assert seen == len(model)
    finally:
        img.close()
        source.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    tree=st.builds(mkdir, st.dictionaries(names, trees, min_size=1, max_size=10), attrs),
    data=st.data(),
    compressor=st.sampled_from([Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE]),
    digester=st.sampled_from([Digester.BLAKE3, Digester.SHA256]),
    repeatable=st.booleans(),
)
def test_reader_sees_what_was_built(tmp_path_factory, tree, data, compressor, digester, repeatable):
    add_hardlinks(tree, data)
    opts = BuildOptions(chunk_size=0x1000, compressor=compressor, digester=digester, repeatable=repeatable)
    check_image(tree, str(tmp_path_factory.mktemp("rt")), opts)


def test_cache_view_layout_and_verification(tmp_path):
    data = os.urandom(0x3000 + 5) + b"\0" * 0x2000
    root = Inode.directory()
    root.children[b"f"] = reg(data)
    r = build_image(root, str(tmp_path / "boot"), str(tmp_path / "blobs"), BuildOptions(chunk_size=0x1000))
    img = open_bootstrap(str(tmp_path / "boot"))
    try:
        size = write_cache_view(img, str(tmp_path / "blobs"), r.blob_id, str(tmp_path / "view"))
        view = (tmp_path / "view").read_bytes()
        assert len(view) == size == img.blobs[0].uncompressed_size
        ino = img.lookup(img.root_ino, b"f")
        for c in img.chunks(ino):
            assert (
                view[c.uncompressed_offset : c.uncompressed_offset + c.uncompressed_size]
                == data[c.file_offset : c.file_offset + c.uncompressed_size]
            )
    finally:
        img.close()
    # the path form gives the same view; a flipped byte in chunk data is caught by blob.digest
    write_cache_view(str(tmp_path / "boot"), str(tmp_path / "blobs"), r.blob_id, str(tmp_path / "view2"))
    assert (tmp_path / "view2").read_bytes() == view
    blob = bytearray((tmp_path / "blobs" / r.blob_id).read_bytes())
    blob[10] ^= 0xFF
    (tmp_path / "blobs" / r.blob_id).write_bytes(bytes(blob))
    with pytest.raises(DigestMismatch):
        write_cache_view(str(tmp_path / "boot"), str(tmp_path / "blobs"), r.blob_id, str(tmp_path / "view3"))
    assert not (tmp_path / "view3").exists()
