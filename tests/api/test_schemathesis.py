"""Property-based conformance run of nydusd's OpenAPI v1 file against a running `nydusd-py`
(shared daemon on a real FUSE mount, one image mounted), over its unix socket.

Checks: no 5xx for any generated input, every error is nydusd's `{code, message}` JSON, every
answer carries `Server: Nydus API`, and the daemon stays RUNNING with its mount intact. The
OpenAPI file's own response schemas are stale where the snapshotter-facing contract differs
(`underlying_files` is an array, errors are 4xx for bad input), so schema/status conformance is
asserted by the contract tests in tests/daemon and tests/api instead.
"""

import json
import socket
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from tests.conftest import NYDUS_FIXTURES, require_device
from tests.daemon.rig import Api, DaemonProc, cleanup_mount, make_image, snapshotter_config, wait_state

pytestmark = pytest.mark.slow

schema = schemathesis.openapi.from_path(str(NYDUS_FIXTURES / "nydus-api-v1.yaml"))
# exit would end the daemon under test; it is covered by the sequence tests
schema = schema.exclude(path="/daemon/exit")


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kw: object) -> None:
        super().__init__("localhost", **kw)  # type: ignore[arg-type]
        self.unix_path = path

    def _new_conn(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(self.unix_path)
        return s


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.unix_path)


class UnixAdapter(HTTPAdapter):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):  # noqa: ANN001, ANN201
        return self.pool


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    require_device("/dev/fuse")
    root = tmp_path_factory.mktemp("schemathesis")
    (root / "mnt").mkdir()
    (root / "sock").mkdir(mode=0o700)
    img = make_image(str(root), 7, files=6)
    sock = str(root / "sock" / "api.sock")
    d = DaemonProc(["fuse", "--mountpoint", str(root / "mnt"), "--apisock", sock, "--log-level", "warn"],
                   str(root / "daemon.log"))
    api = Api(sock)
    try:
        d.wait_socket(sock)
        wait_state(api, "RUNNING")
        body = {"fs_type": "rafs", "source": img.boot, "config": snapshotter_config(img.blobs, "s1")}
        assert api.request("POST", "/api/v1/mount", {"mountpoint": "/s1"}, body).status == 204
        session = requests.Session()
        session.mount("http://", UnixAdapter(sock))
        yield session, api, root
    finally:
        api.close()
        d.stop()
        cleanup_mount(str(root / "mnt"))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_v1(case: schemathesis.Case, daemon) -> None:  # noqa: ANN001
    session, api, root = daemon
    response = case.call(base_url="http://localhost/api/v1", session=session)
    case.validate_response(response, checks=[schemathesis.checks.not_a_server_error])
    headers = response.headers  # lower-case names -> lists of values
    assert headers.get("server") == ["Nydus API"]
    assert headers.get("content-type") == ["application/json"]
    if response.status_code >= 400:
        body = json.loads(response.content)
        assert set(body) == {"code", "message"}, body
    elif response.status_code == 204:
        assert response.content == b""
    else:
        json.loads(response.content)
    info = api.get("/api/v1/daemon").json()
    assert info["state"] == "RUNNING"
    assert "/s1" in info["backend_collection"]
    assert (Path(root) / "mnt" / "s1" / "id-7").read_bytes() == b"image 7\n"
