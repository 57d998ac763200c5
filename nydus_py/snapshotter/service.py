"""`containerd.services.snapshots.v1.Snapshots` over gRPC on a unix socket: what containerd's
`[proxy_plugins.<name>] type = "snapshot"` connects to.

Each RPC calls the Snapshotter with the request's fields; a SnapshotError aborts with its status
code (containerd's errdefs maps NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT
and UNAVAILABLE back to its own errors). List streams the matching infos in batches, like
containerd's proxy server does. The `snapshotter` field of the requests is ignored: the socket
serves one snapshotter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from . import filters
from .errors import SnapshotError
from .grpc_gen import mount_pb2
from .grpc_gen import snapshots_pb2 as pb
from .grpc_gen import snapshots_pb2_grpc as pb_grpc
from .snapshotter import Mount, Snapshotter
from .store import Info, Kind

log = logging.getLogger(__name__)
T = TypeVar("T")
LIST_BATCH = 100


def _ts(ns: int) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(ns)
    return t


def info_to_pb(info: Info) -> Any:
    return pb.Info(name=info.name, parent=info.parent, kind=info.kind.name, created_at=_ts(info.created_ns),
                   updated_at=_ts(info.updated_ns), labels=info.labels)


def mounts_to_pb(mounts: list[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


def info_adaptor(info: Info) -> filters.Adaptor:
    """Field lookup for filters, like bolt.go's adaptSnapshot."""
    kinds = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}

    def field(path: Any) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return (kinds[info.kind], True) if info.kind in kinds else ("", False)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels or len(path) < 2:
                return "", False
            key = ".".join(path[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False

    return field


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SnapshotError as e:
            if e.code in ("ALREADY_EXISTS", "NOT_FOUND"):
                log.debug("%s: %s %s", what, e.code, e)
            else:
                log.warning("%s: %s %s", what, e.code, e)
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
            raise  # abort() raises; this keeps type checkers informed
        except OSError as e:
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.UNKNOWN, f"{what}: {e}")
            raise

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        log.debug("Prepare key=%s parent=%s labels=%s", request.key, request.parent, dict(request.labels))
        mounts = self._call(context, f"prepare {request.key}",
                            lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, f"view {request.key}",
                            lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, f"mounts {request.key}", lambda: self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=mounts_to_pb(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, f"commit {request.key}",
                   lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, f"remove {request.key}", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._call(context, f"stat {request.key}", lambda: self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        i = request.info
        info = Info(i.name, i.parent, labels=dict(i.labels))  # only labels can change
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        out = self._call(context, f"update {i.name}", lambda: self.sn.update(info, paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(out))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        fs = self._call(context, "list", lambda: filters.parse_all(list(request.filters)))
        infos = [i for i in self._call(context, "list", self.sn.walk) if filters.matches(fs, info_adaptor(i))]
        for start in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(i) for i in infos[start:start + LIST_BATCH]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = self._call(context, f"usage {request.key}", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call(context, "cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


def socket_address(address: str) -> tuple[str, str]:
    """(filesystem path, grpc address) for `/path.sock` or `unix:///path.sock`."""
    path = address[len("unix://"):] if address.startswith("unix://") else address
    path = os.path.abspath(path)
    return path, "unix://" + path


def serve(snapshotter: Snapshotter, address: str, workers: int = 8, uid: int = 0, gid: int = 0) -> grpc.Server:
    """Start the gRPC server on unix socket `address` (a stale socket file is replaced). The
    socket is bound under a temporary name, given mode 0660 and (upstream's uid/gid) its owner,
    then renamed into place: no one sees it at `address` before its permissions are final."""
    path, _target = socket_address(address)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    for stale in (tmp, path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"),
                         options=[("grpc.max_receive_message_length", 16 << 20),
                                  ("grpc.max_send_message_length", 16 << 20)])
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)
    if server.add_insecure_port("unix://" + tmp) == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    try:
        os.chmod(tmp, 0o660)
        if uid or gid:
            os.chown(tmp, uid, gid)
        os.rename(tmp, path)
    except BaseException:
        server.stop(None)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return server
