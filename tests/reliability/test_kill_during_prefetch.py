"""`kill -9` of `nydusd-py` while it prefetches into the blob cache, then a restart on the same
cache: every file must read back byte for byte (issue 16, "keep it from coming back").

The daemon runs with a bandwidth-capped prefetch of the whole image (so the kill lands mid-way)
and a reader thread going through the FUSE mount at the same time; it is killed once the
prefetch has fetched a given share of the blob. The successor has prefetch off and digest
validation off (the default), so whatever the killed daemon left in the cache is served as is:
a chunk marked ready with wrong or missing bytes would show up as a wrong byte here. The
successor must also have used that cache (fewer backend reads than chunks), or the check
would prove nothing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from tests.conftest import require_device
from tests.daemon.rig import Api, DaemonProc, cleanup_mount

pytestmark = pytest.mark.slow
CHUNK = 0x10000
RATE = 2 << 20  # prefetch bandwidth, bytes/s: the whole blob takes a few seconds
DEADLINE = 30.0


def make_files(src: Path) -> dict[str, bytes]:
    rng = random.Random(16)
    files = {f"big/{i:02d}.bin": rng.randbytes(rng.randrange(4, 16) * CHUNK + rng.randrange(CHUNK)) for i in range(16)}
    files.update({f"small/{i:02d}": rng.randbytes(rng.randrange(1, 5000)) for i in range(20)})
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return files


def config(blobs: Path, cache: Path, prefetch: bool) -> str:
    cfg: dict[str, Any] = {
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
        "mode": "direct", "digest_validate": False,
        "fs_prefetch": {"enable": prefetch, "prefetch_all": True, "threads_count": 2, "bandwidth_rate": RATE,
                        "merging_size": 2 * CHUNK},  # many small steps: the kill lands between two
    }
    return json.dumps(cfg)


def start(work: Path, name: str, boot: Path, cfg: str) -> tuple[DaemonProc, Api, Path]:
    mnt, sock = work / f"mnt-{name}", work / f"sock-{name}" / "api.sock"
    mnt.mkdir()
    sock.parent.mkdir(mode=0o700)
    (work / f"{name}.json").write_text(cfg)
    d = DaemonProc(["fuse", "--bootstrap", str(boot), "--config", str(work / f"{name}.json"), "--mountpoint",
                    str(mnt), "--apisock", str(sock), "--thread-num", "2", "--log-level", "info"],
                   str(work / f"{name}.log"))
    d.wait_socket(str(sock), timeout=DEADLINE)
    return d, Api(str(sock)), mnt


def blobcache(api: Api) -> dict[str, Any]:
    r = api.get("/api/v1/metrics/blobcache")
    assert r.status == 200, r.body
    return r.json()  # type: ignore[no-any-return]


def read_while_prefetching(mnt: Path, files: dict[str, bytes], stop: threading.Event) -> None:
    """On-demand reads racing the prefetch (a dead mount after the kill ends them)."""
    rels = sorted(files)
    while not stop.is_set():
        for rel in rels[::3]:
            try:
                (mnt / rel).read_bytes()
            except OSError:
                return


@pytest.mark.parametrize("share", [0.1, 0.4, 0.7])
def test_kill_9_during_prefetch_leaves_no_wrong_byte(tmp_path: Path, share: float) -> None:
    require_device("/dev/fuse")
    src, blobs, cache, boot = tmp_path / "src", tmp_path / "blobs", tmp_path / "cache", tmp_path / "image.boot"
    files = make_files(src)
    res = build_image(tree_from_directory(src), str(boot), str(blobs), BuildOptions(chunk_size=CHUNK))
    assert res.blob_path is not None
    blob_size = os.path.getsize(res.blob_path)
    d, api, mnt = start(tmp_path, "killed", boot, config(blobs, cache, prefetch=True))
    stop = threading.Event()
    reader = threading.Thread(target=read_while_prefetching, args=(mnt, files, stop), daemon=True)
    try:
        reader.start()
        deadline = time.monotonic() + DEADLINE
        # `share` of the blob fetched (by prefetch and the reader together), prefetch under way
        while (fetched := api.get("/api/v1/metrics/backend").json()["read_amount_total"]) < share * blob_size:
            assert time.monotonic() < deadline, fetched
            time.sleep(0.01)
        m = blobcache(api)
        assert m["prefetch_data_amount"] > 0 and not m["data_all_ready"], m
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(DEADLINE)
    finally:
        stop.set()
        d.kill()
        api.close()
        cleanup_mount(str(mnt))
    reader.join(DEADLINE)

    d2, api2, mnt2 = start(tmp_path, "after", boot, config(blobs, cache, prefetch=False))
    try:
        wrong = [rel for rel, data in sorted(files.items()) if (mnt2 / rel).read_bytes() != data]
        assert not wrong, f"{len(wrong)} of {len(files)} files differ after kill -9 at {share:.0%}: {wrong[:5]}"
        # the successor served some reads from what the killed daemon cached, fetched the rest
        bc, backend = blobcache(api2), api2.get("/api/v1/metrics/backend").json()
        print(f"kill at {share:.0%}: cache hits {bc['whole_hits']} whole / {bc['partial_hits']} partial, "
              f"backend reads {backend['read_count']}, {res.chunks} chunks")
        assert bc["whole_hits"] > 0 and backend["read_count"] > 0, (bc, backend)
        assert d2.stop() == 0
    finally:
        d2.kill()
        api2.close()
        cleanup_mount(str(mnt2))
