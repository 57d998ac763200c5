"""FUSE request accounting: per-mount counters and in-flight requests, fed by FuseSession's observer.

The hot path does one dict insert/pop and one locked update of a few list slots per request;
everything else (nydusd's FsIoStats JSON, per-file maps, Prometheus families) is derived from these
counters when someone asks. nydusd's array layouts are part of the contract the snapshotter
parses: 15 fop slots, 8 block-size buckets, 8 latency buckets.
"""

import errno
import struct
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any

from ..fuse.abi import Opcode

# nydusd's fop index (StatsFop): the array position of each opcode in fop_hits/fop_errors/...
FOP_OPCODES = (
    Opcode.GETATTR, Opcode.READLINK, Opcode.OPEN, Opcode.RELEASE, Opcode.READ, Opcode.STATFS,
    Opcode.GETXATTR, Opcode.LISTXATTR, Opcode.OPENDIR, Opcode.LOOKUP, Opcode.READDIR, Opcode.READDIRPLUS,
    Opcode.ACCESS, Opcode.FORGET, Opcode.BATCH_FORGET,
)
N_FOPS = len(FOP_OPCODES)
MAX_OPCODE = 64
# latency bucket upper bounds in microseconds (the last bucket is "more")
LATENCY_BOUNDS_US = (200, 1_000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)
# block-size bucket upper bounds in bytes (exclusive)
BLOCK_BOUNDS = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20)
_ERR = struct.Struct("<i")
_ERR_AT_4 = _ERR.unpack_from
_clock_ns = time.perf_counter_ns
_READ = int(Opcode.READ)
_OPEN = int(Opcode.OPEN)
_RELEASE = int(Opcode.RELEASE)
_ENOSYS = -errno.ENOSYS


def latency_bucket(us: int) -> int:
    """Index of the first latency bound `us` does not exceed (7: more than 2 s)."""
    return bisect_left(LATENCY_BOUNDS_US, us)


def size_bucket(n: int) -> int:
    """Index of the block-size bucket of an `n`-byte request (7: 1 MiB and more)."""
    return bisect_right(BLOCK_BOUNDS, n)


def opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name.lower()
    except ValueError:
        return f"op{opcode}"


class FsStats:
    """Counters of one mounted filesystem (nydusd's FsIoStats), keyed by its mountpoint."""

    def __init__(self, id: str, *, files: bool = False, access_pattern: bool = False, latest: bool = False) -> None:
        self.id = id
        self.files_enabled = files
        self.pattern_enabled = access_pattern
        self.latest_enabled = latest
        self.lock = threading.Lock()
        self.hits = [0] * (MAX_OPCODE + 1)
        self.errors = [0] * (MAX_OPCODE + 1)
        self.latency_us = [0] * (MAX_OPCODE + 1)
        self.latency_dist = [[0] * 8 for _ in range(MAX_OPCODE + 1)]
        self.block_count_read = [0] * 8
        self.data_read = 0
        self.opens = 0
        self.releases = 0
        # per inode: [total_fops, data_read, block_count_read[8], fop_hits[15], fop_errors[15]]
        self.per_file: dict[int, list[Any]] = {}
        self.pattern: dict[int, list[int]] = {}  # ino -> [nr_read, first secs, first nanos]
        self.latest: set[int] = set()

    def record(self, opcode: int, ino: int, elapsed_us: int, error: int, nbytes: int) -> None:
        op = opcode if opcode <= MAX_OPCODE else MAX_OPCODE
        lb = bisect_left(LATENCY_BOUNDS_US, elapsed_us)  # (latency_bucket, inline: on every request)
        with self.lock:
            self.hits[op] += 1
            self.latency_us[op] += elapsed_us
            self.latency_dist[op][lb] += 1
            if error and error != _ENOSYS:  # ENOSYS is "stop asking" (no-open etc.), not a failure
                self.errors[op] += 1
            elif op == _READ:
                self.data_read += nbytes
                self.block_count_read[bisect_right(BLOCK_BOUNDS, nbytes)] += 1  # (size_bucket)
            elif op == _OPEN:
                self.opens += 1
            elif op == _RELEASE:
                self.releases += 1
            if self.files_enabled or self.pattern_enabled or self.latest_enabled:
                self._record_file(op, ino, error, nbytes)

    def _record_file(self, op: int, ino: int, error: int, nbytes: int) -> None:
        if self.files_enabled:
            f = self.per_file.get(ino)
            if f is None:
                f = self.per_file[ino] = [0, 0, [0] * 8, [0] * N_FOPS, [0] * N_FOPS]
            f[0] += 1
            try:
                k = FOP_OPCODES.index(op)
            except ValueError:
                k = -1
            if k >= 0:
                (f[4] if error and error != _ENOSYS else f[3])[k] += 1
            if op == _READ and not error:
                f[1] += nbytes
                f[2][size_bucket(nbytes)] += 1
        if op == _READ and not error:
            if self.pattern_enabled:
                p = self.pattern.get(ino)
                if p is None:
                    now = time.time_ns()
                    self.pattern[ino] = [1, now // 1_000_000_000, now % 1_000_000_000]
                else:
                    p[0] += 1
            if self.latest_enabled:
                self.latest.add(ino)

    # -- nydusd JSON ------------------------------------------------------------------------------
    def fs_io_stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "files_account_enabled": self.files_enabled,
                "access_pattern_enabled": self.pattern_enabled,
                "record_latest_read_files_enabled": self.latest_enabled,
                "measure_latency": True,
                "id": self.id,
                "nr_opens": max(0, self.opens - self.releases),
                "data_read": self.data_read,
                "block_count_read": list(self.block_count_read),
                "fop_hits": [self.hits[o] for o in FOP_OPCODES],
                "fop_errors": [self.errors[o] for o in FOP_OPCODES],
                "fop_cumulative_latency_total": [self.latency_us[o] for o in FOP_OPCODES],
                "read_latency_dist": list(self.latency_dist[_READ]),
            }

    def files(self) -> dict[str, Any]:
        with self.lock:
            return {str(ino): {"total_fops": f[0], "data_read": f[1], "block_count_read": list(f[2]),
                               "fop_hits": list(f[3]), "fop_errors": list(f[4])}
                    for ino, f in sorted(self.per_file.items())}

    def take_latest(self) -> list[list[int]]:
        """Inodes read since the last call, as runs `[start, end]` or `[ino]`; clears the set."""
        with self.lock:
            inos = sorted(self.latest)
            self.latest.clear()
        runs: list[list[int]] = []
        for ino in inos:
            if runs and runs[-1][-1] == ino - 1:
                runs[-1] = [runs[-1][0], ino]
            else:
                runs.append([ino])
        return runs

    def access_patterns(self) -> list[dict[str, int]]:
        with self.lock:
            return [{"ino": ino, "nr_read": p[0], "first_access_time_secs": p[1], "first_access_time_nanos": p[2]}
                    for ino, p in sorted(self.pattern.items())]

    def op_snapshot(self) -> list[tuple[int, int, int, int, list[int]]]:
        """(opcode, hits, errors, latency_us total, latency buckets) of every opcode seen."""
        with self.lock:
            return [(op, self.hits[op], self.errors[op], self.latency_us[op], list(self.latency_dist[op]))
                    for op in range(MAX_OPCODE + 1) if self.hits[op]]


class FuseMetrics:
    """The RequestObserver of a daemon's FuseSession: routes each request to the FsStats of the
    filesystem that owns its inode, and keeps the in-flight table for /metrics/inflight."""

    def __init__(self, route: Callable[[int], tuple[FsStats | None, int]]) -> None:
        # route(kernel nodeid) -> (stats of its filesystem or None, the filesystem's own inode)
        self.route = route
        self.inflight: dict[int, tuple[int, int, int, int]] = {}  # unique -> (nodeid, opcode, perf_counter_ns, unique)
        self.pseudo = FsStats("")  # requests on the pseudo root (shared mode)

    def started(self, opcode: int, nodeid: int, unique: int) -> object:
        # the in-flight entry is the token itself: one tuple per request
        token = self.inflight[unique] = (nodeid, opcode, _clock_ns(), unique)
        return token

    def finished(self, token: object, reply: Any) -> None:
        nodeid: int
        opcode: int
        t0: int
        unique: int
        nodeid, opcode, t0, unique = token  # type: ignore[misc]
        elapsed_us = (_clock_ns() - t0) // 1000
        self.inflight.pop(unique, None)
        if reply is None:
            error = nbytes = 0
        elif isinstance(reply, tuple):
            head, data = reply
            nbytes = len(data)
            error = _ERR_AT_4(head, 4)[0]
        else:
            nbytes = len(reply) - 16
            error = _ERR_AT_4(reply, 4)[0]
        stats, ino = self.route(nodeid)
        (stats or self.pseudo).record(opcode, ino, elapsed_us, error, nbytes)

    def inflight_list(self) -> list[dict[str, int]]:
        """nydusd's in-flight entries; start times are wall-clock seconds (from the monotonic clock)."""
        wall, mono = time.time(), time.perf_counter_ns()
        return [{"inode": n, "opcode": op, "unique": u, "timestamp_secs": int(wall - (mono - t0) / 1e9)}
                for _, (n, op, t0, u) in sorted(self.inflight.items())]
