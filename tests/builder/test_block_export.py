"""`nydus-image-py export --block`: one raw disk with the data inline, mounted by the kernel EROFS
driver from a read-only loop device and compared with the source tree field by field; fsck.erofs
checks (and extracts) the default, self-contained disk; upstream's verbatim layout
(--keep-device-table) mounts too and is the bootstrap plus each blob's cache view at its slot's
mapped_blkaddr, byte for byte."""

import io
import json
import os
import random
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.build import build_image
from nydus_py.builder.cache_view import write_cache_view
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.tree import FileData
from nydus_py.cli.image import main as image_cli
from nydus_py.rafs.constants import Compressor
from nydus_py.rafs.layout_common import pack_chunks
from nydus_py.rafs.loader import open_bootstrap
from tests.conftest import require_tool

from .erofs_rig import compare_trees, erofs_available, tree_from_directory
from .test_v6_kernel import everything_tree

pytestmark = [pytest.mark.slow, pytest.mark.root]


@contextmanager
def loop_mount(disk: Path, mnt: Path) -> Iterator[Path]:
    """The disk on a read-only loop device, mounted as EROFS (what virtio-blk gives a guest)."""
    loop = subprocess.run([require_tool("losetup"), "-f", "--show", "-r", str(disk)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "erofs", "-o", "ro", loop, str(mnt)], check=True, capture_output=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
    finally:
        subprocess.run([require_tool("losetup"), "-d", loop], check=False, capture_output=True)


def export(boot: Path, blobs: Path, out: Path, *extra: str) -> None:
    assert image_cli(["export", "--block", "-B", str(boot), "-D", str(blobs), "-O", str(out), *extra]) == 0


def fsck(disk: Path, extract: Path | None = None) -> None:
    args = [f"--extract={extract}"] if extract else []
    r = subprocess.run([require_tool("fsck.erofs"), *args, str(disk)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("opts", [BuildOptions(chunk_size=0x4000),
                                  BuildOptions(chunk_size=0x1000, compressor=Compressor.LZ4_BLOCK)],
                         ids=["zstd-16k", "lz4-4k"])
def test_disk_mounts_from_a_loop_device_like_the_source(opts, tmp_path):
    erofs_available()
    src = tmp_path / "src"
    everything_tree(str(src))
    boot, blobs = tmp_path / "boot", tmp_path / "blobs"
    r = build_image(tree_from_directory(str(src)), str(boot), str(blobs), opts)
    assert r.deduplicated > 0
    disk = tmp_path / "image.disk"
    export(boot, blobs, disk)
    with loop_mount(disk, tmp_path / "mnt") as mnt:
        assert compare_trees(str(src), str(mnt)) > 10
    fsck(disk)
    fsck(disk, tmp_path / "extracted")  # fsck reads and writes every file's data from the disk alone
    files = 0
    for top, _dirs, names in os.walk(src):
        for n in names:
            p = Path(top) / n
            if stat.S_ISREG(os.lstat(p).st_mode):
                files += 1
                assert (tmp_path / "extracted" / p.relative_to(src)).read_bytes() == p.read_bytes(), p
    assert files > 5
    # the disk is the whole image: the blobs are not needed any more
    for b in blobs.iterdir():
        b.unlink()
    with loop_mount(disk, tmp_path / "mnt2") as mnt:
        assert compare_trees(str(src), str(mnt)) > 10


def two_blob_image(tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    src = tmp_path / "src"
    src.mkdir()
    lower = random.Random(7).randbytes(5 * 0x1000 + 9)
    (src / "lower").write_bytes(lower)
    (src / "upper").write_bytes(lower[:0x2000] + b"new data" * 1000)
    (src / "empty").write_bytes(b"")
    for p in src.iterdir():
        os.utime(p, ns=(0, 1_000_000_000))
    opts = BuildOptions(chunk_size=0x1000)
    blobs = tmp_path / "blobs"
    w = BlobWriter(str(blobs), opts, blob_index=0)
    chunks = w.add_file(FileData(len(lower), lambda: io.BytesIO(lower)))
    info = w.finish()
    assert info is not None
    root = tree_from_directory(str(src))
    root.set_chunks(root.find(b"/lower"), pack_chunks(chunks), len(lower), root.blob_set([info]))
    boot = tmp_path / "boot"
    r = build_image(root, str(boot), str(blobs), opts)
    assert r.blob_ids == [info.blob_id, r.blob_id]
    return src, boot, blobs, r.blob_ids


def test_two_blobs_and_upstream_layout(tmp_path):
    erofs_available()
    src, boot, blobs, blob_ids = two_blob_image(tmp_path)
    for name, extra in (("own.disk", ()), ("upstream.disk", ("--keep-device-table",))):
        disk = tmp_path / name
        export(boot, blobs, disk, *extra)
        with loop_mount(disk, tmp_path / f"mnt-{name}") as mnt:
            assert compare_trees(str(src), str(mnt)) == 4
    fsck(tmp_path / "own.disk")
    # upstream's bytes: the bootstrap, then each blob's uncompressed view at mapped_blkaddr
    disk = (tmp_path / "upstream.disk").read_bytes()
    raw_boot = boot.read_bytes()
    assert disk[:len(raw_boot)] == raw_boot
    with open_bootstrap(str(boot)) as img:
        slots = img.devices  # type: ignore[attr-defined]
    assert [s.blob_id for s in slots] == blob_ids and all(s.mapped_blkaddr * 4096 >= len(raw_boot) for s in slots)
    for slot in slots:
        view = tmp_path / f"view-{slot.blob_id[:8]}"
        size = write_cache_view(str(boot), str(blobs), slot.blob_id, str(view))
        start = slot.mapped_blkaddr * 4096
        assert disk[start:start + size] == view.read_bytes()
    assert len(disk) == slots[-1].mapped_blkaddr * 4096 + slots[-1].blocks * 4096


def test_errors_are_one_line(tmp_path, capsys):
    src, boot, blobs, blob_ids = two_blob_image(tmp_path)
    (blobs / blob_ids[1]).unlink()
    assert image_cli(["export", "--block", "-B", str(boot), "-D", str(blobs), "-O", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err, err
    assert not (tmp_path / "d").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".disk-")]
    v5 = tmp_path / "v5"
    build_image(tree_from_directory(str(src)), str(v5), str(tmp_path / "b5"), BuildOptions(fs_version=5))
    assert image_cli(["export", "--block", "-B", str(v5), "-D", str(tmp_path / "b5"), "-O", str(tmp_path / "e")]) == 1
    assert "needs RAFS v6" in capsys.readouterr().err


def test_verity_tree_after_the_disk_and_a_config_entry_instead_of_a_blob_dir(tmp_path, capsys):
    """`--verity` appends the hash tree and prints upstream's options line, which `veritysetup
    verify` accepts for the disk; the disk still mounts. `-C` with a BlobCacheEntry (localfs backend,
    metadata_path) writes the same disk as `-B`/`-D`."""
    erofs_available()
    src, boot, blobs, _ids = two_blob_image(tmp_path)
    plain, disk = tmp_path / "plain.disk", tmp_path / "verity.disk"
    export(boot, blobs, plain)
    capsys.readouterr()
    export(boot, blobs, disk, "--verity")
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("dm-verity options: --no-superblock --format=1 -s \"\" --hash=sha256 ")
    words = line.split()
    data_blocks = int(words[words.index("--data-blocks") + 1])
    hash_offset = int(words[words.index("--hash-offset") + 1])
    assert hash_offset == data_blocks * 4096 == plain.stat().st_size
    assert disk.read_bytes()[:hash_offset] == plain.read_bytes()
    verify = [require_tool("veritysetup"), "verify", "--no-superblock", "--format=1", "-s", "", "--hash=sha256",
              "--data-block-size=4096", "--hash-block-size=4096", f"--data-blocks={data_blocks}",
              f"--hash-offset={hash_offset}", str(disk), str(disk), words[-1]]
    r = subprocess.run(verify, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with loop_mount(disk, tmp_path / "mnt") as mnt:
        assert compare_trees(str(src), str(mnt)) == 4
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"type": "bootstrap", "id": "disk-default", "domain_id": "block-nbd", "config_v2": {
        "version": 2, "id": "factory", "backend": {"type": "localfs", "localfs": {"dir": str(blobs)}},
        "cache": {"type": "filecache", "filecache": {"work_dir": str(tmp_path / "cache")}},
        "metadata_path": str(boot)}}))
    via_config = tmp_path / "config.disk"
    assert image_cli(["export", "--block", "-C", str(entry), "-O", str(via_config)]) == 0
    assert via_config.read_bytes() == plain.read_bytes()


def test_config_entry_errors_are_one_line(tmp_path, capsys):
    _src, boot, blobs, _ids = two_blob_image(tmp_path)
    cases = [
        ({"type": "datablob", "id": "x", "config_v2": {"version": 2, "backend": {
            "type": "localfs", "localfs": {"dir": str(blobs)}}}}, "a \"bootstrap\" entry is needed"),
        ({"type": "bootstrap", "id": "", "config_v2": {"version": 2}}, "id:"),
        ({"type": "bootstrap", "id": "x"}, "neither config_v2 nor config"),
        ({"type": "bootstrap", "id": "x", "config_v2": {"version": 1, "backend": {}}}, "version"),
        ({"type": "bootstrap", "id": "x", "config_v2": {"version": 2, "backend": {
            "type": "localfs", "localfs": {"dir": str(blobs)}}}}, "metadata_path"),
    ]
    for i, (obj, words) in enumerate(cases):
        entry = tmp_path / f"entry{i}.json"
        entry.write_text(json.dumps(obj))
        assert image_cli(["export", "--block", "-C", str(entry), "-O", str(tmp_path / f"d{i}")]) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") <= 1, (obj, err)
        assert not (tmp_path / f"d{i}").exists()
    # the legacy form works too
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"type": "bootstrap", "id": "x", "config": {
        "backend_type": "localfs", "backend_config": {"dir": str(blobs)}, "cache_type": "filecache",
        "cache_config": {"work_dir": str(tmp_path / "c2")}, "metadata_path": str(boot)}}))
    assert image_cli(["export", "--block", "-C", str(legacy), "-O", str(tmp_path / "legacy.disk")]) == 0
    assert (tmp_path / "legacy.disk").stat().st_size > 0
