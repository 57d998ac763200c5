"""Kata volumes: the `extraoption=` codec against upstream-made strings, the `nydus-overlayfs-py`
mount helper mounting a real overlay, and the snapshotter's mounts through its gRPC API with
`enable_nydus_overlayfs` on (fuse.nydus-overlayfs + extraoption) and off (plain overlay)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from nydus_py.snapshotter import extraoption as xo
from nydus_py.snapshotter.dedicated import DedicatedDaemons
from nydus_py.snapshotter.errors import Unavailable
from nydus_py.snapshotter.grpc_gen import snapshots_pb2_grpc as pb_grpc
from nydus_py.snapshotter.nydusd import DaemonSettings, SharedDaemon
from nydus_py.snapshotter.overlayfs_helper import HelperError, compact_lowerdir, flags_and_data, parse_argv
from nydus_py.snapshotter.service import serve
from nydus_py.snapshotter.snapshotter import Snapshotter
from nydus_py.transport.mount import MNT_DETACH, sys_umount
from tests.conftest import REPO, require_tool

from .conftest import FakeMounter, Rig
from .test_service import INDEX_OFF, code, remote_prepare, stargz_labels

# Made by upstream nydus-snapshotter (json.Marshal of its ExtraOption, base64.StdEncoding) and kept
# as test vectors by Kata (src/libs/kata-types/src/mount.rs, test_get_nydus_extra_options_v5/_v6).
UPSTREAM_V5 = "extraoption=eyJzb3VyY2UiOiIvdmFyL2xpYi9jb250YWluZXJkL2lvLmNvbnRhaW5lcmQuc25hcHNob3R0ZXIudjEubnlkdXMvc25hcHNob3RzLzkvZnMvaW1hZ2UvaW1hZ2UuYm9vdCIsImNvbmZpZyI6IntcImRldmljZVwiOntcImJhY2tlbmRcIjp7XCJ0eXBlXCI6XCJyZWdpc3RyeVwiLFwiY29uZmlnXCI6e1wicmVhZGFoZWFkXCI6ZmFsc2UsXCJob3N0XCI6XCJsb2NhbGhvc3Q6NTAwMFwiLFwicmVwb1wiOlwidWJ1bnR1LW55ZHVzXCIsXCJzY2hlbWVcIjpcImh0dHBcIixcInNraXBfdmVyaWZ5XCI6dHJ1ZSxcInByb3h5XCI6e1wiZmFsbGJhY2tcIjpmYWxzZX0sXCJ0aW1lb3V0XCI6NSxcImNvbm5lY3RfdGltZW91dFwiOjUsXCJyZXRyeV9saW1pdFwiOjJ9fSxcImNhY2hlXCI6e1widHlwZVwiOlwiYmxvYmNhY2hlXCIsXCJjb25maWdcIjp7XCJ3b3JrX2RpclwiOlwiL3Zhci9saWIvbnlkdXMvY2FjaGVcIixcImRpc2FibGVfaW5kZXhlZF9tYXBcIjpmYWxzZX19fSxcIm1vZGVcIjpcImRpcmVjdFwiLFwiZGlnZXN0X3ZhbGlkYXRlXCI6ZmFsc2UsXCJlbmFibGVfeGF0dHJcIjp0cnVlLFwiZnNfcHJlZmV0Y2hcIjp7XCJlbmFibGVcIjp0cnVlLFwicHJlZmV0Y2hfYWxsXCI6ZmFsc2UsXCJ0aHJlYWRzX2NvdW50XCI6NCxcIm1lcmdpbmdfc2l6ZVwiOjAsXCJiYW5kd2lkdGhfcmF0ZVwiOjB9LFwidHlwZVwiOlwiXCIsXCJpZFwiOlwiXCIsXCJkb21haW5faWRcIjpcIlwiLFwiY29uZmlnXCI6e1wiaWRcIjpcIlwiLFwiYmFja2VuZF90eXBlXCI6XCJcIixcImJhY2tlbmRfY29uZmlnXCI6e1wicmVhZGFoZWFkXCI6ZmFsc2UsXCJwcm94eVwiOntcImZhbGxiYWNrXCI6ZmFsc2V9fSxcImNhY2hlX3R5cGVcIjpcIlwiLFwiY2FjaGVfY29uZmlnXCI6e1wid29ya19kaXJcIjpcIlwifSxcIm1ldGFkYXRhX3BhdGhcIjpcIlwifX0iLCJzbmFwc2hvdGRpciI6Ii92YXIvbGliL2NvbnRhaW5lcmQvaW8uY29udGFpbmVyZC5zbmFwc2hvdHRlci52MS5ueWR1cy9zbmFwc2hvdHMvMjU3IiwiZnNfdmVyc2lvbiI6InY1In0="  # noqa: E501
UPSTREAM_V6 = "extraoption=eyJzb3VyY2UiOiIvdmFyL2xpYi9jb250YWluZXJkL2lvLmNvbnRhaW5lcmQuc25hcHNob3R0ZXIudjEubnlkdXMvc25hcHNob3RzLzIwMS9mcy9pbWFnZS9pbWFnZS5ib290IiwiY29uZmlnIjoie1wiZGV2aWNlXCI6e1wiYmFja2VuZFwiOntcInR5cGVcIjpcInJlZ2lzdHJ5XCIsXCJjb25maWdcIjp7XCJyZWFkYWhlYWRcIjpmYWxzZSxcImhvc3RcIjpcImxvY2FsaG9zdDo1MDAwXCIsXCJyZXBvXCI6XCJ1YnVudHUtbnlkdXMtdjZcIixcInNjaGVtZVwiOlwiaHR0cFwiLFwic2tpcF92ZXJpZnlcIjp0cnVlLFwicHJveHlcIjp7XCJmYWxsYmFja1wiOmZhbHNlfSxcInRpbWVvdXRcIjo1LFwiY29ubmVjdF90aW1lb3V0XCI6NSxcInJldHJ5X2xpbWl0XCI6Mn19LFwiY2FjaGVcIjp7XCJ0eXBlXCI6XCJibG9iY2FjaGVcIixcImNvbmZpZ1wiOntcIndvcmtfZGlyXCI6XCIvdmFyL2xpYi9ueWR1cy9jYWNoZVwiLFwiZGlzYWJsZV9pbmRleGVkX21hcFwiOmZhbHNlfX19LFwibW9kZVwiOlwiZGlyZWN0XCIsXCJkaWdlc3RfdmFsaWRhdGVcIjpmYWxzZSxcImVuYWJsZV94YXR0clwiOnRydWUsXCJmc19wcmVmZXRjaFwiOntcImVuYWJsZVwiOnRydWUsXCJwcmVmZXRjaF9hbGxcIjpmYWxzZSxcInRocmVhZHNfY291bnRcIjo0LFwibWVyZ2luZ19zaXplXCI6MCxcImJhbmR3aWR0aF9yYXRlXCI6MH0sXCJ0eXBlXCI6XCJcIixcImlkXCI6XCJcIixcImRvbWFpbl9pZFwiOlwiXCIsXCJjb25maWdcIjp7XCJpZFwiOlwiXCIsXCJiYWNrZW5kX3R5cGVcIjpcIlwiLFwiYmFja2VuZF9jb25maWdcIjp7XCJyZWFkYWhlYWRcIjpmYWxzZSxcInByb3h5XCI6e1wiZmFsbGJhY2tcIjpmYWxzZX19LFwiY2FjaGVfdHlwZVwiOlwiXCIsXCJjYWNoZV9jb25maWdcIjp7XCJ3b3JrX2RpclwiOlwiXCJ9LFwibWV0YWRhdGFfcGF0aFwiOlwiXCJ9fSIsInNuYXBzaG90ZGlyIjoiL3Zhci9saWIvY29udGFpbmVyZC9pby5jb250YWluZXJkLnNuYXBzaG90dGVyLnYxLm55ZHVzL3NuYXBzaG90cy8yNjEiLCJmc192ZXJzaW9uIjoidjYifQ=="  # noqa: E501
ROOT = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus/snapshots"


# -- the codec -----------------------------------------------------------------------------------

@pytest.mark.parametrize("option,boot,snapdir,version,repo", [
    (UPSTREAM_V5, f"{ROOT}/9/fs/image/image.boot", f"{ROOT}/257", "v5", "ubuntu-nydus"),
    (UPSTREAM_V6, f"{ROOT}/201/fs/image/image.boot", f"{ROOT}/261", "v6", "ubuntu-nydus-v6"),
])
def test_upstream_extraoptions_decode_and_encode_back_byte_for_byte(option, boot, snapdir, version, repo) -> None:
    got = xo.decode(option)
    assert (got.source, got.snapshotdir, got.fs_version) == (boot, snapdir, version)
    backend = json.loads(got.config)["device"]["backend"]
    assert backend["type"] == "registry" and backend["config"]["repo"] == repo
    assert got.encode() == option  # the same bytes upstream's json.Marshal + base64 made
    assert xo.find(["lowerdir=/a:/b", option, "index=off"]) == got


def test_encoding_escapes_like_go() -> None:
    """Go's encoding/json writes <, > and & as \\u003c, \\u003e, \\u0026 and keeps UTF-8 as is."""
    opt = xo.ExtraOption("/b<oot>", '{"auth":"a&b"}', "/snap/ü", "v6")
    text = base64.b64decode(opt.encode()[len(xo.PREFIX):]).decode()
    assert text == ('{"source":"/b\\u003coot\\u003e","config":"{\\"auth\\":\\"a\\u0026b\\"}",'
                    '"snapshotdir":"/snap/ü","fs_version":"v6"}')
    assert xo.decode(opt.encode()) == opt


def b64(doc: object) -> str:
    return xo.PREFIX + base64.b64encode(json.dumps(doc).encode()).decode()


GOOD = {"source": "/b", "config": "{}", "snapshotdir": "/s", "fs_version": "v6"}


@pytest.mark.parametrize("value,message", [
    ("extraoption=not*base64", "extraoption is not standard base64"),
    (xo.PREFIX + base64.b64encode(b"{nope").decode(), "extraoption is not JSON after base64 decoding"),
    (b64(["a"]), "extraoption must be a JSON object, got list"),
    (b64({**GOOD, "config": ""}), "extraoption field 'config' is empty"),
    (b64({k: v for k, v in GOOD.items() if k != "fs_version"}), "extraoption field 'fs_version' must be a string"),
    (b64({**GOOD, "snapshotdir": 7}), "extraoption field 'snapshotdir' must be a string, got 7"),
])
def test_malformed_extraoption_is_one_clear_line(value: str, message: str) -> None:
    with pytest.raises(xo.ExtraOptionError) as e:
        xo.decode(value)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_two_extraoptions_are_refused_and_nydus_options_stripped() -> None:
    with pytest.raises(xo.ExtraOptionError, match="2 extraoption options in one mount"):
        xo.find([UPSTREAM_V5, UPSTREAM_V6])
    assert xo.find(["lowerdir=/a"]) is None
    assert xo.strip(["index=off", UPSTREAM_V5, "io.katacontainers.volume=e30=", "lowerdir=/a:/b"]) == \
        ["index=off", "lowerdir=/a:/b"]


@pytest.fixture(scope="module")
def v6_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("v6boot")
    (tmp / "src").mkdir()
    (tmp / "src" / "hello.txt").write_text("hello\n")
    (tmp / "blobs").mkdir()
    subprocess.run([sys.executable, "-m", "nydus_py.cli.image", "create", "--bootstrap", str(tmp / "image.boot"),
                    "--blob-dir", str(tmp / "blobs"), str(tmp / "src")], cwd=REPO, check=True, capture_output=True,
                   timeout=120)
    return tmp / "image.boot"


def test_fs_version_of_real_bootstraps(v6_bootstrap: Path, nydus_fixtures: Path) -> None:
    assert xo.detect_fs_version((nydus_fixtures / "v5-sha256-none.boot").read_bytes()[:xo.HEADER_BYTES]) == "v5"
    assert xo.detect_fs_version(v6_bootstrap.read_bytes()[:xo.HEADER_BYTES]) == "v6"
    with pytest.raises(xo.ExtraOptionError, match="not a RAFS bootstrap"):
        xo.detect_fs_version(bytes(8192))
    with pytest.raises(xo.ExtraOptionError, match="too short"):
        xo.detect_fs_version(b"RAFS")


# -- the mount helper ----------------------------------------------------------------------------

def test_helper_argv_contract() -> None:
    a = parse_argv(["overlay", "/t", "-o", f"lowerdir=/l1:/l2,upperdir=/u,workdir=/w,{UPSTREAM_V6},dev,suid"])
    assert (a.source, a.target, a.options) == ("overlay", "/t", ["lowerdir=/l1:/l2", "upperdir=/u", "workdir=/w",
                                                                  "dev", "suid"])
    # mount(8)'s helper convention: several -o, -t, -n
    a = parse_argv(["-n", "overlay", "/t", "-o", "lowerdir=/a:/b", "-o", "ro", "-t", "nydus-overlayfs"])
    assert a.options == ["lowerdir=/a:/b", "ro"]
    assert flags_and_data(["ro", "lowerdir=/a:/b", "nodev", "dev", "defaults"]) == (1, "lowerdir=/a:/b")
    for argv, msg in ((["tmpfs", "/t", "-o", "lowerdir=/a:/b"], "invalid filesystem type tmpfs"),
                      (["overlay", "/t", "-o", UPSTREAM_V5], "empty overlayfs mount options"),
                      (["overlay", "-o", "x"], "expected a source and a target"),
                      (["overlay", "/t", "-x"], "unknown flag -x")):
        with pytest.raises(HelperError, match=msg):
            parse_argv(argv)
    with pytest.raises(HelperError, match="option remount is not allowed"):
        flags_and_data(["remount"])


def test_helper_compacts_long_lowerdirs_like_containerd() -> None:
    base = "/var/lib/x/snapshots"
    chdir, out = compact_lowerdir([f"workdir={base}/9/work", f"upperdir={base}/9/fs",
                                   f"lowerdir={base}/1/fs:{base}/2/fs", "index=off"])
    assert chdir == base + "/"
    assert out == ["workdir=9/work", "upperdir=9/fs", "lowerdir=1/fs:2/fs", "index=off"]
    assert compact_lowerdir(["lowerdir=/a/x:/b/y"]) == ("", ["lowerdir=/a/x:/b/y"])


def overlay_dirs(tmp: Path) -> dict[str, Path]:
    d = {k: tmp / k for k in ("lower1", "lower2", "upper", "work", "target")}
    for p in d.values():
        p.mkdir()
    (d["lower1"] / "top.txt").write_text("from lower1\n")
    (d["lower2"] / "top.txt").write_text("hidden by lower1\n")
    (d["lower2"] / "base.txt").write_text("from lower2\n")
    return d


def mount_entry(target: Path) -> tuple[str, str] | None:
    """(fstype, super options) of the mount at `target` from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ")
        if pre.split()[4] == str(target):
            fstype, _src, sopts = post.split(" ", 2)
            return fstype, sopts
    return None


@pytest.fixture
def umounts() -> Iterator[list[Path]]:
    targets: list[Path] = []
    yield targets
    for t in reversed(targets):
        if mount_entry(t) is not None:
            sys_umount(str(t), MNT_DETACH)


@pytest.mark.root
@pytest.mark.parametrize("via", ["helper", "mount.fuse"])
def test_helper_mounts_a_plain_overlay_with_the_extraoption_present(tmp_path: Path, umounts: list[Path],
                                                                    via: str) -> None:
    """What runc's container gets: containerd runs `mount.fuse overlay <target> -o ... -t
    nydus-overlayfs`, mount.fuse runs `nydus-overlayfs overlay <target> -o a,b,c`."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    d = overlay_dirs(tmp_path)
    opts = [f"lowerdir={d['lower1']}:{d['lower2']}", f"upperdir={d['upper']}", f"workdir={d['work']}",
            UPSTREAM_V6, "io.katacontainers.volume=eyJ2b2x1bWVfdHlwZSI6ImRpcmVjdF9ibG9jayJ9"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "nydus-overlayfs"  # as deploy installs it: a wrapper named as mount.fuse expects
    helper.write_text(f"#!/bin/sh\nexec {sys.executable} -m nydus_py.snapshotter.overlayfs_helper \"$@\"\n")
    helper.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{bindir}:{os.environ['PATH']}")
    if via == "helper":
        argv = [str(helper), "overlay", str(d["target"]), "-o", ",".join(opts)]
    else:
        argv = [require_tool("mount.fuse"), "overlay", str(d["target"])]
        for o in opts:
            argv += ["-o", o]
        argv += ["-t", "nydus-overlayfs"]
    umounts.append(d["target"])
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    entry = mount_entry(d["target"])
    assert entry is not None and entry[0] == "overlay", entry
    assert "extraoption" not in entry[1] and "katacontainers" not in entry[1]
    assert (d["target"] / "top.txt").read_text() == "from lower1\n"
    assert (d["target"] / "base.txt").read_text() == "from lower2\n"
    (d["target"] / "new.txt").write_text("written\n")
    assert (d["upper"] / "new.txt").read_text() == "written\n"


@pytest.mark.root
def test_helper_failure_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nydus_py.snapshotter.overlayfs_helper", "overlay",
                        str(tmp_path / "missing"), "-o", f"lowerdir={tmp_path}/a:{tmp_path}/b,{UPSTREAM_V5}"],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("nydus-overlayfs-py: mount overlay on ") and r.stderr.count("\n") == 1, r.stderr


# -- the snapshotter's mounts --------------------------------------------------------------------

@dataclass
class HandoffMounter(FakeMounter):
    """FakeMounter plus `handoff`: the bootstrap file and config a Kata daemon would get."""

    bootstrap: str = ""
    handoffs: list[tuple[str, str, str]] = field(default_factory=list)

    def handoff(self, sid: str, image_ref: str, layer_digest: str) -> tuple[str, str]:
        self.handoffs.append((sid, image_ref, layer_digest))
        if not self.bootstrap:
            raise Unavailable(f"image {image_ref}: its bootstrap is not at /nowhere")
        return self.bootstrap, json.dumps({"device": {"id": f"/{sid}"}})


def start(root: Path, mounter: FakeMounter, **options: object) -> Rig:
    sn = Snapshotter(str(root / "state"), mounter, **options)  # type: ignore[arg-type]
    sock = str(root / "run" / "snap.sock")
    server = serve(sn, sock, workers=4)
    channel = grpc.insecure_channel("unix://" + sock)
    grpc.channel_ready_future(channel).result(timeout=10)
    return Rig(root, sock, sn, server, channel, pb_grpc.SnapshotsStub(channel), mounter)


@pytest.fixture
def kata_rig(tmp_path: Path, v6_bootstrap: Path) -> Iterator[Rig]:
    r = start(tmp_path, HandoffMounter(tmp_path / "fake-mnt", bootstrap=str(v6_bootstrap)), nydus_overlayfs=True)
    yield r
    r.stop()


def pull_nydus(rig: Rig) -> str:
    """A Nydus image as containerd's unpacker makes it: a data layer and the bootstrap on top."""
    remote_prepare(rig, 1, "sha256:c1", "", stargz_labels("sha256:c1", "sha256:blob1", bootstrap=False))
    remote_prepare(rig, 2, "sha256:c2", "sha256:c1", stargz_labels("sha256:c2", "sha256:" + "b0" * 32,
                                                                     bootstrap=True))
    return rig.sid("sha256:c2")


def test_enabled_nydus_mounts_carry_the_extraoption(kata_rig: Rig, v6_bootstrap: Path) -> None:
    boot = pull_nydus(kata_rig)
    lower = kata_rig.mounter.mount_dir(boot)
    (m,) = kata_rig.prepare("default/3/ctr", "sha256:c2")
    up = kata_rig.fs("default/3/ctr")
    assert (m.type, m.source) == ("fuse.nydus-overlayfs", "overlay")
    assert list(m.options[:-1]) == INDEX_OFF + [f"workdir={up.parent / 'work'}", f"upperdir={up}", f"lowerdir={lower}"]
    got = xo.decode(m.options[-1])
    assert got == xo.ExtraOption(str(v6_bootstrap), json.dumps({"device": {"id": f"/{boot}"}}), str(up.parent), "v6")
    assert kata_rig.mounter.handoffs[-1] == (boot, "docker://registry.local:5000/app@sha256:" + "cd" * 32,
                                             "sha256:" + "b0" * 32)
    assert kata_rig.mounts("default/3/ctr") == [m]
    # a view: an overlay of the image and the view's own directory, as upstream
    (v,) = kata_rig.view("default/4/view", "sha256:c2")
    assert v.type == "fuse.nydus-overlayfs"
    assert list(v.options[:-1]) == INDEX_OFF + [f"lowerdir={lower}:{kata_rig.fs('default/4/view')}"]
    assert xo.decode(v.options[-1]).snapshotdir == str(kata_rig.fs("default/4/view").parent)


def test_ordinary_snapshots_stay_plain_when_enabled(kata_rig: Rig) -> None:
    (m,) = kata_rig.prepare("default/1/base", "")
    assert m.type == "bind"
    kata_rig.commit("base", "default/1/base")
    (m,) = kata_rig.prepare("default/2/ctr", "base")
    assert (m.type, m.source) == ("overlay", "overlay") and not any(o.startswith("extraoption=") for o in m.options)
    assert kata_rig.mounter.handoffs == []


def test_disabled_nydus_mounts_are_plain_overlays(tmp_path: Path, v6_bootstrap: Path) -> None:
    rig = start(tmp_path, HandoffMounter(tmp_path / "fake-mnt", bootstrap=str(v6_bootstrap)))
    try:
        boot = pull_nydus(rig)
        (m,) = rig.prepare("default/3/ctr", "sha256:c2")
        up = rig.fs("default/3/ctr")
        assert (m.type, m.source) == ("overlay", "overlay")
        assert list(m.options) == INDEX_OFF + [f"workdir={up.parent / 'work'}", f"upperdir={up}",
                                               f"lowerdir={rig.mounter.mount_dir(boot)}"]
        assert rig.mounter.handoffs == []
    finally:
        rig.stop()


def test_helper_path_sets_the_type(tmp_path: Path, v6_bootstrap: Path) -> None:
    rig = start(tmp_path, HandoffMounter(tmp_path / "fake-mnt", bootstrap=str(v6_bootstrap)), nydus_overlayfs=True,
                nydus_overlayfs_path="/usr/local/bin/nydus-overlayfs-py")
    try:
        pull_nydus(rig)
        (m,) = rig.prepare("default/3/ctr", "sha256:c2")
        assert m.type == "fuse./usr/local/bin/nydus-overlayfs-py"
    finally:
        rig.stop()


def test_no_bootstrap_for_kata_is_unavailable_and_rolled_back(kata_rig: Rig) -> None:
    pull_nydus(kata_rig)
    assert isinstance(kata_rig.mounter, HandoffMounter)
    kata_rig.mounter.bootstrap = ""
    with pytest.raises(grpc.RpcError) as e:
        kata_rig.prepare("default/3/ctr", "sha256:c2")
    assert code(e) == grpc.StatusCode.UNAVAILABLE
    assert "its bootstrap is not at /nowhere" in e.value.details()
    assert sorted(i.name for i in kata_rig.list()) == ["sha256:c1", "sha256:c2"]  # the failed Prepare is undone


def test_settings_and_flag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nydus_py.snapshotter.main import build_parser, settings_from

    cfg = tmp_path / "config.toml"
    cfg.write_text('version = 1\n[snapshot]\nenable_nydus_overlayfs = true\nnydus_overlayfs_path = "nydus-overlayfs"\n'
                   "enable_kata_volume = true\n")
    s = settings_from(build_parser().parse_args(["--config", str(cfg)]))
    assert (s.nydus_overlayfs, s.nydus_overlayfs_path) == (True, "nydus-overlayfs")
    assert "enable_kata_volume = True is not implemented" in caplog.text and "guest-pull" in caplog.text
    s = settings_from(build_parser().parse_args(["--config", str(cfg), "--nydus-overlayfs-path", "/x/nydus-overlayfs"]))
    assert s.nydus_overlayfs_path == "/x/nydus-overlayfs"


# -- the daemons' side: which bootstrap and config Kata gets ------------------------------------

DIGEST = "sha256:" + "5e" * 32
REF = "docker://registry.local:5000/app@sha256:" + "cd" * 32


def daemon_settings(**kw: object) -> DaemonSettings:
    return DaemonSettings(command=["nydusd-py"], env={}, docker_config_paths=[], **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_handoff_is_the_cached_bootstrap_and_the_mount_config(tmp_path: Path, mode: str) -> None:
    settings = daemon_settings(fs_driver="erofs", insecure_registries=("registry.local:5000",))
    d = SharedDaemon(str(tmp_path), settings) if mode == "shared" else DedicatedDaemons(str(tmp_path), settings)
    with pytest.raises(Unavailable, match=r"its bootstrap is not at .*5e5e.*\.image\.boot .*pull the image again"):
        d.handoff("7", REF, DIGEST)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ("5e" * 32 + ".image.boot")).write_bytes(b"boot")
    path, config = d.handoff("7", REF, DIGEST)
    assert path == str(tmp_path / "cache" / ("5e" * 32 + ".image.boot"))
    cfg = json.loads(config)
    assert cfg["device"]["id"] == "/7" and "fs_driver" not in cfg  # Kata's daemon serves it over virtio-fs
    assert cfg["device"]["backend"]["config"] == {"host": "registry.local:5000", "repo": "app", "timeout": 30,
                                                       "connect_timeout": 10, "skip_verify": True, "scheme": "https"}
    assert cfg["device"]["cache"] == {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}
    with pytest.raises(Unavailable, match="the snapshot labels give no bootstrap layer digest"):
        d.handoff("7", REF, "sha256:boot")


def test_handoff_needs_a_blob_cache(tmp_path: Path) -> None:
    d = SharedDaemon(str(tmp_path), daemon_settings(config_template={"device": {"cache": {"type": "none"}}}))
    with pytest.raises(Unavailable, match="the nydusd config has no blob cache"):
        d.handoff("7", REF, DIGEST)


def test_a_missing_helper_is_warned_about(tmp_path: Path) -> None:
    from nydus_py.snapshotter.main import overlayfs_helper_warning
    from nydus_py.snapshotter.settings import Settings

    conf = Settings(nydus_overlayfs=True)
    warning = overlayfs_helper_warning(conf, path=str(tmp_path))
    assert warning is not None and "no 'nydus-overlayfs' on this host's PATH" in warning and "\n" not in warning
    (tmp_path / "nydus-overlayfs").write_text("#!/bin/sh\n")
    (tmp_path / "nydus-overlayfs").chmod(0o755)
    assert overlayfs_helper_warning(conf, path=str(tmp_path)) is None
    assert overlayfs_helper_warning(Settings(), path=str(tmp_path / "empty")) is None  # not enabled: not needed
