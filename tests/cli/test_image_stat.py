"""`nydus-image-py stat` on images built with known duplicate content (4 KiB chunks, no
compression), so every number is worked out by hand: chunk references, distinct chunks, dedup
ratio per image and per blob, padding, own/referenced chunks of a target, and the global dedup
table of several bases."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_tar
from nydus_py.cli.image import main
from nydus_py.rafs.constants import Compressor
from tests.builder.treeutil import make_tar, member

K4 = 0x1000
X, Y, Z, V = (bytes([c]) * K4 for c in b"XYZV")
W = b"w" * 100


@pytest.fixture(params=[5, 6])
def images(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(dir with bootstraps a and b, a, b); blobs in their own directory."""
    boots, blobs = tmp_path / "boots", tmp_path / "blobs"
    boots.mkdir()
    blobs.mkdir()
    trees = {
        "a": [member("d", tarfile.DIRTYPE, mode=0o755), member("a1", data=X + Y + Z), member("a2", data=X + X),
              member("a3", tarfile.LNKTYPE, linkname="a1"), member("a4", data=W),
              member("s", tarfile.SYMTYPE, linkname="a1")],
        "b": [member("b1", data=X + V)],
    }
    for name, members in trees.items():
        opts = BuildOptions(fs_version=request.param, compressor=Compressor.NONE, chunk_size=K4)
        build_image(tree_from_tar(io.BytesIO(make_tar(members))), str(boots / name), str(blobs), opts)
    return boots, boots / "a", boots / "b"


def stat_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"stat-{len(os.listdir(tmp_path))}.json"
    assert main(["stat", *args, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def test_one_bootstrap(images, tmp_path):
    _d, a, _b = images
    s = stat_json(tmp_path, "--bootstrap", str(a))
    img = s["base_images"][0]
    assert (img["dirs"], img["files"], img["symlinks"]) == (2, 4, 1)  # root + d; a3 is a name of a1
    assert img["chunks"] == 6 and img["distinct_chunks"] == 4  # a1 XYZ, a2 XX, a4 W -> X Y Z W
    assert img["dedup_ratio"] == pytest.approx(1 - 4 / 6)
    assert img["file_size"] == 3 * K4 + 2 * K4 + 100 and img["padding_size"] == K4 - 100
    assert img["comp_size"] == 5 * K4 + 100 and img["uncomp_size"] == 6 * K4  # uncompressed + padding
    assert img["own_chunks"] == 4 and img["own_comp_size"] == 3 * K4 + 100
    assert img["chunk_sizes"][0] == 3 + 2 + 1  # 4 KiB chunks per file
    assert img["file_sizes"][7] == 1 and img["file_sizes"][14] == 2  # 100 B; 8 KiB and 12 KiB
    [blob] = img["blobs"]
    assert (blob["chunk_refs"], blob["distinct_chunks"], blob["chunk_count"]) == (6, 4, 4)
    assert blob["dedup_ratio"] == pytest.approx(1 / 3)
    assert blob["referenced_uncompressed"] == 3 * K4 + 100
    assert not s["dedup_enabled"] and not s["target_enabled"]


def test_target_against_base(images, tmp_path):
    _d, a, b = images
    s = stat_json(tmp_path, "--bootstrap", str(a), "--target", str(b))
    t = s["target_images"][0]
    assert (t["chunks"], t["own_chunks"], t["ref_chunks"]) == (2, 1, 1)  # V new, X in the base
    assert t["ref_comp_size"] == K4 and t["own_comp_size"] == K4


def test_blob_dir_dedups_across_bases(images, tmp_path):
    d, _a, _b = images
    s = stat_json(tmp_path, "--blob-dir", str(d))
    assert [Path(i["bootstrap"]).name for i in s["base_images"]] == ["a", "b"]
    total = s["base_image"]
    assert total["dedup_chunks"] == 5 and total["dedup_comp_size"] == 4 * K4 + 100  # X Y Z W V
    t1, t2 = s["dedup_info"][:2]
    # threshold 1: every chunk stored once; threshold 2: only X (in both images) goes to the base
    assert (t1["raw_chunks"], t1["dedup_chunks"], t1["comp_base_size"], t1["comp_image_size"]) == (6, 5, 4 * K4 + 100, 0)
    assert (t2["raw_chunks"], t2["dedup_chunks"], t2["comp_base_size"], t2["comp_image_size"]) == (
        6, 5, K4, 3 * K4 + 100)
    assert t2["comp_content_size"] == 5 * K4 + 100


def test_text_output_and_errors(images, capsys):
    _d, a, b = images
    assert main(["stat", "-B", str(a), "-T", str(b)]) == 0
    text = capsys.readouterr().out
    assert "Dedup Ratio:            33.3%" in text and "Referenced Chunk Count: 1" in text
    assert "6 refs to 4 chunks (dedup ratio 33.3%)" in text
    assert main(["stat"]) == 1
    assert "one of --bootstrap and --blob-dir" in capsys.readouterr().err


def test_config_is_checked_and_changes_nothing(images, tmp_path, capsys):
    """upstream's `-C/--config`: a storage config for loading the bootstraps. Chunk sizes are in the
    bootstraps' chunk tables here, so a good config gives the same statistics and a bad one is an error."""
    _d, a, _b = images
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": 2, "backend": {"type": "localfs", "localfs": {"dir": str(tmp_path)}}}))
    plain = stat_json(tmp_path, "-B", str(a))
    with_config = stat_json(tmp_path, "-B", str(a), "-C", str(good))
    assert with_config == plain
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["stat", "-B", str(a), "-C", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JSON" in err.upper()
    assert main(["stat", "-B", str(a), "-C", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
