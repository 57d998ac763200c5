"""The sans-IO auth core: challenge parsing, credentials, and the token state machine."""

import base64
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_py.config import ConfigError
from nydus_py.storage.registry import auth as A
from nydus_py.storage.registry.config import parse_registry_config

B = base64.b64encode(b"alice:pw").decode()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_parse_bearer_and_basic():
    [c] = A.parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"')
    assert c.scheme == "bearer" and c.realm == "https://auth.example/token"
    assert c.service == "registry.example" and c.scope == "repository:a/b:pull"
    [b] = A.parse_www_authenticate('Basic realm="test-realm"')
    assert b.scheme == "basic" and b.realm == "test-realm"


def test_parse_two_challenges_quotes_and_commas():
    cs = A.parse_www_authenticate('Basic realm="a, b", Bearer realm="https://t/x",scope="repository:r:pull,push" ,  '
                                  'service=unquoted')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].realm == "a, b"
    assert cs[1].scope == "repository:r:pull,push" and cs[1].service == "unquoted"
    [e] = A.parse_www_authenticate(r'Bearer realm="q\"uote"')
    assert e.realm == 'q"uote'


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises(s):
    for c in A.parse_www_authenticate(s):
        assert c.scheme and c.scheme == c.scheme.lower()


def test_decode_basic():
    assert A.decode_basic(B) == ("alice", "pw")
    for bad in ("not base64!", base64.b64encode(b"nocolon").decode(), base64.b64encode(b"\xff:\xfe").decode()):
        with pytest.raises(ValueError):
            A.decode_basic(bad)


def test_docker_config_lookup(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:x").decode()},
        "reg.example:5000": {"username": "u", "password": "p:w"},
        "broken.example": {"auth": "%%%"},
    }}))
    assert A.docker_config_auth("reg.example:5000", [str(p)]) == A.encode_basic("u", "p:w")
    assert A.docker_config_auth("docker.io", [str(p)]) == base64.b64encode(b"hub:x").decode()
    assert A.docker_config_auth("broken.example", [str(p)]) is None
    assert A.docker_config_auth("other", [str(p), str(tmp_path / "missing.json")]) is None


def test_credentials_precedence(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"auths": {"h": {"auth": A.encode_basic("docker", "d")}}}))
    env_auth = A.encode_basic("env", "e")
    assert A.resolve_credentials("h", B, {"IMAGE_PULL_AUTH": env_auth}, [str(p)]) == env_auth
    assert A.resolve_credentials("h", B, {}, [str(p)]) == B
    assert A.resolve_credentials("h", None, {}, [str(p)]) == A.encode_basic("docker", "d")
    with pytest.raises(ValueError):
        A.resolve_credentials("h", "garbage", {}, [])


def test_registry_config_fields_and_errors(tmp_path):
    cfg = parse_registry_config({"host": "r:5000", "repo": "a/b", "scheme": "", "auth": B, "timeout": 2,
                                 "retry_limit": 2, "proxy": {"url": "http://p:1", "fallback": False},
                                 "unknown_key": 1, "readahead": False},
                                env={"NYDUS_HEADER_X-Trace": "1"}, docker_config_paths=[])
    assert cfg.scheme == "https" and cfg.auth == B and cfg.retries == 2 and cfg.proxy.url == "http://p:1"
    assert not cfg.proxy.fallback and cfg.headers == (("X-Trace", "1"),)
    assert cfg.deadline == pytest.approx(2 * 3 + 2)
    env = {"IMAGE_PULL_AUTH": A.encode_basic("x", "y")}
    assert parse_registry_config({"host": "r", "repo": "a"}, env=env).auth == env["IMAGE_PULL_AUTH"]
    for bad in ({"repo": "a"}, {"host": "r"}, {"host": "http://r", "repo": "a"}, {"host": "r", "repo": "a", "auth": "x"},
                {"host": "r", "repo": "a", "timeout": "5"}, {"host": "r", "repo": "a", "proxy": {"url": "ftp://x"}},
                {"host": "r", "repo": "../a"}):
        with pytest.raises(ConfigError):
            parse_registry_config(bad, env={}, docker_config_paths=[])


BEARER = [A.Challenge("bearer", {"realm": "https://t/token", "service": "reg", "scope": "repository:a/b:pull"})]


def state(**kw):
    clock = Clock()
    return A.AuthState(repo="a/b", clock=clock, rng=random.Random(1), **kw), clock


def test_anonymous_then_bearer_flow():
    s, clock = state(basic=B)
    hdr, gen = s.current()
    assert hdr is None
    d = s.on_unauthorized(BEARER, hdr, gen)
    assert isinstance(d, A.Fetch) and d.request.method == "POST" and d.request.basic == B
    assert ("grant_type", "password") in d.request.form() and ("scope", "repository:a/b:pull") in d.request.form()
    new = s.token_received(d.request, "T1", 300)
    assert new == "Bearer T1" and s.header is None  # cached only once a request with it worked
    s.confirm(new)
    assert s.current() == ("Bearer T1", gen + 1)


def test_expired_token_is_stripped_first_then_refetched():
    s, clock = state()
    s.token_received(A.TokenRequest("https://t/token", "reg", ("repository:a/b:pull",), None, "POST"), "T1", 300)
    s.confirm("Bearer T1")
    clock.t += 100
    hdr, gen = s.current()
    harbor = [A.Challenge("basic", {"realm": "harbor"})]
    assert s.on_unauthorized(harbor, hdr, gen) == A.Retry(None)  # resend without the header
    d = s.on_unauthorized(BEARER, hdr, gen, stripped=True)
    assert isinstance(d, A.Fetch)


def test_fresh_token_refused_is_no_storm():
    s, clock = state()
    req = A.TokenRequest("https://t/token", "reg", ("repository:a/b:pull",), None, "POST")
    hdr = s.token_received(req, "T1", 300)
    d = s.on_unauthorized(BEARER, hdr, s.generation, stripped=True)
    assert isinstance(d, A.Fail) and d.retryable
    clock.t += A.MIN_REFETCH_INTERVAL + 0.01
    assert isinstance(s.on_unauthorized(BEARER, hdr, s.generation, stripped=True), A.Fetch)


def test_token_fetch_failure_backs_off_exponentially():
    s, clock = state()
    delays = []
    for _ in range(8):
        s.token_failed()
        delays.append(s.fetch_blocked_until - clock.t)
        d = s.on_unauthorized(BEARER, None, s.generation)
        assert isinstance(d, A.Fail) and d.retryable
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0] and max(delays) == A.FETCH_RETRY_MAX
    clock.t += A.FETCH_RETRY_MAX
    assert isinstance(s.on_unauthorized(BEARER, None, s.generation), A.Fetch)


def test_other_reader_renewed_meanwhile():
    s, _ = state()
    s.confirm("Bearer OLD")
    sent, gen = s.current()
    s.confirm("Bearer NEW")
    assert s.on_unauthorized(BEARER, sent, gen) == A.Retry("Bearer NEW")


def test_basic_challenge():
    s, _ = state()
    assert isinstance(s.on_unauthorized([A.Challenge("basic", {})], None, 0), A.Fail)
    s, _ = state(basic=B)
    assert s.on_unauthorized([A.Challenge("basic", {})], None, 0) == A.Retry(f"Basic {B}")
    d = s.on_unauthorized([A.Challenge("basic", {})], f"Basic {B}", 0, stripped=True)
    assert isinstance(d, A.Fail) and not d.retryable
    assert isinstance(s.on_unauthorized([], None, 0), A.Fail)
    bad_realm = [A.Challenge("bearer", {"realm": "file:///etc/passwd"})]
    assert isinstance(s.on_unauthorized(bad_realm, None, 0), A.Fail)


def test_post_falls_back_to_get_and_remembers():
    s, _ = state(basic=B)
    d = s.on_unauthorized(BEARER, None, 0)
    assert isinstance(d, A.Fetch)
    get = s.token_method_failed(d.request)
    assert get is not None and get.method == "GET" and ("account", "alice") in get.form()
    assert s.token_method_failed(get) is None
    d2 = s.on_unauthorized(BEARER, None, 0)
    assert isinstance(d2, A.Fetch) and d2.request.method == "GET"


def test_static_registry_token():
    s, _ = state(registry_token="STATIC")
    assert s.current()[0] == "Bearer STATIC" and s.next_refresh() is None


@pytest.mark.parametrize("ttl", [5.0, 60.0, 300.0, 3600.0, 86400.0])
def test_refresh_schedule_with_jitter(ttl):
    times = []
    for seed in range(40):
        clock = Clock()
        s = A.AuthState(clock=clock, rng=random.Random(seed))
        s.token_received(A.TokenRequest("https://t", "s", (), None, "POST"), "T", ttl)
        at = s.next_refresh()
        assert at is not None
        delay = at - clock.t
        assert 0 <= delay < ttl  # always before expiry
        if ttl > 2 * A.REFRESH_MARGIN:
            assert delay <= ttl - A.REFRESH_MARGIN
            assert delay >= ttl - A.REFRESH_MARGIN - min(ttl / 10, A.REFRESH_JITTER_CAP) - 1e-9
        times.append(delay)
    assert len(set(times)) > 30  # jittered: many daemons do not renew in lockstep


def test_refresh_failure_backoff():
    clock = Clock()
    s = A.AuthState(clock=clock, rng=random.Random(0))
    s.token_received(A.TokenRequest("https://t", "s", ("x",), None, "POST"), "T", 600)
    delays = []
    for _ in range(10):
        s.refresh_failed()
        delays.append(s.next_refresh() - clock.t)
    assert delays[:3] == [5.0, 10.0, 20.0] and delays[-1] == A.REFRESH_RETRY_MAX
    req = s.refresh_request()
    assert req is not None and req.scopes == ("x",)
    s.refresh_succeeded(req, "T2", 600)
    assert s.header == "Bearer T2" and s.refresh_failures == 0


@pytest.mark.parametrize("body", [b"", b"[]", b"{}", b'{"token": 5}', b"not json"])
def test_token_response_errors(body):
    with pytest.raises(A.AuthError):
        A.parse_token_response(body, 0)


def test_token_response_defaults():
    assert A.parse_token_response(b'{"access_token": "x"}', 0) == ("x", A.TOKEN_DEFAULT_TTL)
    assert A.parse_token_response(b'{"token": "y", "expires_in": 30}', 0) == ("y", 30.0)
