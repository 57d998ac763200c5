"""Hostile layer tars: decompression bombs (issue 16, item 6).

A small gzip or zstd layer that expands far past its size must be refused while it expands, by
`nydus-image-py create` and by `nydusify-py convert`, with one error line naming the layer and the
limit; the expansion happens only inside the output (`--blob-dir`) or work dir, and nothing is left
there, in the temp dir, or in the target registry after the failure. Small caps are passed as
flags so the bombs stay small.
"""

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from nydus_py.builder.limits import ExpansionLimitError, ExpansionLimits, ExpansionMeter, parse_size
from nydus_py.builder.sources import tree_from_tar
from nydus_py.cli.image import main as image_main
from nydus_py.convert import oci
from nydus_py.convert.layer import decompress_to
from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from tests.storage import registry_rig as rig
from tests.storage.conftest import plain_registry, registry_bin, registry_root  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BOMB_FILE = 48 * MiB  # zeros: ~48 KiB of gzip, a few KiB of zstd


def tar_of(files: dict[str, bytes | int]) -> bytes:
    """A tar with the given files; an int value is that many zero bytes (streamed, not held)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1_700_000_000, 0o644
            if isinstance(data, int):
                info.size = data
                tar.addfile(info, _Zeros(data))
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: "bytearray | memoryview") -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        memoryview(b)[:n] = bytes(n)
        self.left -= n
        return n


@pytest.fixture(scope="module")
def bomb_tar() -> bytes:
    return tar_of({"etc/hello": b"hello\n", "var/bomb": BOMB_FILE})


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "zstd": lambda data: zstandard.ZstdCompressor(level=19).compress(data),
}


@pytest.fixture(scope="module", params=sorted(COMPRESS))
def bomb(request: pytest.FixtureRequest, bomb_tar: bytes) -> tuple[str, bytes, bytes]:
    """(kind, compressed layer, its tar)."""
    blob = COMPRESS[request.param](bomb_tar)
    assert len(blob) * 200 < len(bomb_tar)  # a real bomb: > 200x
    return request.param, blob, bomb_tar


# Caps (flags): ABSOLUTE refuses the bomb by size alone; RATIO by ratio alone (grace 1 MiB).
ABSOLUTE = ["--max-expanded-size", "8M", "--max-expansion-ratio", "0"]
RATIO = ["--max-expansion-ratio", "20", "--expansion-ratio-grace", "1M"]
CASES = {"absolute": (ABSOLUTE, "--max-expanded-size"), "ratio": (RATIO, "--max-expansion-ratio")}


@pytest.fixture
def watched_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's temp dir, redirected to an empty directory the test can inspect."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def create(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = image_main([str(a) for a in argv])
    _out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, err


# -- nydus-image-py create ------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_create_refuses_bomb_and_leaves_nothing(case: str, bomb: tuple[str, bytes, bytes], tmp_path: Path,
                                                watched_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kind, blob, _tar = bomb
    flags, limit = CASES[case]
    layer = tmp_path / f"layer.tar.{kind}"
    layer.write_bytes(blob)
    out = tmp_path / "out"
    rc, err = create(capsys, "create", "--bootstrap", out / "image.boot", "--blob-dir", out / "blobs", *flags, layer)
    assert rc == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("nydus-image-py: error:")]
    assert len(errors) == 1, err
    assert str(layer) in errors[0] and limit in errors[0], errors[0]
    assert not out.exists(), list(out.rglob("*"))  # not even the directories create made
    assert not any(watched_tmp.iterdir())


def test_create_leaves_an_existing_blob_dir_as_it_was(bomb: tuple[str, bytes, bytes], tmp_path: Path,
                                                       watched_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kind, blob, _tar = bomb
    layer = tmp_path / f"layer.tar.{kind}"
    layer.write_bytes(blob)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "older-blob").write_bytes(b"kept")
    rc, err = create(capsys, "create", "--bootstrap", tmp_path / "image.boot", "--blob-dir", blobs, *ABSOLUTE, layer)
    assert rc == 1 and "--max-expanded-size" in err
    assert sorted(p.name for p in blobs.iterdir()) == ["older-blob"]
    assert not (tmp_path / "image.boot").exists()
    assert not any(watched_tmp.iterdir())


def test_create_spools_inside_the_blob_dir_not_the_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With the temp dir unusable, a gzip layer still builds: it is expanded in --blob-dir."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(tar_of({"a/b": b"data" * 1000}), mtime=0))
    blobs = tmp_path / "blobs"
    rc, err = create(capsys, "create", "--bootstrap", tmp_path / "image.boot", "--blob-dir", blobs, layer)
    assert rc == 0, err
    assert (tmp_path / "image.boot").is_file()
    assert [p.name for p in blobs.iterdir() if p.name.startswith(".")] == []  # no spool file left


def test_create_small_compressible_layer_is_within_the_grace(tmp_path: Path, watched_tmp: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The ratio is only checked past the grace: 4 MiB of zeros (1000x) still builds."""
    layer = tmp_path / "zeros.tar.gz"
    layer.write_bytes(gzip.compress(tar_of({"zeros": 4 * MiB}), mtime=0))
    rc, err = create(capsys, "create", "--bootstrap", tmp_path / "image.boot", "--blob-dir", tmp_path / "blobs",
                     "--max-expansion-ratio", "20", "--expansion-ratio-grace", "8M", layer)
    assert rc == 0, err
    assert not any(watched_tmp.iterdir())


def test_create_bad_limit_flags_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--max-expanded-size", "lots"), ("--max-expansion-ratio", "-1"),
                        ("--max-expansion-ratio", "nan"), ("--expansion-ratio-grace", "1X")):
        with pytest.raises(SystemExit) as e:
            image_main(["create", "-B", str(tmp_path / "b"), "-D", str(tmp_path / "d"), flag, value, "src"])
        assert e.value.code == 2
        assert flag in capsys.readouterr().err


# -- the library entry points ---------------------------------------------------------------------


class Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: "bytes | bytearray | memoryview") -> int:  # type: ignore[override]
        self.n += len(b)
        return len(b)


def test_decompress_to_never_writes_past_the_cap(bomb: tuple[str, bytes, bytes]) -> None:
    kind, blob, _tar = bomb
    sink = Sink()
    cap = 8 * MiB
    with pytest.raises(ExpansionLimitError, match="--max-expanded-size"):
        decompress_to(io.BytesIO(blob), sink, limits=ExpansionLimits(max_size=cap, max_ratio=0))  # type: ignore[arg-type]
    assert sink.n <= cap


def test_decompress_to_ratio_cap(bomb: tuple[str, bytes, bytes]) -> None:
    kind, blob, tar = bomb
    sink = Sink()
    with pytest.raises(ExpansionLimitError, match="--max-expansion-ratio"):
        decompress_to(io.BytesIO(blob), sink, limits=ExpansionLimits(max_ratio=20, ratio_grace=MiB))  # type: ignore[arg-type]
    assert sink.n <= max(MiB, 20 * len(blob)) + 16 * MiB  # one decompression step past the check at most
    # the defaults let this (48 MiB, under the 64 MiB grace) through, byte for byte
    out = io.BytesIO()
    diff_id, size, got = decompress_to(io.BytesIO(blob), out)
    assert (got, size, diff_id) == (kind, len(tar), hashlib.sha256(tar).hexdigest())


class Unseekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: "bytearray | memoryview") -> int:  # type: ignore[override]
        return self.f.readinto(b)


def test_ratio_is_against_the_whole_compressed_size(tmp_path: Path, watched_tmp: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """40 MiB of zeros, then 4 MiB of random data: 11x overall, but ~1000x over its first MiB.
    With the layer's size known, a ratio cap of 20 lets it through; a stream of unknown size is
    judged on what was read so far."""
    tar = tar_of({"zeros": 40 * MiB, "random": random.Random(7).randbytes(4 * MiB)})
    blob = gzip.compress(tar, compresslevel=1, mtime=0)
    limits = ExpansionLimits(max_ratio=20, ratio_grace=MiB)
    out = io.BytesIO()
    decompress_to(io.BytesIO(blob), out, limits=limits)
    assert out.getvalue() == tar
    with pytest.raises(ExpansionLimitError, match="--max-expansion-ratio"):
        decompress_to(Unseekable(blob), io.BytesIO(), limits=limits)  # type: ignore[arg-type]
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(blob)
    rc, err = create(capsys, "create", "--bootstrap", tmp_path / "image.boot", "--blob-dir", tmp_path / "blobs",
                     "--max-expansion-ratio", "20", "--expansion-ratio-grace", "1M", layer)
    assert rc == 0, err
    with pytest.raises(ExpansionLimitError, match="--max-expansion-ratio"):
        tree_from_tar(io.BufferedReader(Unseekable(blob)), limits=limits, spool_dir=str(tmp_path))  # type: ignore[arg-type]
    assert not any(watched_tmp.iterdir())


def test_plain_tar_is_not_a_ratio_bomb() -> None:
    tar = tar_of({"zeros": 3 * MiB})
    out = io.BytesIO()
    decompress_to(io.BytesIO(tar), out, limits=ExpansionLimits(max_ratio=1.0, ratio_grace=0))
    assert out.getvalue() == tar
    with pytest.raises(ExpansionLimitError):
        decompress_to(io.BytesIO(tar), io.BytesIO(), limits=ExpansionLimits(max_size=MiB))


def test_tree_from_tar_refuses_bomb_from_a_stream(bomb: tuple[str, bytes, bytes], tmp_path: Path,
                                                  watched_tmp: Path) -> None:
    kind, blob, _tar = bomb
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(ExpansionLimitError, match="--max-expanded-size"):
        tree_from_tar(io.BytesIO(blob), limits=ExpansionLimits(max_size=4 * MiB), spool_dir=str(spool))
    assert not any(spool.iterdir()) and not any(watched_tmp.iterdir())


def test_meter_and_sizes() -> None:
    assert [parse_size(t) for t in ("0", "4096", "8k", "64M", "64MiB", "2g", "1T")] == [
        0, 4096, 8 << 10, 64 << 20, 64 << 20, 2 << 30, 1 << 40]
    for bad in ("", "-1", "1.5G", "12Q", "M"):
        with pytest.raises(ValueError):
            parse_size(bad)
    m = ExpansionMeter(ExpansionLimits(max_size=100, max_ratio=4, ratio_grace=10))
    m.consumed(5)
    m.produce(10)  # at the grace: not checked
    m.produce(10)  # 20 <= 4 * 5
    with pytest.raises(ExpansionLimitError, match="more than 4 times"):
        m.produce(1)
    assert m.expanded == 20
    m.consumed(100)
    m.produce(80)
    with pytest.raises(ExpansionLimitError, match="more than 100 bytes"):
        m.produce(1)
    with pytest.raises(ValueError):
        ExpansionLimits(max_size=-1)


# -- nydusify-py convert --------------------------------------------------------------------------


def push_layer(reg: rig.Registry, repo: str, media_type: str, blob: bytes, tar: bytes) -> None:
    cfg = parse_registry_config({"host": reg.host, "repo": repo, "scheme": "http"}, env={}, docker_config_paths=[])
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}})
    with RegistryBackend(cfg) as b:
        digest = b.push_blob(blob)
        cdig = b.push_blob(config.encode())
        man = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                          "config": {"mediaType": oci.OCI_CONFIG, "digest": cdig, "size": len(config)},
                          "layers": [{"mediaType": media_type, "digest": digest, "size": len(blob)}]}).encode()
        b.push_manifest("v1", man, oci.OCI_MANIFEST)


def repo_exists(reg: rig.Registry, repo: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{reg.url}/v2/{repo}/tags/list", timeout=10) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError:
        return False


MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip", "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_refuses_bomb_and_leaves_nothing(case: str, bomb: tuple[str, bytes, bytes], tmp_path: Path,
                                                 plain_registry: rig.Registry) -> None:  # noqa: F811
    kind, blob, tar = bomb
    flags, limit = CASES[case]
    src_repo, dst_repo = f"bomb/{kind}-{case}", f"bomb-target/{kind}-{case}"
    push_layer(plain_registry, src_repo, MEDIA[kind], blob, tar)
    work, systmp = tmp_path / "work", tmp_path / "systmp"
    work.mkdir()
    systmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(systmp), "DOCKER_CONFIG": "/nonexistent",
           "HOME": "/nonexistent"}
    r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "convert", "--source",
                        f"{plain_registry.host}/{src_repo}:v1", "--target", f"{plain_registry.host}/{dst_repo}:v1",
                        "--source-insecure", "--target-insecure", "--work-dir", str(work), "-q", *flags],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert r.returncode == 1, (r.stdout, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("nydusify-py: error:")]
    assert len(errors) == 1, r.stderr
    layer = "sha256:" + hashlib.sha256(blob).hexdigest()[:12]
    assert f"layer 1 ({layer})" in errors[0] and limit in errors[0], errors[0]
    assert "Traceback" not in r.stderr
    assert not any(work.iterdir()), list(work.rglob("*"))
    assert not any(systmp.iterdir()), list(systmp.rglob("*"))
    assert not repo_exists(plain_registry, dst_repo)
