"""`nydus-snapshotter-py`: the containerd proxy snapshotter's command line.

    nydus-snapshotter-py --root /var/lib/containerd-nydus-py \\
        --address /run/containerd-nydus-py/containerd-nydus-grpc.sock \\
        [--nydusd-path nydusd-py] [--nydusd-args "--thread-num 4 --log-level info"] \\
        [--nydusd-config template.json] [--insecure-registry HOST[:PORT]]... [--config FILE.toml] \\
        [--fs-driver fusedev|erofs|auto]

`--config` names a TOML file with the same settings (`root`, `address`, `nydusd_path`,
`nydusd_args`, `nydusd_config`, `insecure_registries`, `log_level`, `stop_daemon_on_exit`, and
`fs_driver` in a `[daemon]` table, see `fsdriver`); command-line flags win. containerd points `[proxy_plugins.<name>] address` at `--address`.
SIGTERM/SIGINT stop the gRPC server (5 s grace); the shared nydusd-py keeps running (a restarted
snapshotter adopts it) unless `--stop-daemon-on-exit`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
import tomllib
from typing import Any

from .. import __version__
from .errors import SnapshotError
from .fsdriver import FS_DRIVERS, resolve_fs_driver
from .nydusd import DEFAULT_ARGS, DaemonSettings, SharedDaemon, default_command, load_template
from .service import serve, socket_address
from .snapshotter import Snapshotter

log = logging.getLogger("nydus-snapshotter-py")

DEFAULT_ROOT = "/var/lib/containerd-nydus-py"
DEFAULT_ADDRESS = "/run/containerd-nydus-py/containerd-nydus-grpc.sock"
CONFIG_KEYS = {"root": str, "address": str, "nydusd_path": str, "nydusd_args": str, "nydusd_config": str,
               "insecure_registries": list, "log_level": str, "stop_daemon_on_exit": bool, "daemon": dict}
DAEMON_KEYS = {"fs_driver": str}  # the [daemon] table
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydus-snapshotter-py", description="containerd proxy snapshotter: overlayfs snapshots and Nydus "
                                "images mounted lazily through a shared nydusd-py",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with the settings below (flags override it)")
    p.add_argument("--root", help=f"state directory: metadata.db, snapshots/, mnt/, cache/ (default {DEFAULT_ROOT})")
    p.add_argument("--address", help=f"gRPC unix socket for containerd (default {DEFAULT_ADDRESS})")
    p.add_argument("--nydusd-path", help="nydusd-py executable (default: nydusd-py on PATH, else "
                                         "python3 -m nydus_py.cli.daemon)")
    p.add_argument("--nydusd-args", help=f"extra arguments of the shared daemon (default {' '.join(DEFAULT_ARGS)!r})")
    p.add_argument("--nydusd-config", help="v1 JSON nydusd config used as the template of every image's config")
    p.add_argument("--insecure-registry", action="append", default=None, metavar="HOST[:PORT]",
                   help="registry reached without certificate checks, falling back to plain HTTP (repeatable; "
                        "loopback registries always are)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--fs-driver", choices=FS_DRIVERS, default=None,
                   help="how images are served: fusedev (the shared daemon's FUSE filesystem), erofs (the kernel's "
                        "EROFS driver, data lazily through the daemon) or auto (erofs where this host supports "
                        "file-backed EROFS mounts, else fusedev); default: [daemon] fs_driver, else fusedev")
    p.add_argument("--stop-daemon-on-exit", action="store_true", default=None,
                   help="also stop the shared nydusd-py when the snapshotter exits")
    p.add_argument("--version", action="version", version=f"nydus-snapshotter-py {__version__}")
    return p


def load_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    for key, value in doc.items():
        if key not in CONFIG_KEYS:
            raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(CONFIG_KEYS))})")
        if not isinstance(value, CONFIG_KEYS[key]):
            raise ValueError(f"{path}: {key} must be a {CONFIG_KEYS[key].__name__}")
    if not all(isinstance(h, str) for h in doc.get("insecure_registries", [])):
        raise ValueError(f"{path}: insecure_registries must be a list of strings")
    for key, value in doc.get("daemon", {}).items():
        if key not in DAEMON_KEYS:
            raise ValueError(f"{path}: unknown key daemon.{key} (known: {', '.join(sorted(DAEMON_KEYS))})")
        if not isinstance(value, DAEMON_KEYS[key]):
            raise ValueError(f"{path}: daemon.{key} must be a {DAEMON_KEYS[key].__name__}")
    driver = doc.get("daemon", {}).get("fs_driver", "fusedev")
    if driver not in FS_DRIVERS:
        raise ValueError(f"{path}: daemon.fs_driver must be one of {', '.join(FS_DRIVERS)}, got {driver!r}")
    return doc


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The effective settings: defaults < --config file < flags."""
    conf: dict[str, Any] = {"root": DEFAULT_ROOT, "address": DEFAULT_ADDRESS, "nydusd_path": "",
                            "nydusd_args": " ".join(DEFAULT_ARGS), "nydusd_config": "", "insecure_registries": [],
                            "log_level": "info", "stop_daemon_on_exit": False, "fs_driver": "fusedev"}
    if args.config:
        doc = load_config(args.config)
        conf["fs_driver"] = doc.pop("daemon", {}).get("fs_driver", conf["fs_driver"])
        conf.update(doc)
    for key in [*CONFIG_KEYS, "fs_driver"]:
        flag = "insecure_registry" if key == "insecure_registries" else key
        value = getattr(args, flag, None)
        if value is not None:
            conf[key] = value
    return conf


def _level(name: str) -> int:
    return {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
            "error": logging.ERROR}[name]


def _remount(sn: Snapshotter, daemon: SharedDaemon) -> None:
    """After a restart: mount the Nydus images of existing snapshots again (best effort)."""
    for rec in sn.bootstrap_snapshots():
        try:
            daemon.mount(rec.id, rec.source)
        except SnapshotError as e:
            log.warning("snapshot %s (%s): %s", rec.info.name, rec.source, e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        conf = settings_from(args)
        template = load_template(conf["nydusd_config"]) if conf["nydusd_config"] else None
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        print(f"nydus-snapshotter-py: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=_level(conf["log_level"]), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = shlex.split(conf["nydusd_path"]) if conf["nydusd_path"] else default_command()
    settings = DaemonSettings(command=command, args=shlex.split(conf["nydusd_args"]),
                              insecure_registries=tuple(conf["insecure_registries"]), config_template=template,
                              fs_driver=resolve_fs_driver(conf["fs_driver"]))
    daemon = SharedDaemon(conf["root"], settings)
    try:
        sn = Snapshotter(conf["root"], daemon)
        server = serve(sn, conf["address"])
    except (OSError, RuntimeError) as e:
        print(f"nydus-snapshotter-py: error: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    path = socket_address(conf["address"])[0]
    log.info("serving containerd.services.snapshots.v1.Snapshots on %s, root %s", path, sn.root)
    threading.Thread(target=_remount, args=(sn, daemon), name="remount", daemon=True).start()
    stop.wait()
    log.info("stopping")
    server.stop(5).wait(10)
    if conf["stop_daemon_on_exit"]:
        daemon.stop()
    sn.close()
    if os.path.exists(path):
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
