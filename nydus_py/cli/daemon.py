"""`nydusd-py`: the daemon's command line (the `fuse` subcommand, as nydusd spells it)."""

import argparse
import logging
import signal
import sys
from types import FrameType

from ..daemon.config import ConfigError, RafsConfig, parse_config
from ..fs.rafs_fs import RafsFilesystem
from ..fuse.protocol import FuseSession
from ..rafs import FormatError, open_bootstrap
from ..rafs.chunkdata import BlobSource
from ..storage.device import BlobDevice
from ..storage.localfs import LocalBlobDir, SingleBlobFile
from ..transport.fusedev import FuseDevSession

log = logging.getLogger("nydusd-py")

LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "error": logging.ERROR}


def make_source(cfg: RafsConfig) -> BlobSource:
    if cfg.backend.type == "localfs":
        conf = cfg.backend.config
        if conf.get("blob_file"):
            return SingleBlobFile(str(conf["blob_file"]))
        return LocalBlobDir(str(conf["dir"]), alt_dirs=[str(d) for d in conf.get("alt_dirs") or []])
    raise ConfigError(f"backend {cfg.backend.type!r} is not available in this build")


def cmd_fuse(args: argparse.Namespace) -> int:
    if not args.bootstrap or not args.config:
        log.error("fuse: --bootstrap and --config are required (the API-driven shared daemon is not built yet)")
        return 1
    with open(args.config, "rb") as f:
        cfg = parse_config(f.read())
    image = open_bootstrap(args.bootstrap)
    device = BlobDevice(image, make_source(cfg), validate=cfg.digest_validate or cfg.cache.validate)
    fs = RafsFilesystem(image, device, entry_timeout=cfg.entry_timeout, attr_timeout=cfg.attr_timeout,
                        enable_xattr=cfg.enable_xattr)
    session = FuseSession(fs, debug=args.log_level in ("trace", "debug"))
    transport = FuseDevSession(session.handle, args.mountpoint, threads=args.thread_num)
    transport.mount()
    log.info("serving %s (RAFS v%d, %d blobs) at %s with %d threads", args.bootstrap, image.version,
             len(image.blobs), args.mountpoint, args.thread_num)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: unmounting %s", signum, args.mountpoint)
        try:
            transport.unmount()
        except OSError as e:
            log.error("unmount failed: %s", e)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not transport.wait(0.5):
        pass
    transport.close()
    image.close()
    log.info("session ended")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusd-py", description="Lazy-loading RAFS filesystem daemon (nydusd peer)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fuse", help="serve a RAFS image through /dev/fuse")
    f.add_argument("--config", help="nydusd JSON config (backend, cache, validation)")
    f.add_argument("--bootstrap", help="RAFS v5/v6 bootstrap (image.boot)")
    f.add_argument("--mountpoint", required=True)
    f.add_argument("--thread-num", "--fuse-threads", dest="thread_num", type=int, default=4)
    f.add_argument("--log-level", default="info", choices=sorted(LOG_LEVELS))
    f.add_argument("--log-file")
    f.add_argument("--id")
    f.add_argument("--apisock")
    f.set_defaults(func=cmd_fuse)
    from .virtiofs import add_arguments as add_virtiofs_arguments

    add_virtiofs_arguments(sub.add_parser("virtiofs", help="serve filesystems to a VM over vhost-user-fs"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= getattr(args, "thread_num", 1) <= 1024:
        print("nydusd-py: --thread-num must be 1..1024", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=LOG_LEVELS.get(args.log_level, logging.INFO),
        filename=getattr(args, "log_file", None),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ConfigError, FormatError, OSError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
