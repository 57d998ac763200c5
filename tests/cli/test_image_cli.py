"""`nydus-image-py` end to end: create/merge/check/inspect/unpack, round trips and bad input."""

import gzip
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from nydus_py.builder.merge import merge_layers
from nydus_py.builder.sources import tree_from_directory, tree_from_tar
from nydus_py.cli.image import main
from nydus_py.rafs import open_bootstrap
from tests.builder.treeutil import describe, make_tar, member
from tests.conftest import REPO

IS_ROOT = os.geteuid() == 0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def populate(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"hello\n")
    os.link(root / "d" / "f", root / "d" / "e" / "hl")
    (root / "big").write_bytes(os.urandom(70_000) + bytes(50_000))  # several 4 KiB chunks
    (root / "dup1").write_bytes(b"same" * 3000)
    (root / "dup2").write_bytes(b"same" * 3000)
    (root / "empty").write_bytes(b"")
    os.symlink("../../outside", root / "d" / "sl")
    os.symlink("/", root / "rootlink")
    os.mkfifo(root / "fifo")
    os.chmod(root / "d" / "f", 0o4755)
    os.chmod(root / "d" / "e", 0o700)
    os.setxattr(root / "d" / "f", b"user.bin", b"\x00\xff\x01")
    os.setxattr(root / "d", b"user.dir", b"")
    os.utime(root / "big", ns=(1_600_000_000_000_000_001, 1_600_000_000_123_456_789))
    with open(os.path.join(os.fsencode(root), b"caf\xe9"), "wb") as f:
        f.write(b"latin-1 name")
    if IS_ROOT:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
        os.chown(root / "d" / "f", 1000, 2000)
        os.chmod(root / "d" / "f", 0o4755)
        os.chown(root / "d" / "sl", 7, 8, follow_symlinks=False)
        os.setxattr(root / "big", b"trusted.overlay.opaque", b"y")
        os.setxattr(root / "big", b"security.capability", b"\x01\x00\x00\x02" + bytes(16))


def blob_files(blob_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in blob_dir.iterdir()}


@pytest.mark.parametrize(
    "compressor, digester",
    [("zstd", "blake3"), ("lz4_block", "sha256"), ("none", "blake3")],
)
def test_round_trip_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], compressor: str, digester: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    populate(src)
    boot, blobs, out = tmp_path / "img.boot", tmp_path / "blobs", tmp_path / "out.tar"
    rc, stdout, err = run(
        capsys, "create", "--bootstrap", boot, "--blob-dir", blobs, "--compressor", compressor,
        "--digester", digester, "--chunk-size", "0x1000", "--output-json", tmp_path / "r.json", src,
    )  # fmt: skip
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["blob_id"] in stdout and (blobs / result["blob_id"]).is_file()
    assert result["deduplicated"] >= 3  # dup2 repeats dup1's chunks
    rc, stdout, err = run(capsys, "check", "--bootstrap", boot, "--blob-dir", blobs)
    assert rc == 0, err
    assert "OK" in stdout
    rc, _, err = run(capsys, "unpack", "--bootstrap", boot, "--blob-dir", blobs, "--output", out)
    assert rc == 0, err
    expected = describe(tree_from_directory(src))
    got = describe(tree_from_tar(out))
    assert got.keys() == expected.keys()
    for path in expected:
        assert got[path] == expected[path], path


def test_sockets_are_kept_in_image_and_skipped_in_tar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(src / "sock"))
    s.close()
    (src / "f").write_bytes(b"f")
    boot, blobs = tmp_path / "b", tmp_path / "blobs"
    assert run(capsys, "create", "-B", boot, "-D", blobs, src)[0] == 0
    rc, out, _ = run(capsys, "inspect", "-B", boot, "--json")
    assert rc == 0
    types = {e["path"]: e["type"] for e in json.loads(out)["tree"]}
    assert types["/sock"] == "socket"
    rc, _, err = run(capsys, "unpack", "-B", boot, "-D", blobs, "-o", tmp_path / "o.tar")
    assert rc == 0 and "sock" in err and "skipped" in err
    with tarfile.open(tmp_path / "o.tar") as t:
        assert sorted(t.getnames()) == [".", "f"]


def layer_tars(tmp_path: Path) -> list[Path]:
    big = os.urandom(9000)
    layers = [
        [
            member("etc/motd", data=b"hello"),
            member("etc/hostname", data=b"box"),
            member("data/gone/deep", data=b"x"),
            member("data/opq/a", data=b"a"),
            member("bin/tool", data=big, mode=0o755),
            member("bin/tool-link", tarfile.LNKTYPE, linkname="bin/tool"),
            member("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        ],
        [
            member("etc/.wh.motd"),
            member("data/.wh.gone"),
            member("data/opq/.wh..wh..opq"),
            member("data/opq/b", data=b"b"),
            member("copy-of-tool", data=big),  # same data as a lower layer: deduplicated
        ],
        [member(".dotfile", data=b"dot", pax={"SCHILY.xattr.user.k": "v"}), member("etc/hostname", data=b"new")],
    ]
    paths = []
    for i, members in enumerate(layers):
        raw = make_tar(members)
        p = tmp_path / f"layer{i}.tar{'.gz' if i == 1 else ''}"
        p.write_bytes(gzip.compress(raw) if i == 1 else raw)
        paths.append(p)
    return paths


def test_create_from_layers_applies_whiteouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tars = layer_tars(tmp_path)
    boot, blobs = tmp_path / "img.boot", tmp_path / "blobs"
    rc, _, err = run(
        capsys, "create", "-B", boot, "-D", blobs, "--chunk-size", "0x1000", "--output-json", tmp_path / "r.json", *tars
    )
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["deduplicated"] >= 3
    assert run(capsys, "check", "-B", boot, "-D", blobs)[0] == 0
    assert run(capsys, "unpack", "-B", boot, "-D", blobs, "-o", tmp_path / "o.tar")[0] == 0
    expected = describe(merge_layers([tree_from_tar(t) for t in tars]))
    got = describe(tree_from_tar(tmp_path / "o.tar"))
    assert got == expected
    assert {p.decode() for p in got} == {
        "/", "/.dotfile", "/bin", "/bin/tool", "/bin/tool-link", "/copy-of-tool", "/data", "/data/opq",
        "/data/opq/b", "/dev", "/dev/null", "/etc", "/etc/hostname",
    }  # fmt: skip


def test_merge_layer_bootstraps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tars = layer_tars(tmp_path)
    blobs = tmp_path / "blobs"
    boots = []
    for i, t in enumerate(tars):
        boot = tmp_path / f"l{i}.boot"
        assert run(capsys, "create", "-B", boot, "-D", blobs, "--type", "targz-rafs" if i == 1 else "tar-rafs", t)[0] == 0
        boots.append(boot)
    # a single-layer bootstrap keeps its whiteouts, for merge to apply
    rc, out, _ = run(capsys, "inspect", "-B", boots[1], "--json")
    assert "/etc/.wh.motd" in {e["path"] for e in json.loads(out)["tree"]}
    before = blob_files(blobs)
    merged = tmp_path / "merged.boot"
    rc, _, err = run(capsys, "merge", "-B", merged, "-D", blobs, "--output-json", tmp_path / "m.json", *boots)
    assert rc == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["blob_id"] is None and result["chunks"] == 0
    assert blob_files(blobs) == before  # no data rewritten
    assert set(result["blob_ids"]) <= set(before)
    assert run(capsys, "check", "-B", merged, "-D", blobs)[0] == 0
    assert run(capsys, "unpack", "-B", merged, "-D", blobs, "-o", tmp_path / "o.tar")[0] == 0
    assert describe(tree_from_tar(tmp_path / "o.tar")) == describe(merge_layers([tree_from_tar(t) for t in tars]))
    # merge without --blob-dir works too (nothing new to write)
    assert run(capsys, "merge", "-B", tmp_path / "m2.boot", *boots)[0] == 0
    assert (tmp_path / "m2.boot").read_bytes() == merged.read_bytes()


def test_parent_bootstrap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tars = layer_tars(tmp_path)
    blobs = tmp_path / "blobs"
    assert run(capsys, "create", "-B", tmp_path / "l0.boot", "-D", blobs, tars[0])[0] == 0
    rc, _, err = run(capsys, "create", "-B", tmp_path / "l1.boot", "-D", blobs, "--parent-bootstrap", tmp_path / "l0.boot", tars[1])
    assert rc == 0, err
    assert run(capsys, "unpack", "-B", tmp_path / "l1.boot", "-D", blobs, "-o", tmp_path / "o.tar")[0] == 0
    assert describe(tree_from_tar(tmp_path / "o.tar")) == describe(merge_layers([tree_from_tar(t) for t in tars[:2]]))


def test_repeatable_and_blob_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    populate(src)
    for i in (1, 2):
        assert run(capsys, "create", "--repeatable", "-B", tmp_path / f"{i}.boot", "-D", tmp_path / f"b{i}", src)[0] == 0
    assert (tmp_path / "1.boot").read_bytes() == (tmp_path / "2.boot").read_bytes()
    assert blob_files(tmp_path / "b1") == blob_files(tmp_path / "b2")
    (blob_id,) = blob_files(tmp_path / "b1")
    assert blob_id == hashlib.sha256((tmp_path / "b1" / blob_id).read_bytes()).hexdigest()
    named = "ab" * 32
    rc, out, _ = run(capsys, "create", "--blob-id", named, "-B", tmp_path / "n.boot", "-D", tmp_path / "bn", src)
    assert rc == 0 and named in out and list(blob_files(tmp_path / "bn")) == [named]
    assert run(capsys, "check", "-B", tmp_path / "n.boot", "-D", tmp_path / "bn")[0] == 0


def test_prefetch_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"f")
    (src / "g").write_bytes(b"g")
    (tmp_path / "list").write_text("/a/b\ng\n\n/missing\n")
    boot = tmp_path / "b"
    rc, _, err = run(capsys, "create", "-B", boot, "-D", tmp_path / "blobs", "--prefetch-files", tmp_path / "list", src)
    assert rc == 0 and "missing" in err
    with open_bootstrap(str(boot)) as img:
        a = img.lookup(img.root_ino, b"a")
        assert a is not None
        expected = {img.lookup(a, b"b"), img.lookup(img.root_ino, b"g")}
        assert set(img.prefetch_table()) == expected


def test_check_detects_corrupt_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "victim").write_bytes(os.urandom(10_000))
    boot, blobs = tmp_path / "b", tmp_path / "blobs"
    assert run(capsys, "create", "-B", boot, "-D", blobs, "--compressor", "none", src)[0] == 0
    (blob,) = blobs.iterdir()
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0x55  # inside the only chunk (uncompressed, at offset 0)
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    rc, _, err = run(capsys, "check", "-B", boot, "-D", blobs)
    assert rc == 1
    assert blob.name in err and "/victim" in err and "chunk #0" in err
    rc, out, _ = run(capsys, "check", "-B", boot, "-D", blobs, "--json")
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False and report["error_count"] >= 1
    assert any(blob.name in e for e in report["errors"])
    # structure alone is still fine
    assert run(capsys, "check", "-B", boot)[0] == 0
    # unpack refuses to hand out wrong bytes
    rc, _, err = run(capsys, "unpack", "-B", boot, "-D", blobs, "-o", tmp_path / "o.tar")
    assert rc == 1 and not (tmp_path / "o.tar").exists()
    # a missing blob is named too
    blob.unlink()
    rc, _, err = run(capsys, "check", "-B", boot, "-D", blobs)
    assert rc == 1 and blob.name in err and "not found" in err


def test_check_detects_truncated_blob_and_bad_blob_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(20_000))
    boot, blobs = tmp_path / "b", tmp_path / "blobs"
    assert run(capsys, "create", "-B", boot, "-D", blobs, "--chunk-size", "0x1000", src)[0] == 0
    (blob,) = blobs.iterdir()
    good = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(good[:100])
    rc, _, err = run(capsys, "check", "-B", boot, "-D", blobs)
    assert rc == 1 and blob.name in err
    # flip a byte in the trailer (blob.meta / ToC area): chunk data still verifies, blob.meta must not
    with open_bootstrap(str(boot)) as img:
        ci_offset = img.blobs[0].ci_offset
    assert ci_offset > 0
    bad = bytearray(good)
    bad[ci_offset + 1] ^= 0xFF
    blob.write_bytes(bytes(bad))
    rc, _, err = run(capsys, "check", "-B", boot, "-D", blobs)
    assert rc == 1 and "blob.meta" in err and blob.name in err


def test_inspect_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    populate(src)
    boot = tmp_path / "b"
    assert run(capsys, "create", "-B", boot, "-D", tmp_path / "blobs", "--chunk-size", "0x4000", src)[0] == 0
    rc, out, _ = run(capsys, "inspect", "-B", boot, "--json")
    assert rc == 0
    info = json.loads(out)
    assert (info["version"], info["compressor"], info["digester"], info["chunk_size"]) == (6, "zstd", "blake3", 0x4000)
    assert len(info["blobs"]) == 1 and len(info["blobs"][0]["blob_id"]) == 64
    stats = info["stats"]
    files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
    distinct = {os.lstat(p).st_ino for p in files}
    assert stats["files"] == len(distinct)
    assert stats["hardlinks"] == len(files) - len(distinct)
    assert stats["dirs"] == 1 + sum(1 for p in src.rglob("*") if p.is_dir() and not p.is_symlink())
    assert stats["symlinks"] == 2
    assert stats["total_size"] == sum(os.lstat(p).st_size for p in {os.lstat(p).st_ino: p for p in files}.values())
    tree = {e["path"]: e for e in info["tree"]}
    big = tree["/big"]
    assert big["type"] == "file" and big["size"] == 120_000 and big["chunks"] == 8
    assert tree["/d/f"]["mode"] == 0o4755 and tree["/d/f"]["xattrs"] == ["user.bin"]
    assert tree["/d/e/hl"]["ino"] == tree["/d/f"]["ino"] and tree["/d/f"]["nlink"] == 2
    assert tree["/d/sl"]["target"] == "../../outside"
    assert tree["/fifo"]["type"] == "fifo"
    for e in info["tree"]:
        assert {"path", "ino", "type", "mode", "uid", "gid", "size", "nlink", "mtime", "chunks"} <= e.keys()
    rc, text, _ = run(capsys, "inspect", "-B", boot)
    assert rc == 0 and "/d/sl -> ../../outside" in text and "compressor zstd" in text


@pytest.mark.parametrize(
    "members",
    [
        [member("../escape", data=b"x")],
        [member("h", tarfile.LNKTYPE, linkname="/etc/passwd")],
        [member("s", tarfile.SYMTYPE, linkname="/etc"), member("s/x", data=b"x")],
    ],
)
def test_hostile_tar_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], members: list) -> None:
    (tmp_path / "l.tar").write_bytes(make_tar(members))
    rc, _, err = run(capsys, "create", "-B", tmp_path / "b", "-D", tmp_path / "blobs", tmp_path / "l.tar")
    assert rc == 1 and err.startswith("nydus-image-py: error:")
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "escape").exists()


def test_truncated_tar_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = make_tar([member("big", data=os.urandom(100_000))])
    (tmp_path / "l.tar").write_bytes(raw[:4096])
    rc, _, err = run(capsys, "create", "-B", tmp_path / "b", "-D", tmp_path / "blobs", tmp_path / "l.tar")
    assert rc == 1 and "past the end" in err


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--type", "targz-rafs", "PLAIN"], "not gzip"),
        (["--type", "dir-rafs", "PLAIN"], "needs a directory"),
        (["--type", "tar-rafs", "DIR"], "needs a tar file"),
        (["MISSING"], "No such file"),
        (["--fs-version", "5", "--compressor", "gzip", "DIR"], "gzip is not supported for RAFS v5"),
        (["--blob-id", "../../x", "DIR"], "blob id"),
    ],
)
def test_create_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], message: str) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f").write_bytes(b"f")
    (tmp_path / "plain.tar").write_bytes(make_tar([member("a", data=b"a")]))
    subst = {"PLAIN": tmp_path / "plain.tar", "DIR": tmp_path / "dir", "MISSING": tmp_path / "missing"}
    tail = [str(subst.get(a, a)) for a in argv_tail]
    rc, _, err = run(capsys, "create", "-B", tmp_path / "b", "-D", tmp_path / "blobs", *tail)
    assert rc == 1 and message in err, err


def test_bad_bootstraps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "garbage").write_bytes(os.urandom(8192))
    (tmp_path / "empty").write_bytes(b"")
    for name in ("garbage", "empty", "missing"):
        for cmd in (["check"], ["inspect"], ["unpack", "-D", str(tmp_path), "-o", str(tmp_path / "o.tar")]):
            rc, _, err = run(capsys, cmd[0], "-B", tmp_path / name, *cmd[1:])
            assert rc == 1 and err.startswith("nydus-image-py: error:"), (name, cmd, err)
    assert not (tmp_path / "o.tar").exists()


def test_chunk_size_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["create", "-B", str(tmp_path / "b"), "-D", str(tmp_path), "--chunk-size", "0x1001", str(tmp_path)])
    assert exc.value.code == 2
    assert "power of two" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    (tmp_path / "garbage").write_bytes(b"x" * 100)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "nydus_py.cli.image", "check", "-B", str(tmp_path / "garbage")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert p.returncode == 1 and "Traceback" not in p.stderr and "not a RAFS bootstrap" in p.stderr


# ------------------------------------------------------------------------------------------
# the real Nydus v5 fixtures
# ------------------------------------------------------------------------------------------


def expected_fixture(fixtures: Path) -> tuple[list[dict], dict[bytes, str]]:
    text = (fixtures / "v5-tree.json").read_text()
    tree, end = json.JSONDecoder().raw_decode(text)
    md5s = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            md5s[path.encode()] = digest
    return tree, md5s


def tree_json_shape(node: dict) -> tuple:
    kids = tuple(sorted(tree_json_shape(c) for c in node.get("contents", []) if node["type"] == "directory"))
    return (node["type"], node["name"], node.get("target", ""), kids)


def tar_shape(tar_path: Path) -> tuple:
    root: dict = {"type": "directory", "name": "", "contents": []}
    dirs = {"": root}
    with tarfile.open(tar_path) as t:
        members = t.getmembers()
    for m in members:
        name = m.name.lstrip("./") if m.name != "." else ""
        if not name:
            continue
        parent, _, base = name.rpartition("/")
        if m.isdir():
            node = {"type": "directory", "name": base, "contents": []}
            dirs[name] = node
        elif m.issym():
            node = {"type": "link", "name": base, "target": m.linkname}
        else:
            node = {"type": "file", "name": base}
        dirs[parent]["contents"].append(node)
    return tree_json_shape(root)


@pytest.mark.parametrize("boot", ["v5-sha256-none.boot", "v5-blake3-lz4.boot"])
def test_nydus_v5_fixtures(nydus_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], boot: str) -> None:
    bootstrap, blobs = nydus_fixtures / boot, nydus_fixtures / "blobs"
    rc, out, err = run(capsys, "check", "--bootstrap", bootstrap, "--blob-dir", blobs)
    assert rc == 0, err
    assert "RAFS v5" in out and "OK" in out
    out_tar = tmp_path / "v5.tar"
    rc, _, err = run(capsys, "unpack", "--bootstrap", bootstrap, "--blob-dir", blobs, "--output", out_tar)
    assert rc == 0, err
    tree, md5s = expected_fixture(nydus_fixtures)
    assert tar_shape(out_tar) == tree_json_shape(tree[0])
    with tarfile.open(out_tar) as t:
        got = {}
        links = {}
        for m in t.getmembers():
            if m.isfile():
                f = t.extractfile(m)
                assert f is not None
                got[b"/" + m.name.encode()] = hashlib.md5(f.read()).hexdigest()
            elif m.islnk():
                links[m.name] = m.linkname
    for path, target in links.items():
        got[b"/" + path.encode()] = got[b"/" + target.encode()]
    assert got == md5s
    assert sorted(links.items()) == [
        ("hardlink-test/test.sh", "hardlink-test/foo"),
        ("normal-file-test/test.sh", "hardlink-test/foo"),
    ]
    rc, out, _ = run(capsys, "inspect", "--bootstrap", bootstrap, "--json")
    info = json.loads(out)
    assert info["version"] == 5 and info["stats"]["files"] == 21 and info["stats"]["hardlinks"] == 2
    (blob,) = info["blobs"]
    assert blob["blob_id"] == hashlib.sha256((blobs / blob["blob_id"]).read_bytes()).hexdigest()  # spec 5.5


def test_corrupt_fixture_blob_is_reported(nydus_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = nydus_fixtures / "v5-sha256-none.boot"
    with open_bootstrap(str(bootstrap)) as img:
        blob_id = img.blobs[0].blob_id
    data = bytearray((nydus_fixtures / "blobs" / blob_id).read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / blob_id).write_bytes(bytes(data))
    rc, _, err = run(capsys, "check", "-B", bootstrap, "-D", tmp_path)
    assert rc == 1 and blob_id in err and "digest" in err


@pytest.mark.parametrize("aligned", [False, True])
def test_aligned_chunk_v5(tmp_path: Path, capsys: pytest.CaptureFixture[str], aligned: bool) -> None:
    """`--aligned-chunk` (nydus-image's flag): every chunk of a v5 blob starts 4 KiB-aligned in the
    uncompressed blob; without it v5 packs them end to end. Either way the image checks and unpacks
    equal to its source."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(1000 + 517 * i))
    boot, blobs, out = tmp_path / "img.boot", tmp_path / "blobs", tmp_path / "out.tar"
    rc, _, err = run(capsys, "create", "--bootstrap", boot, "--blob-dir", blobs, "--fs-version", "5",
                     *(["--aligned-chunk"] if aligned else []), src)
    assert rc == 0, err
    with open_bootstrap(str(boot)) as img:
        offsets = [c.uncompressed_offset for _p, ino in img.walk() if stat.S_ISREG(img.getattr(ino).mode)
                   for c in img.chunks(ino)]
    assert len(offsets) == 8
    assert all(o % 4096 == 0 for o in offsets) == aligned, offsets
    assert run(capsys, "check", "--bootstrap", boot, "--blob-dir", blobs)[0] == 0
    rc, _, err = run(capsys, "unpack", "--bootstrap", boot, "--blob-dir", blobs, "--output", out)
    assert rc == 0, err
    assert describe(tree_from_tar(out)) == describe(tree_from_directory(src))


@pytest.mark.parametrize("fs_version", ["5", "6"])
def test_create_with_chunk_dict(tmp_path: Path, capsys: pytest.CaptureFixture[str], fs_version: str) -> None:
    """`create --chunk-dict bootstrap=PATH`: chunks the dictionary image has are referenced from
    its blob (listed first, as nydus-image does), only the rest is stored; the image checks and
    unpacks equal to its source, with both blobs in the blob dir."""
    rng = __import__("random").Random(int(fs_version))
    shared = {f"s{i}": rng.randbytes(20_000 + 1000 * i) for i in range(5)}
    dict_src, src = tmp_path / "dict-src", tmp_path / "src"
    dict_src.mkdir()
    src.mkdir()
    for name, data in shared.items():
        (dict_src / name).write_bytes(data)
        (src / f"copy-of-{name}").write_bytes(data)
    (src / "new").write_bytes(rng.randbytes(30_000))
    blobs = tmp_path / "blobs"
    common = ("--blob-dir", blobs, "--fs-version", fs_version, "--chunk-size", "0x1000")
    rc, _, err = run(capsys, "create", "--bootstrap", tmp_path / "dict.boot", *common,
                     "--output-json", tmp_path / "dict.json", dict_src)
    assert rc == 0, err
    dict_blob = json.loads((tmp_path / "dict.json").read_text())["blob_id"]
    rc, _, err = run(capsys, "create", "--bootstrap", tmp_path / "img.boot", *common, "--chunk-dict",
                     f"bootstrap={tmp_path / 'dict.boot'}", "--output-json", tmp_path / "img.json", src)
    assert rc == 0, err
    res = json.loads((tmp_path / "img.json").read_text())
    assert res["blob_ids"] == [dict_blob, res["blob_id"]]
    assert res["uncompressed_bytes"] == 30_000  # only "new" is stored
    with open_bootstrap(str(tmp_path / "img.boot")) as img:
        used = {c.blob_index for _p, ino in img.walk() if stat.S_ISREG(img.getattr(ino).mode) for c in img.chunks(ino)}
    assert used == {0, 1}
    rc, out, err = run(capsys, "check", "--bootstrap", tmp_path / "img.boot", "--blob-dir", blobs)
    assert rc == 0 and "OK" in out, err
    rc, _, err = run(capsys, "unpack", "--bootstrap", tmp_path / "img.boot", "--blob-dir", blobs,
                     "--output", tmp_path / "out.tar")
    assert rc == 0, err
    assert describe(tree_from_tar(tmp_path / "out.tar")) == describe(tree_from_directory(src))
    # a parent bootstrap that already lists the dictionary's blob: it is not listed twice
    rc, _, err = run(capsys, "create", "--bootstrap", tmp_path / "up.boot", *common, "--parent-bootstrap",
                     tmp_path / "dict.boot", "--chunk-dict", tmp_path / "dict.boot",
                     "--output-json", tmp_path / "up.json", src)
    assert rc == 0, err
    up = json.loads((tmp_path / "up.json").read_text())
    assert up["blob_ids"] == [dict_blob, up["blob_id"]] and up["uncompressed_bytes"] == 30_000


def test_create_chunk_dict_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    rc, _, err = run(capsys, "create", "--bootstrap", tmp_path / "dict.boot", "--blob-dir", tmp_path / "b", src)
    assert rc == 0, err
    for spec, message in ((f"bootstrap={tmp_path / 'dict.boot'}", "chunk dict has chunk size 0x100000, the image "
                                                                  "uses 0x1000"),
                          (f"registry={tmp_path / 'dict.boot'}", "expected bootstrap=PATH")):
        rc, _, err = run(capsys, "create", "--bootstrap", tmp_path / "img.boot", "--blob-dir", tmp_path / "b",
                         "--chunk-size", "0x1000", "--chunk-dict", spec, src)
        assert rc == 1 and message in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "img.boot").exists()
