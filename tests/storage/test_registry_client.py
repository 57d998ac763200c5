"""The registry backend against real `docker-registry` instances (plain, basic, token, mirror,
redirect) and a forward proxy; blobs are pushed by our own client."""

import errno
import hashlib
import json
import os
import random
import threading
from collections.abc import Callable

import pytest

from nydus_py.rafs.constants import Compressor, Digester
from nydus_py.rafs.model import BlobInfo
from nydus_py.storage.registry import RegistryBackend, parse_registry_config

from ..clock import ManualClock
from ..waiting import wait_until
from . import registry_rig as rig
from .fault_proxy import FaultProxy
from .images import registry_config

DATA = random.Random(3).randbytes(700_000)
BLOB_ID = hashlib.sha256(DATA).hexdigest()
BLOB = BlobInfo(0, BLOB_ID, Compressor.NONE, Digester.SHA256, 0x10000)


def backend(host: str, repo: str = "test/blob", clock: Callable[[], float] | None = None,
            **extra: object) -> RegistryBackend:
    cfg = parse_registry_config(registry_config(host, repo, **extra), env={}, docker_config_paths=[])
    return RegistryBackend(cfg) if clock is None else RegistryBackend(cfg, clock=clock)


def nudge_refresh(b: RegistryBackend) -> None:
    """Make the renewal task look at the (manual) clock again now, instead of when the wait it
    started on the old reading runs out."""
    event = b.client.http.tokens._event
    assert event is not None
    b.loop.call_soon_threadsafe(event.set)


def check_ranges(b: RegistryBackend, n: int = 20, seed: int = 0) -> None:
    rng = random.Random(seed)
    spots = [(0, 1), (len(DATA) - 1, 1), (0, len(DATA)), (65535, 2)]
    spots += [(o, rng.randrange(1, min(200_000, len(DATA) - o) + 1)) for o in
              (rng.randrange(len(DATA)) for _ in range(n))]
    for off, size in spots:
        assert b.read(BLOB, off, size) == DATA[off:off + size], (off, size)


@pytest.fixture(scope="module")
def pushed_plain(plain_registry):
    with backend(plain_registry.host) as b:
        assert b.push_blob(DATA) == f"sha256:{BLOB_ID}"
        assert b.push_blob(DATA) == f"sha256:{BLOB_ID}"  # already there: no second upload
    return plain_registry


def test_plain_push_and_ranged_reads(pushed_plain):
    with backend(pushed_plain.host) as b:
        check_ranges(b)
        c = b.counters
        assert c.ok_200_for_206 == 0 and c.read_errors == 0 and c.retries == 0
        assert c.requests == c.reads  # anonymous registry: one request per read
        assert b.blob_size(BLOB_ID) == len(DATA)


def test_chunked_upload(plain_registry):
    data = os.urandom(300_001)
    with backend(plain_registry.host, "test/chunked") as b:
        digest = b.push_blob(data, chunk_size=100_000)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        blob = BlobInfo(0, digest[7:], Compressor.NONE, Digester.SHA256, 0x10000)
        assert b.read(blob, 0, len(data)) == data
    assert plain_registry.log_text().count("PATCH /v2/test/chunked/blobs/uploads/") >= 3


def test_missing_blob_and_range_past_end_fail_fast(pushed_plain):
    with backend(pushed_plain.host) as b:
        missing = BlobInfo(0, "0" * 64, Compressor.NONE, Digester.SHA256, 0x10000)
        requests = b.counters.requests
        with pytest.raises(OSError) as e:
            b.read(missing, 0, 10)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError):
            b.read(BLOB, len(DATA) + 10, 10)
        # permanent answers are not retried: one request each
        assert b.counters.retries == 0 and b.counters.requests == requests + 2
        assert b.counters.errors_by_status.get(404) == 1
        with pytest.raises(OSError) as e:
            b.blob_size("0" * 64)
        assert e.value.errno == errno.ENOENT


def test_basic_auth(basic_registry):
    with backend(basic_registry.host, auth=rig.basic_auth()) as b:
        b.push_blob(DATA)
        check_ranges(b, 5)
        # one 401 to learn the scheme, then the Basic header is cached
        assert b.counters.unauthorized == 1
    with backend(basic_registry.host, auth=rig.basic_auth(rig.USER, "wrong")) as b:
        with pytest.raises(OSError):
            b.read(BLOB, 0, 10)
        assert b.counters.retries == 0  # refused credentials are final
    with backend(basic_registry.host) as b, pytest.raises(OSError):
        b.read(BLOB, 0, 10)


def test_basic_auth_from_env_and_docker_config(basic_registry, tmp_path):
    cfg = parse_registry_config(registry_config(basic_registry.host, "test/blob"),
                                env={"IMAGE_PULL_AUTH": rig.basic_auth()})
    with RegistryBackend(cfg) as b:
        b.push_blob(DATA)
        assert b.read(BLOB, 5, 5) == DATA[5:10]
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"username": rig.USER, "password": rig.PASSWORD}}}))
    cfg = parse_registry_config(registry_config(basic_registry.host, "test/blob"), env={},
                                docker_config_paths=[str(tmp_path / "config.json")])
    with RegistryBackend(cfg) as b:
        assert b.read(BLOB, 5, 5) == DATA[5:10]


@pytest.fixture(scope="module")
def pushed_token(token_registry):
    for repo in ("test/blob", "public/blob"):
        with backend(token_registry.host, repo, auth=rig.basic_auth()) as b:
            b.push_blob(DATA)
    return token_registry


def test_token_auth_one_fetch_for_a_burst(pushed_token, token_server):
    before = len(token_server.requests)
    with backend(pushed_token.host, auth=rig.basic_auth()) as b:
        errors: list[BaseException] = []

        def reader(seed: int) -> None:
            try:
                check_ranges(b, 3, seed)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert b.counters.token_fetches == 1
    assert len(token_server.requests) - before == 1
    assert token_server.requests[-1]["method"] == "POST" and token_server.requests[-1]["auth"]


def test_token_anonymous_public_and_denied_private(pushed_token):
    with backend(pushed_token.host, "public/blob") as b:
        assert b.read(BLOB, 100, 50) == DATA[100:150]
    with backend(pushed_token.host, "test/blob") as b:
        with pytest.raises(OSError):
            b.read(BLOB, 100, 50)
        # a token that the registry refuses is not re-fetched in a loop
        assert b.counters.token_fetches <= 2


def test_token_get_fallback_remembered(pushed_token, token_server):
    token_server.post_enabled = False
    try:
        before = len(token_server.requests)
        with backend(pushed_token.host, auth=rig.basic_auth()) as b:
            assert b.read(BLOB, 0, 100) == DATA[:100]
            assert "http://" + token_server.realm.split("://")[1] in b.client.auth.use_get
        methods = [r["method"] for r in token_server.requests[before:]]
        assert methods == ["POST", "GET"]
    finally:
        token_server.post_enabled = True


def test_token_proactive_renewal_is_bounded(pushed_token, token_server):
    """Each token is renewed once, 20 s plus at most 30 s of jitter before its 300 s run out
    (time on a manual clock), and the renewal is one token request: never a storm."""
    assert token_server.expires_in == 300
    clock = ManualClock()
    before = len(token_server.requests)
    with backend(pushed_token.host, clock=clock, auth=rig.basic_auth()) as b:
        assert b.read(BLOB, 0, 10) == DATA[:10]
        assert b.counters.token_fetches == 1 and b.counters.token_refreshes == 0
        for n in range(1, 4):
            tok = b.client.auth.token
            at = b.client.auth.next_refresh()
            assert tok is not None and at is not None
            assert 300 - 20 - 30 <= at - tok.issued_at <= 300 - 20
            clock.advance(at - clock())
            nudge_refresh(b)
            wait_until(lambda n=n: b.counters.token_refreshes >= n, what=f"renewal {n}")
            assert b.read(BLOB, 10, 10) == DATA[10:20]
            assert b.counters.token_refreshes == n and b.counters.token_fetches == n + 1
            assert b.client.auth.token is not tok and b.counters.unauthorized == 1  # only the first read's
    assert len(token_server.requests) - before == 4


def test_token_server_down_backs_off(pushed_token, token_server):
    """A failed token fetch blocks the next one for 1 s, then 2 s, ... (time on a manual clock):
    reads meanwhile fail without asking the token server."""
    token_server.fail_next = 1000
    clock = ManualClock()
    try:
        before = len(token_server.requests)
        with backend(pushed_token.host, clock=clock, auth=rig.basic_auth(), read_deadline=0.5) as b:

            def fails_asking(n: int) -> None:
                asked = len(token_server.requests)
                with pytest.raises(OSError):
                    b.read(BLOB, 0, 10)
                assert len(token_server.requests) - asked == n

            fails_asking(2)  # POST, then GET (remembered for this realm)
            fails_asking(0)  # within the first 1 s
            # blocked for 1 s after the first failure, then 2 s, then 4 s
            for step, asks in ((1.0, 1), (1.0, 0), (1.0, 1), (2.0, 0), (2.0, 1)):
                clock.advance(step)
                fails_asking(asks)
            assert b.counters.token_failures == 4 and b.client.auth.fetch_failures == 4
        assert len(token_server.requests) - before == 5
    finally:
        token_server.fail_next = 0


def test_mirror_answers_200_for_206(pushed_plain, mirror_registry):
    with backend(mirror_registry.host) as b:
        assert b.read(BLOB, 12345, 1000) == DATA[12345:13345]
        assert b.counters.ok_200_for_206 >= 1
        check_ranges(b, 5)
        assert b.counters.read_errors == 0


def test_redirect_without_authorization_and_cached(pushed_plain, redirect_registry):
    reg, target = redirect_registry
    start = len(target.requests)
    with backend(reg.host, registry_token="not-for-object-storage") as b:
        assert b.read(BLOB, 0, 100) == DATA[:100]
        assert b.read(BLOB, 1000, 100) == DATA[1000:1100]
        assert b.counters.redirects == 1 and b.counters.redirect_cache_hits == 1
        got = target.requests[start:]
        assert [r["range"] for r in got] == ["bytes=0-99", "bytes=1000-1099"]
        assert not any(r["auth"] for r in got)
        # an expired signature (403) drops the cached URL and asks the registry again
        target.deny_next = 1
        assert b.read(BLOB, 2000, 10) == DATA[2000:2010]
        assert b.counters.redirect_cache_drops == 1 and b.counters.redirects == 2
    gets = [line for line in reg.log_text().splitlines() if f"/blobs/sha256:{BLOB_ID}" in line and "307" in line]
    assert len(gets) >= 2


def test_redirect_host_rewrite(registry_bin, registry_root, pushed_plain):
    target = rig.RangeServer(pushed_plain.data).start()
    reg = rig.Registry(registry_bin, registry_root, "redirect-bogus", {
        "storage": {"filesystem": {"rootdirectory": str(pushed_plain.data)}, "redirect": {"disable": False},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "middleware": {"storage": [{"name": "redirect", "options": {"baseurl": "http://127.0.0.1:9/"}}]},
    })
    reg.helpers.append(target)
    reg.start()
    try:
        with backend(reg.host, blob_redirected_host=target.url.split("://")[1]) as b:
            assert b.read(BLOB, 7, 7) == DATA[7:14]
        assert len(target.requests) == 1
    finally:
        reg.stop()


def test_forward_proxy_fallback_and_recovery(pushed_plain):
    proxy = FaultProxy()
    try:
        with backend(pushed_plain.host, proxy={"url": proxy.url, "ping_url": proxy.url + "/ping",
                                               "check_interval": 0.2, "fallback": True}) as b:
            assert b.read(BLOB, 0, 10) == DATA[:10]
            assert len(proxy.blob_requests()) == 1 and b.counters.fallbacks == 0
            proxy.pause()
            for i in range(3):
                assert b.read(BLOB, i, 10) == DATA[i:i + 10]
            assert b.counters.fallbacks >= 1 and b.counters.proxy_failures >= 1
            proxy.resume()
            wait_until(lambda: b.counters.proxy_recoveries, what="the health check to see the proxy back")
            assert b.counters.proxy_recoveries == 1
            n = len(proxy.blob_requests())
            assert b.read(BLOB, 50, 10) == DATA[50:60]
            assert len(proxy.blob_requests()) == n + 1
            # the proxy answering 5xx is a proxy failure too
            proxy.inject("5xx")
            fb = b.counters.fallbacks
            assert b.read(BLOB, 60, 10) == DATA[60:70]
            assert b.counters.fallbacks == fb + 1
        proxy.pause()
        with backend(pushed_plain.host, proxy={"url": proxy.url, "fallback": False}, read_deadline=1.5) as b:
            with pytest.raises(OSError):
                b.read(BLOB, 0, 10)
            assert b.counters.fallbacks == 0
    finally:
        proxy.stop()


def tls_backend(host: str, **extra: object) -> RegistryBackend:
    conf = {"host": host, "repo": "test/tls", "timeout": 2, "read_deadline": 2.0, **extra}
    return RegistryBackend(parse_registry_config(conf, env={}, docker_config_paths=[]))


def test_https_with_ca_file_skip_verify_and_refusal(tls_registry):
    reg, ca = tls_registry
    with tls_backend(reg.host, ca_cert_files=[str(ca)]) as b:  # scheme defaults to https
        b.push_blob(DATA)
        assert b.read(BLOB, 10, 20) == DATA[10:30]
    with tls_backend(reg.host, skip_verify=True) as b:
        assert b.read(BLOB, 10, 20) == DATA[10:30] and b.counters.https_to_http == 0
    with tls_backend(reg.host) as b:  # unknown CA: refused, EIO by the client's own deadline
        with pytest.raises(OSError):
            b.read(BLOB, 10, 20)
        assert b.counters.network_errors >= 1 and b.hung_reads == 0


def test_starting_a_client_loads_the_system_cas_no_second_time(monkeypatch):
    """aiohttp made its verified context from the system CAs at import; a client that verifies
    with them uses that one (loading them again was ~25-50 ms of every daemon start). Custom CA
    files still get a context of their own (test above)."""
    import ssl

    import aiohttp.connector

    made: list[object] = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: made.append(a) or real(*a, **k))
    with tls_backend("127.0.0.1:9") as b:  # (nothing listens: start() connects nowhere)
        assert all(s.connector._ssl is True for s in b.client.http._sessions.values())  # type: ignore[union-attr]
    assert made == [] and isinstance(aiohttp.connector._SSL_CONTEXT_VERIFIED, ssl.SSLContext)


def test_https_to_http_fallback_only_with_skip_verify(pushed_plain):
    with tls_backend(pushed_plain.host, repo="test/blob", skip_verify=True) as b:
        assert b.read(BLOB, 0, 10) == DATA[:10]
        assert b.read(BLOB, 10, 10) == DATA[10:20]
        assert b.counters.https_to_http == 1 and b.client.scheme == "http"
    with tls_backend(pushed_plain.host, repo="test/blob") as b, pytest.raises(OSError):
        b.read(BLOB, 0, 10)


def test_https_to_http_fallback_holds_for_concurrent_first_reads(pushed_plain):
    """Reads queued behind the first request (with URLs built as https) follow the switch."""
    with tls_backend(pushed_plain.host, repo="test/blob", skip_verify=True) as b:
        results: list[bytes] = []
        errors: list[BaseException] = []

        def reader(off: int) -> None:
            try:
                results.append(b.read(BLOB, off, 16))
            except BaseException as e:  # collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i * 16,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert sorted(results) == sorted(DATA[i * 16 : i * 16 + 16] for i in range(8))
        assert b.counters.https_to_http == 1


def test_https_to_http_fallback_then_401_retry(basic_registry):
    """The 401 answer after the switch is retried over plain HTTP, not the old https URL."""
    with backend(basic_registry.host, auth=rig.basic_auth()) as b:
        b.push_blob(DATA)
    with tls_backend(basic_registry.host, repo="test/blob", skip_verify=True, auth=rig.basic_auth()) as b:
        assert b.read(BLOB, 3, 10) == DATA[3:13]
        assert b.counters.https_to_http == 1 and b.counters.unauthorized == 1


def test_ssl_context_is_shared_per_ca_set(tls_registry):
    """Loading the system CA store costs ~70 ms; clients with the same CA files share one context,
    and an edited CA file (new mtime) is read again."""
    from nydus_py.storage.registry.http import RegistryHttp

    _reg, ca = tls_registry

    def ctx(**extra: object) -> object:
        conf = {"host": "example.invalid", "repo": "a/b", **extra}
        return RegistryHttp(parse_registry_config(conf, env={}, docker_config_paths=[]))._ssl()

    assert ctx() is ctx() and ctx(skip_verify=True) is False
    with_ca = ctx(ca_cert_files=[str(ca)])
    assert with_ca is ctx(ca_cert_files=[str(ca)]) and with_ca is not ctx()
    st = os.stat(ca)
    os.utime(ca, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert ctx(ca_cert_files=[str(ca)]) is not with_ca


def test_a_stalled_first_request_does_not_hold_up_the_others(pushed_plain):
    """The first request of a client learns the authentication alone; when it stalls (held by
    the proxy before any answer), the other reads go ahead after a short wait instead of waiting
    for it up to its deadline."""
    proxy = FaultProxy(pushed_plain.url)
    proxy.hold_if = lambda req: (req.range or "").startswith("bytes=0-")
    first: list[bytes | BaseException] = []
    try:
        with backend(proxy.host, timeout=30) as b:  # (no retry of the held one while it is held)
            def read_first() -> None:
                try:
                    first.append(b.read(BLOB, 0, 10))
                except BaseException as e:  # noqa: BLE001
                    first.append(e)

            t = threading.Thread(target=read_first)
            t.start()
            wait_until(lambda: proxy.held >= 1, 10, "the first read to reach the registry and be held")
            assert b.read(BLOB, 500_000, 100) == DATA[500_000:500_100]  # while the first is held
            assert proxy.held == 1 and not first
            assert b.counters.first_request_waits_cut == 1
            proxy.release_held()
            t.join(30)
            assert first == [DATA[:10]]
    finally:
        proxy.stop()
