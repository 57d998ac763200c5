"""What `nydusd-py` loads before it serves anything (issue 12, memory): modules only some
configurations need are imported when they are needed, not at start."""

import email.utils
import json
import subprocess
import sys

import pytest

from nydus_py.daemon.logsetup import http_date

# module -> why only some daemons need it
LAZY = {
    "asyncio": "the event loop, only with an API socket",
    "ssl": "TLS, only for registries",
    "hashlib": "OpenSSL's libcrypto, only for sha256 digests",
    "email": "RFC 2822 dates and log rotation",
    "logging.handlers": "log rotation",
    "google_crc32c": "chunk CRCs",
    "aiohttp": "the HTTP API and registries",
    "grpc": "the gRPC API",
    "nydus_py.fs.erofs_serve": "fs_driver erofs mounts",
    "nydus_py.transport.erofs_mount": "fs_driver erofs mounts",
    "nydus_py.transport.fuse_uring": "--io-uring",
    "nydus_py.fs.passthrough": "passthrough mounts (virtio-fs shares)",
}


def test_the_daemon_entry_point_imports_nothing_it_may_not_need() -> None:
    code = ("import sys, json; import nydus_py.cli.daemon; "
            f"print(json.dumps([m for m in {sorted(LAZY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = json.loads(out.stdout)
    assert loaded == [], {m: LAZY[m] for m in loaded}


def test_mounting_by_reference_loads_no_builder() -> None:
    """`--image REF` needs the manifest code and the bootstrap's tar, not the builder (~20 ms)."""
    code = ("import sys; import nydus_py.cli.daemon, nydus_py.convert.pull; "
            "print([m for m in sys.modules if m.startswith('nydus_py.builder')])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("ts", [0, 951782400, 1_700_000_000.75, 4_102_444_799])
def test_event_dates_are_formatdates(ts: float) -> None:
    """The API's error-event dates keep email.utils.formatdate's form without the email package."""
    assert http_date(ts) == email.utils.formatdate(ts, usegmt=True)
