"""End to end with real parts: Debian's containerd 1.6 (own root, state, socket and config) uses
`nydus-snapshotter-py` as a proxy snapshotter; images live in Debian's docker-registry.

* A Nydus image made by `nydusify-py` from a busybox-static OCI image is pulled with
  `ctr-remote images rpull` (stargz labels) and run with `ctr run`: containerd downloads only the
  manifest and the config, the container's root is an overlay on the `nydusd-py` mount, and the
  daemon fetched fewer bytes than the blobs hold. Removing the image collects every snapshot and
  unmounts the image from the daemon.
* The OCI image itself goes through the same snapshotter the ordinary way (`ctr images pull`:
  containerd applies each layer into our overlay snapshots) and runs with the same content.
* From a basic-auth registry: containerd gets the credentials on the command line, the snapshotter
  only from the docker config.json of its own host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nydus_py.api.client import ApiClient
from nydus_py.snapshotter.grpc_gen import snapshots_pb2 as pb
from nydus_py.snapshotter.grpc_gen import snapshots_pb2_grpc as pb_grpc
from tests.conftest import require_device, require_tool
from tests.convert import ociimage as oi
from tests.storage import registry_rig as rig
from tests.waiting import WaitTimeout, wait_until

from .containerd_rig import Containerd, SnapshotterProcess, log_tail

pytestmark = [pytest.mark.slow, pytest.mark.root]
REPO = Path(__file__).resolve().parents[2]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

# what the sample image (tests/convert/ociimage.sample_layers) shows once its layers are merged
SCRIPT = ("cat /etc/passwd; ls -A /data/opq; test -e /etc/motd || echo motd-gone; test -e /data/gone || "
          "echo gone-gone; cat /.dotfile; stat -c '%h' /data/hl/two; echo lines=$(wc -l < /data/new.txt); "
          "echo root=$(stat -c %s /usr/share/big.bin)")


def expected_output(img: oi.OciImage) -> str:
    files = {e.name: e.data for layer in img.layers for e in layer.entries if e.kind == "file"}
    big = len(files["usr/share/big.bin"])
    lines = files["data/new.txt"].count(b"\n")
    return (files["etc/passwd"].decode() + "b\nmotd-gone\ngone-gone\n" + files[".dotfile"].decode()
            + f"2\nlines={lines}\nroot={big}\n")


def nydusify(src: str, dst: str, *extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), DOCKER_CONFIG="/nonexistent-docker-config")
    r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "convert", "--source", src, "--target", dst,
                        "--source-insecure", "--target-insecure", "--chunk-size", "0x40000", "-q", *extra],
                       capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
    assert r.returncode == 0, r.stderr


def manifest(reg: rig.Registry, repo: str, tag: str, auth: str | None = None) -> dict:
    req = urllib.request.Request(f"{reg.url}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    if auth:
        req.add_header("Authorization", f"Basic {auth}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def containerd_blob_gets(reg: rig.Registry) -> set[str]:
    """Digests of the blobs containerd itself downloaded (registry access log, by User-Agent)."""
    out = set()
    for line in reg.log_text().splitlines():
        if '"GET ' in line and "/blobs/sha256:" in line and '"containerd/' in line:
            out.add("sha256:" + line.split("/blobs/sha256:")[1][:64])
    return out


class Stack:
    def __init__(self, work: Path, docker_config: Path) -> None:
        env = dict(os.environ, DOCKER_CONFIG=str(docker_config))
        env.pop("IMAGE_PULL_AUTH", None)
        self.snap = SnapshotterProcess(work, env=env)
        (work / "cd").mkdir()
        try:
            self.cd = Containerd(require_tool("containerd"), require_tool("ctr"), work / "cd", self.snap.sock)
        except BaseException:
            self.snap.stop()
            raise
        self.ctr = require_tool("ctr")
        self.ctr_remote = require_tool("ctr-remote")

    def stop(self) -> None:
        try:
            self.cd.stop()
        finally:
            self.snap.stop()

    def logs(self) -> str:
        return f"snapshotter:\n{log_tail(self.snap.log)}\nnydusd-py:\n{log_tail(self.snap.root / 'nydusd' / 'nydusd.log')}"

    def daemon_mounts(self) -> list[str]:
        api = ApiClient(self.snap.daemon_sock)
        try:
            return sorted(api.call("GET", "/api/v1/daemon")["backend_collection"])
        finally:
            api.close()

    def snapshots(self) -> list:
        import grpc

        with grpc.insecure_channel("unix://" + self.snap.sock) as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            return [i for r in stub.List(pb.ListSnapshotsRequest(), timeout=30) for i in r.info]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, basic_registry):
    require_device("/dev/fuse")
    for tool in ("containerd", "ctr", "ctr-remote", "runc"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("containerd-e2e")
    docker_config = work / "docker"
    docker_config.mkdir()
    (docker_config / "config.json").write_text(json.dumps({"auths": {basic_registry.host: {"auth": rig.basic_auth()}}}))
    s = Stack(work, docker_config)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory, plain_registry, skopeo):
    """The sample OCI image pushed by skopeo and its Nydus conversion: (image, oci ref, nydus ref)."""
    work = tmp_path_factory.mktemp("snap-images")
    img = oi.make_image(oi.sample_layers(seed=7))
    layout = oi.write_layout(work / "layout", "v1", img)
    src = f"{plain_registry.host}/snap/app:v1"
    oi.skopeo_push(skopeo, layout, "v1", src)
    dst = f"{plain_registry.host}/snap/app:v1-nydus"
    nydusify(src, dst)
    return img, src, dst


def test_nydus_image_is_pulled_and_run_lazily(stack: Stack, images, plain_registry):
    img, _src, ref = images
    t0 = time.monotonic()
    stack.cd.run(stack.ctr_remote, "images", "rpull", "--plain-http", "--snapshotter", "nydus-py", ref)
    pull_s = time.monotonic() - t0
    m = manifest(plain_registry, "snap/app", "v1-nydus")
    *blobs, boot = m["layers"]
    # containerd fetched the config only: every layer was answered by the snapshotter
    assert containerd_blob_gets(plain_registry) == {m["config"]["digest"]}, stack.logs()
    nydus_snaps = {i.name: i for i in stack.snapshots()}
    assert len(nydus_snaps) == 4 and all(i.kind == pb.COMMITTED for i in nydus_snaps.values())
    assert sum(i.labels.get("containerd.io/snapshot/nydus-bootstrap") == "true" for i in nydus_snaps.values()) == 1
    (mp,) = stack.daemon_mounts()

    out = stack.cd.ctr_run(ref, "nydus-c1", "/bin/busybox", "sh", "-c", SCRIPT + "; grep ' / ' /proc/mounts")
    lines = out.splitlines()
    assert "\n".join(lines[:-1]) + "\n" == expected_output(img), stack.logs()
    root_mount = lines[-1].split()
    assert root_mount[2] == "overlay", lines[-1]
    lowerdir = [o for o in root_mount[3].split(",") if o.startswith("lowerdir=")]
    assert lowerdir == [f"lowerdir={stack.snap.mnt}{mp}"]  # the Nydus mount is the only lower layer

    # lazily: the container's reads fetched what busybox and the files read need, not the 4 MiB
    # nobody read; the rest comes by the default config's background completion (capped, behind
    # on-demand reads), which ends with every blob byte fetched once
    api = ApiClient(stack.snap.daemon_sock)
    blob_bytes = sum(b["size"] for b in blobs)

    def metrics() -> tuple[dict, dict]:
        return (api.call("GET", "/api/v1/metrics/backend", {"id": mp}),
                api.call("GET", "/api/v1/metrics/blobcache", {"id": mp}))
    try:
        backend, cache = metrics()
        # (0 when the capped background completion got there first: this image is 5 MB)
        assert cache["fetched_bytes"]["ondemand"] < blob_bytes - (3 << 20), (cache, blob_bytes)
        wait_until(lambda: metrics()[1]["prefetch_end_time_secs"] > 0, 60,
                   lambda: f"background completion of {blob_bytes} blob bytes to end: {metrics()}")
        backend, cache = metrics()
    finally:
        api.close()
    # every file's data (the layers' overwritten files aside), the 4 MiB nobody read included
    assert blob_bytes - (1 << 20) < backend["read_amount_total"] <= 1.05 * blob_bytes, (backend, blob_bytes)
    assert cache["fetched_bytes"]["prefetch"] > 0, cache
    assert backend["read_errors"] == 0
    print(f"rpull {pull_s:.2f}s; on demand {cache['fetched_bytes']['ondemand']} of {blob_bytes} blob bytes, "
          f"all {backend['read_amount_total']} after background completion")

    # the image's removal: containerd's GC removes every snapshot, the daemon unmounts the image
    stack.cd.run(stack.ctr, "images", "rm", "--sync", ref)
    wait_until(lambda: stack.snapshots() == [], 30, lambda: f"containerd's GC to remove every snapshot:\n{stack.logs()}")
    assert stack.daemon_mounts() == []
    assert os.listdir(stack.snap.root / "snapshots") == []
    assert boot["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"


def test_oci_image_goes_through_the_same_snapshotter(stack: Stack, images):
    img, src, _ref = images
    stack.cd.run(stack.ctr, "images", "pull", "--plain-http", "--snapshotter", "nydus-py", src)
    snaps = stack.snapshots()
    assert len(snaps) == 3 and {s.kind for s in snaps} == {pb.COMMITTED}
    out = stack.cd.ctr_run(src, "oci-c1", "/bin/busybox", "sh", "-c",
                           SCRIPT + "; sha256sum /usr/share/big.bin; grep ' / ' /proc/mounts")
    lines = out.splitlines()
    assert "\n".join(lines[:-2]) + "\n" == expected_output(img), stack.logs()
    big = next(e.data for e in img.layers[0].entries if e.name == "usr/share/big.bin")
    assert lines[-2].split()[0] == hashlib.sha256(big).hexdigest()
    opts = lines[-1].split()[3].split(",")
    lowers = next(o for o in opts if o.startswith("lowerdir=")).split("=", 1)[1].split(":")
    assert len(lowers) == 3 and all(p.startswith(str(stack.snap.root / "snapshots")) for p in lowers)
    assert stack.daemon_mounts() == []  # nothing of this image went through nydusd-py
    stack.cd.run(stack.ctr, "images", "rm", "--sync", src)


def test_credentials_come_from_the_snapshotter_host(stack: Stack, images, basic_registry):
    """containerd pulls the manifest with `-u`, the snapshotter's daemon with the docker
    config.json of its own host: containerd never passes credentials to a snapshotter."""
    img, src, _ref = images
    dst = f"{basic_registry.host}/private/app:v1-nydus"
    nydusify(src, dst, "--target-auth", f"{rig.USER}:{rig.PASSWORD}")
    user = f"{rig.USER}:{rig.PASSWORD}"
    stack.cd.run(stack.ctr_remote, "images", "rpull", "--plain-http", "--snapshotter", "nydus-py", "-u", user, dst)
    out = stack.cd.ctr_run(dst, "auth-c1", "/bin/busybox", "sh", "-c", SCRIPT)
    assert out == expected_output(img), stack.logs()
    assert len(stack.daemon_mounts()) == 1
    assert containerd_blob_gets(basic_registry) == {manifest(basic_registry, "private/app", "v1-nydus",
                                                             rig.basic_auth())["config"]["digest"]}
    stack.cd.run(stack.ctr, "images", "rm", "--sync", dst)
    assert stack.daemon_mounts() == []


def test_a_dead_daemon_is_restarted_and_the_image_mounted_again(stack: Stack, images):
    img, _src, ref = images
    stack.cd.run(stack.ctr_remote, "images", "rpull", "--plain-http", "--snapshotter", "nydus-py", ref)
    before = stack.snap.daemon_pid()
    assert before is not None
    os.kill(before, signal.SIGKILL)
    with contextlib.suppress(WaitTimeout):  # as before: a zombie not reaped yet still lets the test go on
        wait_until(lambda: not os.path.exists(f"/proc/{before}"), 10, f"daemon {before} to be gone")
    # the container's Prepare finds the daemon gone: leftovers cleared, daemon restarted, image mounted
    out = stack.cd.ctr_run(ref, "restart-c1", "/bin/busybox", "sh", "-c", SCRIPT)
    assert out == expected_output(img), stack.logs()
    after = stack.snap.daemon_pid()
    assert after is not None and after != before
    assert len(stack.daemon_mounts()) == 1
    stack.cd.run(stack.ctr, "images", "rm", "--sync", ref)
    assert stack.daemon_mounts() == []


def test_commit_a_running_container_into_a_new_image(stack: Stack, images, plain_registry, tmp_path):
    """`nydusify-py commit`: what a running container of a Nydus image wrote, changed and deleted
    becomes a new Nydus image (the task paused while its upper directory is read, then resumed);
    containerd runs that image with the changes, and `nydusify-py check` finds every blob right."""
    img, _src, ref = images
    stack.cd.run(stack.ctr_remote, "images", "rpull", "--plain-http", "--snapshotter", "nydus-py", ref)
    cid = "commit-c1"
    fifo = str(stack.cd.work / "fifo")
    stack.cd.run(stack.ctr, "run", "-d", "--snapshotter", "nydus-py", "--runc-root", str(stack.cd.runc_root),
                 "--fifo-dir", fifo, ref, cid, "/bin/busybox", "sleep", "600")
    target = f"{plain_registry.host}/snap/app:committed"
    try:
        stack.cd.run(stack.ctr, "tasks", "exec", "--exec-id", "w1", "--fifo-dir", fifo, cid, "/bin/busybox", "sh",
                     "-c", "echo committed > /committed.txt && rm /etc/passwd && mkdir -p /data/newdir && "
                           "echo x > /data/newdir/f")
        out = tmp_path / "commit.json"
        env = dict(os.environ, PYTHONPATH=str(REPO), DOCKER_CONFIG="/nonexistent-docker-config")
        r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "commit", "--container", cid[:9],
                            "--target", target, "--containerd-address", f"unix://{stack.cd.sock}", "--plain-http",
                            "--output-json", str(out)], capture_output=True, text=True, timeout=300, cwd=str(REPO),
                           env=env)
        assert r.returncode == 0, r.stderr + stack.logs()
        res = json.loads(out.read_text())
        assert res["container"] == cid and res["paused"] and res["committed_layers"] == 1 and res["blob_id"]
        tasks = stack.cd.run(stack.ctr, "tasks", "ls").stdout
        assert any(line.split()[:1] == [cid] and "RUNNING" in line for line in tasks.splitlines()), tasks
        m = manifest(plain_registry, "snap/app", "committed")
        assert m["layers"][-1]["annotations"]["containerd.io/snapshot/nydus-commit-blobs"] == f"sha256:{res['blob_id']}"
        r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "check", "--plain-http", "--target", target],
                           capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
        assert r.returncode == 0, r.stderr
        stack.cd.run(stack.ctr_remote, "images", "rpull", "--plain-http", "--snapshotter", "nydus-py", target)
        got = stack.cd.ctr_run(target, "commit-c2", "/bin/busybox", "sh", "-c",
                               "cat /committed.txt; test -e /etc/passwd || echo passwd-gone; cat /data/newdir/f; "
                               "cat /.dotfile")
        dotfile = next(e.data for layer in img.layers for e in layer.entries if e.name == ".dotfile")
        assert got == "committed\npasswd-gone\nx\n" + dotfile.decode(), stack.logs()
    finally:
        stack.cd.run(stack.ctr, "tasks", "kill", "-s", "SIGKILL", cid, check=False)
        with contextlib.suppress(WaitTimeout):
            wait_until(lambda: "RUNNING" not in stack.cd.run(stack.ctr, "tasks", "ls").stdout, 20,
                       "the committed container's task to end")
        stack.cd.run(stack.ctr, "tasks", "delete", "-f", cid, check=False)
        stack.cd.run(stack.ctr, "containers", "delete", cid, check=False)
        stack.cd.run(stack.ctr, "images", "rm", "--sync", ref, target, check=False)
