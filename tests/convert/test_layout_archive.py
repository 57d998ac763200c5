"""`nydusify-py convert --source-archive/--target-archive`: OCI image layout tars in place of the
source or target registry. skopeo writes the source archives (`oci-archive:`) and reads the target
ones back into a docker-registry, where `nydusify-py check` compares every file of the Nydus
image with the source image's layers."""

import gzip
import io
import json
import subprocess
import tarfile

import pytest

from . import ociimage as oi
from .test_check import check
from .test_convert_e2e import nydusify

pytestmark = [pytest.mark.slow, pytest.mark.root]


def skopeo_copy(skopeo: str, src: str, dst: str) -> None:
    r = subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--preserve-digests",
                        "--src-tls-verify=false", "--dest-tls-verify=false", src, dst],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def sample(tmp_path_factory, plain_registry, skopeo):
    """The sample image as an OCI archive (tag v1) and in the registry: (archive, registry ref)."""
    work = tmp_path_factory.mktemp("archive")
    layout = oi.write_layout(work / "layout", "v1", oi.make_image(oi.sample_layers(seed=5)))
    archive = work / "app.tar"
    skopeo_copy(skopeo, f"oci:{layout}:v1", f"oci-archive:{archive}:v1")
    ref = f"{plain_registry.host}/archive/app:v1"
    oi.skopeo_push(skopeo, layout, "v1", ref)
    return archive, ref


def passes_check(src: str, dst: str) -> None:
    r = check("--source", src, "--target", dst)
    assert r.returncode == 0, r.stdout + r.stderr


def test_convert_from_an_archive_to_a_registry(sample, plain_registry, tmp_path):
    archive, src = sample
    packed = tmp_path / "app.tar.gz"
    packed.write_bytes(gzip.compress(archive.read_bytes(), 1))
    for n, path in enumerate((archive, packed)):
        dst = f"{plain_registry.host}/archive/from-tar:v{n}"
        r = nydusify("--source", "somewhere.example/any/app:v1", "--source-archive", str(path), "--target", dst,
                     "--target-insecure")
        assert r.returncode == 0, r.stderr
        passes_check(src, dst)


def test_convert_into_an_archive_and_archive_to_archive(sample, plain_registry, skopeo, tmp_path):
    archive, src = sample
    out = tmp_path / "nydus.tar"
    r = nydusify("--source", src, "--source-insecure", "--target-archive", str(out), "--target",
                 "example.com/app:v1-nydus")
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tf:
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        names = tf.getnames()
    assert names[:2] == ["oci-layout", "index.json"]
    [entry] = index["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "v1-nydus",
                                    "io.containerd.image.name": "example.com/app:v1-nydus"}
    dst = f"{plain_registry.host}/archive/into-tar:v1"
    skopeo_copy(skopeo, f"oci-archive:{out}", f"docker://{dst}")
    passes_check(src, dst)
    # no registry at all: archive in, archive out (the name inside defaults to the source's)
    offline = tmp_path / "offline.tar"
    r = nydusify("--source", "registry.invalid/app:v1", "--source-archive", str(archive), "--target-archive",
                 str(offline))
    assert r.returncode == 0, r.stderr
    dst = f"{plain_registry.host}/archive/offline:v1"
    skopeo_copy(skopeo, f"oci-archive:{offline}", f"docker://{dst}")
    passes_check(src, dst)


def test_convert_a_docker_save_archive(plain_registry, skopeo, tmp_path):
    """skopeo's `docker-archive:` (manifest.json, no index.json), two images in it: the one
    --source names is converted."""
    def gzip_only(seed: int) -> oi.OciImage:  # docker images have no zstd layers
        return oi.make_image([oi.compress(oi.Layer(ly.entries, "gzip")) for ly in oi.sample_layers(seed=seed)])

    mine = oi.write_layout(tmp_path / "mine", "v1", gzip_only(7))
    src = f"{plain_registry.host}/archive/docker-src:v1"
    oi.skopeo_push(skopeo, mine, "v1", src)
    saved = tmp_path / "saved.tar"
    other = oi.write_layout(tmp_path / "other", "v1", gzip_only(6))
    r = subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", f"oci:{mine}:v1",
                        f"docker-archive:{saved}:example.com/team/app:v1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with tarfile.open(saved) as tf:
        assert "manifest.json" in tf.getnames() and "index.json" not in tf.getnames()
    dst = f"{plain_registry.host}/archive/from-docker-save:v1"
    r = nydusify("--source", "example.com/team/app:v1", "--source-archive", str(saved), "--target", dst,
                 "--target-insecure")
    assert r.returncode == 0, r.stderr
    passes_check(src, dst)
    # a second image in the archive: the name picks
    two = tmp_path / "two.tar"
    r = subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", f"oci:{other}:v1",
                        f"docker-archive:{two}:example.com/team/other:v2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with tarfile.open(saved) as a, tarfile.open(two) as b, tarfile.open(tmp_path / "both.tar", "w") as out:
        entries = json.load(a.extractfile("manifest.json")) + json.load(b.extractfile("manifest.json"))  # type: ignore[arg-type]
        for tf in (a, b):
            for m in tf:
                if m.name != "manifest.json":
                    out.addfile(m, tf.extractfile(m) if m.isfile() else None)
        body = json.dumps(entries).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        out.addfile(info, io.BytesIO(body))
    dst = f"{plain_registry.host}/archive/from-docker-save:v2"
    r = nydusify("--source", "example.com/team/app:v1", "--source-archive", str(tmp_path / "both.tar"),
                 "--target", dst, "--target-insecure")
    assert r.returncode == 0, r.stderr
    passes_check(src, dst)
    r = nydusify("--source", "example.com/team/nope:v1", "--source-archive", str(tmp_path / "both.tar"),
                 "--target", dst, "--target-insecure")
    assert r.returncode == 1 and "none is tagged" in r.stderr and "example.com/team/other:v2" in r.stderr, r.stderr


def test_archive_errors_are_one_line(sample, tmp_path, plain_registry):
    archive, _src = sample
    two = tmp_path / "two.tar"
    with tarfile.open(archive) as tf_in, tarfile.open(two, "w") as tf_out:
        for m in tf_in:
            data = tf_in.extractfile(m) if m.isfile() else None
            if m.name == "index.json" and data is not None:
                index = json.load(data)
                first = index["manifests"][0]
                index["manifests"] = [{**first, "annotations": {"org.opencontainers.image.ref.name": t}}
                                      for t in ("a", "b")]
                body = json.dumps(index).encode()
                m.size = len(body)
                tf_out.addfile(m, io.BytesIO(body))
            else:
                tf_out.addfile(m, data)
    docker_save = tmp_path / "docker.tar"
    with tarfile.open(docker_save, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"[]"))
    target = f"{plain_registry.host}/archive/never:v1"
    cases = [(two, "holds 2 images and none is named"), (docker_save, "manifest.json lists no image"),
             (tmp_path / "missing.tar", "source archive not accessible")]
    for path, words in cases:
        r = nydusify("--source", "example.com/app:v1", "--source-archive", str(path), "--target", target,
                     "--target-insecure")
        assert r.returncode != 0 and words in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0, r.stderr
    r = nydusify("--source", "example.com/app:v1", "--source-archive", str(archive), "--target-archive",
                 str(tmp_path / "no" / "such" / "dir.tar"))
    assert r.returncode != 0 and "target archive directory not accessible" in r.stderr
