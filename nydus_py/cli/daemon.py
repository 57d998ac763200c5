"""`nydusd-py`: the process around DaemonService, in nydusd's start-up order.

fuse, normal start: load config + bootstrap, mount FUSE (INIT -> READY -> RUNNING), and only then
bind `--apisock`, so the socket appears when the daemon is already RUNNING (the snapshotter and
Kata poll for the file, then for RUNNING). With `--upgrade`, or when the previous daemon crashed
(the mountpoint is still mounted and `--apisock` exists but refuses connections), nothing is
mounted: the daemon stays in INIT with its API up and waits for the supervisor's takeover.

The main thread waits for signals and the exit request; FUSE workers, the HTTP API (api.server:
a thread per connection, no event loop, so neither asyncio nor ssl nor aiohttp is loaded by it),
the gRPC server and blocking API calls run in their own threads. SIGTERM/SIGINT unmount (lazily) and exit 0; `PUT
/api/v1/daemon/exit` exits 0 without unmounting; the FUSE session ending (unmounted by someone
else) exits 0. Start-up failures print `Error: ...` and exit 1; usage errors exit 2.
"""

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api.server import ApiServer

from ..config import ConfigError, ParsedConfig, parse_any, read_config_file
from ..daemon.errors import ApiError
from ..daemon.heap import StartupHeap, tune_malloc
from ..daemon.image_ref import image_source, is_image_source
from ..daemon.instance import MountCmd
from ..daemon.logsetup import setup_logging
from ..daemon.service import DaemonOptions, DaemonService
from ..daemon.state import DaemonState, Event
from ..rafs import FormatError
from ..storage.prefetch import read_prefetch_list
from ..transport.mount import is_mountpoint, real_mountpoint
from .daemon_options import parse_args

log = logging.getLogger("nydusd-py")


class StartupError(Exception):
    pass


def vhost_user_available() -> bool:
    try:
        import nydus_py.transport.vhost_user  # noqa: F401
    except ImportError:
        return False
    return True


def set_rlimit_nofile(target: int) -> None:
    """nydusd's RLIMIT_NOFILE rule: min(requested, max(soft, min(file-max - 16384, 1e6)))."""
    if target <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/file-max") as f:
            file_max = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        file_max = 1 << 20
    want = min(target, max(soft, min(file_max - 16384, 1_000_000)))
    if want == soft:
        return
    for limits in ((want, max(want, hard)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return
        except (OSError, ValueError) as e:
            err = e
    log.info("RLIMIT_NOFILE stays %d: %s", soft, err)


def previous_crashed(mountpoint: str, apisock: str | None) -> bool:
    """nydusd's crash test: our mountpoint is still mounted and the old API socket is dead."""
    from ..transport.mount import is_mountpoint

    if not apisock or not os.path.exists(apisock) or not is_mountpoint(mountpoint):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(apisock)
        except OSError:
            return True
    return False


def quickstart_config(localfs_dir: str) -> ParsedConfig:
    """`--localfs-dir DIR`: localfs backend and blob cache both in DIR."""
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": localfs_dir}},
                      "cache": {"type": "blobcache", "config": {"work_dir": os.path.join(localfs_dir, "cache")}}},
           "mode": "direct", "digest_validate": False}
    return parse_any(json.dumps(cfg))


class Daemon:
    def __init__(self, args: Any) -> None:
        self.args = args
        mode = args.command
        threads = getattr(args, "thread_num", None) or getattr(args, "threads", None) or 4
        mountpoint = getattr(args, "mountpoint", None) or ""
        if mode == "fuse":
            # An existing mount (upgrade/failover) is not stat'ed: its daemon is not serving yet.
            if not is_mountpoint(mountpoint) and not os.path.isdir(mountpoint):
                raise StartupError(f"mountpoint {mountpoint} does not exist or is not a directory")
            mountpoint = real_mountpoint(mountpoint)
        self.opts = DaemonOptions(
            mode=mode, mountpoint=mountpoint, threads=threads,
            apisock=os.path.abspath(args.apisock) if args.apisock else None, id=args.id,
            supervisor=os.path.abspath(args.supervisor) if args.supervisor else None,
            failover_policy=getattr(args, "failover_policy", "none"), upgrade=args.upgrade,
            debug=args.log_level in ("trace", "debug"), trim_interval=args.trim_interval,
            case_insensitive=bool(getattr(args, "case_insensitive", False)))
        if getattr(args, "fuse_poll_us", None) is not None:
            self.opts.fuse_poll_us = args.fuse_poll_us
        if getattr(args, "fuse_warm_kb", None) is not None:
            self.opts.fuse_warm_kb = args.fuse_warm_kb
        self.events = setup_logging(args.log_level, args.log_file, args.log_rotation_size)
        self.service = DaemonService(self.opts, self.events)
        self.servers: list[ApiServer] = []
        self.grpc_server: Any = None
        self.kernel = False  # the dedicated mount is served by the kernel EROFS driver
        self.heap = StartupHeap()  # (main hands its own over)

    # -- start-up ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Config and the initial (dedicated) mount, before anything is visible to clients."""
        a = self.args
        svc = self.service
        if getattr(a, "backend_source", None):
            log.info("--backend-source given; ignored (credentials come from the config)")
        try:
            if a.config:
                svc.default_config = read_config_file(a.config)
            elif getattr(a, "localfs_dir", None):
                svc.default_config = quickstart_config(a.localfs_dir)
        except (ConfigError, OSError) as e:
            raise StartupError(f"config {a.config or a.localfs_dir}: {e}") from None
        self.opts.io_uring = bool(getattr(a, "io_uring", False)) or (
            svc.default_config is not None and svc.default_config.fuse_io_uring)
        if getattr(a, "shared_dir", None):
            try:
                svc.mount(a.virtual_mountpoint, MountCmd("passthrough_fs", a.shared_dir, ""))
            except ApiError as e:
                raise StartupError(f"--shared-dir {a.shared_dir}: {e.message}") from None
        boot = getattr(a, "bootstrap", None)
        if getattr(a, "image", None):
            boot = image_source(a.image)  # docker://REF: a config is optional (daemon.image_ref)
        driver = getattr(a, "fs_driver", None) or (
            svc.default_config.fs_driver if svc.default_config is not None else "fusedev")
        if getattr(a, "fs_driver", None) == "erofs" and not boot:
            raise StartupError("--fs-driver erofs needs --bootstrap or --image (a shared daemon takes the driver from each "
                               "mount's config)")
        if boot:
            self.kernel = self.opts.mode == "fuse" and driver == "erofs"
            if svc.default_config is None and not is_image_source(boot):
                raise StartupError("--bootstrap needs --config or --localfs-dir")
            files = None
            if a.prefetch_files:
                try:
                    files = [os.fsdecode(p) for p in read_prefetch_list(a.prefetch_files)]
                except OSError as e:
                    raise StartupError(f"--prefetch-files {a.prefetch_files}: {e}") from None
            cmd = MountCmd("rafs", boot, "", files)
            if self.kernel:  # EROFS at --mountpoint; no FUSE filesystem of ours there
                cmd = MountCmd("rafs", boot, "", files, fs_driver="erofs", target=self.opts.mountpoint)
            try:
                svc.mount(a.virtual_mountpoint, cmd)
            except ApiError as e:
                raise StartupError(e.message) from None
            img = svc.instances[svc.normalize_mountpoint(a.virtual_mountpoint)].image
            if img is not None:  # (no inode count here: on v6 it walks the inode table)
                log.info("loaded %s (RAFS v%d, %d blobs)", boot, img.version, len(img.blobs))

    def recovering(self) -> bool:
        """--upgrade, or a crashed predecessor: stay in INIT, mount nothing, wait for takeover."""
        if self.opts.mode != "fuse":
            return False
        if getattr(self.args, "fs_driver", None) == "erofs" and not self.opts.supervisor:
            return False  # (nothing holds its blob views' connection: there is nothing to take over)
        if self.opts.upgrade:
            log.info("--upgrade: waiting in INIT for the takeover")
            return True
        if previous_crashed(self.opts.mountpoint, self.opts.apisock):
            log.warning("previous daemon on %s crashed: waiting in INIT for the takeover", self.opts.mountpoint)
            return True
        return False

    def start_fuse(self) -> None:
        svc = self.service
        try:
            svc.fuse_mount()
        except OSError as e:
            raise StartupError(f"mount FUSE at {self.opts.mountpoint}: {e}") from None
        boot = getattr(self.args, "bootstrap", None) or getattr(self.args, "image", None)
        log.info("serving %s at %s with %d threads (%s mode)", boot or "a shared daemon", self.opts.mountpoint,
                 self.opts.threads, "dedicated" if boot else "shared")

    def start_erofs(self) -> None:
        """The dedicated mount is already the kernel's (made in load()): just go RUNNING."""
        svc = self.service
        svc.sm.fire(Event.MOUNT)
        svc.sm.fire(Event.START)
        boot = getattr(self.args, "bootstrap", None) or getattr(self.args, "image", None)
        log.info("serving %s at %s with the kernel EROFS driver (dedicated mode)", boot, self.opts.mountpoint)

    def start_virtiofs(self) -> None:
        from ..transport.vhost_user import virtiofs_server
        from ..transport.vhost_user.server import DEFAULT_WORKERS

        svc = self.service
        workers = self.args.threads or DEFAULT_WORKERS
        queues = getattr(self.args, "virtio_queues", 1)
        server = virtiofs_server(svc.session, os.path.abspath(self.args.sock), request_queues=queues,
                                 workers=workers)
        server.bind()
        server.start()
        svc.transport = server
        svc.sm.fire(Event.MOUNT)
        svc.sm.fire(Event.START)
        log.info("serving virtio-fs on %s (%d request queue(s), %d workers each)", self.args.sock, queues, workers)

    def start_apis(self) -> None:
        a = self.args
        if not self.has_api():
            return
        # imported here: a daemon pays for the API servers it runs only (grpc is ~10 MiB)
        from ..api.server import serve_metrics_tcp, serve_unix

        # the HTTP socket last: clients take its appearance as "the daemon is up"
        if a.metrics_addr:
            host, _, port = a.metrics_addr.rpartition(":")
            self.servers.append(serve_metrics_tcp(self.service, host or "127.0.0.1", int(port)))
        if a.grpc_sock:
            from ..api.grpc_server import serve_grpc

            self.grpc_server = serve_grpc(self.service, a.grpc_sock)
            log.info("gRPC API listening on %s", a.grpc_sock)
        if self.opts.apisock:
            self.servers.append(serve_unix(self.service, self.opts.apisock))
            log.info("API listening on %s", self.opts.apisock)

    # -- running -----------------------------------------------------------------------------------
    def _watch_transport(self) -> None:
        """The FUSE session ending by itself (unmounted elsewhere, aborted) ends the daemon."""
        svc = self.service
        while not svc.exit_event.is_set():
            t = svc.transport
            if t is None:
                svc.exit_event.wait(0.5)
                continue
            if t.wait(0.5):
                if not svc.exit_event.is_set():
                    log.info("the FUSE session ended; exiting")
                    with contextlib.suppress(ApiError):
                        if svc.state == DaemonState.RUNNING:
                            svc.sm.fire(Event.STOP)
                    svc.request_exit(0, unmount=False)
                return

    def has_api(self) -> bool:
        a = self.args
        return bool(a.metrics_addr or getattr(a, "grpc_sock", None) or self.opts.apisock)

    def _start(self) -> None:
        if not self.recovering():
            self.load()
            if self.kernel:
                self.start_erofs()
            elif self.opts.mode == "fuse":
                self.start_fuse()
            else:
                self.start_virtiofs()

    def run(self) -> int:
        """Signals and the exit request are waited for on a threading.Event in the main thread;
        the API servers run on their own threads (no event loop: see api.server)."""
        svc = self.service
        stop = threading.Event()
        svc.on_exit = stop.set
        started = threading.Event()
        pending: list[int] = []

        def on_signal(sig: int, _frame: object) -> None:
            # a SIGTERM that arrives while we mount must not kill us with the default action
            # (leaving a dead mount behind): it is acted on once the mount is complete and
            # shutdown() can undo it
            if started.is_set():
                self._shutdown_on(sig)
            else:
                pending.append(sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        t0 = time.monotonic()
        self._start()
        try:
            self.start_apis()
        except OSError as e:
            raise StartupError(f"API socket: {e}") from None
        started.set()
        log.info("state %s %.0f ms after start", svc.state.value, (time.monotonic() - t0) * 1000)
        self.heap.serving(svc.exit_event)  # (the start-up's garbage, after the first requests: daemon.heap)
        if pending:
            self._shutdown_on(pending[0])
        threading.Thread(target=self._watch_transport, name="transport-watch", daemon=True).start()
        while not stop.wait(1.0):  # (a timed wait: signal handlers run between waits)
            pass
        return self.finish()

    def _shutdown_on(self, sig: int) -> None:
        log.info("signal %s: shutting down", signal.Signals(sig).name)
        threading.Thread(target=self.service.shutdown, name="shutdown", daemon=True).start()

    def finish(self) -> int:
        svc = self.service
        code, unmount = svc.exit_request or (0, True)
        for server in self.servers:
            server.close()
        if self.grpc_server is not None:
            self.grpc_server.stop(0.5)
        for path in (self.opts.apisock, getattr(self.args, "grpc_sock", None)):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._stop_transport(unmount)
        log.info("exit %d", code)
        return code

    def _stop_transport(self, unmount: bool) -> None:
        svc = self.service
        t = svc.transport
        if t is None or (self.opts.mode == "fuse" and not unmount):
            # hand-over or session already over: leave the FUSE mount alone (our fds close at
            # exit), and the EROFS mounts handed to the supervisor; undo the others (their
            # views would die with us)
            svc.close_all(kernel_only=not (t is None and unmount))
            return
        t.stop()
        svc.close_all()

def main(argv: list[str] | None = None) -> int:
    heap = StartupHeap()
    heap.begin()  # no cyclic collection until the daemon serves (daemon.heap)
    tune_malloc()  # decoded chunks reuse the heap's pages (daemon.heap)
    try:
        return _main(argv, heap)
    finally:
        heap.end()  # (on again whatever happened: a start-up error, a caller in this process)


def _main(argv: list[str] | None, heap: StartupHeap) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "singleton":
        print("Error: singleton/fscache mode is not supported by nydusd-py (use `fuse`)", file=sys.stderr)
        return 1
    if args.command == "virtiofs" and not vhost_user_available():
        print("Error: virtiofs is not yet available in this build of nydusd-py", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(args)
        daemon.heap = heap
        set_rlimit_nofile(args.rlimit_nofile)
        return daemon.run()
    except StartupError as e:
        log.error("%s", e)
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, FormatError, OSError) as e:
        log.error("%s", e)
        print(f"Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
