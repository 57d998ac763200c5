"""`nydus-image-py chunkdict generate`: the chunks at least N images share become a dictionary
bootstrap (no data of its own), which `create --chunk-dict` then references instead of storing."""

import json
import random
from pathlib import Path

import pytest

from nydus_py.builder.sources import tree_from_directory, tree_from_tar
from nydus_py.rafs import open_bootstrap
from tests.builder.treeutil import describe

from .test_image_cli import run

rng = random.Random(5)
SHARED = {"s1": rng.randbytes(3 * 4096 + 10), "s2": rng.randbytes(2 * 4096)}


def image(tmp: Path, capsys, name: str, files: dict[str, bytes], *extra: str) -> tuple[Path, dict]:
    src = tmp / f"{name}-src"
    src.mkdir()
    for n, data in files.items():
        (src / n).write_bytes(data)
    boot = tmp / f"{name}.boot"
    rc, _, err = run(capsys, "create", "--bootstrap", boot, "--blob-dir", tmp / "blobs", "--chunk-size", "0x1000",
                     "--output-json", tmp / f"{name}.json", *extra, src)
    assert rc == 0, err
    return boot, json.loads((tmp / f"{name}.json").read_text())


def test_shared_chunks_make_a_dictionary_later_builds_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a, ra = image(tmp_path, capsys, "a", {**SHARED, "u1": rng.randbytes(9000)})
    b, _ = image(tmp_path, capsys, "b", {**SHARED, "u2": rng.randbytes(9000)})
    c, _ = image(tmp_path, capsys, "c", {"s2": SHARED["s2"], "u3": rng.randbytes(5000)})
    rc, out, err = run(capsys, "chunkdict", "generate", "--bootstrap", tmp_path / "dict.boot", "--database",
                       "sqlite:///tmp/unused.db", "--output-json", tmp_path / "d.json", a, b, c)
    assert rc == 0, err
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["chunks"] == 4 + 2  # s1's four chunks and s2's two: in 2 and 3 of the images
    assert res["blob_ids"] == [ra["blob_id"]]  # first found in a's blob; no data of its own
    assert res["per_image_kept"] == [6, 6, 2]
    with open_bootstrap(str(tmp_path / "dict.boot")) as d:
        assert d.blobs[0].blob_id == ra["blob_id"]
    # a build with the dictionary stores only what it does not have
    new = rng.randbytes(7000)
    d_boot, rd = image(tmp_path, capsys, "d", {**SHARED, "new": new}, "--chunk-dict",
                       f"bootstrap={tmp_path / 'dict.boot'}")
    assert rd["uncompressed_bytes"] == len(new) and ra["blob_id"] in rd["blob_ids"]
    rc, stdout, err = run(capsys, "check", "--bootstrap", d_boot, "--blob-dir", tmp_path / "blobs")
    assert rc == 0 and "OK" in stdout, err
    rc, _, err = run(capsys, "unpack", "--bootstrap", d_boot, "--blob-dir", tmp_path / "blobs", "--output",
                     tmp_path / "d.tar")
    assert rc == 0, err
    assert describe(tree_from_tar(tmp_path / "d.tar")) == describe(tree_from_directory(tmp_path / "d-src"))
    # --min-images 3: only s2 is in all three
    rc, _, err = run(capsys, "chunkdict", "generate", "-B", tmp_path / "d3.boot", "--min-images", "3",
                     "--output-json", tmp_path / "d3.json", a, b, c)
    assert rc == 0, err
    assert json.loads((tmp_path / "d3.json").read_text())["chunks"] == 2


def test_chunkdict_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a, _ = image(tmp_path, capsys, "a", {"x": rng.randbytes(5000)})
    b, _ = image(tmp_path, capsys, "b", {"y": rng.randbytes(5000)})
    rc, _, err = run(capsys, "chunkdict", "generate", "-B", tmp_path / "d.boot", a, b)
    assert rc == 1 and "no chunk is shared by 2 of the 2 images" in err, err
    src = tmp_path / "big-src"
    src.mkdir()
    (src / "x").write_bytes(b"x" * 100)
    rc, _, err = run(capsys, "create", "-B", tmp_path / "big.boot", "-D", tmp_path / "blobs", src)
    assert rc == 0, err
    rc, _, err = run(capsys, "chunkdict", "generate", "-B", tmp_path / "d.boot", a, tmp_path / "big.boot")
    assert rc == 1 and "a dictionary serves only builds like it" in err, err
    assert len(err.strip().splitlines()) == 1
