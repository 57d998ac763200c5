"""nydusd's HTTP admin API (v1 and v2) over a unix socket, with aiohttp.

Routes are matched on the exact path like upstream's server: an unknown path is 404, a known path
with the wrong method 400, both with the `{code, message}` body. Every answer carries
`Server: Nydus API` and `Content-Type: application/json`; success is 200 with JSON or 204 with
no body. Endpoints that take no body refuse a non-empty one. Calls that mount, unmount or change
state run one at a time on a worker thread, so the event loop keeps answering (state polls,
metrics, liveness connections) while a mount loads its bootstrap. Idle connections are never
closed by the server: the snapshotter's liveness monitor holds one open without ever using it.
"""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from ..daemon.errors import ApiError, BadRequest, NotFound
from ..daemon.instance import MountCmd
from .prometheus import CONTENT_TYPE, exposition, make_registry
from .sockets import bind_unix

log = logging.getLogger(__name__)

SERVER = "Nydus API"
JSON_HEADERS = {"Server": SERVER, "Content-Type": "application/json"}
NEVER = float(1 << 31)  # seconds: "no keep-alive timeout"
MAX_BODY = 1 << 20  # upstream allows 51200 bytes; never be stricter

Handler = Callable[["ApiContext", web.Request, bytes], Awaitable[web.Response]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, headers=JSON_HEADERS)


def no_content() -> web.Response:
    return web.Response(status=204, headers=JSON_HEADERS)


def error_response(e: ApiError) -> web.Response:
    return json_response(e.body(), e.status)


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


def query_bool(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None or value == "":
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise BadRequest(f"query parameter {name!r} must be true or false")


# Workers for blocking calls (mount, umount, takeover...). More than one: a mount waiting on a
# slow registry must not hold up the umount or mount of another image (the service serializes
# what must be serialized under its own lock, and never holds it while building an instance).
API_WORKERS = 4


class ApiContext:
    """The service plus the workers that run its blocking calls."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.executor = ThreadPoolExecutor(max_workers=API_WORKERS, thread_name_prefix="api-worker")
        self.registry = make_registry(service)

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


# -- handlers ------------------------------------------------------------------------------------
async def get_daemon(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.daemon_info(v2=False))


async def get_daemon_v2(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.daemon_info(v2=True))


async def put_daemon(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    ctx.service.configure(parse_json(body))
    return no_content()


async def get_events(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.events_json())


async def get_backend(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.backend_info(req.query.get("mountpoint")))


def _blocking_no_body(method: str) -> Handler:
    async def handler(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
        no_body(body)
        await ctx.blocking(getattr(ctx.service, method))
        return no_content()

    return handler


async def post_mount(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    mp = req.query.get("mountpoint")
    ctx.service.normalize_mountpoint(mp)  # a missing/bad mountpoint is reported before the body
    cmd = MountCmd.from_json(parse_json(body))
    await ctx.blocking(ctx.service.mount, mp, cmd)
    return no_content()


async def put_mount(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    mp = req.query.get("mountpoint")
    ctx.service.normalize_mountpoint(mp)
    cmd = MountCmd.from_json(parse_json(body))
    await ctx.blocking(ctx.service.remount, mp, cmd)
    return no_content()


async def delete_mount(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    no_body(body)
    await ctx.blocking(ctx.service.umount, req.query.get("mountpoint"))
    return no_content()


async def get_metrics(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.metrics_fs(req.query.get("id")))


async def get_metrics_files(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.metrics_files(req.query.get("id"), query_bool(req, "latest")))


async def get_metrics_pattern(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.metrics_pattern(req.query.get("id")))


async def get_metrics_backend(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.metrics_backend(req.query.get("id")))


async def get_metrics_blobcache(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.metrics_blobcache(req.query.get("id")))


async def get_metrics_transport(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.metrics_transport())


async def get_metrics_inflight(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    ops = ctx.service.metrics_inflight()
    return no_content() if ops is None else json_response(ops)


async def get_config(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return json_response(ctx.service.get_config(req.query.get("id")))


async def put_config(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    data = parse_json(body)
    await ctx.blocking(ctx.service.put_config, req.query.get("id"), data)
    return no_content()


def _blobs(method: str) -> Handler:
    async def handler(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
        ctx.service.blobs(method)
        return no_content()

    return handler


async def get_prometheus(ctx: ApiContext, req: web.Request, body: bytes) -> web.Response:
    return web.Response(body=exposition(ctx.registry), headers={"Server": SERVER, "Content-Type": CONTENT_TYPE})


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


def make_app(service: Any, routes: dict[str, dict[str, Handler]] | None = None) -> web.Application:
    ctx = ApiContext(service)
    table = ROUTES if routes is None else routes

    async def dispatch(request: web.Request) -> web.Response:
        methods = table.get(request.path)
        try:
            if methods is None:
                raise NotFound(f"NoRoute: {request.path}")
            handler = methods.get(request.method)
            if handler is None:
                raise BadRequest(f"InvalidMethod: {request.method} {request.path}")
            body = await request.read()
            return await handler(ctx, request, body)
        except ApiError as e:
            if e.status >= 500:
                log.error("%s %s: %s", request.method, request.path, e.message)
            else:
                log.info("%s %s: %s %s", request.method, request.path, e.status, e.message)
            return error_response(e)
        except web.HTTPException as e:  # e.g. a body over client_max_size
            return json_response({"code": "UNDEFINED", "message": f"BadRequest: {e.reason}"},
                                 e.status if 400 <= e.status < 500 else 400)
        except Exception as e:
            log.exception("%s %s failed", request.method, request.path)
            return json_response({"code": "UNDEFINED", "message": f"Internal: {type(e).__name__}: {e}"}, 500)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", dispatch)

    async def on_cleanup(_app: web.Application) -> None:
        ctx.executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(on_cleanup)
    return app


def metrics_only_app(service: Any) -> web.Application:
    """`/metrics` alone, for the optional TCP listener (the control API stays on the unix socket)."""
    return make_app(service, {"/metrics": {"GET": get_prometheus}})


async def start_unix_site(app: web.Application, path: str) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=NEVER, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, bind_unix(path), shutdown_timeout=0.5)
    await site.start()
    return runner


async def start_tcp_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
