"""`nydusd-py virtiofs`: serve filesystems to a VM over vhost-user-fs (nydusd's virtiofs mode).

* `--bootstrap B --config C`: that RAFS image at the root of the share (dedicated mode).
* `--shared-dir D`: a read-write passthrough of host directory D at the root.
* neither: the share starts as an empty pseudo root (a `Vfs`); filesystems are mounted into it
  at run time (Kata: `/containers` passthrough, `/rafs/<id>/lowerdir` images) by the HTTP API.

The vhost-user socket is unlinked, bound and listened on before this returns to its caller's
loop; the daemon runs until SIGTERM/SIGINT.
"""

import argparse
import contextlib
import logging
import signal
import threading
from types import FrameType

from ..daemon.config import RafsConfig, parse_config
from ..fs.passthrough import PassthroughFilesystem
from ..fs.rafs_fs import RafsFilesystem
from ..fuse.api import Filesystem
from ..fuse.protocol import FuseSession
from ..rafs import open_bootstrap
from ..storage.device import BlobDevice
from ..transport.vhost_user import VhostUserServer, virtiofs_server

log = logging.getLogger("nydusd-py")


def open_rafs(bootstrap: str, cfg: RafsConfig) -> RafsFilesystem:
    """A RafsFilesystem for `bootstrap` with the backend/cache `cfg` asks for."""
    from .daemon import make_source  # the shared backend/cache factory of the fuse command

    image = open_bootstrap(bootstrap)
    try:
        device = BlobDevice(image, make_source(cfg), validate=cfg.digest_validate or cfg.cache.validate)
    except BaseException:
        image.close()
        raise
    return RafsFilesystem(image, device, entry_timeout=cfg.entry_timeout, attr_timeout=cfg.attr_timeout,
                          enable_xattr=cfg.enable_xattr)


def root_filesystem(args: argparse.Namespace) -> Filesystem:
    """What the share's root serves, from the command line."""
    if args.bootstrap:
        if not args.config:
            raise ValueError("virtiofs: --bootstrap needs --config")
        if args.shared_dir:
            raise ValueError("virtiofs: --bootstrap and --shared-dir exclude each other")
        with open(args.config, "rb") as f:
            cfg = parse_config(f.read())
        return open_rafs(args.bootstrap, cfg)
    if args.shared_dir:
        return PassthroughFilesystem(args.shared_dir)
    from ..vfs import Vfs

    return Vfs()


def serve(fs: Filesystem, sock: str, *, debug: bool = False) -> tuple[FuseSession, VhostUserServer]:
    """Bind `sock` and serve `fs` in the background."""
    session = FuseSession(fs, debug=debug)
    server = virtiofs_server(session, sock)
    server.start()
    return session, server


def cmd_virtiofs(args: argparse.Namespace) -> int:
    try:
        fs = root_filesystem(args)
    except ValueError as e:
        log.error("%s", e)
        return 1
    session, server = serve(fs, args.sock, debug=args.log_level in ("trace", "debug"))
    log.info("virtiofs: serving %s on %s", type(fs).__name__, args.sock)
    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(0.5):
        if server.wait(0):
            log.error("virtiofs: the vhost-user server stopped")
            break
    server.stop()
    session.reset()
    close = getattr(fs, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()
    log.info("virtiofs: stopped after %d front-end connections", server.connections)
    return 0


def add_arguments(v: argparse.ArgumentParser) -> None:
    """The `virtiofs` subcommand's flags (upstream spelling; Kata's extras accepted)."""
    v.add_argument("--sock", required=True, help="vhost-user socket to listen on")
    v.add_argument("--config", help="nydusd JSON config for --bootstrap")
    v.add_argument("--bootstrap", help="RAFS bootstrap served at the share root (dedicated mode)")
    v.add_argument("--shared-dir", help="host directory served read-write at the share root")
    v.add_argument("--apisock")
    v.add_argument("--hybrid-mode", nargs="?", const="true", help="accepted (upstream flag; no effect)")
    v.add_argument("--id")
    v.add_argument("--log-level", default="info", choices=("trace", "debug", "info", "warn", "error"))
    v.add_argument("--log-file")
    v.add_argument("--thread-num", "--threads", dest="thread_num", type=int, default=1,
                   help="accepted for Kata's virtio_fs_extra_args; one worker per queue")
    v.add_argument("--prefetch-files")
    v.set_defaults(func=cmd_virtiofs)
