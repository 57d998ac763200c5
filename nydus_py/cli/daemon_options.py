"""nydusd's command line (clap definitions of `src/bin/nydusd/main.rs`), parsed with argparse.

Global options may come before or after the subcommand; with no subcommand the FUSE options mean
`fuse` (upstream's legacy mode). Usage errors exit 2 with a message on stderr, like clap.
Deviations, both friendlier than upstream and documented: `--backend-source` is accepted (the
snapshotter sends it; upstream exits 2), and `virtiofs --threads N` (suggested by Kata's docs) is
accepted as `--virtio-workers N` (worker threads per request queue); `--virtio-queues N` offers
several request queues.
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..daemon.version import version_text

SUBCOMMANDS = ("fuse", "virtiofs", "singleton")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        sys.stdout.write(version_text())
        sys.stdout.flush()
        parser.exit(0)


def _int_in(lo: int, hi: int, what: str, unit: str = "") -> Callable[[str], int]:
    """An argparse type: an int in lo..=hi, else one line naming `what` (e.g. "thread count")."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {value!r}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{what} {n}{unit} is not in {lo}..={hi}")
        return n

    return parse


_threads = _int_in(1, 1024, "thread count")
_poll_us = _int_in(0, 10_000, "poll window", " us")
_warm_kb = _int_in(0, 1024, "warm size", " KB")
_queues = _int_in(1, 255, "queue count")


def _nonneg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} must not be negative")
    return n


def _nonneg_float(v: str) -> float:
    f = float(v)
    if not f >= 0:
        raise argparse.ArgumentTypeError(f"{v}: must be >= 0")
    return f


def _global(p: argparse.ArgumentParser, top: bool) -> None:
    """Options valid anywhere on the line; sub-parsers must not reset what the top level set."""
    d: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("global options")
    g.add_argument("-A", "--apisock", help="HTTP API unix socket (created 0600)", **d)
    g.add_argument("-C", "--config", help="config file: JSON v1, JSON v2 or TOML v2", **d)
    g.add_argument("--id", help="daemon id (requires --supervisor)", **d)
    g.add_argument("--supervisor", help="supervisor unix socket for failover/upgrade (requires --id)", **d)
    g.add_argument("--upgrade", action="store_true", help="start in INIT and wait for a takeover", **d)
    g.add_argument("-l", "--log-level", choices=LOG_LEVELS, **({"default": "info"} if top else d))
    g.add_argument("-L", "--log-file", help="log file (.log is appended when it has no extension)", **d)
    g.add_argument("--log-rotation-size", type=_nonneg, metavar="MIB", help="rotate the log at this size",
                   **({"default": 0} if top else d))
    g.add_argument("--rlimit-nofile", type=_nonneg, **({"default": 1_000_000} if top else d))
    g.add_argument("--grpc-sock", help="also serve the gRPC control API on this unix socket", **d)
    g.add_argument("--metrics-addr", metavar="HOST:PORT", help="also serve /metrics over TCP", **d)
    g.add_argument("--trim-interval", type=_nonneg_float, metavar="SECONDS",
                   help="a mount no request reached for this long gives back its bootstrap's resident pages "
                   "and the daemon its free heap (default 10; 0: never)", **({"default": 10.0} if top else d))
    g.add_argument("-V", "--version", action=_VersionAction, help="print version information")


def _fs_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filesystem options")
    g.add_argument("-B", "--bootstrap", help="RAFS bootstrap to mount at --virtual-mountpoint")
    g.add_argument("--image", metavar="REGISTRY/REPO:TAG", help="Nydus image in a registry to mount instead of "
                   "--bootstrap (manifest and bootstrap fetched at start, data read lazily; without a "
                   "cache in --config, chunks are cached in $NYDUS_PY_CACHE_DIR or /var/lib/nydus-py/cache, "
                   "at most $NYDUS_PY_CACHE_SIZE bytes, default 10 GiB)")
    g.add_argument("-D", "--localfs-dir", help="quick start: localfs backend and blob cache in this directory")
    g.add_argument("-s", "--shared-dir", help="passthrough directory (not available)")
    g.add_argument("--prefetch-files", help="file listing paths to prefetch, one per line (requires --bootstrap)")
    g.add_argument("-m", "--virtual-mountpoint", default="/", help="where the bootstrap is mounted inside the FS")
    g.add_argument("--dedup-db", help="accepted for compatibility; cross-image dedup is not used")
    g.add_argument("--backend-source", help="accepted and ignored (nydus-snapshotter's experimental option)")
    g.add_argument("--case-insensitive", action="store_true", default=False,
                   help="LOOKUP of a name that does not exist falls back to a case-folded match, for Windows guests "
                   "(every mount of this daemon; names that differ only in case stay exact). Per RAFS mount: the "
                   "config key \"case_insensitive\": true. Not with --fs-driver erofs")


def _fuse_options(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("FUSE options")
    g.add_argument("-M", "--mountpoint", required=required, help="FUSE mountpoint (must exist)")
    g.add_argument("--thread-num", "--fuse-threads", dest="thread_num", type=_threads, default=4)
    g.add_argument("--io-uring", action="store_true", default=False,
                   help="serve FUSE requests over io_uring (kernel 6.14+ with fuse.enable_uring=Y; the daemon does not "
                   "set that module parameter). Falls back to /dev/fuse reads, logged and counted in "
                   "/api/v1/metrics/transport. Also the config key \"fuse_io_uring\": true")
    g.add_argument("--fuse-poll-us", dest="fuse_poll_us", type=_poll_us, default=None, metavar="US",
                   help="after a reply, a /dev/fuse worker polls for the next request for up to US "
                   "microseconds (adaptive: only while requests keep coming; an idle daemon sleeps in "
                   "read(2)) instead of sleeping at once, which saves the wake-up of every request of a "
                   "stream. 0 turns it off. Default 100")
    g.add_argument("--fuse-warm-kb", dest="fuse_warm_kb", type=_warm_kb, default=None, metavar="KB",
                   help="warming, after a reply is written, while the process that asked wakes up: a LOOKUP of a "
                   "regular file of at most KB kilobytes whose data needs no waiting (one chunk of a local blob, or "
                   "chunks ready in the blob cache) reads it, "
                   "so the READ that usually follows is answered at once (paused while LOOKUPs go unread); "
                   "the READDIR reply that ends a listing decodes the directory a depth-first walk (find, "
                   "ls -R) lists next. /dev/fuse only (an io_uring queue runs on the requester's CPU). 0 "
                   "turns both off. Default 128")
    g.add_argument("--failover-policy", choices=("none", "resend", "flush"), default="resend")
    g.add_argument("--writable", action="store_true", help="accepted; the filesystem is always read-only")
    g.add_argument("--fs-driver", choices=("fusedev", "erofs"), default=None,
                   help="how --bootstrap or --image is served at --mountpoint: fusedev (this daemon's FUSE filesystem) or "
                   "erofs (the kernel's EROFS driver, file data lazily through blob views); default: the config's "
                   "fs_driver, else fusedev")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusd-py", description="Lazy-loading container image filesystem daemon, "
                                "a nydusd peer (fuse | virtiofs | singleton)")
    _global(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="{fuse,virtiofs,singleton}")
    f = sub.add_parser("fuse", help="serve through /dev/fuse")
    _global(f, top=False)
    _fuse_options(f, required=True)
    _fs_options(f)
    v = sub.add_parser("virtiofs", help="serve a VM through vhost-user-fs")
    _global(v, top=False)
    v.add_argument("--sock", required=True, help="vhost-user listener socket")
    v.add_argument("--hybrid-mode", nargs="?", const="true", default=None, help="accepted (RAFS + passthrough)")
    v.add_argument("--virtio-workers", "--threads", dest="threads", type=_threads, default=None, metavar="N",
                   help="worker threads per request queue for reads and writes, so a read waiting on the registry "
                   "does not hold up cached ones; more start while all are stuck, up to 4N (default 4; 1 "
                   "answers everything in the queue's own thread; --threads is Kata's name)")
    v.add_argument("--virtio-queues", type=_queues, default=1, metavar="N",
                   help="request queues offered to the front-end (default 1; QEMU's vhost-user-fs-pci "
                   "num-request-queues must not exceed it)")
    _fs_options(v)
    s = sub.add_parser("singleton", help="fscache service (not supported)")
    _global(s, top=False)
    s.add_argument("-F", "--fscache", help="fscache cache directory")
    s.add_argument("--fscache-tag")
    s.add_argument("--fscache-threads", type=_threads, default=4)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    argv = list(argv)
    parser = build_parser()
    if argv and not any(a in SUBCOMMANDS for a in argv) and not any(a in ("-h", "--help", "-V", "--version")
                                                                    for a in argv):
        argv.insert(0, "fuse")  # legacy mode: top-level FUSE options mean `fuse`
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a subcommand is required (fuse, virtiofs or singleton)")
    if bool(args.id) != bool(args.supervisor):
        parser.error("--id and --supervisor must be given together")
    if getattr(args, "prefetch_files", None) and not (getattr(args, "bootstrap", None) or getattr(args, "image", None)):
        parser.error("--prefetch-files requires --bootstrap or --image")
    if args.config and getattr(args, "localfs_dir", None):
        parser.error("--config conflicts with --localfs-dir")
    if getattr(args, "image", None) and (getattr(args, "bootstrap", None) or getattr(args, "localfs_dir", None)
                                         or getattr(args, "shared_dir", None)):
        parser.error("--image conflicts with --bootstrap, --localfs-dir and --shared-dir")
    if getattr(args, "bootstrap", None) and getattr(args, "shared_dir", None):
        parser.error("--bootstrap conflicts with --shared-dir")
    return args
