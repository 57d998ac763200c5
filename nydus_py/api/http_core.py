"""nydusd's HTTP admin API (v1 and v2) with no I/O: a request in, a response out.

Routes are matched on the exact (percent-decoded, not normalized) path like upstream's server: an
unknown path is 404, a known path with the wrong method 400, both with the `{code, message}` body.
Every answer is `Content-Type: application/json` (but the Prometheus text); success is 200 with JSON
or 204 with no body. Endpoints that take no body refuse a non-empty one. Calls that mount, unmount
or change state go through `blocking`, which the transport (`api.server`) points at its worker
threads, so polls and metrics keep answering while a mount loads its bootstrap. The Prometheus
page's collector is made at the first scrape.
"""

import json
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..daemon.errors import ApiError, BadRequest, NotFound
from ..daemon.instance import MountCmd

log = logging.getLogger(__name__)

SERVER = "Nydus API"
JSON = "application/json"
MAX_BODY = 1 << 20  # upstream allows 51200 bytes; never be stricter

T = TypeVar("T")
Blocking = Callable[..., Any]  # (fn, *args) -> fn(*args), run where a long wait harms nobody


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-decoded
    query: dict[str, str] = field(default_factory=dict)  # the first value of each name
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON


Handler = Callable[["HttpApi", Request], Response]


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """(path, query) of a request target: origin form, or absolute form (its path and query);
    `+` in the query is a space, a name without `=` has the value ""."""
    if not target.startswith("/"):
        parts = urllib.parse.urlsplit(target)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    raw_path, _, raw_query = target.partition("?")
    raw_query = raw_query.partition("#")[0]
    query: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(name, value)
    return urllib.parse.unquote(raw_path), query


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode())


def no_content() -> Response:
    return Response(204)


def error_response(status: int, message: str) -> Response:
    """nydusd's error body for a failure outside the service (HTTP layer, internal error)."""
    return json_response({"code": "UNDEFINED", "message": message}, status)


def too_large() -> Response:
    return error_response(413, "BadRequest: Request Entity Too Large")


def parse_json(body: bytes) -> Any:
    if not body:
        raise BadRequest("a JSON body is required")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # also too deep nesting, too many digits, bad UTF-8
        raise BadRequest(f"ParseBody: {e}") from None


def no_body(body: bytes) -> None:
    if body:
        raise BadRequest("this request takes no body")


def query_bool(req: Request, name: str) -> bool:
    value = req.query.get(name)
    if value is None or value == "":
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise BadRequest(f"query parameter {name!r} must be true or false")


def call_directly(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class HttpApi:
    """The route table over a `DaemonService`; `handle` never raises."""

    def __init__(self, service: Any, routes: dict[str, dict[str, Handler]] | None = None,
                 blocking: Blocking = call_directly) -> None:
        self.service = service
        self.routes = ROUTES if routes is None else routes
        self.blocking = blocking
        self._registry: Any = None

    def route(self, method: str, path: str) -> Handler | Response:
        """The handler, or the error answer (sent before any body is read, like upstream)."""
        methods = self.routes.get(path)
        if methods is None:
            return self._refused(method, path, NotFound(f"NoRoute: {path}"))
        handler = methods.get(method)
        if handler is None:
            return self._refused(method, path, BadRequest(f"InvalidMethod: {method} {path}"))
        return handler

    def call(self, handler: Handler, req: Request) -> Response:
        try:
            return handler(self, req)
        except ApiError as e:
            return self._refused(req.method, req.path, e)
        except Exception as e:
            log.exception("%s %s failed", req.method, req.path)
            return error_response(500, f"Internal: {type(e).__name__}: {e}")

    def handle(self, req: Request) -> Response:
        found = self.route(req.method, req.path)
        return found if isinstance(found, Response) else self.call(found, req)

    def _refused(self, method: str, path: str, e: ApiError) -> Response:
        if e.status >= 500:
            log.error("%s %s: %s", method, path, e.message)
        else:
            log.info("%s %s: %s %s", method, path, e.status, e.message)
        return json_response(e.body(), e.status)

    def prometheus(self) -> Response:
        from .prometheus import CONTENT_TYPE, exposition, make_registry

        if self._registry is None:
            self._registry = make_registry(self.service)
        return Response(200, exposition(self._registry), CONTENT_TYPE)


# -- handlers ------------------------------------------------------------------------------------
def get_daemon(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.daemon_info(v2=False))


def get_daemon_v2(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.daemon_info(v2=True))


def put_daemon(api: HttpApi, req: Request) -> Response:
    api.service.configure(parse_json(req.body))
    return no_content()


def get_events(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.events_json())


def get_backend(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.backend_info(req.query.get("mountpoint")))


def _blocking_no_body(method: str) -> Handler:
    def handler(api: HttpApi, req: Request) -> Response:
        no_body(req.body)
        api.blocking(getattr(api.service, method))
        return no_content()

    return handler


def post_mount(api: HttpApi, req: Request) -> Response:
    mp = req.query.get("mountpoint")
    api.service.normalize_mountpoint(mp)  # a missing/bad mountpoint is reported before the body
    cmd = MountCmd.from_json(parse_json(req.body))
    api.blocking(api.service.mount, mp, cmd)
    return no_content()


def put_mount(api: HttpApi, req: Request) -> Response:
    mp = req.query.get("mountpoint")
    api.service.normalize_mountpoint(mp)
    cmd = MountCmd.from_json(parse_json(req.body))
    api.blocking(api.service.remount, mp, cmd)
    return no_content()


def delete_mount(api: HttpApi, req: Request) -> Response:
    no_body(req.body)
    api.blocking(api.service.umount, req.query.get("mountpoint"))
    return no_content()


def get_metrics(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.metrics_fs(req.query.get("id")))


def get_metrics_files(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.metrics_files(req.query.get("id"), query_bool(req, "latest")))


def get_metrics_pattern(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.metrics_pattern(req.query.get("id")))


def get_metrics_backend(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.metrics_backend(req.query.get("id")))


def get_metrics_blobcache(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.metrics_blobcache(req.query.get("id")))


def get_metrics_transport(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.metrics_transport())


def get_metrics_inflight(api: HttpApi, req: Request) -> Response:
    ops = api.service.metrics_inflight()
    return no_content() if ops is None else json_response(ops)


def get_config(api: HttpApi, req: Request) -> Response:
    return json_response(api.service.get_config(req.query.get("id")))


def put_config(api: HttpApi, req: Request) -> Response:
    data = parse_json(req.body)
    api.blocking(api.service.put_config, req.query.get("id"), data)
    return no_content()


def _blobs(method: str) -> Handler:
    def handler(api: HttpApi, req: Request) -> Response:
        api.service.blobs(method)
        return no_content()

    return handler


def get_prometheus(api: HttpApi, req: Request) -> Response:
    return api.prometheus()


V1 = "/api/v1"
V2 = "/api/v2"
ROUTES: dict[str, dict[str, Handler]] = {
    f"{V1}/daemon": {"GET": get_daemon, "PUT": put_daemon},
    f"{V1}/daemon/events": {"GET": get_events},
    f"{V1}/daemon/backend": {"GET": get_backend},
    f"{V1}/daemon/start": {"PUT": _blocking_no_body("start")},
    f"{V1}/daemon/exit": {"PUT": _blocking_no_body("exit")},
    f"{V1}/daemon/fuse/sendfd": {"PUT": _blocking_no_body("sendfd")},
    f"{V1}/daemon/fuse/takeover": {"PUT": _blocking_no_body("takeover")},
    f"{V1}/mount": {"POST": post_mount, "PUT": put_mount, "DELETE": delete_mount},
    f"{V1}/metrics": {"GET": get_metrics},
    f"{V1}/metrics/files": {"GET": get_metrics_files},
    f"{V1}/metrics/pattern": {"GET": get_metrics_pattern},
    f"{V1}/metrics/backend": {"GET": get_metrics_backend},
    f"{V1}/metrics/blobcache": {"GET": get_metrics_blobcache},
    f"{V1}/metrics/inflight": {"GET": get_metrics_inflight},
    f"{V1}/metrics/transport": {"GET": get_metrics_transport},
    f"{V1}/config": {"GET": get_config, "PUT": put_config},
    f"{V2}/daemon": {"GET": get_daemon_v2, "PUT": put_daemon},
    f"{V2}/blobs": {"GET": _blobs("GET"), "PUT": _blobs("PUT"), "DELETE": _blobs("DELETE")},
    "/metrics": {"GET": get_prometheus},
}
METRICS_ONLY: dict[str, dict[str, Handler]] = {"/metrics": {"GET": get_prometheus}}
