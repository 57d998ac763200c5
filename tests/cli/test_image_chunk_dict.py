"""`nydus-image-py create --chunk-dict bootstrap=PATH` (upstream nydus-image's flag): chunks the
dictionary image has are referenced from its blobs, not stored again; the dictionary blobs some
chunk uses join the blob table, the others do not; the image reads back whole (`check` over every
chunk, `unpack`)."""

import json
import random
import tarfile
from pathlib import Path

import pytest

from nydus_py.rafs import open_bootstrap

from .test_image_cli import run

CS = "0x10000"
KiB = 1024


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def create(capsys: pytest.CaptureFixture[str], src: Path, boot: Path, blobs: Path, *extra: object) -> dict:
    out = boot.with_suffix(".json")
    rc, _, err = run(capsys, "create", "-B", boot, "-D", blobs, "--chunk-size", CS, "--output-json", out, *extra, src)
    assert rc == 0, err
    return json.loads(out.read_text())


def unpacked(capsys: pytest.CaptureFixture[str], boot: Path, blobs: Path, out: Path) -> dict[str, bytes]:
    rc, _, err = run(capsys, "unpack", "-B", boot, "-D", blobs, "--output", out)
    assert rc == 0, err
    with tarfile.open(out) as t:
        return {m.name.lstrip("./"): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]


@pytest.mark.parametrize("fs_version", ["5", "6"])
def test_chunks_of_the_dictionary_are_referenced_not_stored(tmp_path, capsys, fs_version):
    shared, other = rand(1, 5 * 64 * KiB + 123), rand(2, 3 * 64 * KiB)
    blobs = tmp_path / "blobs"
    dict_boot = tmp_path / "dict.boot"
    d = create(capsys, tree(tmp_path / "dict", {"lib/shared": shared, "other": other}), dict_boot, blobs,
               "--fs-version", fs_version)
    files = {"app/copy-of-shared": shared, "app/new": rand(3, 2 * 64 * KiB + 5), "small": b"tiny"}
    src = tree(tmp_path / "app", files)
    plain = create(capsys, src, tmp_path / "plain.boot", tmp_path / "plain-blobs", "--fs-version", fs_version)
    got = create(capsys, src, tmp_path / "app.boot", blobs, "--fs-version", fs_version,
                 "--chunk-dict", f"bootstrap={dict_boot}")
    # the 6 chunks of `shared` come from the dictionary's blob: the new blob stores the rest only
    assert plain["chunks"] - got["chunks"] == 6
    assert got["blob_ids"] == [d["blob_id"], got["blob_id"]]
    with open_bootstrap(str(tmp_path / "app.boot")) as img:
        assert [b.blob_id for b in img.blobs] == got["blob_ids"]
        assert [b.index for b in img.blobs] == [0, 1]
    rc, _, err = run(capsys, "check", "-B", tmp_path / "app.boot", "-D", blobs)
    assert rc == 0, err
    assert unpacked(capsys, tmp_path / "app.boot", blobs, tmp_path / "app.tar") == files


def test_an_unused_dictionary_adds_no_blob_and_a_mismatch_is_one_line(tmp_path, capsys):
    blobs = tmp_path / "blobs"
    dict_boot = tmp_path / "dict.boot"
    create(capsys, tree(tmp_path / "dict", {"x": rand(4, 100 * KiB)}), dict_boot, blobs)
    src = tree(tmp_path / "app", {"y": rand(5, 100 * KiB)})
    got = create(capsys, src, tmp_path / "app.boot", blobs, "--chunk-dict", str(dict_boot))  # plain PATH too
    assert got["blob_ids"] == [got["blob_id"]]
    rc, _, err = run(capsys, "check", "-B", tmp_path / "app.boot", "-D", blobs)
    assert rc == 0, err
    rc, _, err = run(capsys, "create", "-B", tmp_path / "bad.boot", "-D", blobs, "--chunk-size", "0x20000",
                     "--chunk-dict", f"bootstrap={dict_boot}", src)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "chunk size" in err
    rc, _, err = run(capsys, "create", "-B", tmp_path / "bad.boot", "-D", blobs, "--chunk-dict", "blob=x", src)
    assert rc == 1 and "bootstrap=PATH" in err
