"""The gRPC control service: same implementation as HTTP, same semantics and errors."""

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nydus_py.api.grpc_gen import control_pb2 as pb
from nydus_py.api.grpc_gen import control_pb2_grpc as pb_grpc
from nydus_py.api.grpc_server import serve_grpc
from nydus_py.daemon.service import DaemonOptions, DaemonService
from tests.daemon.rig import Image, make_image, snapshotter_config


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    work = tmp_path_factory.mktemp("images")
    return [make_image(str(work), seed, files=6) for seed in range(2)]


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[DaemonService, pb_grpc.ControlStub, str]]:
    svc = DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path)))
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir(mode=0o700)
    path = str(sock_dir / "grpc.sock")
    server = serve_grpc(svc, path)
    channel = grpc.insecure_channel(f"unix:{path}")
    try:
        yield svc, pb_grpc.ControlStub(channel), path
    finally:
        channel.close()
        server.stop(0)
        svc.close_all()


def expect(call, code: grpc.StatusCode, http: int) -> dict:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        call()
    err = e.value
    assert err.code() == code, (err.code(), err.details())
    body = json.loads(err.details())
    assert set(body) == {"code", "message"}
    assert ("http-status", str(http)) in tuple(err.trailing_metadata())
    return body


def test_grpc_mirrors_http(control, images: list[Image]) -> None:  # noqa: ANN001
    svc, stub, path = control
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    info = stub.GetDaemonInfo(pb.DaemonInfoRequest())
    http_info = svc.daemon_info()
    assert info.state == http_info["state"] == "INIT"
    assert info.version.git_commit == http_info["version"]["git_commit"]
    assert not info.HasField("id") and json.loads(info.backend_collection_json) == {}
    for i, img in enumerate(images):
        stub.Mount(pb.MountRequest(mountpoint=f"/s{i}", fs_type="rafs", source=img.boot,
                                   config=snapshotter_config(img.blobs, f"s{i}")))
    mounts = stub.ListMounts(pb.Empty()).mounts
    assert [(m.mountpoint, m.backend_type, m.source) for m in mounts] == [
        ("/s0", "Rafs", images[0].boot), ("/s1", "Rafs", images[1].boot)]
    assert len({m.index for m in mounts}) == 2
    coll = json.loads(stub.GetDaemonInfo(pb.DaemonInfoRequest()).backend_collection_json)
    assert coll == svc.daemon_info()["backend_collection"]
    assert stub.GetDaemonInfo(pb.DaemonInfoRequest(v2=True)).backend_collection_json == ""
    # metrics documents are the HTTP JSON
    m = json.loads(stub.GetMetrics(pb.MetricsRequest(kind=pb.METRICS_FS, id="/s1")).json)
    assert m == svc.metrics_fs("/s1") and len(m["fop_hits"]) == 15
    bc = json.loads(stub.GetMetrics(pb.MetricsRequest(kind=pb.METRICS_BLOBCACHE, id="s0")).json)
    assert isinstance(bc["underlying_files"], list)
    expect(lambda: stub.GetMetrics(pb.MetricsRequest(kind=pb.METRICS_FS)), grpc.StatusCode.NOT_FOUND, 404)
    assert list(stub.GetInflight(pb.Empty()).ops) == []
    sb = json.loads(stub.GetBackend(pb.MountpointRequest(mountpoint="/s0")).json)
    assert sb["version"] == 6
    # errors: same classes as HTTP, nothing changes
    before = svc.vfs.mounts()
    expect(lambda: stub.Mount(pb.MountRequest(mountpoint="/s0", fs_type="rafs", source=images[1].boot,
                                              config=snapshotter_config(images[1].blobs))),
           grpc.StatusCode.ALREADY_EXISTS, 409)
    expect(lambda: stub.Mount(pb.MountRequest(mountpoint="/x", fs_type="rafs", source=images[1].boot,
                                              config="{oops")), grpc.StatusCode.INVALID_ARGUMENT, 400)
    expect(lambda: stub.Mount(pb.MountRequest(fs_type="rafs", source=images[1].boot, config="{}")),
           grpc.StatusCode.INVALID_ARGUMENT, 400)
    expect(lambda: stub.Umount(pb.MountpointRequest(mountpoint="/nope")), grpc.StatusCode.NOT_FOUND, 404)
    expect(lambda: stub.Start(pb.Empty()), grpc.StatusCode.INVALID_ARGUMENT, 400)
    expect(lambda: stub.SetLogLevel(pb.SetLogLevelRequest(log_level="loud")), grpc.StatusCode.INVALID_ARGUMENT, 400)
    expect(lambda: stub.SendFd(pb.Empty()), grpc.StatusCode.UNIMPLEMENTED, 501)
    expect(lambda: stub.PutConfig(pb.PutConfigRequest(id="/s0", values={"nope": "x"})),
           grpc.StatusCode.INVALID_ARGUMENT, 400)
    assert svc.vfs.mounts() == before
    stub.PutConfig(pb.PutConfigRequest(id="/s0", values={"registry_auth": "dXNlcjpwYXNz"}))
    assert dict(stub.GetConfig(pb.IdRequest(id="/s0")).values) == {"registry_auth": "<redacted>"}
    assert stub.GetEvents(pb.Empty()).max_errors == 500
    stub.Umount(pb.MountpointRequest(mountpoint="/s0"))
    assert [m.mountpoint for m in stub.ListMounts(pb.Empty()).mounts] == ["/s1"]
    stub.Exit(pb.Empty())
    assert svc.state.value == "STOPPED"
