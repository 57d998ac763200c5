"""`nydus-image-py compact`: an image whose blobs are mostly dead after merges is rewritten into
fewer, smaller blobs (per the thresholds), and it reads back the same (unpack through the reader,
and `check` verifies every chunk)."""

import json
import random
import tarfile
from pathlib import Path

import pytest

from nydus_py.builder.compact import CompactConfig, _Blob, plan
from nydus_py.builder.merge import merge_layers
from nydus_py.builder.sources import tree_from_tar
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.constants import Compressor, Digester
from nydus_py.rafs.model import BlobInfo
from tests.builder.treeutil import describe, make_tar, member

from .test_image_cli import run

KiB = 1024
CHUNK = "0x10000"


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def layer_tars(tmp: Path) -> list[Path]:
    """Layer 0 holds big files that layers 1 and 2 delete: its blob ends up mostly dead."""
    layers = [
        [member("a", data=rand(1, 600 * KiB)), member("b", data=rand(2, 400 * KiB)), member("c", data=rand(3, 50 * KiB)),
         member("dir", tarfile.DIRTYPE, mode=0o755), member("dir/x", data=rand(4, 20 * KiB)),
         member("dir/link", tarfile.LNKTYPE, linkname="dir/x"),
         # q's one chunk is p's second: one stored chunk, referenced at two file offsets
         member("p", data=rand(8, 64 * KiB) + rand(9, 64 * KiB)), member("q", data=rand(9, 64 * KiB))],
        [member(".wh.a"), member("d", data=rand(5, 30 * KiB)), member("dir/sym", tarfile.SYMTYPE, linkname="../c")],
        [member(".wh.b"), member("e", data=rand(6, 40 * KiB))],
        [member("g", data=rand(7, 10 * KiB)), member("c2", data=rand(3, 50 * KiB))],  # c again: same chunks
    ]
    out = []
    for i, members in enumerate(layers):
        p = tmp / f"layer{i}.tar"
        p.write_bytes(make_tar(members))
        out.append(p)
    return out


def merged_image(tmp: Path, capsys: pytest.CaptureFixture[str], fs_version: int = 6) -> tuple[Path, Path, list[Path]]:
    tars = layer_tars(tmp)
    blobs = tmp / "blobs"
    boots = []
    for i, t in enumerate(tars):
        boot = tmp / f"l{i}.boot"
        rc, _, err = run(capsys, "create", "-B", boot, "-D", blobs, "--chunk-size", CHUNK, "--fs-version",
                         str(fs_version), t)
        assert rc == 0, err
        boots.append(boot)
    merged = tmp / "merged.boot"
    rc, _, err = run(capsys, "merge", "-B", merged, "-D", blobs, *boots)
    assert rc == 0, err
    return merged, blobs, tars


def compact(tmp: Path, capsys: pytest.CaptureFixture[str], merged: Path, blobs: Path, *flags: str) -> dict:
    out = tmp / "result.json"
    rc, _, err = run(capsys, "compact", "-B", merged, "-D", blobs, "--output-json", out, *flags)
    assert rc == 0, err
    return json.loads(out.read_text())


def assert_same_tree(tmp: Path, capsys: pytest.CaptureFixture[str], boot: Path, blobs: Path, tars: list[Path]) -> None:
    rc, out, err = run(capsys, "check", "-B", boot, "-D", blobs)
    assert rc == 0, (out, err)
    o = tmp / f"{boot.name}.tar"
    assert run(capsys, "unpack", "-B", boot, "-D", blobs, "-o", o)[0] == 0
    assert describe(tree_from_tar(o)) == describe(merge_layers([tree_from_tar(t) for t in tars]))


def blob_table(boot: Path) -> list[str]:
    with open_bootstrap(str(boot)) as img:
        return [b.blob_id for b in img.blobs]


def sizes(blobs: Path, ids: list[str]) -> int:
    return sum((blobs / b).stat().st_size for b in ids)


def test_min_used_ratio_rebuilds_the_mostly_dead_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    merged, blobs, tars = merged_image(tmp_path, capsys)
    before = blob_table(merged)
    assert len(before) == 4
    res = compact(tmp_path, capsys, merged, blobs, "--min-used-ratio", "50", "--compact-blob-size", "0",
                  "-O", tmp_path / "c.boot")
    after = blob_table(tmp_path / "c.boot")
    assert res["blob_ids"] == after and len(after) == 4  # no merging asked
    assert res["dropped"] == [before[0]] and res["new_blobs"] == [after[0]]  # the layer-0 blob, rebuilt
    assert res["used_ratio"][before[0]] < 20 and all(res["used_ratio"][b] > 50 for b in before[1:])
    assert after[1:] == before[1:]
    # only c, dir/x and p remain of layer 0: ~200 KiB instead of ~1.2 MiB
    assert (blobs / after[0]).stat().st_size < 230 * KiB < (blobs / before[0]).stat().st_size
    assert res["bytes_after"] == sizes(blobs, after) < sizes(blobs, before) - 900 * KiB
    assert_same_tree(tmp_path, capsys, tmp_path / "c.boot", blobs, tars)


@pytest.mark.parametrize("fs_version", [5, 6])
def test_small_blobs_merge_into_one(tmp_path: Path, capsys: pytest.CaptureFixture[str], fs_version: int) -> None:
    merged, blobs, tars = merged_image(tmp_path, capsys, fs_version)
    before = blob_table(merged)
    res = compact(tmp_path, capsys, merged, blobs)  # defaults: blobs < 10 MiB merge, up to 100 MiB
    out = merged.with_suffix(".bootstrap.compact")  # upstream's default output name
    after = blob_table(out)
    assert len(before) == 4 and len(after) == 1 and res["new_blobs"] == after
    assert sorted(res["dropped"]) == sorted(before)
    assert sizes(blobs, after) < sizes(blobs, before) - 900 * KiB
    assert_same_tree(tmp_path, capsys, out, blobs, tars)


def test_max_compact_size_caps_a_merged_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    merged, blobs, tars = merged_image(tmp_path, capsys)
    before = blob_table(merged)  # used KiB: l0 198 (c, x, p), l1 30, l2 40, l3 60 (g, c2: own blob, no dedup)
    res = compact(tmp_path, capsys, merged, blobs, "--max-compact-size", str(135 * KiB), "-O", tmp_path / "c.boot")
    after = blob_table(tmp_path / "c.boot")
    # smallest blob files first: l1 + l2 + l3 = 130 KiB fit; l0's 198 would pass 135: it stays as it is
    assert len(after) == 2 and before[0] in after and len(res["new_blobs"]) == 1
    assert sorted(res["dropped"]) == sorted(before[1:])
    assert_same_tree(tmp_path, capsys, tmp_path / "c.boot", blobs, tars)


def test_config_file_and_layers_to_compact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    merged, blobs, tars = merged_image(tmp_path, capsys)
    cfg = tmp_path / "compact.json"
    cfg.write_text(json.dumps({"min_used_ratio": 50, "compact_blob_size": 0, "max_compact_size": 1 << 20,
                               "layers_to_compact": 5, "blobs_dir": str(blobs)}))
    rc, out, err = run(capsys, "compact", "-B", merged, "--config", cfg, "-O", tmp_path / "c.boot")
    assert rc == 0 and "nothing to compact" in out, err
    assert not (tmp_path / "c.boot").exists()
    # a flag overrides the file; the blob dir comes from the config
    rc, out, err = run(capsys, "compact", "-B", merged, "--config", cfg, "--layers-to-compact", "4",
                       "-O", tmp_path / "c.boot")
    assert rc == 0 and "1 new" in out, err
    assert_same_tree(tmp_path, capsys, tmp_path / "c.boot", blobs, tars)


def test_chunk_dict_blobs_stay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    merged, blobs, tars = merged_image(tmp_path, capsys)
    before = blob_table(merged)
    res = compact(tmp_path, capsys, merged, blobs, "--chunk-dict", f"bootstrap={tmp_path / 'l0.boot'}",
                  "-O", tmp_path / "c.boot")
    after = blob_table(tmp_path / "c.boot")
    assert before[0] in after and before[0] not in res["dropped"] and len(after) == 2
    assert_same_tree(tmp_path, capsys, tmp_path / "c.boot", blobs, tars)


@pytest.mark.parametrize("args,text", [
    (["--min-used-ratio", "100"], "min_used_ratio must be in 0..99"),
    (["--max-compact-size", "-1"], "max_compact_size must be a non-negative integer"),
    (["--backend-type", "registry"], "local blobs only"),
    (["--backend-config", "{\"dir\": 3}"], "expected a localfs config"),
    (["--config", "CFG-UNKNOWN"], "unknown key(s) min_ratio"),
    (["--config", "CFG-BAD"], "not JSON"),
    (["--config", "CFG-TYPE"], "compact_blob_size must be a non-negative integer, not '1M'"),
])
def test_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], text: str) -> None:
    merged, blobs, _ = merged_image(tmp_path, capsys)
    files = {"CFG-UNKNOWN": '{"min_ratio": 3}', "CFG-BAD": "{oops", "CFG-TYPE": '{"compact_blob_size": "1M"}'}
    argv = []
    for a in args:
        if a in files:
            p = tmp_path / "cfg.json"
            p.write_text(files[a])
            a = str(p)
        argv.append(a)
    rc, out, err = run(capsys, "compact", "-B", merged, "-D", blobs, "-O", tmp_path / "c.boot", *argv)
    assert rc == 1 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydus-image-py: error:") and text in lines[0], err
    assert not (tmp_path / "c.boot").exists()


def test_compact_needs_a_blob_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    merged, _blobs, _ = merged_image(tmp_path, capsys)
    rc, _, err = run(capsys, "compact", "-B", merged)
    assert rc == 1 and "needs --blob-dir" in err and len(err.strip().splitlines()) == 1


def _info(i: int, compressor: Compressor = Compressor.ZSTD) -> BlobInfo:
    return BlobInfo(index=i, blob_id=f"{i:064x}", compressor=compressor, digester=Digester.BLAKE3, chunk_size=1 << 20)


def _blob(i: int, size: int, used: int, compressor: Compressor = Compressor.ZSTD) -> _Blob:
    b = _Blob(_info(i, compressor), size)
    if used:
        b.used[(0, used)] = b""
        b.used_bytes = used
    return b


def test_plan_follows_nydus_image() -> None:
    """drop unused; rebuild below min_used_ratio; merge small ones smallest first within max."""
    blobs = [_blob(0, 1000, 0), _blob(1, 1000, 100), _blob(2, 50, 50), _blob(3, 20, 20), _blob(4, 5000, 4000)]
    plan(blobs, CompactConfig(min_used_ratio=20, compact_blob_size=200, max_compact_size=150))
    assert blobs[0].state == "drop"
    # 1 rebuilt (10% used, 100 bytes); small: 3 (20), 2 (50), 1 (100): 3 <- 2 (70), then +100 > 150
    assert (blobs[3].state, sorted(blobs[3].group)) == ("rebuild", [2, 3])
    assert (blobs[2].state, blobs[2].into) == ("merged", 3)
    assert (blobs[1].state, blobs[1].group) == ("rebuild", [1])
    assert blobs[4].state == "keep"


def test_plan_merges_only_compatible_blobs() -> None:
    blobs = [_blob(0, 10, 10), _blob(1, 20, 20, Compressor.LZ4_BLOCK), _blob(2, 30, 30)]
    plan(blobs, CompactConfig(compact_blob_size=100, max_compact_size=100))
    # the lz4 blob stays on its own; the zstd ones merge past it
    assert [b.state for b in blobs] == ["rebuild", "keep", "merged"] and blobs[0].group == [0, 2]
