"""End to end with real parts: OCI images made here (busybox-static root, whiteouts, an opaque
directory, hard links, a dotfile; gzip, zstd and plain layers) pushed to Debian's docker-registry
with skopeo, converted by `nydusify-py`, mounted lazily by reference by `nydusd-py`, and compared
with what a real overlayfs mount of the same layers shows. Bad input fails with a clear message
and pushes nothing; a failed push leaves no manifest; a re-run reuses the blobs."""

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nydus_py.api.client import ApiCallError, ApiClient
from nydus_py.convert import oci
from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device, require_tool
from tests.storage import registry_rig as rig
from tests.storage.fault_proxy import FaultProxy
from tests.waiting import wait_until

from . import ociimage as oi

pytestmark = [pytest.mark.slow, pytest.mark.root]
REPO = Path(__file__).resolve().parents[2]


def env(docker_config: Path | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "IMAGE_PULL_AUTH" and not k.startswith("NYDUS_HEADER_")}
    e["PYTHONPATH"] = str(REPO)
    e["DOCKER_CONFIG"] = str(docker_config or "/nonexistent-docker-config")
    e["HOME"] = "/nonexistent-home"
    return e


def nydusify(*args: str, docker_config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "convert", *args], capture_output=True,
                          text=True, timeout=300, env=env(docker_config), cwd=str(REPO))


def convert(tmp: Path, src: str, dst: str, *extra: str, docker_config: Path | None = None) -> dict:
    out = tmp / f"result-{time.monotonic_ns()}.json"
    r = nydusify("--source", src, "--target", dst, "--source-insecure", "--target-insecure",
                 "--output-json", str(out), *extra, docker_config=docker_config)
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and "dedup ratio" in r.stdout
    return json.loads(out.read_text())


def http_get(url: str, accept: str = "", auth: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    if auth:
        req.add_header("Authorization", f"Basic {auth}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_manifest(reg: rig.Registry, repo: str, ref: str, accept: str = oci.OCI_MANIFEST) -> dict:
    st, body = http_get(f"{reg.url}/v2/{repo}/manifests/{ref}", accept)
    assert st == 200, (st, body)
    return json.loads(body)


def repo_exists(reg: rig.Registry, repo: str) -> bool:
    """docker-registry creates a repository on the first blob upload or manifest push."""
    return http_get(f"{reg.url}/v2/{repo}/tags/list")[0] == 200


class Daemon:
    """`nydusd-py fuse` (dedicated with --image, or shared with an API socket)."""

    def __init__(self, work: Path, name: str, image: str | None = None, config: dict | None = None) -> None:
        self.mnt = work / f"mnt-{name}"
        self.mnt.mkdir()
        self.sock = str(work / f"{name}.sock")
        self.log = work / f"{name}.log"
        argv = [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--mountpoint", str(self.mnt), "--apisock",
                self.sock, "--log-level", "info", "--thread-num", "4"]
        if image:
            argv += ["--image", image]
        if config is not None:
            cfg = work / f"{name}.json"
            cfg.write_text(json.dumps(config))
            argv += ["--config", str(cfg)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=env())
        try:
            wait_until(self._mounted, 30, lambda: f"the daemon to mount:\n{self.log.read_text()}")
        except AssertionError:
            self.kill()
            raise
        self.api = ApiClient(self.sock)

    def _mounted(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return is_mountpoint(str(self.mnt)) and os.path.exists(self.sock)

    def stop(self) -> None:
        self.api.close()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.log.read_text()
        assert not is_mountpoint(str(self.mnt))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if is_mountpoint(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


@pytest.fixture(scope="module")
def source_image(tmp_path_factory, plain_registry, skopeo):
    """The sample image, pushed by skopeo from an OCI layout: (image, reference)."""
    work = tmp_path_factory.mktemp("oci")
    img = oi.make_image(oi.sample_layers(seed=1))
    layout = oi.write_layout(work / "layout", "v1", img)
    ref = f"{plain_registry.host}/test/app:v1"
    oi.skopeo_push(skopeo, layout, "v1", ref)
    assert get_manifest(plain_registry, "test/app", "v1")["layers"][1]["digest"] == img.layers[1].digest
    return img, ref


def registry_cfg(cache: Path | None, **backend: object) -> dict:
    device: dict = {"backend": {"type": "registry", "config": {"scheme": "http", "timeout": 5, **backend}}}
    if cache is not None:
        device["cache"] = {"type": "blobcache", "config": {"work_dir": str(cache)}}
    return {"device": device, "mode": "direct", "digest_validate": True, "enable_xattr": True}


def chroot(mnt: Path, script: str) -> str:
    r = subprocess.run([require_tool("chroot"), str(mnt), "/bin/busybox", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def overlay_reference(work: Path, img: oi.OciImage) -> dict:
    lowers = [oi.unpack_for_overlay(layer, work / f"lower{i}") for i, layer in enumerate(img.layers)]
    mnt = work / "overlay"
    oi.overlay_mount(lowers, mnt)
    try:
        return oi.snapshot(mnt)
    finally:
        oi.umount(mnt)


@pytest.mark.parametrize("fs_version,chunk", [(6, "0x40000"), (5, "0x100000")])
def test_convert_and_mount_lazily_like_overlayfs(fs_version, chunk, tmp_path, daemons, source_image,
                                                 plain_registry):
    require_device("/dev/fuse")
    img, src = source_image
    repo = f"test/app-nydus{fs_version}"
    target = f"{plain_registry.host}/{repo}:v1"
    res = convert(tmp_path, src, target, "--fs-version", str(fs_version), "--chunk-size", chunk)
    assert res["layers"] == 3 and res["deduplicated"] > 0  # big-copy.bin reuses big.bin's chunks

    # what real Nydus tools look for (NYDUSD-CONTRACT.md 7)
    m = get_manifest(plain_registry, repo, "v1")
    assert m["mediaType"] == oci.OCI_MANIFEST and m["config"]["mediaType"] == oci.OCI_CONFIG
    *blobs, boot = m["layers"]
    assert len(blobs) == 3
    for b in blobs:
        assert b["mediaType"] == oci.NYDUS_BLOB and b["annotations"][oci.ANNO_NYDUS_BLOB] == "true"
    assert boot["mediaType"] == oci.OCI_LAYER_GZIP
    assert boot["annotations"][oci.ANNO_NYDUS_BOOTSTRAP] == "true"
    assert boot["annotations"][oci.ANNO_FS_VERSION] == str(fs_version)
    st, cfg_body = http_get(f"{plain_registry.url}/v2/{repo}/blobs/{m['config']['digest']}")
    cfg = json.loads(cfg_body)
    assert cfg["rootfs"]["diff_ids"][:3] == [b["digest"] for b in blobs]
    assert cfg["history"][-1]["comment"] == "Nydus Bootstrap Layer" and cfg["config"]["Cmd"] == ["/bin/sh"]
    st, boot_layer = http_get(f"{plain_registry.url}/v2/{repo}/blobs/{boot['digest']}")
    with tarfile.open(fileobj=io.BytesIO(boot_layer), mode="r:gz") as t:
        assert "image/image.boot" in t.getnames()
    assert cfg["rootfs"]["diff_ids"][3] == "sha256:" + hashlib.sha256(gzip.decompress(boot_layer)).hexdigest()

    # mount by reference: manifest and bootstrap fetched, data read lazily through the blob cache
    cache = tmp_path / "cache"
    d = Daemon(tmp_path, "lazy", image=target, config=registry_cfg(cache))
    daemons.append(d)
    out = chroot(d.mnt, "cat /etc/passwd; ls -A /data/opq; test -e /etc/motd || echo motd-gone; "
                        "test -e /data/gone || echo gone-gone; /bin/hello.sh; cat /.dotfile; "
                        "stat -c '%h %a' /data/hl/one; echo $(wc -l < /data/new.txt)")
    assert out.splitlines() == [
        "root:x:0:0:root:/root:/bin/sh", "nydus:x:1000:1000::/home/nydus:/bin/sh", "b", "motd-gone", "gone-gone",
        "hello from nydus-py", "hidden but present", "2 640", "5000"]
    blob_bytes = sum(b["size"] for b in blobs)
    backend = d.api.call("GET", "/api/v1/metrics/backend")
    # busybox and a few small files were read; the 4 MiB big.bin / big-copy.bin never were
    assert 0 < backend["read_amount_total"] < 0.6 * blob_bytes, (backend, blob_bytes)
    assert backend["read_errors"] == 0
    assert [n for n in os.listdir(cache) if n.endswith(".image.boot")] == [f"{boot['digest'][7:]}.image.boot"]

    # the whole tree equals the overlayfs view of the same layers
    want = overlay_reference(tmp_path, img)
    got = oi.snapshot(d.mnt)
    assert got == want
    assert got["#links"] == (("data/hl/one", "data/hl/two"),)
    d.stop()


def test_rerun_reuses_blobs(tmp_path, source_image, plain_registry):
    img, src = source_image
    target = f"{plain_registry.host}/test/reuse:v1"
    first = convert(tmp_path, src, target)
    uploads = plain_registry.log_text().count('"POST /v2/test/reuse/blobs/uploads/')
    second = convert(tmp_path, src, target)
    assert first["uploaded"] and not first["reused"]
    assert second["uploaded"] == [] and sorted(second["reused"]) == sorted(first["uploaded"])
    assert second["manifest_digest"] == first["manifest_digest"]  # the conversion is deterministic
    assert plain_registry.log_text().count('"POST /v2/test/reuse/blobs/uploads/') == uploads


def test_merge_platform_index_mounted_through_the_api(tmp_path, daemons, source_image, plain_registry, skopeo):
    require_device("/dev/fuse")
    img, src = source_image
    target = f"{plain_registry.host}/test/merged:v1"
    res = convert(tmp_path, src, target, "--merge-platform")
    idx = get_manifest(plain_registry, "test/merged", "v1", oci.OCI_INDEX)
    assert idx["mediaType"] == oci.OCI_INDEX and len(idx["manifests"]) == 2
    orig, ny = idx["manifests"]
    assert orig["digest"] == img.manifest_digest and orig["platform"] == {"architecture": "amd64", "os": "linux"}
    assert ny["digest"] == res["manifest_digest"] and ny["artifactType"] == oci.NYDUS_ARTIFACT
    assert ny["platform"]["os.features"] == [oci.NYDUS_OS_FEATURE]
    nm = get_manifest(plain_registry, "test/merged", ny["digest"])
    assert nm["config"]["mediaType"] == oci.NYDUS_CONFIG
    # plain tools still get the original image from the index
    out = tmp_path / "copied"
    subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", f"docker://{target}",
                    f"dir:{out}"], check=True, capture_output=True, timeout=120)
    copied = (out / "manifest.json").read_bytes()
    assert hashlib.sha256(copied).hexdigest() == img.manifest_digest[7:]

    # a shared daemon mounts the reference through the HTTP API (the Nydus entry of the index)
    d = Daemon(tmp_path, "shared")
    daemons.append(d)
    d.api.call("POST", "/api/v1/mount", {"mountpoint": "/app"},
               {"fs_type": "rafs", "source": f"docker://{target}", "config": json.dumps(registry_cfg(None))})
    assert (d.mnt / "app" / "etc" / "hostname-ish").read_bytes() == b"nydus-py\n"
    assert sorted(os.listdir(d.mnt / "app" / "data" / "opq")) == ["b"]
    info = d.api.call("GET", "/api/v1/daemon")
    assert any(m["mountpoint"] == "/app" for m in info["backend_collection"].values())
    with pytest.raises(ApiCallError) as e:  # a reference that is not there: 4xx with the reason
        d.api.call("POST", "/api/v1/mount", {"mountpoint": "/nope"},
                   {"fs_type": "rafs", "source": f"docker://{plain_registry.host}/test/absent:v1",
                    "config": json.dumps(registry_cfg(None))})
    assert "not found" in str(e.value)
    with pytest.raises(ApiCallError) as e:  # an OCI image that is not a Nydus one
        d.api.call("POST", "/api/v1/mount", {"mountpoint": "/oci"},
                   {"fs_type": "rafs", "source": f"docker://{src}", "config": json.dumps(registry_cfg(None))})
    assert "not a Nydus image" in str(e.value)
    d.stop()


# -- bad input ---------------------------------------------------------------------------------------


def push_raw(reg: rig.Registry, repo: str, tag: str, layers: list[tuple[str, bytes]], config: bytes) -> str:
    """Push blobs and a manifest with our own client (skopeo would refuse or repair bad layers)."""
    cfg = parse_registry_config({"host": reg.host, "repo": repo, "scheme": "http"}, env={}, docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        descs = [{"mediaType": mt, "digest": b.push_blob(data), "size": len(data)} for mt, data in layers]
        cdig = b.push_blob(config)
        man = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                          "config": {"mediaType": oci.OCI_CONFIG, "digest": cdig, "size": len(config)},
                          "layers": descs}).encode()
        return b.push_manifest(tag, man, oci.OCI_MANIFEST)


def one_layer_config(diff_id: str, arch: str = "amd64") -> bytes:
    return json.dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()


def small_tar(marker: str, entries: list[oi.Entry] | None = None) -> bytes:
    return oi.make_tar(entries or [oi.Entry("etc", "dir", mode=0o755), oi.Entry("etc/marker", data=marker.encode())])


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


BAD = ["missing-repo", "missing-tag", "platform-mismatch", "platform-invalid", "index-without-platform",
       "digest-mismatch", "truncated-gzip", "diff-id-mismatch", "not-a-tar", "hostile-path", "already-nydus"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_clearly_and_pushes_nothing(case, tmp_path, source_image, plain_registry):
    img, src = source_image
    host = plain_registry.host
    extra: list[str] = []
    gz = "application/vnd.oci.image.layer.v1.tar+gzip"
    if case == "missing-repo":
        source, expect = f"{host}/test/no-such-image:v1", "not found"
    elif case == "missing-tag":
        source, expect = f"{host}/test/app:no-such-tag", "not found"
    elif case == "platform-mismatch":
        source, expect, extra = src, "is for linux/amd64, not linux/arm64", ["--platform", "linux/arm64"]
    elif case == "platform-invalid":
        source, expect, extra = src, "invalid platform", ["--platform", "linux"]
    elif case == "index-without-platform":
        tar = small_tar("arm")
        man = push_raw(plain_registry, "bad/index", "arm", [(gz, gzip.compress(tar, mtime=0))],
                       one_layer_config(sha(tar), "arm64"))
        st, body = http_get(f"{plain_registry.url}/v2/bad/index/manifests/arm", oci.OCI_MANIFEST)
        index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
            {"mediaType": oci.OCI_MANIFEST, "digest": man, "size": len(body),
             "platform": {"os": "linux", "architecture": "arm64"}}]}).encode()
        with RegistryBackend(parse_registry_config({"host": host, "repo": "bad/index", "scheme": "http"}, env={},
                                                   docker_config_paths=[])) as b:
            b.push_manifest("multi", index, oci.OCI_INDEX)
        source, expect = f"{host}/bad/index:multi", "no manifest for platform linux/amd64"
    elif case == "digest-mismatch":
        tar = small_tar(f"lying layer {time.time_ns()}")
        blob = gzip.compress(tar, mtime=0)
        push_raw(plain_registry, "bad/lying", "v1", [(gz, blob)], one_layer_config(sha(tar)))
        h = sha(blob)[7:]  # the registry serves what is on its disk: change it behind its back
        data = plain_registry.data / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"
        data.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        source, expect = f"{host}/bad/lying:v1", "does not match its digest"
    elif case == "truncated-gzip":
        tar = small_tar("truncated", [oi.Entry("f", data=os.urandom(200_000))])
        push_raw(plain_registry, "bad/trunc", "v1", [(gz, gzip.compress(tar, mtime=0)[:-5000])],
                 one_layer_config(sha(tar)))
        source, expect = f"{host}/bad/trunc:v1", "truncated gzip"
    elif case == "diff-id-mismatch":  # checked where it is used: the build cache's keys
        tar = small_tar("diff id")
        push_raw(plain_registry, "bad/diffid", "v1", [(gz, gzip.compress(tar, mtime=0))],
                 one_layer_config(sha(tar + b"\0" * 512)))
        source, expect = f"{host}/bad/diffid:v1", "does not match the config's diff_id"
        extra = ["--build-cache", f"{host}/cache/diffid:cache"]
    elif case == "not-a-tar":
        junk = os.urandom(5000)
        push_raw(plain_registry, "bad/junk", "v1", [(gz, gzip.compress(junk, mtime=0))], one_layer_config(sha(junk)))
        source, expect = f"{host}/bad/junk:v1", "layer 1"
    elif case == "hostile-path":
        tar = small_tar("x", [oi.Entry("../../etc/evil", data=b"evil")])
        push_raw(plain_registry, "bad/hostile", "v1", [(gz, gzip.compress(tar, mtime=0))], one_layer_config(sha(tar)))
        source, expect = f"{host}/bad/hostile:v1", "escapes the layer root"
    else:
        convert(tmp_path, src, f"{host}/test/already:v1")
        source, expect = f"{host}/test/already:v1", "already a Nydus image"
    target_repo = f"target/{case}"
    r = nydusify("--source", source, "--target", f"{host}/{target_repo}:v1", "--source-insecure",
                 "--target-insecure", *extra)
    assert r.returncode == 1, (r.stdout, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("nydusify-py: error:")]
    assert len(errors) == 1 and expect in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not repo_exists(plain_registry, target_repo)  # nothing was pushed


def test_a_config_lying_about_diff_ids_converts_without_a_build_cache(tmp_path, plain_registry):
    """Without build-cache records nothing uses the source's diff_ids (the tar is fixed by the
    layer digest, which is checked), so the tar is not hashed; the image converts, and its
    Nydus config lists the new blobs, not the lying diff_id."""
    host = plain_registry.host
    tar = small_tar("diff id, no cache")
    lie = sha(tar + b"\0" * 512)
    push_raw(plain_registry, "lying/diffid", "v1", [("application/vnd.oci.image.layer.v1.tar+gzip",
                                                       gzip.compress(tar, mtime=0))], one_layer_config(lie))
    res = convert(tmp_path, f"{host}/lying/diffid:v1", f"{host}/lying/diffid:v1-nydus")
    assert res["layers_built"] == 1
    st, body = http_get(f"{plain_registry.url}/v2/lying/diffid/manifests/v1-nydus", oci.OCI_MANIFEST)
    assert st == 200
    st, cfg = http_get(f"{plain_registry.url}/v2/lying/diffid/blobs/{json.loads(body)['config']['digest']}")
    assert st == 200 and lie not in json.loads(cfg)["rootfs"]["diff_ids"]


def test_failed_push_leaves_no_manifest_and_rerun_completes(tmp_path, source_image, plain_registry):
    img, src = source_image
    # uploads through a proxy that fails the first blob upload it sees (whole pushes: a blob
    # streamed while written that fails is pushed whole then, see test_stream_push)
    proxy = FaultProxy(plain_registry.url, match=lambda m, p: m == "POST" and "/blobs/uploads/" in p)
    try:
        target = f"{proxy.host}/test/flaky:v1"
        proxy.inject("5xx", 1)
        r = nydusify("--source", src, "--target", target, "--source-insecure", "--target-insecure", "--jobs", "1",
                     "--push-retry-count", "1", "--no-stream-push")
        assert r.returncode == 1 and "503" in r.stderr, r.stderr
        st, _ = http_get(f"{plain_registry.url}/v2/test/flaky/manifests/v1", oci.OCI_MANIFEST)
        assert st == 404  # no manifest pointing at missing blobs
        res = convert(tmp_path, src, target)
        assert res["uploaded"]
        m = get_manifest(plain_registry, "test/flaky", "v1")
        for layer in m["layers"]:
            assert http_get(f"{plain_registry.url}/v2/test/flaky/blobs/{layer['digest']}")[0] == 200
    finally:
        proxy.stop()


def test_download_cut_midway_restarts_the_layer(tmp_path, source_image, plain_registry):
    """Layers are inflated while they download: a body cut off midway restarts that layer's
    tar from zero (`_InflateSink.restart`), and the image is the same as without the fault."""
    img, src = source_image
    clean = convert(tmp_path, src, f"{plain_registry.host}/test/cut-ref:v1")
    big = max(img.layers, key=lambda layer: len(layer.blob)).digest
    proxy = FaultProxy(plain_registry.url, match=lambda m, p: m == "GET" and p.endswith(f"/blobs/{big}"))
    try:
        proxy.inject("truncate_200", 2)
        res = convert(tmp_path, src.replace(plain_registry.host, proxy.host), f"{plain_registry.host}/test/cut:v1")
        assert [r.fault for r in proxy.requests if r.path.endswith(big)] == ["truncate_200", "truncate_200", None]
    finally:
        proxy.stop()
    assert res["manifest_digest"] == clean["manifest_digest"]


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_authenticated_registries(kind, tmp_path, daemons, request, skopeo):
    require_device("/dev/fuse")
    reg = request.getfixturevalue(f"{kind}_registry")
    img = oi.make_image(oi.sample_layers(seed=2, big=1 << 20))
    layout = oi.write_layout(tmp_path / "layout", "v1", img)
    creds = f"{rig.USER}:{rig.PASSWORD}"
    subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                    "--dest-creds", creds, f"oci:{layout}:v1", f"docker://{reg.host}/private/app:v1"],
                   check=True, capture_output=True, timeout=120)
    target = f"{reg.host}/private/app:v1-nydus"
    if kind == "basic":  # explicit credentials
        r = nydusify("--source", f"{reg.host}/private/app:v1", "--target", target, "--source-insecure",
                     "--target-insecure", "--source-auth", creds, "--target-auth", creds)
        assert r.returncode == 0, r.stderr
    else:  # docker config.json, bearer tokens with pull then push scope
        dc = tmp_path / "docker"
        dc.mkdir()
        (dc / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": rig.basic_auth()}}}))
        convert(tmp_path, f"{reg.host}/private/app:v1", target, docker_config=dc)
    anonymous = nydusify("--source", f"{reg.host}/private/app:v1", "--target", f"{reg.host}/private/x:v1",
                         "--source-insecure", "--target-insecure")
    assert anonymous.returncode == 1 and "nydusify-py: error:" in anonymous.stderr
    d = Daemon(tmp_path, kind, image=target, config=registry_cfg(None, auth=rig.basic_auth()))
    daemons.append(d)
    assert chroot(d.mnt, "cat /etc/hostname-ish") == "nydus-py\n"
    d.stop()


def test_nydusify_usage_errors():
    r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "convert", "--source", "x"],
                       capture_output=True, text=True, env=env(), cwd=str(REPO))
    assert r.returncode == 2 and "--target" in r.stderr
    r = nydusify("--source", "UPPER/case", "--target", "127.0.0.1:1/x:y")
    assert r.returncode == 1 and "invalid image reference" in r.stderr
    r = nydusify("--source", "127.0.0.1:1/a:b", "--target", "127.0.0.1:1/x@sha256:" + "0" * 64)
    assert r.returncode == 1 and "must name a tag" in r.stderr


def test_unreachable_source_is_one_clear_error(tmp_path):
    r = nydusify("--source", "127.0.0.1:9/a:b", "--target", "127.0.0.1:9/x:y", "--source-insecure")
    assert r.returncode == 1 and r.stderr.count("nydusify-py: error:") == 1 and "Traceback" not in r.stderr

