"""More of nydusify's `convert` flags, against a real loopback docker-registry:
--push-retry-count/--push-retry-delay (through a fault proxy that answers 503), --with-referrer
(the manifest's `subject`), --prefetch-dir, --fs-align-chunk, --batch-size, --docker-v2-format and
the flags' environment variables (SOURCE, TARGET, PLAIN_HTTP, ...)."""

import hashlib
import io
import json
import random
import stat
import subprocess
import sys

import pytest

from nydus_py.convert import oci
from nydus_py.convert.bootstrap_layer import extract_bootstrap
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.prefetch import resolve_path
from tests.storage import registry_rig as rig
from tests.storage.fault_proxy import FaultProxy

from . import ociimage as oi
from . import regpush
from .test_convert_e2e import REPO, env, get_manifest, http_get

pytestmark = [pytest.mark.slow]


def nydusify(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = env()
    e.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "convert", *args], capture_output=True,
                          text=True, timeout=300, env=e, cwd=str(REPO))


@pytest.fixture(scope="module")
def image(plain_registry: rig.Registry) -> tuple[oi.OciImage, str]:
    rng = random.Random(11)
    files = [oi.Entry("data", "dir", mode=0o755), oi.Entry("data/sub", "dir", mode=0o755)]
    files += [oi.Entry(f"data/f{i}", data=rng.randbytes(1000 + 777 * i)) for i in range(6)]
    files += [oi.Entry(f"data/sub/g{i}", data=rng.randbytes(5000 + 33 * i)) for i in range(4)]
    img = oi.make_image([oi.compress(oi.Layer(files, "gzip")),
                         oi.compress(oi.Layer([oi.Entry("x.txt", data=rng.randbytes(70001))], "gzip"))])
    regpush.push_image(plain_registry.url, "upflags/src", "v1", img)
    return img, f"{plain_registry.host}/upflags/src:v1"


def bootstrap_of(reg: rig.Registry, repo: str, tag: str, path) -> dict:
    m = get_manifest(reg, repo, tag)
    st, body = http_get(f"{reg.url}/v2/{repo}/blobs/{m['layers'][-1]['digest']}")
    assert st == 200
    with open(path, "wb") as f:
        extract_bootstrap(io.BytesIO(body), f)
    return m


def test_upload_answered_503_is_tried_again(tmp_path, image, plain_registry):
    """(Whole-blob pushes, `--no-stream-push`: a blob streamed while written whose stream fails
    is pushed whole through this retry path, see test_stream_push.)"""
    _img, src = image
    proxy = FaultProxy(plain_registry.url, match=lambda m, p: m in ("POST", "PATCH", "PUT") and "/blobs/uploads/" in p)
    try:
        proxy.inject("5xx", 2)
        out = tmp_path / "r.json"
        r = nydusify("--source", src, "--target", f"{proxy.host}/upflags/retry:v1", "--plain-http", "--jobs", "1",
                     "--push-retry-delay", "20ms", "--output-json", str(out), "--no-stream-push")
        assert r.returncode == 0, r.stderr
        assert json.loads(out.read_text())["push_retries"] == 2
        assert sum("retrying in 0.02s" in ln for ln in r.stderr.splitlines()) == 2, r.stderr
        assert sum(q.fault == "5xx" for q in proxy.requests) == 2
        m = get_manifest(plain_registry, "upflags/retry", "v1")
        for layer in m["layers"]:
            assert http_get(f"{plain_registry.url}/v2/upflags/retry/blobs/{layer['digest']}")[0] == 200
        # a count of 1 is one attempt: the same fault now fails the conversion, with no manifest
        proxy.inject("5xx", 1)
        r = nydusify("--source", src, "--target", f"{proxy.host}/upflags/once:v1", "--plain-http", "--jobs", "1",
                     "--push-retry-count", "1", "--no-stream-push")
        assert r.returncode == 1 and "503" in r.stderr and "retrying" not in r.stderr, r.stderr
        assert http_get(f"{plain_registry.url}/v2/upflags/once/manifests/v1", oci.OCI_MANIFEST)[0] == 404
    finally:
        proxy.stop()


def test_with_referrer_sets_the_subject(image, plain_registry):
    img, src = image
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/ref:v1", "--plain-http",
                 "--with-referrer")
    assert r.returncode == 0, r.stderr
    st, body = http_get(f"{plain_registry.url}/v2/upflags/src/manifests/v1", oci.OCI_MANIFEST)
    assert st == 200
    m = get_manifest(plain_registry, "upflags/ref", "v1")
    assert m["subject"] == {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                            "size": len(body)}
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/ref:v2", "--plain-http")
    assert r.returncode == 0, r.stderr
    assert "subject" not in get_manifest(plain_registry, "upflags/ref", "v2")


def test_prefetch_dir_is_the_prefetch_table(tmp_path, image, plain_registry):
    _img, src = image
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/pf:v1", "--plain-http",
                 "--prefetch-dir", "/data/sub")
    assert r.returncode == 0, r.stderr
    bootstrap_of(plain_registry, "upflags/pf", "v1", tmp_path / "boot")
    with open_bootstrap(str(tmp_path / "boot")) as img:
        assert img.prefetch_table() == [resolve_path(img, b"/data/sub")]
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/pf:v2", "--plain-http",
                 "--prefetch-dir", "/data", "--prefetch-patterns")
    assert r.returncode == 1 and "--prefetch-dir conflicts with --prefetch-patterns" in r.stderr, r.stderr


@pytest.mark.parametrize("aligned", [False, True])
def test_fs_align_chunk_aligns_v5_chunks(tmp_path, image, plain_registry, aligned):
    _img, src = image
    tag = f"v5-{int(aligned)}"
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/align:{tag}", "--plain-http",
                 "--fs-version", "5", *(["--fs-align-chunk"] if aligned else []))
    assert r.returncode == 0, r.stderr
    bootstrap_of(plain_registry, "upflags/align", tag, tmp_path / "boot")
    with open_bootstrap(str(tmp_path / "boot")) as img:
        offsets = [c.uncompressed_offset for _p, ino in img.walk() if stat.S_ISREG(img.getattr(ino).mode)
                   for c in img.chunks(ino)]
    assert len(offsets) >= 10
    assert all(o % 4096 == 0 for o in offsets) == aligned, offsets
    # the image reads back equal to its source either way
    r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "check", "--plain-http", "--source", src,
                        "--target", f"{plain_registry.host}/upflags/align:{tag}"], capture_output=True, text=True,
                       timeout=300, env=env(), cwd=str(REPO))
    assert r.returncode == 0, r.stderr


def test_batch_size_and_docker_v2_format(image, plain_registry):
    _img, src = image
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/b:v1", "--plain-http",
                 "--batch-size", "0x100000")
    assert r.returncode == 1 and "--batch-size: batch chunks are not supported" in r.stderr, r.stderr
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/b:v1", "--plain-http",
                 "--batch-size", "0", "--docker-v2-format", "-q")
    assert r.returncode == 0, r.stderr
    assert "--docker-v2-format has been deprecated, use --oci instead" in r.stderr
    r = nydusify("--source", src, "--target", f"{plain_registry.host}/upflags/b:v2", "--plain-http",
                 "--push-retry-delay", "bogus")
    assert r.returncode == 1 and "--push-retry-delay: invalid duration 'bogus'" in r.stderr, r.stderr


def test_environment_variables_set_the_flags(tmp_path, image, plain_registry):
    _img, src = image
    out = tmp_path / "env.json"
    r = nydusify(extra_env={"SOURCE": src, "TARGET": f"{plain_registry.host}/upflags/env:v1", "PLAIN_HTTP": "true",
                            "FS_VERSION": "5", "OUTPUT_JSON": str(out), "WITH_REFERRER": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["target"] == f"{plain_registry.host}/upflags/env:v1"
    m = get_manifest(plain_registry, "upflags/env", "v1")
    assert m["layers"][-1]["annotations"][oci.ANNO_FS_VERSION] == "5" and "subject" in m
    # a flag on the command line wins over its variable
    r = nydusify("--fs-version", "6", "--target", f"{plain_registry.host}/upflags/env:v2",
                 extra_env={"SOURCE": src, "TARGET": "127.0.0.1:9/never:used", "PLAIN_HTTP": "true",
                            "FS_VERSION": "5"})
    assert r.returncode == 0, r.stderr
    assert get_manifest(plain_registry, "upflags/env", "v2")["layers"][-1]["annotations"][oci.ANNO_FS_VERSION] == "6"
    # a value that is not a boolean is one line, before anything is fetched
    r = nydusify(extra_env={"SOURCE": src, "TARGET": f"{plain_registry.host}/upflags/env:v3", "PLAIN_HTTP": "yes"})
    assert r.returncode == 2
    assert r.stderr.strip() == "nydusify-py: error: environment variable PLAIN_HTTP='yes' is not a boolean " \
                               "(true/false/1/0)"
    # without SOURCE or --source it is still a usage error
    r = nydusify(extra_env={"TARGET": f"{plain_registry.host}/upflags/env:v3"})
    assert r.returncode == 2 and "--source" in r.stderr
    r = nydusify("--source", src, "--plain-http")
    assert r.returncode == 2 and "one of the arguments --target --target-suffix --target-archive is required" in r.stderr, r.stderr
