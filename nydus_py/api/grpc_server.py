"""The gRPC control service (proto/nydus_py/control.proto) on its own unix socket.

Each method calls the DaemonService method its HTTP endpoint calls, with the same arguments, so
semantics and errors are the same: an ApiError aborts the call with the status derived from its
HTTP status, the `{code, message}` JSON as details, and `http-status` in the trailing metadata.
grpcio runs handlers on its own thread pool; mutations serialise on the service's lock.
"""

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from ..daemon.errors import ApiError
from ..daemon.instance import MountCmd
from .grpc_gen import control_pb2 as pb
from .grpc_gen import control_pb2_grpc as pb_grpc
from .sockets import check_socket_dir

log = logging.getLogger(__name__)

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
T = TypeVar("T")


def _opt(msg: Any, field: str) -> str | None:
    return getattr(msg, field) if msg.HasField(field) else None


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, service: Any) -> None:
        self.service = service

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ApiError as e:
            context.set_trailing_metadata((("http-status", str(e.status)),))
            context.abort(STATUS.get(e.status, grpc.StatusCode.UNKNOWN), json.dumps(e.body()))
            raise  # abort() raises; this keeps type checkers informed

    def GetDaemonInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._call(context, lambda: self.service.daemon_info(v2=request.v2))
        coll = info["backend_collection"]
        return pb.DaemonInfo(version=pb.Version(**info["version"]), id=info["id"], supervisor=info["supervisor"],
                             state=info["state"], backend_collection_json="" if coll is None else json.dumps(coll))

    def SetLogLevel(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, lambda: self.service.configure({"log_level": request.log_level}))
        return pb.Empty()

    def GetEvents(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.Events(**self._call(context, self.service.events_json))

    def GetBackend(self, request: Any, context: grpc.ServicerContext) -> Any:
        doc = self._call(context, lambda: self.service.backend_info(request.mountpoint or None))
        return pb.JsonDocument(json=json.dumps(doc))

    def _void(self, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        self._call(context, fn)
        return pb.Empty()

    def Start(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, self.service.start)

    def Exit(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, self.service.exit)

    def SendFd(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, self.service.sendfd)

    def Takeover(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, self.service.takeover)

    def _cmd(self, request: Any) -> MountCmd:
        body: dict[str, Any] = {"fs_type": request.fs_type, "source": request.source, "config": request.config}
        if request.prefetch_files:
            body["prefetch_files"] = list(request.prefetch_files)
        return MountCmd.from_json(body)

    def Mount(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, lambda: self.service.mount(request.mountpoint or None, self._cmd(request)))

    def Remount(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, lambda: self.service.remount(request.mountpoint or None, self._cmd(request)))

    def Umount(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, lambda: self.service.umount(request.mountpoint or None))

    def ListMounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        insts = sorted(self.service.instances.values(), key=lambda i: i.mountpoint)
        return pb.MountList(mounts=[
            pb.MountInfo(mountpoint=i.mountpoint, backend_type=i.backend_type, fs_type=i.cmd.fs_type,
                         source=i.cmd.source, index=i.index, mounted_time=i.mounted_time) for i in insts])

    def GetMetrics(self, request: Any, context: grpc.ServicerContext) -> Any:
        ident = _opt(request, "id")
        svc = self.service
        kinds: dict[int, Callable[[], Any]] = {
            pb.METRICS_FS: lambda: svc.metrics_fs(ident),
            pb.METRICS_FILES: lambda: svc.metrics_files(ident, False),
            pb.METRICS_FILES_LATEST: lambda: svc.metrics_files(ident, True),
            pb.METRICS_PATTERN: lambda: svc.metrics_pattern(ident),
            pb.METRICS_BACKEND: lambda: svc.metrics_backend(ident),
            pb.METRICS_BLOBCACHE: lambda: svc.metrics_blobcache(ident),
        }
        return pb.JsonDocument(json=json.dumps(self._call(context, kinds[request.kind])))

    def GetInflight(self, request: Any, context: grpc.ServicerContext) -> Any:
        ops = self._call(context, self.service.metrics_inflight) or []
        return pb.InflightList(ops=[pb.InflightOp(**op) for op in ops])

    def GetConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ConfigValues(values=self._call(context, lambda: self.service.get_config(_opt(request, "id"))))

    def PutConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._void(context, lambda: self.service.put_config(_opt(request, "id"), dict(request.values)))


def serve_grpc(service: Any, path: str, workers: int = 4) -> grpc.Server:
    """Start the control service on unix socket `path` (0600, in a non-world-writable dir)."""
    check_socket_dir(path)
    path = os.path.abspath(path)
    if os.path.exists(path):
        os.unlink(path)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"))
    pb_grpc.add_ControlServicer_to_server(ControlServicer(service), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    # grpc's core creates the file under the process umask (never group/other-writable, so nobody
    # else can connect meanwhile); narrow it to 0600 like the HTTP socket
    os.chmod(path, 0o600)
    return server
