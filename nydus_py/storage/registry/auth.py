"""Registry authentication without I/O: challenges, credentials, and the token state machine.

The HTTP client feeds this module what it saw (a 401 and its `WWW-Authenticate`, a token
response, the clock) and gets back what to send next. Keeping it pure lets the tests drive every
path - Harbor's Basic-for-expired-Bearer answer, token renewal with jitter, failure backoff, and
the guards that stop a burst of 401s from turning into a burst of token requests.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TOKEN_DEFAULT_TTL = 600.0
REFRESH_MARGIN = 20.0  # renew this long before expiry (plus jitter), as nydusd does
REFRESH_JITTER_CAP = 300.0
REFRESH_RETRY_MIN = 5.0
REFRESH_RETRY_MAX = 600.0
FETCH_RETRY_MIN = 1.0  # after a failed on-demand token fetch, no new fetch for this long (doubling)
FETCH_RETRY_MAX = 60.0
MIN_REFETCH_INTERVAL = 1.0  # a 401 on a token younger than this does not buy another token
CLIENT_ID = "nydus-registry-client"


class AuthError(Exception):
    """The registry refused us and no credential or token we could get will change that."""


# -- WWW-Authenticate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer", ...
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scope(self) -> str:
        return self.params.get("scope", "")


def _token(s: str, i: int) -> tuple[str, int]:
    j = i
    while j < len(s) and s[j] not in ' \t,="':
        j += 1
    return s[i:j], j


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


def _quoted(s: str, i: int) -> tuple[str, int]:
    """Value of the quoted string starting at s[i] == '"'; an unterminated one runs to the end."""
    out = []
    i += 1
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    return "".join(out), i


def parse_www_authenticate(value: str) -> list[Challenge]:
    """All challenges in one `WWW-Authenticate` value (RFC 7235), never raising.

    `Bearer realm="https://a/token",service="reg",scope="repository:x:pull"` gives one Bearer
    challenge; `Basic realm="r", Bearer realm="t"` gives two. Junk yields what could be parsed.
    """
    out: list[Challenge] = []
    s = value or ""
    i = 0
    scheme = ""
    params: dict[str, str] = {}
    while i < len(s):
        i = _skip_ws(s, i)
        if i < len(s) and s[i] == ",":
            i += 1
            continue
        tok, j = _token(s, i)
        if not tok:
            i = j + 1  # a stray '=' or '"': skip it
            continue
        k = _skip_ws(s, j)
        if k < len(s) and s[k] == "=" and scheme:
            k = _skip_ws(s, k + 1)
            if k < len(s) and s[k] == '"':
                val, i = _quoted(s, k)
            else:
                val, i = _token(s, k)
            params[tok.lower()] = val
            continue
        if k < len(s) and s[k] == "=":
            i = k + 1  # parameter before any scheme: ignore
            continue
        if scheme:
            out.append(Challenge(scheme, params))
        scheme, params = tok.lower(), {}
        i = j
    if scheme:
        out.append(Challenge(scheme, params))
    return out


# -- credentials --------------------------------------------------------------------------------


def decode_basic(auth: str) -> tuple[str, str]:
    """(user, password) of a base64 `user:pass`; ValueError when it is not that."""
    try:
        text = base64.b64decode(auth.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("auth is not base64 of 'user:password'") from None
    user, sep, password = text.partition(":")
    if not sep:
        raise ValueError("auth does not contain ':' between user and password")
    return user, password


def encode_basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _registry_key(key: str) -> str:
    """`https://index.docker.io/v1/` and `index.docker.io` both name host `index.docker.io`."""
    if "://" in key:
        return urlsplit(key).netloc.lower()
    return key.split("/", 1)[0].lower()


def docker_config_auth(host: str, paths: list[str] | None = None) -> str | None:
    """base64 `user:pass` for `host` from a docker `config.json` (`auths` entries only).

    Searched: `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`, unless `paths` is given.
    Credential helpers are not run. Unreadable or malformed files are skipped.
    """
    if paths is None:
        paths = []
        if os.environ.get("DOCKER_CONFIG"):
            paths.append(os.path.join(os.environ["DOCKER_CONFIG"], "config.json"))
        paths.append(os.path.join(os.path.expanduser("~"), ".docker", "config.json"))
    want = _registry_key(host)
    aliases = {want}
    if want in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        aliases |= {"docker.io", "index.docker.io", "registry-1.docker.io"}
    for p in paths:
        try:
            with open(p, "rb") as f:
                doc = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            continue
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        for key, entry in auths.items():
            if not isinstance(key, str) or _registry_key(key) not in aliases or not isinstance(entry, dict):
                continue
            auth = entry.get("auth")
            if isinstance(auth, str) and auth:
                try:
                    decode_basic(auth)
                except ValueError:
                    continue
                return auth
            user, password = entry.get("username"), entry.get("password")
            if isinstance(user, str) and isinstance(password, str) and user:
                return encode_basic(user, password)
    return None


def resolve_credentials(host: str, config_auth: str | None, env: Mapping[str, str] | None = None,
                        docker_config_paths: list[str] | None = None) -> str | None:
    """The base64 `user:pass` to use: `IMAGE_PULL_AUTH` beats the config `auth` (as in nydusd),
    which beats a docker config.json entry for `host`. ValueError for a malformed explicit value."""
    env = os.environ if env is None else env
    explicit = env.get("IMAGE_PULL_AUTH") or config_auth
    if explicit:
        decode_basic(explicit)
        return explicit
    return docker_config_auth(host, docker_config_paths)


def _scope_actions(scopes: tuple[str, ...] | list[str]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        for one in scope.split(" "):
            kind, _, rest = one.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                out.setdefault((kind, name), set()).update(a for a in actions.split(",") if a)
    return out


def scopes_cover(have: tuple[str, ...], want: str) -> bool:
    """Whether a token for `have` already grants every action `want` asks for."""
    got = _scope_actions(have)
    return all(actions <= got.get(res, set()) for res, actions in _scope_actions([want]).items())


# -- the state machine --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """Ask `realm` for a bearer token. `method` is "POST" (OAuth2 form) or "GET" (query)."""

    realm: str
    service: str
    scopes: tuple[str, ...]
    basic: str | None
    method: str

    def form(self) -> list[tuple[str, str]]:
        """POST body fields (also the GET query, minus the OAuth2 grant fields)."""
        out = [("service", self.service), ("client_id", CLIENT_ID)]
        if self.method == "POST":
            out.append(("scope", " ".join(self.scopes)))
            if self.basic:
                user, password = decode_basic(self.basic)
                out += [("grant_type", "password"), ("username", user), ("password", password)]
        else:
            out += [("scope", s) for s in self.scopes]
            if self.basic:
                out.append(("account", decode_basic(self.basic)[0]))
        return [(k, v) for k, v in out if v]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Basic {self.basic}"} if self.basic else {}


@dataclass(frozen=True)
class Retry:
    """Send the request again with this Authorization value (None = without the header)."""

    header: str | None


@dataclass(frozen=True)
class Fetch:
    """Get a token with `request`, report it with `token_received`/`token_failed`, then retry."""

    request: TokenRequest


@dataclass(frozen=True)
class Fail:
    """Give up on this request; `retryable` when a later attempt (after backoff) may succeed."""

    reason: str
    retryable: bool = False


Decision = Retry | Fetch | Fail


@dataclass
class Token:
    value: str
    issued_at: float
    expires_at: float
    realm: str
    service: str
    scopes: tuple[str, ...]
    refused: bool = False  # the registry answered 401 to it


def parse_token_response(body: bytes, now: float) -> tuple[str, float]:
    """(token, ttl) from a token server's JSON; AuthError when there is no token in it."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise AuthError("token server answered something that is not JSON") from None
    if not isinstance(doc, dict):
        raise AuthError("token server answer is not a JSON object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthError("token server answer carries no token")
    ttl = doc.get("expires_in")
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
        ttl = TOKEN_DEFAULT_TTL
    return token, float(min(ttl, 86400.0 * 365))


class AuthState:
    """The cached `Authorization` value of one registry backend, and how it changes.

    `generation` counts header changes: a request remembers the generation it was sent with, so a
    401 for a header that has since been replaced is simply retried with the new one instead of
    fetching yet another token (many readers, one token request).
    """

    def __init__(self, basic: str | None = None, registry_token: str | None = None, repo: str = "",
                 clock: Callable[[], float] | None = None, rng: random.Random | None = None) -> None:
        import time

        self.basic = basic
        self.repo = repo
        self.clock = clock or time.monotonic
        self.rng = rng or random.Random()
        self.header: str | None = f"Bearer {registry_token}" if registry_token else None
        self.generation = 0
        self.token: Token | None = None
        self.static_token = bool(registry_token)
        self.use_get: set[str] = set()  # realms whose token server wants GET
        self.fetch_failures = 0
        self.fetch_blocked_until = 0.0
        self.refresh_failures = 0
        self.refresh_at: float | None = None
        self.token_fetches = 0
        self.token_failures = 0

    # -- request side ---------------------------------------------------------------------------
    def current(self) -> tuple[str | None, int]:
        return self.header, self.generation

    def _set(self, header: str | None) -> None:
        if header != self.header:
            self.header = header
            self.generation += 1

    def on_unauthorized(self, challenges: list[Challenge], sent: str | None, sent_generation: int,
                        stripped: bool = False) -> Decision:
        """What to do after a 401 to a request sent with `sent` (at `sent_generation`).

        `stripped` says this 401 answered the header-less resend (so its challenge is the real one).
        """
        if sent_generation != self.generation and self.header != sent:
            return Retry(self.header)
        if sent is not None and not stripped:
            return Retry(None)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            if not bearer.realm.startswith(("http://", "https://")):
                return Fail(f"bearer challenge without a usable realm: {bearer.realm!r}")
            now = self.clock()
            tok = self.token
            if tok is not None and sent == f"Bearer {tok.value}":
                tok.refused = True
            if (tok is not None and now - tok.issued_at < MIN_REFETCH_INTERVAL and tok.realm == bearer.realm
                    and scopes_cover(tok.scopes, bearer.scope)):
                # a token for this was issued moments ago: use it, or give up for now if it was
                # refused - never more than one token request per interval for the same scope
                if tok.refused:
                    return Fail("registry refused a token issued just now (wrong scope or credentials?)", True)
                return Retry(f"Bearer {tok.value}")
            if now < self.fetch_blocked_until:
                return Fail(f"token fetch backing off for {self.fetch_blocked_until - now:.1f}s after failures", True)
            scope = bearer.scope or (f"repository:{self.repo}:pull" if self.repo else "")
            scopes = tuple(s for s in scope.split(" ") if s)
            if tok is not None and tok.realm == bearer.realm:
                scopes = tuple(dict.fromkeys(tok.scopes + scopes))  # keep push when a pull asks again
            method = "GET" if bearer.realm in self.use_get else "POST"
            return Fetch(TokenRequest(bearer.realm, bearer.service, scopes, self.basic, method))
        if basic is not None:
            if not self.basic:
                return Fail("registry wants basic auth and no credentials are configured")
            header = f"Basic {self.basic}"
            if sent == header:
                return Fail("registry refused the configured credentials")
            return Retry(header)
        return Fail("401 without a usable WWW-Authenticate challenge")

    def confirm(self, header: str | None) -> None:
        """A request sent with `header` succeeded: keep it as the cached value (nydusd caches
        the header only once a request with it worked)."""
        self._set(header)

    # -- token side -----------------------------------------------------------------------------
    def token_method_failed(self, request: TokenRequest) -> TokenRequest | None:
        """POST was refused: the same request by GET (remembered per realm), or None after GET."""
        if request.method == "POST":
            self.use_get.add(request.realm)
            return TokenRequest(request.realm, request.service, request.scopes, request.basic, "GET")
        return None

    def token_received(self, request: TokenRequest, token: str, ttl: float) -> str:
        """Record a fresh token; returns the header to retry with (not cached until it works)."""
        now = self.clock()
        self.token_fetches += 1
        self.fetch_failures = 0
        self.fetch_blocked_until = 0.0
        self.refresh_failures = 0
        self.token = Token(token, now, now + ttl, request.realm, request.service, request.scopes)
        self.refresh_at = now + self._refresh_delay(ttl)
        return f"Bearer {token}"

    def token_failed(self) -> None:
        """A token fetch failed: no new on-demand fetch for 1 s, doubling up to 60 s."""
        self.token_failures += 1
        self.fetch_failures += 1
        delay = min(FETCH_RETRY_MAX, FETCH_RETRY_MIN * 2 ** (self.fetch_failures - 1))
        self.fetch_blocked_until = self.clock() + delay

    def _refresh_delay(self, ttl: float) -> float:
        jitter = self.rng.uniform(0.0, min(ttl / 10.0, REFRESH_JITTER_CAP))
        delay = ttl - REFRESH_MARGIN - jitter
        if delay < ttl / 2:  # short-lived tokens: renew around half-life instead of right away
            delay = ttl / 2 - jitter / 2
        return max(0.0, delay)

    def refresh_request(self) -> TokenRequest | None:
        """The request for a proactive renewal of the current token (None when there is none)."""
        tok = self.token
        if tok is None or self.static_token:
            return None
        method = "GET" if tok.realm in self.use_get else "POST"
        return TokenRequest(tok.realm, tok.service, tok.scopes, self.basic, method)

    def refresh_succeeded(self, request: TokenRequest, token: str, ttl: float) -> None:
        self._set(self.token_received(request, token, ttl))

    def refresh_failed(self) -> None:
        """Proactive renewal failed: retry after 5 s, doubling up to 600 s."""
        self.token_failures += 1
        self.refresh_failures += 1
        delay = min(REFRESH_RETRY_MAX, REFRESH_RETRY_MIN * 2 ** (self.refresh_failures - 1))
        self.refresh_at = self.clock() + delay

    def next_refresh(self) -> float | None:
        """Clock time of the next proactive renewal, or None when there is nothing to renew."""
        return None if self.token is None or self.static_token else self.refresh_at
