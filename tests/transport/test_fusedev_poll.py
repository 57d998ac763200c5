"""Busy-polling of /dev/fuse after a reply: the window rule (sans-IO), and on a real mount that
a stream of requests is read by polling (counted), and that an idle session's workers end up
asleep in read(2) once the window has run out, burning no CPU."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nydus_py.api.client import ApiClient
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.fusedev import (
    POLL_COOLDOWN,
    RUNQ_BUSY_NS,
    RUNQ_COOLDOWN,
    RUNQ_EVERY,
    RUNQ_SLICE_NS,
    FuseDevSession,
    PollWindow,
)
from tests.conftest import require_device
from tests.fs.mountrig import CHUNK, abort_connection, build, nydusd
from tests.waiting import wait_until

US = 1000


def test_window_opens_when_requests_come_soon_after_a_reply() -> None:
    w = PollWindow(100 * US, start_ns=10 * US)
    assert w.window_ns == 0  # nothing polled before requests have been seen close together
    w.blocked(30 * US)
    assert w.window_ns == 10 * US
    w.blocked(30 * US)
    assert w.window_ns == 20 * US
    for _ in range(10):
        w.blocked(50 * US)
    assert w.window_ns == 100 * US  # capped


def test_window_closes_when_requests_stop() -> None:
    w = PollWindow(100 * US, start_ns=10 * US)
    for _ in range(5):
        w.blocked(1 * US)
    assert w.window_ns == 100 * US
    w.blocked(10_000 * US)
    assert w.window_ns == 50 * US
    w.blocked(10_000 * US)
    w.blocked(10_000 * US)
    assert w.window_ns == 12_500
    w.blocked(10_000 * US)
    assert w.window_ns == 0  # below the start: no polling at all for a sparse stream


def test_a_busy_cpu_stops_polling_for_a_while() -> None:
    w = PollWindow(100 * US, start_ns=10 * US)
    for _ in range(5):
        w.blocked(1 * US)
    w.contended()
    assert w.window_ns == 0
    for _ in range(POLL_COOLDOWN):  # requests coming close together do not reopen it at once
        w.blocked(1 * US)
        assert w.window_ns == 0
    w.blocked(1 * US)
    assert w.window_ns == 10 * US


def test_waiting_for_a_cpu_pauses_polling() -> None:
    w = PollWindow(100 * US, start_ns=10 * US)
    for _ in range(5):
        w.blocked(1 * US)
    assert not w.runq(1_000_000, 10, 0)  # the first sample only sets the start
    # at the bound: not busy
    assert not w.runq(1_000_000 + RUNQ_EVERY * RUNQ_BUSY_NS, 11, RUNQ_EVERY)
    assert w.window_ns == 100 * US
    # a long wait over requests not all polled for: wake-ups of a sleeping thread, not busy CPUs
    assert not w.runq(2_000_000 + 3 * RUNQ_EVERY * RUNQ_BUSY_NS, 12, 2 * RUNQ_EVERY - 1)
    assert w.window_ns == 100 * US
    # waits of time-slice length, all requests polled for: other processes hold the CPUs
    assert w.runq(3_000_000 + 6 * RUNQ_EVERY * RUNQ_BUSY_NS, 13, 3 * RUNQ_EVERY - 1)
    assert w.window_ns == 0 and w.cooldown == RUNQ_COOLDOWN
    for _ in range(RUNQ_COOLDOWN):
        w.blocked(1 * US)
    assert w.window_ns == 0
    w.blocked(1 * US)
    assert w.window_ns == 10 * US


def test_short_waits_for_the_cpu_do_not_pause_polling() -> None:
    """The client woken on this CPU by a reply runs before the worker reads its next request:
    the worker waits in the run queue for one client turn per request (tens of microseconds,
    one switch each), more than RUNQ_BUSY_NS a request, and yet no other process wants the CPU
    (on a quiet machine that stopped polling for RUNQ_COOLDOWN requests)."""
    w = PollWindow(100 * US, start_ns=10 * US)
    for _ in range(5):
        w.blocked(1 * US)
    turn = RUNQ_SLICE_NS // 3  # a client turn, well over RUNQ_BUSY_NS
    assert turn > 4 * RUNQ_BUSY_NS
    assert not w.runq(1_000_000, 100, 0)
    for k in range(1, 6):  # one switch-in per request, every request polled for
        assert not w.runq(1_000_000 + k * RUNQ_EVERY * turn, 100 + k * RUNQ_EVERY, k * RUNQ_EVERY)
    assert w.window_ns == 100 * US and w.cooldown == 0
    # the same wait in a few long waits (other processes' time slices): busy
    assert w.runq(1_000_000 + 6 * RUNQ_EVERY * turn, 100 + 5 * RUNQ_EVERY + 2, 6 * RUNQ_EVERY)
    assert w.window_ns == 0 and w.cooldown == RUNQ_COOLDOWN


def test_a_short_turn_of_another_task_does_not_stop_polling() -> None:
    """A sched_yield that let a kernel thread or the client run for a few tens of microseconds
    is no busy CPU; one that let a task run for a time slice is."""
    w = PollWindow(100 * US, start_ns=10 * US)
    for _ in range(5):
        w.blocked(1 * US)
    for _ in range(1000):  # a quiet machine: rcu_preempt, kworkers, the client's turns
        assert not w.lent(30 * US)
    assert w.window_ns == 100 * US and w.cooldown == 0
    w.queued = 5
    assert w.lent(2000 * US)  # a CPU hog's time slice
    assert w.window_ns == 0 and w.cooldown == POLL_COOLDOWN and w.queued == 0


def test_contention_ends_a_streak_of_queued_requests() -> None:
    w = PollWindow(100 * US)
    w.queued = 20
    w.contended()
    assert w.queued == 0


def test_a_zero_limit_never_polls() -> None:
    w = PollWindow(0)
    for _ in range(3):
        w.blocked(1)
    assert w.window_ns == 0


def _task_state(tid: int) -> tuple[str, str]:
    """(state letter, wchan) of a thread of this process."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    state = stat.rsplit(")", 1)[1].split()[0]
    return state, Path(f"/proc/self/task/{tid}/wchan").read_text()


def _pin(dev: FuseDevSession, workers_cpu: int, client_cpu: int) -> None:
    """The session's workers onto one CPU, the client (this thread) onto another or the same."""
    for t in dev._workers:
        assert t.native_id is not None
        os.sched_setaffinity(t.native_id, {workers_cpu})
    os.sched_setaffinity(threading.get_native_id(), {client_cpu})


def _serve(tmp_path: Path, poll_us: int, busy_check: bool = False):  # noqa: ANN202
    """A RAFS mount served in this process; `busy_check` off unless asked: the mechanics are
    tested on a machine that others may load (RUNQ_* would pause polling)."""
    require_device("/dev/fuse")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(CHUNK))
    img = build(str(src), str(tmp_path / "img"), views=False)
    image = open_bootstrap(img.boot)
    source = LocalBlobDir(img.blob_dir)
    fs = RafsFilesystem(image, BlobDevice(image, source), attr_timeout=0.0, readahead_chunks=0)
    session = FuseSession(fs)
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    mnt.mkdir()
    dev = FuseDevSession(session.handle_vectored, str(mnt), threads=2, max_write=session.max_write,
                         poll_us=poll_us, busy_check=busy_check)
    dev.mount()
    watchdog = threading.Timer(120, abort_connection, args=(str(mnt),))
    watchdog.start()

    def close() -> None:
        dev.close()
        watchdog.cancel()
        fs.close()
        image.close()
        source.close()

    return dev, mnt, close


@pytest.mark.slow
@pytest.mark.root
def test_a_request_stream_is_polled_and_an_idle_session_sleeps_in_read(tmp_path: Path) -> None:
    dev, mnt, close = _serve(tmp_path, poll_us=5000)  # a wide window: the stat loop always hits
    try:
        for _ in range(300):  # attr_timeout 0: every stat is GETATTRs, one right after another
            os.stat(mnt / "d" / "f")
        m = dev.poll_metrics()
        assert m["poll_us"] == 5000
        # most of the stream was read without sleeping: found by polling, or waiting already
        assert m["poll_hits"] + m["poll_queued"] >= 100, m
        assert m["requests"] >= 600, m
        # Nothing more comes: the window runs out, and each worker sleeps (the leader in
        # fuse_dev_do_read, the other on the reader lock); a worker still polling is running.
        tids = [t.native_id for t in dev._workers if t.native_id is not None]
        assert len(tids) == 2

        def asleep() -> list[tuple[str, str]] | None:
            states = [_task_state(t) for t in tids]
            ok = all(s == "S" for s, _ in states) and any(w == "fuse_dev_do_read" for _, w in states)
            return states if ok else None

        wait_until(asleep, 10, lambda: f"workers asleep, one in read(2): {[_task_state(t) for t in tids]} "
                                       f"{dev.poll_metrics()}")
        spun = dev.poll_metrics()["poll_spin_us"]
        assert all(w == "fuse_dev_do_read" or "futex" in w for _, w in asleep() or [])
        # still asleep and not spinning: the counters only move when a request comes
        assert dev.poll_metrics()["poll_spin_us"] == spun
        os.stat(mnt / "d" / "f")
        wait_until(lambda: dev.poll_metrics()["requests"] > m["requests"] + 2, 10, "the next requests")
    finally:
        close()


@pytest.mark.slow
@pytest.mark.root
def test_polling_backs_off_when_another_task_wants_the_cpu(tmp_path: Path) -> None:
    """A spin that yields to another runnable task stops and sleeps instead (poll_yielded): on a
    busy CPU, spinning only delays the client and whatever else runs there."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    dev, mnt, close = _serve(tmp_path, poll_us=5000, busy_check=True)
    hog = subprocess.Popen(["taskset", "-c", str(cpus[0]), sys.executable, "-c", "while True: pass"])
    try:
        _pin(dev, cpus[0], cpus[1])  # the workers share the hog's CPU; the client (this thread) does not
        path = mnt / "d" / "f"
        for _ in range(300):
            os.stat(path)
        m = dev.poll_metrics()
        assert m["poll_yielded"] >= 1, m
    finally:
        os.sched_setaffinity(threading.get_native_id(), set(cpus))
        hog.kill()
        hog.wait()
        close()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("busy_check", [True, False])
def test_polling_pauses_while_the_workers_wait_for_a_cpu(tmp_path: Path, busy_check: bool) -> None:
    """Workers that share their CPU with busy processes stop polling (poll_yielded,
    poll_cpu_busy): there a spinning thread competes as a CPU hog instead of being woken ahead
    of them."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    dev, mnt, close = _serve(tmp_path, poll_us=5000, busy_check=busy_check)
    hogs = [subprocess.Popen(["taskset", "-c", str(cpus[0]), sys.executable, "-c", "while True: pass"])
            for _ in range(2)]
    try:
        _pin(dev, cpus[0], cpus[1])
        for _ in range(300):
            os.stat(mnt / "d" / "f")
        m = dev.poll_metrics()
        # paused: by a spin's sched_yield that let a hog run, or (yields short, the thread
        # preempted all the same) by its run-queue wait; which one comes first is the scheduler's
        if busy_check:
            assert m["poll_cpu_busy"] + m["poll_yielded"] >= 1, m
        else:
            assert m["poll_cpu_busy"] == 0 and m["poll_yielded"] == 0, m
    finally:
        os.sched_setaffinity(threading.get_native_id(), set(cpus))
        for h in hogs:
            h.kill()
            h.wait()
        close()


@pytest.mark.slow
@pytest.mark.root
def test_a_client_on_the_workers_cpu_is_no_busy_cpu(tmp_path: Path) -> None:
    """Client and workers on one CPU, nothing else there: the client, woken on that CPU by each
    reply, runs before the worker reads its next request, and the worker waits in the run queue
    for its turns (tens of microseconds each). That is no load: the stream stays polled (it
    paused for 1024 requests per run-queue sample before). Another process on that CPU would
    pause it, rightly, so one round of three must see none."""
    cpus = sorted(os.sched_getaffinity(0))
    dev, mnt, close = _serve(tmp_path, poll_us=100, busy_check=True)
    rounds = []
    try:
        _pin(dev, cpus[0], cpus[0])
        for _ in range(3):
            before = dev.poll_metrics()
            for _ in range(600):
                os.stat(mnt / "d" / "f")
            m = dev.poll_metrics()
            d = {k: m[k] - before[k] for k in ("requests", "poll_hits", "poll_queued", "poll_cpu_busy")}
            rounds.append(d)
            if d["poll_cpu_busy"] == 0 and d["poll_hits"] + d["poll_queued"] >= 0.9 * d["requests"]:
                return
        pytest.fail(f"the stream was paused as if the CPU were busy in every round: {rounds}")
    finally:
        os.sched_setaffinity(threading.get_native_id(), set(cpus))
        close()


@pytest.mark.slow
@pytest.mark.root
def test_no_polling_between_reads(tmp_path: Path) -> None:
    """Where READs come every other request, the workers stop polling: the client's turn between
    them is longer than polling pays for, and the spin would take the CPU it needs."""
    dev, mnt, close = _serve(tmp_path, poll_us=5000)
    try:
        path = mnt / "d" / "f"
        for _ in range(100):
            os.stat(path)
        before = dev.poll_metrics()
        assert before["poll_hits"] + before["poll_queued"] >= 50, before
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(100):  # GETATTR, READ, GETATTR, READ, ...
                os.stat(path)
                assert len(os.pread(fd, 4096, 0)) == 4096
        finally:
            os.close(fd)
        after = dev.poll_metrics()
        assert after["requests"] >= before["requests"] + 200, after
        assert after["poll_hits"] - before["poll_hits"] <= 20, (before, after)  # of 400 requests
        assert after["poll_spin_us"] - before["poll_spin_us"] <= 20_000, (before, after)
    finally:
        close()


@pytest.mark.slow
@pytest.mark.root
def test_poll_us_0_reads_blocking_only(tmp_path: Path) -> None:
    dev, mnt, close = _serve(tmp_path, poll_us=0)
    try:
        for _ in range(50):
            os.stat(mnt / "d" / "f")
        m = dev.poll_metrics()
        assert m["requests"] >= 100 and m["poll_hits"] == 0 and m["poll_misses"] == 0 and m["poll_spin_us"] == 0
    finally:
        close()


@pytest.mark.slow
@pytest.mark.root
def test_daemon_flag_and_transport_metrics(tmp_path: Path) -> None:
    """`--fuse-poll-us`: the window reaches the workers, and /api/v1/metrics/transport counts
    the requests read by polling, and the READs answered without a hand-off."""
    require_device("/dev/fuse")
    src = tmp_path / "src"
    for i in range(20):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "f").write_bytes(b"x" * i)
    img = build(str(src), str(tmp_path / "img"), views=False)
    mnt, sock = str(tmp_path / "mnt"), str(tmp_path / "api.sock")
    with nydusd(img.boot, img.blob_dir, mnt, str(tmp_path), args=("--fuse-poll-us", "3000", "--apisock", sock,
                                                                  "--fuse-warm-kb", "64"),
                attr_timeout=0, entry_timeout=0):
        wait_until(lambda: os.path.exists(sock), 30, "the API socket")
        for _ in range(20):  # a stream of LOOKUPs and GETATTRs, each right after the last reply
            for i in range(20):
                os.stat(os.path.join(mnt, f"d{i}", "f"))
        for i in range(1, 20):  # READs of a localfs image: answered without a hand-off
            assert Path(mnt, f"d{i}", "f").read_bytes() == b"x" * i
        client = ApiClient(sock)
        try:
            m = client.call("GET", "/api/v1/metrics/transport")
        finally:
            client.close()
    assert m["transport"] == "fusedev"
    f = m["fusedev"]
    # (the stream is polled unless other processes keep the CPUs busy: then it pauses, counted)
    assert f["poll_us"] == 3000 and f["requests"] >= 800, f
    assert f["poll_hits"] + f["poll_queued"] + f["poll_cpu_busy"] >= 1, f
    assert f["reads_kept"] >= 19, f
    # --fuse-warm-kb reaches the session; the stat stream stopped the warming, the reads
    # (each right after its file's LOOKUP: attr and entry timeouts are 0) brought it back
    w = m["warm"]
    assert w["warm_kb"] == 64 and w["lookups_skipped"] >= 300 and w["followed"] >= 19, w
    assert w["warmed"] == w["lookups_warmed"] and w["warmed"] >= w["hits"], w
