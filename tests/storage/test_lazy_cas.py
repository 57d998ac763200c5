"""aiohttp imported without reading the system CA store (storage/registry/lazy_cas, issue 12
start-up): a plain-HTTP registry never pays for it, and a TLS connection verified with the
default store gets it before its handshake. Each case runs in a fresh interpreter (this one has
imported aiohttp already), against real `docker-registry` instances; OpenSSL takes the default
store from $SSL_CERT_FILE, so the TLS rig's CA stands in for the system's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.storage.registry import RegistryBackend, parse_registry_config

from . import registry_rig as rig

REPO = Path(__file__).resolve().parents[2]
DATA = random.Random(5).randbytes(50_000)
BLOB_ID = hashlib.sha256(DATA).hexdigest()

# reads 10 bytes of BLOB_ID from HOST (scheme SCHEME), prints the CA counts of aiohttp's default
# contexts and lazy_cas's counters
PROBE = """
import json, sys
from nydus_py.rafs.constants import Compressor, Digester
from nydus_py.rafs.model import BlobInfo
from nydus_py.storage.registry import RegistryBackend, lazy_cas, parse_registry_config
import aiohttp.connector as c
host, scheme, blob_id, extra = sys.argv[1:5]
before = c._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"]
conf = {"host": host, "repo": "test/lazycas", "scheme": scheme, "timeout": 5, "read_deadline": 5.0, **json.loads(extra)}
with RegistryBackend(parse_registry_config(conf, env={}, docker_config_paths=[])) as b:
    try:
        data = b.read(BlobInfo(0, blob_id, Compressor.NONE, Digester.SHA256, 0x10000), 0, 10).hex()
    except OSError as e:
        data = "error: %s" % e
print(json.dumps({"before": before, "after": c._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
                  "unverified_after": c._SSL_CONTEXT_UNVERIFIED.cert_store_stats()["x509_ca"],
                  "data": data, **lazy_cas.stats}))
"""


def probe(host: str, scheme: str, extra_env: dict[str, str] | None = None, **conf: object) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    out = subprocess.run([sys.executable, "-c", PROBE, host, scheme, BLOB_ID, json.dumps(conf)], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def push(host: str, **extra: object) -> None:
    conf = {"host": host, "repo": "test/lazycas", "timeout": 5, **extra}
    with RegistryBackend(parse_registry_config(conf, env={}, docker_config_paths=[])) as b:
        b.push_blob(DATA)


def test_a_plain_http_registry_never_reads_the_ca_store(plain_registry: rig.Registry) -> None:
    push(plain_registry.host, scheme="http")
    r = probe(plain_registry.host, "http")
    assert r["data"] == DATA[:10].hex(), r
    assert r["before"] == 0 and r["after"] == 0 and r["unverified_after"] == 0, r
    assert r["deferred"] == 2 and r["loaded"] == 0 and r["eager_loads"] == 0, r


def test_a_verified_tls_connection_gets_the_default_store_first(tls_registry: tuple[rig.Registry, Path]) -> None:
    reg, ca = tls_registry
    push(reg.host, ca_cert_files=[str(ca)])
    r = probe(reg.host, "https", {"SSL_CERT_FILE": str(ca)})
    assert r["data"] == DATA[:10].hex(), r  # verified with the default store: its CA came in time
    assert r["before"] == 0 and r["after"] == 1 and r["unverified_after"] == 1, r
    assert r["loaded"] == 2, r


def test_an_unverified_tls_connection_never_reads_the_ca_store(tls_registry: tuple[rig.Registry, Path]) -> None:
    """`skip_verify` (nydusify's --source-insecure, which tries HTTPS first): the store would not
    be looked at, so it is not read (~40 ms of a conversion's start-up)."""
    reg, ca = tls_registry
    push(reg.host, ca_cert_files=[str(ca)])
    r = probe(reg.host, "https", {"SSL_CERT_FILE": str(ca)}, skip_verify=True)
    assert r["data"] == DATA[:10].hex(), r  # over TLS, unverified
    assert r["before"] == 0 and r["after"] == 0 and r["unverified_after"] == 0, r
    assert r["deferred"] == 2 and r["loaded"] == 0, r


def test_without_the_ca_tls_is_still_refused(tls_registry: tuple[rig.Registry, Path], tmp_path: Path) -> None:
    """The put-off store is the real one: a CA it lacks is refused, not skipped."""
    reg, ca = tls_registry
    push(reg.host, ca_cert_files=[str(ca)])
    empty = tmp_path / "none.pem"
    empty.write_text("")
    r = probe(reg.host, "https", {"SSL_CERT_FILE": str(empty), "SSL_CERT_DIR": str(tmp_path)})
    assert str(r["data"]).startswith("error"), r
    assert r["loaded"] == 2, r


@pytest.mark.parametrize("first", ["aiohttp", "nydus_py.storage.registry"])
def test_aiohttp_imported_first_keeps_its_loaded_store(first: str) -> None:
    """Imported before us (an API server, a test): nothing is put off."""
    code = (f"import {first}, json\nfrom nydus_py.storage.registry import lazy_cas\nimport aiohttp.connector as c\n"
            "print(json.dumps([lazy_cas.stats['deferred'], c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca']]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60, check=True)
    deferred, cas = json.loads(out.stdout)
    if first == "aiohttp":
        assert deferred == 0 and cas > 0
    else:
        assert deferred == 2 and cas == 0
