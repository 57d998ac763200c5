"""`nydus-image-py optimize`: the chunks of the listed files move into one new blob (in list
order, a shared chunk once), their records point there, the list becomes the prefetch table, and
the image still checks and unpacks equal to its source."""

import json
import os
import random
import stat
from pathlib import Path

import pytest

from nydus_py.builder.optimize import parse_prefetch_files
from nydus_py.builder.sources import tree_from_directory, tree_from_tar
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.prefetch import resolve_path
from tests.builder.treeutil import describe

from .test_image_cli import run


def make_image(tmp: Path, capsys: pytest.CaptureFixture[str], fs_version: str) -> tuple[Path, Path, Path]:
    rng = random.Random(int(fs_version))
    src = tmp / "src"
    (src / "app").mkdir(parents=True)
    (src / "lib").mkdir()
    for i in range(12):
        (src / "lib" / f"l{i}").write_bytes(rng.randbytes(3000 + 4096 * (i % 4)))
    (src / "app" / "main").write_bytes(rng.randbytes(5 * 4096 + 100))
    (src / "app" / "conf").write_bytes(rng.randbytes(700))
    (src / "app" / "same").write_bytes((src / "lib" / "l3").read_bytes())  # chunks shared with l3
    os.link(src / "app" / "conf", src / "app" / "conf-link")
    boot, blobs = tmp / "img.boot", tmp / "blobs"
    rc, _, err = run(capsys, "create", "--bootstrap", boot, "--blob-dir", blobs, "--fs-version", fs_version,
                     "--chunk-size", "0x1000", src)
    assert rc == 0, err
    return src, boot, blobs


def chunks_of(img, path: bytes) -> list:
    return img.chunks(resolve_path(img, path))


@pytest.mark.parametrize("fs_version", ["5", "6"])
def test_listed_files_move_into_one_new_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str], fs_version: str,
                                             caplog: pytest.LogCaptureFixture):
    src, boot, blobs = make_image(tmp_path, capsys, fs_version)
    with open_bootstrap(str(boot)) as before:
        old_blob = before.blobs[0].blob_id
        untouched = {p: [(c.blob_index, c.compressed_offset) for c in chunks_of(before, p)]
                     for p in (b"/lib/l0", b"/lib/l5")}
    hints = {"version": "v1", "files": [
        {"path": "/app/main", "ranges": [[4096, 4096], [4 * 4096, 1]]},  # chunks 1 and 4 of 6
        {"path": "/lib/l3"}, {"path": "/app/same"}, {"path": "/app/conf-link"},
        {"path": "relative/x"}, {"path": "/nope"}, {"path": "/lib"}]}
    (tmp_path / "hints.json").write_text(json.dumps(hints))
    out = tmp_path / "opt.boot"
    rc, stdout, err = run(capsys, "optimize", "-B", boot, "-D", blobs, "-p", tmp_path / "hints.json", "-O", out,
                          "--output-json", tmp_path / "r.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["files"] == 4 and res["blob_id"] in res["blob_ids"] and old_blob in res["blob_ids"]
    assert sorted(res["skipped"]) == ["/lib: not a regular file", "/nope: not in the image"]
    assert "not absolute, skipped: relative/x" in caplog.text
    l3_chunks = -(-(3000 + 3 * 4096) // 4096)
    assert res["chunks_moved"] == 2 + l3_chunks + 1  # /app/same shares l3's chunks: stored once
    with open_bootstrap(str(out)) as img:
        new = [b.blob_id for b in img.blobs].index(res["blob_id"])
        main = chunks_of(img, b"/app/main")
        assert [c.blob_index == new for c in main] == [False, True, False, False, True, False]
        moved = [(c.compressed_offset, c.uncompressed_size) for c in main if c.blob_index == new]
        l3 = chunks_of(img, b"/lib/l3")
        assert all(c.blob_index == new for c in l3)
        assert [(c.compressed_offset, c.uncompressed_size) for c in chunks_of(img, b"/app/same")] == \
            [(c.compressed_offset, c.uncompressed_size) for c in l3]
        assert all(c.blob_index == new for c in chunks_of(img, b"/app/conf"))  # through its hard link
        # in list order: main's two chunks first, then l3's
        assert moved[0][0] == 0 and max(o for o, _ in moved) < min(c.compressed_offset for c in l3)
        for p, was in untouched.items():
            old = [b.blob_id for b in img.blobs].index(old_blob)
            assert [(c.blob_index, c.compressed_offset) for c in chunks_of(img, p)] == [(old, o) for _b, o in was]
        assert img.prefetch_table() == [resolve_path(img, p) for p in
                                        (b"/app/main", b"/lib/l3", b"/app/same", b"/app/conf-link")]
    rc, stdout, err = run(capsys, "check", "--bootstrap", out, "--blob-dir", blobs)
    assert rc == 0 and "OK" in stdout, err
    rc, _, err = run(capsys, "unpack", "--bootstrap", out, "--blob-dir", blobs, "--output", tmp_path / "out.tar")
    assert rc == 0, err
    assert describe(tree_from_tar(tmp_path / "out.tar")) == describe(tree_from_directory(src))


def test_plain_path_list_and_one_blob_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _src, boot, blobs = make_image(tmp_path, capsys, "6")
    (blob,) = list(blobs.iterdir())
    (tmp_path / "hints.txt").write_text("/lib/l1\n\n/lib/l2\n")
    out_dir = tmp_path / "out-blobs"
    rc, stdout, err = run(capsys, "optimize", "-B", boot, "-b", blob, "-p", tmp_path / "hints.txt",
                          "--output-blob-dir", out_dir, "--output-json", tmp_path / "r.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["files"] == 2 and os.path.isfile(out_dir / res["blob_id"])
    with open_bootstrap(f"{boot}.optimized") as img:
        assert img.prefetch_table() == [resolve_path(img, b"/lib/l1"), resolve_path(img, b"/lib/l2")]
        assert all(stat.S_ISREG(img.getattr(i).mode) for i in img.prefetch_table())


@pytest.mark.parametrize("text,message", [
    (b'{"version": "v2", "files": []}', 'expected {"version": "v1"'),
    (b'{"version": "v1", "files": [{"path": "/a", "ranges": [[1]]}]}', "ranges must be [[offset, size], ...]"),
    (b'{"version": "v1", "files": [{}]}', "entry 0 has no path"),
    (b'{"version": ', "not valid JSON")])
def test_bad_hint_files(text: bytes, message: str):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("{", r"\{")):
        parse_prefetch_files(text)


@pytest.mark.parametrize("boot", ["v5-blake3-lz4.boot", "v5-sha256-none.boot"])
def test_optimize_an_image_made_by_nydus(tmp_path: Path, capsys: pytest.CaptureFixture[str], boot: str):
    """Upstream-made images (the shared fixtures): the optimized image checks and unpacks to the
    same tree as the original."""
    from tests.conftest import NYDUS_FIXTURES

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for b in (NYDUS_FIXTURES / "blobs").iterdir():
        os.symlink(b, blobs / b.name)
    with open_bootstrap(str(NYDUS_FIXTURES / boot)) as img:
        files = [p for p, ino in img.walk() if stat.S_ISREG(img.getattr(ino).mode) and img.getattr(ino).size > 0]
    (tmp_path / "hints.txt").write_bytes(b"\n".join(files[::3]) + b"\n")
    rc, _, err = run(capsys, "optimize", "-B", NYDUS_FIXTURES / boot, "-D", blobs, "-p", tmp_path / "hints.txt",
                     "-O", tmp_path / "opt.boot", "--output-blob-dir", tmp_path / "out", "--output-json",
                     tmp_path / "r.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["files"] == len(files[::3]) and res["chunks_moved"] > 0
    os.symlink(tmp_path / "out" / res["blob_id"], blobs / res["blob_id"])
    assert run(capsys, "check", "--bootstrap", tmp_path / "opt.boot", "--blob-dir", blobs)[0] == 0
    for name, b in (("orig", NYDUS_FIXTURES / boot), ("opt", tmp_path / "opt.boot")):
        rc, _, err = run(capsys, "unpack", "--bootstrap", b, "--blob-dir", blobs, "--output", tmp_path / f"{name}.tar")
        assert rc == 0, err
    assert describe(tree_from_tar(tmp_path / "opt.tar")) == describe(tree_from_tar(tmp_path / "orig.tar"))
