"""`nydusify-py commit` pieces without containerd: parsing what `ctr` prints, and the layer a
container's overlay upper directory becomes over its image (whiteouts, opaque directories,
overlay's own xattrs dropped, redirect/metacopy refused). The containerd end to end is in
tests/snapshotter/test_containerd_e2e.py."""

import os
import stat
import tarfile
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.cli.image import main as image_main
from nydus_py.convert.committer import Committer
from nydus_py.convert.containerd import parse_container_info, task_status, upper_dir_of
from nydus_py.convert.errors import ConvertError

INFO = """{
    "ID": "c1",
    "Labels": {"io.containerd.image.config.stop-signal": "SIGTERM"},
    "Image": "127.0.0.1:5000/snap/app:v1-nydus",
    "Runtime": {"Name": "io.containerd.runc.v2", "Options": null},
    "SnapshotKey": "c1",
    "Snapshotter": "nydus-py",
    "CreatedAt": "2026-12-05T05:00:00Z"
}"""


def test_container_info():
    c = parse_container_info(INFO)
    assert (c.id, c.image, c.snapshotter, c.snapshot_key) == ("c1", "127.0.0.1:5000/snap/app:v1-nydus", "nydus-py",
                                                              "c1")
    with pytest.raises(ConvertError, match="no Image"):
        parse_container_info('{"ID": "c1", "Snapshotter": "x", "SnapshotKey": "k"}')
    with pytest.raises(ConvertError, match="not JSON"):
        parse_container_info("container not found")


def test_upper_dir_of_mount_commands():
    cmd = ("mount -t overlay overlay / -o index=off,workdir=/var/lib/s/snapshots/9/work,"
           "upperdir=/var/lib/s/snapshots/9/fs,lowerdir=/var/lib/s/snapshots/3/mnt\n")
    assert upper_dir_of(cmd) == "/var/lib/s/snapshots/9/fs"
    with pytest.raises(ConvertError, match="no upperdir"):
        upper_dir_of("mount -t overlay overlay / -o lowerdir=/a:/b")
    with pytest.raises(ConvertError, match="mounted as 'bind'"):
        upper_dir_of("mount -t bind /var/lib/s/snapshots/1/fs / -o rbind,rw")
    with pytest.raises(ConvertError, match="unexpected snapshot mount"):
        upper_dir_of("")


def test_task_status():
    out = "TASK    PID      STATUS    \nc1      12345    RUNNING\nc2      0        STOPPED\n"
    assert task_status(out, "c1") == "RUNNING" and task_status(out, "c2") == "STOPPED"
    assert task_status(out, "c3") is None


def test_upper_directory_becomes_a_layer_over_the_image(tmp_path: Path, capsys):
    base, upper = tmp_path / "base", tmp_path / "upper"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "passwd").write_text("root:x:0:0\n")
    (base / "etc" / "motd").write_text("hello\n")
    (base / "data" / "old").mkdir(parents=True)
    (base / "data" / "old" / "a").write_text("a")
    (base / "data" / "keep").write_text("k" * 5000)
    boot, blobs = tmp_path / "base.boot", tmp_path / "blobs"
    build_image(tree_from_directory(str(base)), str(boot), str(blobs), BuildOptions(chunk_size=0x1000))
    # what overlayfs leaves in the upper directory
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc" / "motd", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # deleted
    (upper / "etc" / "passwd").write_text("root:x:0:0\nuser:x:1000:1000\n")  # changed
    os.setxattr(upper / "etc", b"trusted.overlay.impure", b"y")
    (upper / "data" / "old").mkdir(parents=True)
    os.setxattr(upper / "data" / "old", b"trusted.overlay.opaque", b"y")  # emptied and refilled
    (upper / "data" / "old" / "b").write_text("b")
    os.setxattr(upper / "data", b"trusted.overlay.origin", b"\x00\xfb")
    os.setxattr(upper / "data", b"user.kept", b"v")
    (upper / "new").write_bytes(os.urandom(9000))
    out_boot, out_blobs = tmp_path / "out.boot", tmp_path / "blobs"
    res = Committer._build(str(boot), str(upper), str(out_boot), str(out_blobs))
    assert res.blob_id is not None and len(res.blob_ids) == 2  # the image's blob and the new one
    assert image_main(["unpack", "--bootstrap", str(out_boot), "--blob-dir", str(blobs), "--output",
                       str(tmp_path / "out.tar")]) == 0
    with tarfile.open(tmp_path / "out.tar") as t:
        names = {m.name.removeprefix("./").rstrip("/") for m in t.getmembers()} - {"", "."}
        assert names == {"etc", "etc/passwd", "data", "data/old", "data/old/b", "data/keep", "new"}
        assert t.extractfile("etc/passwd").read() == b"root:x:0:0\nuser:x:1000:1000\n"  # type: ignore[union-attr]
        assert t.extractfile("data/keep").read() == b"k" * 5000  # type: ignore[union-attr]
        assert t.extractfile("new").read() == (upper / "new").read_bytes()  # type: ignore[union-attr]
        for m in t.getmembers():
            assert not any("overlay" in k for k in m.pax_headers), (m.name, m.pax_headers)
        data = t.getmember("./data" if "./data" in t.getnames() else "data")
        assert data.pax_headers.get("SCHILY.xattr.user.kept") == "v"


def test_redirected_upper_entries_are_refused(tmp_path: Path):
    base, upper = tmp_path / "base", tmp_path / "upper"
    (base / "d").mkdir(parents=True)
    build_image(tree_from_directory(str(base)), str(tmp_path / "b.boot"), str(tmp_path / "blobs"), BuildOptions())
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", b"trusted.overlay.redirect", b"/d")
    with pytest.raises(ConvertError, match="redirect_dir/metacopy"):
        Committer._build(str(tmp_path / "b.boot"), str(upper), str(tmp_path / "o.boot"), str(tmp_path / "blobs"))
