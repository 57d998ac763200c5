"""Issue 16 item 4: read deadlines are deadlines, under concurrency too, and metadata served from
the bootstrap never waits behind data fetches.

A real `nydusd-py fuse` mount reads through a fault proxy that stalls every blob request. The
configured bound of one read is the registry deadline (`timeout` x (`retry_limit` + 1) + 2 s) plus
the backend's grace; every reader of the mount must get EIO within it, however many read at once,
and a `stat` of a name nobody looked up must be answered while all of them are still waiting."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from nydus_py.storage.registry import RegistryBackend, parse_registry_config
from tests.storage import images
from tests.storage.fault_proxy import FaultProxy
from tests.storage.test_registry_mount import Nydusd
from tests.waiting import wait_until

TIMEOUT, RETRIES = 2.0, 2
READERS = 8
WAIT = 60.0  # how long the test waits for a condition before it fails


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, plain_registry):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("deadlines")
    img = images.build(work / "img", seed=41)
    cfg = parse_registry_config(images.registry_config(plain_registry.host, "test/deadlines"), env={},
                                docker_config_paths=[])
    with RegistryBackend(cfg) as b:
        images.push_image(b, img, "v1")
    return img


@pytest.mark.slow
def test_stalled_registry_reads_end_within_the_bound_and_metadata_flows(tmp_path: Path, pushed,  # type: ignore[no-untyped-def]
                                                                        plain_registry) -> None:
    img = pushed
    proxy = FaultProxy(plain_registry.url, stall_seconds=300)
    conf = images.registry_config(proxy.host, "test/deadlines", timeout=TIMEOUT, retry_limit=RETRIES)
    deadline = parse_registry_config(conf, env={}, docker_config_paths=[]).deadline
    bound = deadline  # the documented bound of one read, retries included
    cfg = images.nydusd_config(conf, str(tmp_path / "cache"), amplify_io=0)
    d = Nydusd(tmp_path, "stall", img.boot, cfg)
    try:
        proxy.inject("stall", 100_000)
        files = sorted(f for f in img.files if f.startswith("small/"))[: READERS + 1]

        # one reader alone
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            (d.mnt / files[0]).read_bytes()
        lone = time.monotonic() - t0
        assert ei.value.errno == errno.EIO
        assert lone < bound, f"a lone read took {lone:.1f} s, the configured bound is {bound:.1f} s"

        # READERS at once, more than the daemon's 4 FUSE threads
        before = len(proxy.blob_requests())
        took: dict[str, float] = {}
        errs: dict[str, int | None] = {}
        done = threading.Event()

        def reader(rel: str) -> None:
            t = time.monotonic()
            try:
                (d.mnt / rel).read_bytes()
                errs[rel] = None
            except OSError as e:
                errs[rel] = e.errno
            took[rel] = time.monotonic() - t
            if len(took) == READERS:
                done.set()

        threads = [threading.Thread(target=reader, args=(rel,), daemon=True) for rel in files[1:]]
        for t in threads:
            t.start()
        # every reader's request is at the (stalled) registry: all of them wait at once
        wait_until(lambda: len(proxy.blob_requests()) - before >= READERS, WAIT,
                   f"{READERS} stalled blob requests")
        # metadata of names nobody looked up yet is answered while every reader still waits
        assert not took, f"a reader ended before the stat could be tried: {took}"
        st = os.stat(d.mnt / "etc" / "motd")
        names = sorted(os.listdir(d.mnt / "text"))
        assert not took, f"metadata waited behind data: readers {sorted(took)} ended first"
        assert st.st_size == len(img.files["etc/motd"]) and names == ["log.txt"]
        assert done.wait(bound + WAIT)
        assert set(errs.values()) == {errno.EIO}, errs
        slow = {rel: round(t, 1) for rel, t in took.items() if t >= bound}
        assert not slow, f"readers past the configured bound of {bound:.1f} s: {slow}"
    finally:
        proxy.clear()
        d.kill()
        proxy.stop()
