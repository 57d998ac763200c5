"""The gRPC Snapshots service in-process, through a real unix socket: overlay snapshotter
semantics and mounts (containerd v1.6.20's overlay.go + bolt.go), the error codes containerd's
errdefs relies on, persistence across restarts, and the remote (Nydus) Prepare contract."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from nydus_py.snapshotter import labels as L
from nydus_py.snapshotter.grpc_gen import snapshots_pb2 as pb
from tests.conftest import require_tool

from .conftest import Rig

INDEX_OFF = ["index=off"] if os.path.exists("/sys/module/overlay/parameters/index") else []


def code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


def opts(m) -> list[str]:
    return list(m.options)


# -- ordinary (overlayfs) snapshots -------------------------------------------------------------


def test_prepare_without_parent_is_a_rw_bind_and_commit_records_usage(rig: Rig):
    (m,) = rig.prepare("default/1/extract-1 sha256:aaa")
    fs = rig.fs("default/1/extract-1 sha256:aaa")
    assert (m.type, m.source, opts(m)) == ("bind", str(fs), ["rw", "rbind"])
    assert fs.is_dir() and (fs.parent / "work").is_dir()
    info = rig.stat("default/1/extract-1 sha256:aaa")
    assert info.kind == pb.ACTIVE and info.parent == "" and info.created_at.seconds > 0
    (fs / "hello").write_bytes(b"x" * 10000)
    (fs / "dir").mkdir()
    os.link(fs / "hello", fs / "dir" / "hard")
    active = rig.usage("default/1/extract-1 sha256:aaa")
    assert active.inodes == 3 and active.size >= 10000  # root, dir, one inode for both names
    assert rig.mounts("default/1/extract-1 sha256:aaa") == [m]

    rig.commit("sha256:aaa", "default/1/extract-1 sha256:aaa", {"containerd.io/snapshot.ref": "sha256:aaa"})
    info = rig.stat("sha256:aaa")
    assert info.kind == pb.COMMITTED and dict(info.labels) == {"containerd.io/snapshot.ref": "sha256:aaa"}
    assert rig.usage("sha256:aaa") == active  # stored at commit time
    assert rig.fs("sha256:aaa") == fs  # committing keeps the id and the directory
    with pytest.raises(grpc.RpcError) as e:
        rig.stat("default/1/extract-1 sha256:aaa")
    assert code(e) == grpc.StatusCode.NOT_FOUND


def test_overlay_mounts_list_parents_nearest_first(rig: Rig):
    rig.prepare("a-key")
    rig.commit("A", "a-key")
    (m,) = rig.prepare("b-key", "A")
    b = rig.fs("b-key")
    assert (m.type, m.source) == ("overlay", "overlay")
    assert opts(m) == INDEX_OFF + [f"workdir={b.parent / 'work'}", f"upperdir={b}", f"lowerdir={rig.fs('A')}"]
    rig.commit("B", "b-key")
    (m,) = rig.prepare("c-key", "B")
    c = rig.fs("c-key")
    assert opts(m) == INDEX_OFF + [f"workdir={c.parent / 'work'}", f"upperdir={c}",
                                   f"lowerdir={rig.fs('B')}:{rig.fs('A')}"]
    # views: one parent -> read-only bind of it; more -> overlay without upper/work; none -> ro bind
    (v1,) = rig.view("view-a", "A")
    assert (v1.type, v1.source, opts(v1)) == ("bind", str(rig.fs("A")), ["ro", "rbind"])
    (v2,) = rig.view("view-b", "B")
    assert (v2.type, opts(v2)) == ("overlay", INDEX_OFF + [f"lowerdir={rig.fs('B')}:{rig.fs('A')}"])
    assert not (rig.fs("view-b").parent / "work").exists()
    (v0,) = rig.view("view-empty")
    assert (v0.type, v0.source, opts(v0)) == ("bind", str(rig.fs("view-empty")), ["ro", "rbind"])
    assert rig.stat("view-b").kind == pb.VIEW


def test_errors_use_containerd_codes(rig: Rig):
    rig.prepare("k1")
    cases = [
        (lambda: rig.prepare("k1"), grpc.StatusCode.ALREADY_EXISTS),
        (lambda: rig.prepare("k2", "missing"), grpc.StatusCode.NOT_FOUND),
        (lambda: rig.prepare("k3", "k1"), grpc.StatusCode.INVALID_ARGUMENT),  # parent not committed
        (lambda: rig.commit("X", "missing"), grpc.StatusCode.NOT_FOUND),
        (lambda: rig.stat("missing"), grpc.StatusCode.NOT_FOUND),
        (lambda: rig.mounts("missing"), grpc.StatusCode.NOT_FOUND),
        (lambda: rig.usage("missing"), grpc.StatusCode.NOT_FOUND),
        (lambda: rig.remove("missing"), grpc.StatusCode.NOT_FOUND),
        (lambda: rig.list('name=="unterminated'), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: rig.prepare("k4", labels={"x": "y" * 5000}), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, want in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert code(e) == want, e.value.details()
    rig.commit("C1", "k1")
    with pytest.raises(grpc.RpcError) as e:
        rig.mounts("C1")  # committed snapshots have no mounts
    assert code(e) == grpc.StatusCode.FAILED_PRECONDITION
    rig.prepare("k5", "C1")
    rig.view("v5", "C1")
    for call, want in [(lambda: rig.commit("C1", "k5"), grpc.StatusCode.ALREADY_EXISTS),
                       (lambda: rig.commit("C2", "v5"), grpc.StatusCode.FAILED_PRECONDITION),
                       (lambda: rig.commit("C3", "C1"), grpc.StatusCode.FAILED_PRECONDITION),
                       (lambda: rig.remove("C1"), grpc.StatusCode.FAILED_PRECONDITION)]:  # has children
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert code(e) == want, e.value.details()
    # nothing half-made: the failed Prepares left no directories behind
    rig.remove("k5")
    rig.remove("v5")
    rig.remove("C1")
    assert os.listdir(rig.snapshotter.snapshots_dir) == []
    assert [i.name for i in rig.list()] == []


def test_update_labels_with_and_without_mask(rig: Rig):
    rig.prepare("k", labels={"a": "1", "b": "2"})
    rig.commit("C", "k", {"a": "1", "b": "2"})
    before = rig.stat("C")

    def update(labels: dict[str, str], *paths: str):
        req = pb.UpdateSnapshotRequest(snapshotter="nydus-py", info=pb.Info(name="C", labels=labels))
        if paths:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
        return rig.stub.Update(req, timeout=10).info

    info = update({"a": "9", "c": "3"}, "labels.a")
    assert dict(info.labels) == {"a": "9", "b": "2"}
    assert info.kind == pb.COMMITTED and info.parent == "" and info.created_at == before.created_at
    assert info.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert dict(update({}, "labels.b").labels) == {"a": "9"}  # absent in the request: removed
    assert dict(update({"z": "26"}, "labels").labels) == {"z": "26"}
    assert dict(update({"y": "25"}).labels) == {"y": "25"}  # no mask: all mutable fields
    assert dict(rig.stat("C").labels) == {"y": "25"}
    with pytest.raises(grpc.RpcError) as e:
        update({}, "parent")
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        rig.stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="nope")), timeout=10)
    assert code(e) == grpc.StatusCode.NOT_FOUND


def test_list_filters(rig: Rig):
    rig.prepare("k1")
    rig.commit("sha256:one", "k1", {"containerd.io/snapshot.ref": "sha256:one", "team": "a"})
    rig.prepare("k2", "sha256:one")
    rig.commit("sha256:two", "k2", {"containerd.io/snapshot.ref": "sha256:two", "team": "b"})
    rig.prepare("active", "sha256:two")
    names = lambda *f: sorted(i.name for i in rig.list(*f))  # noqa: E731
    assert names() == ["active", "sha256:one", "sha256:two"]
    # what containerd's metadata layer sends after a remote Prepare
    assert names('labels."containerd.io/snapshot.ref"==sha256:two,parent=="sha256:one"') == ["sha256:two"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:two,parent=="other"') == []
    assert names("kind==active") == ["active"]
    assert names("kind==committed,labels.team!=a") == ["sha256:two"]
    assert names("labels.team") == ["sha256:one", "sha256:two"]  # presence
    assert names("name~=/^sha256:t/") == ["sha256:two"]
    assert names("labels.team==a", "kind==active") == ["active", "sha256:one"]  # several: any
    big = [f"x{i}" for i in range(230)]  # more than one streamed batch
    for k in big:
        rig.view(k, "sha256:one")
    assert len(rig.list("kind==view")) == 230


def test_remove_and_cleanup_reclaim_directories(rig: Rig):
    rig.prepare("k")
    d = rig.fs("k").parent
    rig.remove("k")
    assert not d.exists()
    stray = rig.snapshotter.snapshots_dir + "/12345"
    os.makedirs(stray + "/fs")
    rig.prepare("keep")
    rig.cleanup()
    assert not os.path.exists(stray) and rig.fs("keep").is_dir()


def test_metadata_survives_a_restart_and_ids_are_never_reused(rig: Rig):
    rig.prepare("k1")
    rig.commit("C", "k1", {"l": "v"})
    rig.prepare("k2", "C")
    first = rig.sid("k2")
    rig.remove("k2")
    r2 = rig.restart()
    try:
        assert r2.stat("C").kind == pb.COMMITTED and dict(r2.stat("C").labels) == {"l": "v"}
        r2.prepare("k3", "C")
        assert int(r2.sid("k3")) > int(first)
        assert [i.name for i in r2.list()] == ["C", "k3"]
    finally:
        r2.stop()


@pytest.mark.root
def test_returned_mounts_work_with_the_kernel(rig: Rig, tmp_path):
    """Mount what Prepare returns, like containerd does: a bind for the base layer, then overlayfs
    whose upperdir receives exactly the child's changes."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    mount = require_tool("mount")
    target = tmp_path / "target"
    target.mkdir()

    def do_mount(m) -> None:
        subprocess.run([mount, "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True,
                       capture_output=True)

    def umount() -> None:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)

    (m,) = rig.prepare("base")
    do_mount(m)
    (target / "etc").mkdir()
    (target / "etc" / "passwd").write_text("root\n")
    (target / "gone").write_text("bye\n")
    umount()
    rig.commit("BASE", "base")
    (m,) = rig.prepare("top", "BASE")
    do_mount(m)
    try:
        assert (target / "etc" / "passwd").read_text() == "root\n"
        (target / "new").write_text("new\n")
        os.unlink(target / "gone")
    finally:
        umount()
    upper = rig.fs("top")
    assert sorted(os.listdir(upper)) == ["gone", "new"]
    assert os.major(os.lstat(upper / "gone").st_rdev) == 0 and (upper / "gone").is_char_device()  # whiteout
    assert sorted(os.listdir(rig.fs("BASE"))) == ["etc", "gone"]


# -- remote (Nydus) layers ----------------------------------------------------------------------

MANIFEST = "sha256:" + "ab" * 32


def cri_labels(chain: str, layer: str, *, bootstrap: bool) -> dict[str, str]:
    out = {L.TARGET_REF: chain, L.CRI_IMAGE_REF: "registry.local:5000/app:v1-nydus", L.CRI_LAYER_DIGEST: layer,
           L.CRI_MANIFEST_DIGEST: MANIFEST, "containerd.io/snapshot/cri.image-layers": "sha256:l1,sha256:l2"}
    out[L.NYDUS_BOOTSTRAP if bootstrap else L.NYDUS_BLOB] = "true"
    return out


def stargz_labels(chain: str, layer: str, *, bootstrap: bool) -> dict[str, str]:
    out = {L.TARGET_REF: chain, L.STARGZ_REFERENCE: "registry.local:5000/app:v1-nydus", L.STARGZ_DIGEST: layer,
           "containerd.io/snapshot/remote/stargz.layers": "sha256:l1"}
    out[L.NYDUS_BOOTSTRAP if bootstrap else L.NYDUS_BLOB] = "true"
    return out


def remote_prepare(rig: Rig, n: int, chain: str, parent: str, labels: dict[str, str]) -> None:
    """What containerd's 1.6 unpacker does for one layer: Stat, Prepare -> ALREADY_EXISTS, List, Stat."""
    with pytest.raises(grpc.RpcError) as e:
        rig.stat(chain)
    assert code(e) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        rig.prepare(f"default/{n}/extract-{n} {chain}", parent, labels)
    assert code(e) == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
    found = rig.list(f'labels."containerd.io/snapshot.ref"=={chain},parent=="{parent}"')
    assert [(i.name, i.parent, i.kind) for i in found] == [(chain, parent, pb.COMMITTED)]
    assert dict(found[0].labels) == labels


@pytest.mark.parametrize("make_labels,source", [
    (cri_labels, f"docker://registry.local:5000/app@{MANIFEST}"),
    (stargz_labels, "docker://registry.local:5000/app@sha256:" + "cd" * 32),  # the tag, resolved at Prepare
])
def test_nydus_layers_become_committed_snapshots_and_the_bootstrap_is_the_lower(rig: Rig, make_labels, source):
    remote_prepare(rig, 1, "sha256:c1", "", make_labels("sha256:c1", "sha256:blob1", bootstrap=False))
    remote_prepare(rig, 2, "sha256:c2", "sha256:c1", make_labels("sha256:c2", "sha256:blob2", bootstrap=False))
    assert rig.mounter.calls == []  # data layers need nothing
    remote_prepare(rig, 3, "sha256:c3", "sha256:c2", make_labels("sha256:c3", "sha256:boot", bootstrap=True))
    boot = rig.sid("sha256:c3")
    assert rig.mounter.calls == [("mount", boot, source)]
    assert os.listdir(rig.fs("sha256:c1")) == [] and rig.usage("sha256:c1").size == 0

    # the container's snapshot: overlay on the Nydus mount only (the data layers are inside it)
    (m,) = rig.prepare("default/4/ctr", "sha256:c3")
    up = rig.fs("default/4/ctr")
    assert opts(m) == INDEX_OFF + [f"workdir={up.parent / 'work'}", f"upperdir={up}",
                                   f"lowerdir={rig.mounter.mount_dir(boot)}"]
    (v,) = rig.view("default/5/view", "sha256:c3")
    assert (v.type, v.source, opts(v)) == ("bind", rig.mounter.mount_dir(boot), ["ro", "rbind"])

    # a second pull of the same image (another namespace): the target exists, no second mount
    with pytest.raises(grpc.RpcError) as e:
        rig.prepare("k8s.io/9/extract sha256:c3", "sha256:c2", make_labels("sha256:c3", "sha256:boot", bootstrap=True))
    assert code(e) == grpc.StatusCode.ALREADY_EXISTS
    assert len([c for c in rig.mounter.calls if c[0] == "mount"]) == 1

    # after a daemon restart the mount is gone: Mounts mounts it again
    rig.mounter.mounted.clear()
    assert rig.mounts("default/4/ctr") == [m]
    assert rig.mounter.calls[-1] == ("mount", boot, source)

    # garbage collection, leaf first: the bootstrap's removal unmounts it
    for key in ("default/4/ctr", "default/5/view", "sha256:c3", "sha256:c2", "sha256:c1"):
        rig.remove(key)
    assert rig.mounter.calls[-1] == ("umount", boot) and rig.mounter.mounted == {}
    assert os.listdir(rig.snapshotter.snapshots_dir) == []


def test_failed_image_mount_fails_the_prepare_and_leaves_nothing(rig: Rig):
    rig.mounter.fail = "registry said 404: manifest unknown"
    with pytest.raises(grpc.RpcError) as e:
        rig.prepare("default/1/extract sha256:b", "", cri_labels("sha256:b", "sha256:boot", bootstrap=True))
    assert code(e) == grpc.StatusCode.UNAVAILABLE and "manifest unknown" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        rig.stat("sha256:b")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    assert os.listdir(rig.snapshotter.snapshots_dir) == []
    rig.mounter.fail = ""
    remote_prepare(rig, 2, "sha256:b", "", cri_labels("sha256:b", "sha256:boot", bootstrap=True))


def test_labels_that_are_not_nydus_take_the_ordinary_path(rig: Rig):
    plain = cri_labels("sha256:p", "sha256:layer", bootstrap=False)
    del plain[L.NYDUS_BLOB]  # an OCI layer pulled through CRI: containerd applies it itself
    (m,) = rig.prepare("default/1/extract sha256:p", "", plain)
    assert m.type == "bind" and rig.stat("default/1/extract sha256:p").kind == pb.ACTIVE
    no_ref = {L.NYDUS_BOOTSTRAP: "true", L.TARGET_REF: "sha256:q"}  # no image reference: nothing to mount
    rig.prepare("default/2/extract sha256:q", "", no_ref)
    assert rig.mounter.calls == []
    bad = cri_labels("sha256:r", "sha256:boot", bootstrap=True)
    bad[L.CRI_IMAGE_REF] = "Not A Reference!"
    with pytest.raises(grpc.RpcError) as e:
        rig.prepare("default/3/extract sha256:r", "", bad)
    assert code(e) == grpc.StatusCode.UNAVAILABLE and "Not A Reference!" in e.value.details()


def test_the_socket_appears_with_its_final_owner_and_mode(tmp_path: Path) -> None:
    """serve() binds under a temporary name and renames the socket into place once it is 0660
    and owned by upstream's uid/gid: a client (or a test) that sees the path never sees it
    root-owned 0755 first."""
    import threading

    from nydus_py.snapshotter.service import serve
    from nydus_py.snapshotter.snapshotter import Snapshotter

    from .conftest import FakeMounter

    sock = tmp_path / "run" / "snap.sock"
    seen: list[tuple[int, int, int]] = []
    done = threading.Event()

    def watch() -> None:
        # done is set only once serve() has returned, when the socket must exist: the last look
        # after it always finds the socket, so the first sighting is recorded however the
        # threads were scheduled (a watcher starved until serve() returned still looks once)
        while True:
            finished = done.is_set()
            try:
                st = os.stat(sock)
            except FileNotFoundError:
                if finished:
                    return
                continue
            seen.append((st.st_uid, st.st_gid, st.st_mode & 0o777))
            return

    t = threading.Thread(target=watch)
    t.start()
    sn = Snapshotter(str(tmp_path / "state"), FakeMounter(tmp_path / "fake-mnt"))
    try:
        server = serve(sn, str(sock), workers=2, uid=1234, gid=2345)
        done.set()
        t.join()
        assert seen == [(1234, 2345, 0o660)]
        assert [p.name for p in sock.parent.iterdir()] == ["snap.sock"]  # no temporary name left
        server.stop(None)
    finally:
        done.set()
        sn.close()
