"""The container image, built for real with buildah (tests/deploy/image_rig.py) FROM a Debian
bookworm base made with debootstrap: the build args are checked before anything is fetched; the
default image installs requirements.lock from a private index over HTTPS trusted through
CA_BUNDLE (a TLS-intercepting proxy's situation), runs `nydusd-py --version` and is pushed to a
loopback docker-registry; the nydusd target builds offline from a wheel directory."""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.storage import registry_rig as rig

from .image_rig import (
    LOCAL_BASE,
    Buildah,
    HttpsIndex,
    base_tarball,
    bookworm_sources,
    build_context,
    locked_wheels,
    storage_tmpfs,
)

pytestmark = pytest.mark.slow

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    """buildah on a fresh vfs storage holding the base image: NYDUS_PY_TEST_BASE_IMAGE when set
    (pulled if needed), else the debootstrap tarball imported."""
    binary = require_tool("buildah")
    if os.geteuid() != 0:
        pytest.skip("the image tests run buildah as root (vfs storage, chroot isolation)")
    b = Buildah(binary, tmp_path_factory.mktemp("buildah"))
    on_tmpfs = storage_tmpfs(b.state)
    try:
        base = os.environ.get("NYDUS_PY_TEST_BASE_IMAGE")
        if base:
            b.base = base
        else:
            require_tool("debootstrap")
            b.import_tarball(base_tarball(bookworm_sources(), b.state), LOCAL_BASE)
            b.base, b.from_local = LOCAL_BASE, True
        yield b
    finally:
        if on_tmpfs:
            subprocess.run(["umount", str(b.state)], check=True, timeout=60)
        else:
            shutil.rmtree(b.state)


def arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())


def locked_names() -> set[str]:
    text = (Path(__file__).resolve().parents[2] / "requirements.lock").read_text()
    return {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", text, re.M)}


def build_output(r: subprocess.CompletedProcess[str]) -> str:
    return r.stdout + r.stderr


def test_bad_build_args_fail_first_with_a_line_naming_them(buildah: Buildah, tmp_path: Path) -> None:
    """A missing or non-PEM CA_BUNDLE and an empty WHEELS directory stop the build before apt or
    pip fetch anything, with one line saying what to put where."""
    ctx = build_context(tmp_path / "ctx")
    (ctx / "image-build" / "notes.crt").write_text("not a certificate\n")
    (ctx / "image-build" / "wheels").mkdir()
    cases = {
        "CA_BUNDLE=missing.crt": "CA_BUNDLE=missing.crt: no such file in image-build/ of the build context",
        "CA_BUNDLE=notes.crt": "CA_BUNDLE=notes.crt: not a PEM certificate bundle",
        "WHEELS=wheels": "WHEELS=wheels: no *.whl in image-build/wheels of the build context; "
                         "fill it with scripts/lock.sh --download image-build/wheels",
    }
    for arg, line in cases.items():
        key, _, value = arg.partition("=")
        r = buildah.bud(ctx, "localhost/nydus-py:bad-args", {key: value}, "--target", "build")
        out = build_output(r)
        assert r.returncode != 0, out[-2000:]
        assert line in out, out[-2000:]
        assert not re.search(r"STEP \d+/\d+: RUN .*apt-get", out), out[-2000:]


def test_image_from_a_private_https_index_runs_and_is_pushed(buildah: Buildah, tmp_path: Path) -> None:
    wheels = locked_wheels(arch())
    ca, cert, key = rig.tls_files(tmp_path / "tls")
    with ExitStack() as stack:
        index = HttpsIndex(wheels, tmp_path / "index", cert, key).start()
        stack.callback(index.stop)
        registry = rig.plain_registry(require_tool("docker-registry"), tmp_path / "registry")
        stack.callback(registry.stop)
        ctx = build_context(tmp_path / "ctx")
        # the proxy's CA, and the host's roots for anything else reached directly (the Debian mirror)
        bundle = ca.read_text() + (HOST_BUNDLE.read_text() if HOST_BUNDLE.exists() else "")
        (ctx / "image-build" / "proxy-ca.crt").write_text(bundle)
        commit = secrets.token_hex(20)
        image = "localhost/nydus-py:test"
        r = buildah.bud(ctx, image, {"CA_BUNDLE": "proxy-ca.crt", "PIP_INDEX_URL": index.url, "GIT_COMMIT": commit})
        assert r.returncode == 0, build_output(r)[-4000:]

        # every locked wheel came from the private index (verified TLS, then the lock's hashes)
        served = {p.rsplit("/", 1)[-1] for p in index.served if p.startswith("/files/")}
        assert served == {w.name for w in wheels.glob("*.whl")}
        assert {n.split("-")[0].replace("_", "-").lower() for n in served} == locked_names()

        out = buildah.run_in(image, "sh", "-c", "nydusd-py --version && nydus-snapshotter-py --help >/dev/null "
                             "&& echo snapshotter-help-ok && cat /etc/ssl/certs/ca-certificates.crt")
        assert re.search(r"Version:\s+v\d", out) and f"Git Commit:\t{commit}\n" in out, out[:500]
        assert "snapshotter-help-ok" in out
        assert ca.read_text().strip() in out  # the image trusts the CA_BUNDLE at run time
        print(f"image {image}: {buildah.image_size(image)}")

        buildah("push", "--quiet", "--tls-verify=false", image, f"docker://{registry.host}/nydus-py:test")
        req = urllib.request.Request(f"{registry.url}/v2/nydus-py/manifests/test",
                                     headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            manifest = json.loads(resp.read())
        assert manifest["mediaType"] in (OCI_MANIFEST, DOCKER_MANIFEST) and manifest["layers"]
        for desc in [manifest["config"], *manifest["layers"]]:
            head = urllib.request.Request(f"{registry.url}/v2/nydus-py/blobs/{desc['digest']}", method="HEAD")
            with urllib.request.urlopen(head, timeout=30) as resp:
                assert int(resp.headers["Content-Length"]) == desc["size"], desc
        with urllib.request.urlopen(f"{registry.url}/v2/nydus-py/blobs/{manifest['config']['digest']}",
                                    timeout=30) as resp:
            config = json.loads(resp.read())["config"]
        assert config["Entrypoint"] == ["nydus-snapshotter-py"]
        assert f"NYDUS_PY_GIT_COMMIT={commit}" in config["Env"]
        print(f"pushed: {sum(d['size'] for d in manifest['layers']) / 1e6:.0f} MB compressed")
        buildah.forget(image)  # (after a failure the module's storage goes as a whole)


def test_nydusd_target_builds_offline_from_a_wheel_directory(buildah: Buildah, tmp_path: Path) -> None:
    """WHEELS: pip installs with --no-index from the context's wheels; the index named (a closed
    port) is never asked, so the build would fail if pip went to it."""
    ctx = build_context(tmp_path / "ctx")
    shutil.copytree(locked_wheels(arch()), ctx / "image-build" / "wheels")
    image = "localhost/nydusd-py:offline"
    r = buildah.bud(ctx, image, {"WHEELS": "wheels", "PIP_INDEX_URL": "https://127.0.0.1:9/simple"},
                    "--target", "nydusd")
    assert r.returncode == 0, build_output(r)[-4000:]
    config = json.loads(buildah("inspect", "--type", "image", image).stdout)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["nydusd-py"] and config["Cmd"] == ["--help"]
    out = buildah.run_in(image, "nydusd-py", "--version")
    assert re.search(r"Version:\s+v\d", out), out
    buildah.forget(image)
