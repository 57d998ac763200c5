"""Real registries for the storage tests: Debian's `docker-registry` (distribution 2.8) on
127.0.0.1 with an ephemeral port, temp storage and a temp config, in the variants of
E2E-RIGS.md: plain, htpasswd basic auth, token auth (with our own token server signing ES256 JWTs
with a leaf certificate whose root CA the registry trusts), a pull-through mirror, and a
redirecting front end whose target (our range server) logs every request's Range and whether it
carried an Authorization header.

Everything started here is stopped by `stop()`; the fixtures in conftest.py call it at teardown.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.waiting import wait_until

USER, PASSWORD = "tester", "s3cret-pass"
_LISTEN = re.compile(r'listening on 127\.0\.0\.1:(\d+)')


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# -- asyncio servers in a thread ----------------------------------------------------------------


class ThreadedApp:
    """An aiohttp application served from its own event loop thread on 127.0.0.1:<ephemeral>."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# -- token server ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenCerts:
    root_pem: bytes
    leaf_der: bytes
    leaf_key: ec.EllipticCurvePrivateKey


def make_certs() -> TokenCerts:
    """A self-signed EC P-256 root CA and a leaf certificate signed by it (the JWT signer)."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nydus-py test root")])
    root = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nydus-py token signer")]))
        .issuer_name(root_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return TokenCerts(root.public_bytes(serialization.Encoding.PEM), leaf.public_bytes(serialization.Encoding.DER),
                      leaf_key)


def sign_jwt(certs: TokenCerts, claims: dict[str, Any]) -> str:
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(certs.leaf_der).decode()]}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    der = certs.leaf_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class TokenServer:
    """docker distribution token auth: GET (query) and POST (OAuth2 form) on /token.

    Anonymous callers may pull repositories under `public/`; USER/PASSWORD may pull and push
    everything. `expires_in` sets the token lifetime; `requests` logs every call.
    """

    certs: TokenCerts
    service: str = "nydus-py-registry"
    issuer: str = "nydus-py-token-issuer"
    expires_in: int = 300
    post_enabled: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0  # answer this many requests with 500
    app: ThreadedApp | None = None

    def start(self) -> TokenServer:
        web_app = web.Application()
        web_app.router.add_get("/token", self._handle)
        web_app.router.add_post("/token", self._handle)
        self.app = ThreadedApp(web_app)
        return self

    @property
    def realm(self) -> str:
        assert self.app is not None
        return f"{self.app.url}/token"

    def stop(self) -> None:
        if self.app is not None:
            self.app.stop()
            self.app = None

    def _account(self, request: web.Request, form: dict[str, str]) -> str | None | bool:
        """The authenticated user, None for anonymous, False for wrong credentials."""
        user = password = None
        hdr = request.headers.get("Authorization", "")
        if hdr.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(hdr[6:]).decode().partition(":")
            except ValueError:
                return False
        elif form.get("grant_type") == "password":
            user, password = form.get("username"), form.get("password")
        if user is None:
            return None
        return user if (user, password) == (USER, PASSWORD) else False

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            form = {k: str(v) for k, v in (await request.post()).items()}
            scopes = form.get("scope", "").split()
        else:
            form = dict(request.query)
            scopes = request.query.getall("scope", [])
        self.requests.append({"method": request.method, "scopes": scopes, "time": time.monotonic(),
                              "auth": "Authorization" in request.headers})
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500, text="token server failure (injected)")
        if request.method == "POST" and not self.post_enabled:
            return web.Response(status=405)
        account = self._account(request, form)
        if account is False:
            return web.Response(status=401, text="bad credentials")
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) != 3 or parts[0] != "repository":
                continue
            name, actions = parts[1], parts[2].split(",")
            allowed = actions if account else [a for a in actions if a == "pull" and name.startswith("public/")]
            if allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": account or "", "aud": self.service, "exp": now + self.expires_in,
                  "nbf": now - 5, "iat": now, "jti": secrets.token_hex(8), "access": access}
        token = sign_jwt(self.certs, claims)
        return web.json_response({"token": token, "access_token": token, "expires_in": self.expires_in,
                                  "issued_at": datetime.datetime.now(datetime.UTC).isoformat()})


# -- range server (redirect target) ---------------------------------------------------------------


@dataclass
class RangeServer:
    """Serves a registry's storage root like object storage would, logging each request."""

    root: Path
    requests: list[dict[str, Any]] = field(default_factory=list)
    deny_next: int = 0  # answer this many requests 403, like an expired pre-signed URL
    app: ThreadedApp | None = None

    def start(self) -> RangeServer:
        web_app = web.Application()
        web_app.router.add_route("*", "/{path:.*}", self._handle)
        self.app = ThreadedApp(web_app)
        return self

    @property
    def url(self) -> str:
        assert self.app is not None
        return self.app.url

    def stop(self) -> None:
        if self.app is not None:
            self.app.stop()
            self.app = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"path": request.path, "range": request.headers.get("Range"),
                              "auth": "Authorization" in request.headers, "method": request.method})
        if self.deny_next > 0:
            self.deny_next -= 1
            return web.Response(status=403, text="signature expired (injected)")
        rel = request.match_info["path"]
        path = (self.root / rel).resolve()
        if not str(path).startswith(str(self.root.resolve())) or not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path)


# -- docker-registry ------------------------------------------------------------------------------


class Registry:
    """One `docker-registry serve` process. `url` is http://127.0.0.1:<port>."""

    def __init__(self, binary: str, workdir: Path, name: str, extra: dict[str, Any] | None = None) -> None:
        self.binary = binary
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.data = self.dir / "data"
        self.log_path = self.dir / "registry.log"
        self.config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.data)}, "delete": {"enabled": True},
                        "redirect": {"disable": True}, "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": "127.0.0.1:0", "secret": secrets.token_hex(16)},
            "health": {"storagedriver": {"enabled": False}},
        }
        for k, v in (extra or {}).items():
            self.config[k] = v
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.tls_ca: Path | None = None  # CA file when the registry serves HTTPS
        self.helpers: list[Any] = []  # token/range servers owned by this registry

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Registry:
        cfg_path = self.dir / "config.yml"
        cfg_path.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen([self.binary, "serve", str(cfg_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        ctx = None
        if self.tls_ca is not None:
            import ssl

            ctx = ssl.create_default_context(cafile=str(self.tls_ca))
        try:
            m = wait_until(self._listening, timeout,
                           lambda: f"docker-registry {self.name} to listen: {self.log_text()[-2000:]}")
            self.port = int(m.group(1))
            wait_until(lambda: self._answers(ctx), timeout, f"docker-registry {self.name} to answer /v2/")
        except BaseException:
            self.stop()
            raise
        return self

    def _listening(self) -> re.Match[str] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry {self.name} exited: {self.log_text()[-2000:]}")
        return _LISTEN.search(self.log_text())

    def _answers(self, ctx: Any) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=ctx).close()
            return True
        except urllib.error.HTTPError as e:
            return e.code == 401
        except OSError:
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def blob_gets(self, blob_id: str) -> int:
        """GET requests the registry completed for this blob (from its access log)."""
        n = 0
        for line in self.log_text().splitlines():
            if f"/blobs/sha256:{blob_id}" in line and '"GET ' in line:
                n += 1
        return n

    def stop(self) -> None:
        for h in self.helpers:
            h.stop()
        self.helpers.clear()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()


def plain_registry(binary: str, workdir: Path) -> Registry:
    return Registry(binary, workdir, "plain").start()


def basic_registry(binary: str, workdir: Path, htpasswd: Callable[[str, str], str]) -> Registry:
    d = workdir / "basic"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "htpasswd"
    path.write_text(htpasswd(USER, PASSWORD))
    return Registry(binary, workdir, "basic", {"auth": {"htpasswd": {"realm": "nydus-py-test", "path": str(path)}}}).start()


def token_registry(binary: str, workdir: Path, token: TokenServer) -> Registry:
    d = workdir / "token"
    d.mkdir(parents=True, exist_ok=True)
    root = d / "root.crt"
    root.write_bytes(token.certs.root_pem)
    reg = Registry(binary, workdir, "token", {"auth": {"token": {
        "realm": token.realm, "service": token.service, "issuer": token.issuer, "rootcertbundle": str(root)}}})
    return reg.start()


def mirror_registry(binary: str, workdir: Path, upstream: Registry, name: str = "mirror") -> Registry:
    return Registry(binary, workdir, name, {"proxy": {"remoteurl": upstream.url}}).start()


def redirect_registry(binary: str, workdir: Path, upstream: Registry) -> tuple[Registry, RangeServer]:
    """A second registry over the *same storage* as `upstream`, answering blob GETs with 307 to a
    RangeServer that serves that storage."""
    target = RangeServer(upstream.data).start()
    reg = Registry(binary, workdir, "redirect", {
        "storage": {"filesystem": {"rootdirectory": str(upstream.data)}, "redirect": {"disable": False},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "middleware": {"storage": [{"name": "redirect", "options": {"baseurl": target.url + "/"}}]},
    })
    reg.helpers.append(target)
    return reg.start(), target


def tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A CA of our own and a server certificate for 127.0.0.1 signed by it, written into `d`:
    (ca.pem, cert.pem, key.pem)."""
    import ipaddress

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nydus-py test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "ca.pem", d / "cert.pem", d / "key.pem"


def tls_registry(binary: str, workdir: Path) -> tuple[Registry, Path]:
    """A registry serving HTTPS with a certificate for 127.0.0.1 from our own CA; returns the
    registry and the CA's PEM file."""
    ca, cert, key = tls_files(workdir / "tls")
    reg = Registry(binary, workdir, "tls", {"http": {"addr": "127.0.0.1:0", "secret": secrets.token_hex(16),
                                                     "tls": {"certificate": str(cert), "key": str(key)}}})
    reg.tls_ca = ca
    return reg.start(), ca


def htpasswd_line(tool: str) -> Callable[[str, str], str]:
    def make(user: str, password: str) -> str:
        out = subprocess.run([tool, "-Bbn", user, password], check=True, capture_output=True, text=True).stdout
        return out.strip() + "\n"

    return make
