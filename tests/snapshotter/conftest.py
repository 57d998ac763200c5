"""An in-process snapshotter served over a real unix socket, a gRPC client, and a fake image
mounter that records what the snapshotter asks of the shared daemon."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from nydus_py.snapshotter.errors import Unavailable
from nydus_py.snapshotter.grpc_gen import snapshots_pb2 as pb
from nydus_py.snapshotter.grpc_gen import snapshots_pb2_grpc as pb_grpc
from nydus_py.snapshotter.service import serve
from nydus_py.snapshotter.snapshotter import Snapshotter
from tests.convert.conftest import skopeo  # noqa: F401  (fixture)
from tests.storage.conftest import (  # noqa: F401  (fixtures)
    basic_registry,
    mirror_registry,
    plain_registry,
    registry_bin,
    registry_root,
)


@dataclass
class FakeMounter:
    """Mounts are directories under `base`; `fail` makes the next mounts fail."""

    base: Path
    calls: list[tuple[str, ...]] = field(default_factory=list)
    mounted: dict[str, str] = field(default_factory=dict)
    fail: str = ""
    tags: dict[str, str] = field(default_factory=lambda: {
        "docker://registry.local:5000/app:v1-nydus": "docker://registry.local:5000/app@sha256:" + "cd" * 32})

    def mount(self, sid: str, image_ref: str) -> None:
        if sid in self.mounted:
            return
        self.calls.append(("mount", sid, image_ref))
        if self.fail:
            raise Unavailable(self.fail)
        os.makedirs(self.mount_dir(sid), exist_ok=True)
        self.mounted[sid] = image_ref

    def umount(self, sid: str) -> None:
        self.calls.append(("umount", sid))
        self.mounted.pop(sid, None)

    def mount_dir(self, sid: str) -> str:
        return str(self.base / sid)

    def stop(self) -> None:
        self.calls.append(("stop",))

    def pin(self, image_ref: str) -> str:
        """Tags resolve through `tags` (a tag not there is an error, as a missing manifest is)."""
        if "@sha256:" in image_ref:
            return image_ref
        if image_ref not in self.tags:
            raise Unavailable(f"image {image_ref} not found in the registry (manifest unknown)")
        return self.tags[image_ref]


@dataclass
class Rig:
    root: Path
    sock: str
    snapshotter: Snapshotter
    server: grpc.Server
    channel: grpc.Channel
    stub: pb_grpc.SnapshotsStub
    mounter: FakeMounter

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(1).wait(5)
        self.snapshotter.close()

    def restart(self) -> Rig:
        self.stop()
        return start_rig(self.root, self.mounter)

    # thin helpers: the RPC with the fields containerd fills in
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None):
        return self.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="nydus-py", key=key, parent=parent,
                                                           labels=labels or {}), timeout=30).mounts

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None):
        return self.stub.View(pb.ViewSnapshotRequest(snapshotter="nydus-py", key=key, parent=parent,
                                                     labels=labels or {}), timeout=30).mounts

    def mounts(self, key: str):
        return self.stub.Mounts(pb.MountsRequest(snapshotter="nydus-py", key=key), timeout=30).mounts

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(snapshotter="nydus-py", name=name, key=key, labels=labels or {}),
                         timeout=30)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter="nydus-py", key=key), timeout=30)

    def stat(self, key: str):
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter="nydus-py", key=key), timeout=30).info

    def list(self, *filters: str):
        out = []
        for resp in self.stub.List(pb.ListSnapshotsRequest(snapshotter="nydus-py", filters=list(filters)), timeout=30):
            out.extend(resp.info)
        return out

    def usage(self, key: str):
        return self.stub.Usage(pb.UsageRequest(snapshotter="nydus-py", key=key), timeout=30)

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter="nydus-py"), timeout=30)

    def fs(self, key: str) -> Path:
        """The snapshot's fs directory (found through its id in the metadata)."""
        with self.snapshotter.store.tx() as tx:
            return Path(self.snapshotter.upper_path(tx.get(key).id))

    def sid(self, key: str) -> str:
        with self.snapshotter.store.tx() as tx:
            return tx.get(key).id


def start_rig(root: Path, mounter: FakeMounter) -> Rig:
    sn = Snapshotter(str(root / "state"), mounter)
    sock = str(root / "run" / "snap.sock")
    server = serve(sn, sock, workers=4)
    channel = grpc.insecure_channel("unix://" + sock)
    grpc.channel_ready_future(channel).result(timeout=10)
    return Rig(root, sock, sn, server, channel, pb_grpc.SnapshotsStub(channel), mounter)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = start_rig(tmp_path, FakeMounter(tmp_path / "fake-mnt"))
    yield r
    r.stop()  # idempotent: a test that restarted the rig stops its new one itself
