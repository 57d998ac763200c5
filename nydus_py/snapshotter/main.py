"""`nydus-snapshotter-py`: the containerd proxy snapshotter's command line.

    nydus-snapshotter-py --root /var/lib/containerd-nydus-py \\
        --address /run/containerd-nydus-py/containerd-nydus-grpc.sock \\
        [--nydusd-path nydusd-py] [--nydusd-args "--thread-num 4 --log-level info"] \\
        [--nydusd-config template.json] [--insecure-registry HOST[:PORT]]... [--config FILE.toml] \\
        [--fs-driver fusedev|erofs|auto]

`--config` names a TOML file: upstream nydus-snapshotter's `config.toml` (`version = 1`, read as
is: see `settings` and deploy/README.md for the keys we do not implement) or our older flat form
(`root`, `address`, `nydusd_path`, `nydusd_args`, `nydusd_config`, `insecure_registries`,
`log_level`, `stop_daemon_on_exit`, `[daemon] fs_driver`); command-line flags win. containerd
points `[proxy_plugins.<name>] address` at `--address`. SIGTERM/SIGINT stop the gRPC server (5 s
grace); the daemons keep running (a restarted snapshotter adopts them) unless
`--stop-daemon-on-exit` (`cleanup_on_close = true`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
import threading

from .. import __version__
from .dedicated import DedicatedDaemons
from .errors import SnapshotError
from .fsdriver import FS_DRIVERS, resolve_fs_driver
from .kubelet_auth import KubeletProvider, ProviderConfigError
from .metrics import SnapshotterMetrics
from .nydusd import DaemonSettings, SharedDaemon, default_command, load_template
from .service import serve, socket_address
from .settings import DAEMON_MODES, LOG_LEVELS, ConfigError, Settings, load_file
from .snapshotter import ImageMounter, Snapshotter

log = logging.getLogger("nydus-snapshotter-py")

DEFAULT_ROOT = Settings.root
DEFAULT_ADDRESS = Settings.address


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydus-snapshotter-py", description="containerd proxy snapshotter: overlayfs snapshots and Nydus "
                                "images mounted lazily through nydusd-py",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file: upstream nydus-snapshotter's config.toml (version = 1) or our flat "
                                    "form (flags override it)")
    p.add_argument("--root", help=f"state directory: metadata.db, snapshots/, mnt/, cache/ (default {DEFAULT_ROOT})")
    p.add_argument("--address", help=f"gRPC unix socket for containerd (default {DEFAULT_ADDRESS})")
    p.add_argument("--nydusd-path", "--nydusd", dest="nydusd_path",
                   help="nydusd-py executable (default: nydusd-py on PATH, else python3 -m nydus_py.cli.daemon)")
    p.add_argument("--nydusd-args", help=f"extra arguments of every daemon (default {Settings.nydusd_args!r})")
    p.add_argument("--nydusd-config", help="v1 JSON nydusd config used as the template of every image's config")
    p.add_argument("--daemon-mode", choices=DAEMON_MODES, help="shared (one nydusd-py for every image, default), "
                   "dedicated (one per image; multiple is its alias) or none (only ordinary snapshots)")
    p.add_argument("--insecure-registry", action="append", default=None, metavar="HOST[:PORT]",
                   help="registry reached without certificate checks, falling back to plain HTTP (repeatable; "
                        "loopback registries always are)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--log-to-stdout", action="store_true", default=None, help="log to stdout (default stderr)")
    p.add_argument("--fs-driver", choices=FS_DRIVERS, default=None,
                   help="how images are served: fusedev (nydusd-py's FUSE filesystem), erofs (the kernel's "
                        "EROFS driver, data lazily through the daemon) or auto (erofs where this host supports "
                        "file-backed EROFS mounts, else fusedev); default: [daemon] fs_driver, else fusedev")
    p.add_argument("--stop-daemon-on-exit", action="store_true", default=None,
                   help="also stop the daemons when the snapshotter exits")
    p.add_argument("--nydus-image", help="accepted for nydus-snapshotter compatibility; never run here")
    p.add_argument("--nydus-overlayfs-path", help="the nydus-overlayfs helper (a name in PATH or a path): Nydus "
                                                  "mounts get type fuse.<this> with [snapshot] "
                                                  "enable_nydus_overlayfs (default nydus-overlayfs)")
    p.add_argument("--version", action="version", version=f"nydus-snapshotter-py {__version__}")
    return p


_FLAGS = {"root": "root", "address": "address", "nydusd_path": "nydusd_path", "nydusd_args": "nydusd_args",
          "nydusd_config": "nydusd_config", "daemon_mode": "daemon_mode", "insecure_registry": "insecure_registries",
          "log_level": "log_level", "log_to_stdout": "log_to_stdout", "fs_driver": "fs_driver",
          "stop_daemon_on_exit": "stop_daemon_on_exit", "nydus_overlayfs_path": "nydus_overlayfs_path"}


def settings_from(args: argparse.Namespace) -> Settings:
    """The effective settings: defaults < --config file < flags. ConfigError (one line) when bad."""
    conf = load_file(args.config) if args.config else Settings()
    for flag, name in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(conf, name, value)
    if conf.daemon_mode == "multiple":
        conf.daemon_mode = "dedicated"
    for flag in ("nydus_image",):
        if getattr(args, flag, None):
            log.info("--%s is accepted for nydus-snapshotter compatibility and not used", flag.replace("_", "-"))
    return conf


def overlayfs_helper_warning(conf: Settings, path: str | None = None) -> str | None:
    """With enable_nydus_overlayfs, the one-line warning when this host has no helper for the
    mount type (containerd's mount.fuse runs it for every Nydus container mount, runc's too)."""
    if not conf.nydus_overlayfs:
        return None
    helper = conf.nydus_overlayfs_path or "nydus-overlayfs"
    if shutil.which(helper, path=path) is not None:
        return None
    return (f"[snapshot] enable_nydus_overlayfs: no {helper!r} on this host's PATH, so containerd cannot mount Nydus "
            f"containers (mount type fuse.{helper}); link it to nydus-overlayfs-py, e.g. ln -s "
            f"\"$(command -v nydus-overlayfs-py)\" /usr/local/bin/nydus-overlayfs")


def daemon_args(conf: Settings) -> list[str]:
    """The daemon arguments: nydusd_args, then threads_number and log_rotation_size when set."""
    args = shlex.split(conf.nydusd_args)
    if conf.threads_number:
        args += ["--thread-num", str(conf.threads_number)]  # (argparse: the last one wins)
    if conf.log_rotation_size:
        args += ["--log-rotation-size", str(conf.log_rotation_size)]
    return args


def _level(name: str) -> int:
    return {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
            "error": logging.ERROR}[name]


def _remount(sn: Snapshotter, daemon: ImageMounter) -> None:
    """After a restart: mount the Nydus images of existing snapshots again (best effort), by
    the digest recorded at pull time."""
    for rec in sn.bootstrap_snapshots():
        try:
            daemon.mount(rec.id, rec.source)
        except SnapshotError as e:
            log.warning("snapshot %s (%s): %s", rec.info.name, rec.source, e)


def _setup_logging(conf: Settings) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout if conf.log_to_stdout else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_level(conf.log_level))


MAX_SUN_PATH = 107  # sockaddr_un.sun_path (108) less the NUL
LONGEST_SOCKET = "/nydusd/9999999/supervisor.sock"  # a dedicated daemon's (7-digit snapshot id), under the root


def check_root(root: str) -> None:
    """Every daemon socket under `root` must fit a unix socket address (upstream: MaxRootPathLen)."""
    n = len(os.fsencode(os.path.abspath(root)))
    if n + len(LONGEST_SOCKET) > MAX_SUN_PATH:
        raise ConfigError(f"root {root} is too long ({n} bytes): daemon sockets under it would not fit a unix "
                          f"socket address; use a root of at most {MAX_SUN_PATH - len(LONGEST_SOCKET)} bytes")


def build_mounter(conf: Settings, metrics: SnapshotterMetrics | None = None) -> SharedDaemon | DedicatedDaemons | None:
    """The daemons that serve Nydus images for `daemon_mode` (None for "none")."""
    if conf.daemon_mode == "none":
        log.info("daemon_mode none: Nydus layers are refused, ordinary snapshots work")
        return None
    check_root(conf.root)
    try:
        template = load_template(conf.nydusd_config) if conf.nydusd_config else None
    except OSError as e:
        raise ConfigError(f"nydusd_config {conf.nydusd_config}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"nydusd_config {e}") from None
    provider = None
    if conf.kubelet_providers:
        try:
            provider = KubeletProvider(conf.credential_provider_config, conf.credential_provider_bin_dir)
        except ProviderConfigError as e:
            raise ConfigError(str(e)) from None
    command = shlex.split(conf.nydusd_path) if conf.nydusd_path else default_command()
    if not command or shutil.which(command[0]) is None:
        raise ConfigError(f"nydusd not found: {conf.nydusd_path!r} is not an executable; set [daemon] nydusd_path "
                          "(or --nydusd-path) to nydusd-py, e.g. \"python3 -m nydus_py.cli.daemon\"")
    settings = DaemonSettings(command=command, args=daemon_args(conf),
                              insecure_registries=tuple(conf.insecure_registries), config_template=template,
                              fs_driver=resolve_fs_driver(conf.fs_driver), skip_ssl_verify=conf.skip_ssl_verify,
                              cache_dir=conf.cache_dir, recover_policy=conf.recover_policy,
                              failover_policy=conf.failover_policy,
                              on_mount=metrics.mount.observe if metrics is not None else None,
                              credential_provider=provider.credentials if provider is not None else None,
                              mirrors_dir=conf.mirrors_dir)
    if conf.daemon_mode == "dedicated":
        return DedicatedDaemons(conf.root, settings)
    return SharedDaemon(conf.root, settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        conf = settings_from(args)
        _setup_logging(conf)
        metrics = SnapshotterMetrics()
        mounter = build_mounter(conf, metrics)
        if (warning := overlayfs_helper_warning(conf)) is not None:
            log.warning("%s", warning)
    except (ConfigError, OSError) as e:
        print(f"nydus-snapshotter-py: error: {e}", file=sys.stderr)
        return 2
    try:
        sn = Snapshotter(conf.root, mounter, overlay_volatile=conf.overlayfs_volatile,
                         nydus_overlayfs=conf.nydus_overlayfs, nydus_overlayfs_path=conf.nydus_overlayfs_path)
    except OSError as e:
        print(f"nydus-snapshotter-py: error: root {conf.root}: {e.strerror or e}", file=sys.stderr)
        return 1
    sn.on_pull = metrics.pull.observe
    metrics.watch(sn, mounter)
    try:
        if conf.metrics_address:
            metrics.serve(conf.metrics_address)
    except (OSError, ValueError) as e:
        print(f"nydus-snapshotter-py: error: [metrics] address {conf.metrics_address}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        sn.close()
        return 2
    try:
        server = serve(sn, conf.address, uid=conf.uid, gid=conf.gid)  # (upstream's uid/gid: who may connect)
    except (OSError, RuntimeError) as e:
        print(f"nydus-snapshotter-py: error: gRPC address {conf.address}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        metrics.close()
        sn.close()
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    path = socket_address(conf.address)[0]
    log.info("serving containerd.services.snapshots.v1.Snapshots on %s, root %s, daemon_mode %s", path, sn.root,
             conf.daemon_mode)
    if mounter is not None:
        threading.Thread(target=_remount, args=(sn, mounter), name="remount", daemon=True).start()
    stop.wait()
    log.info("stopping")
    server.stop(5).wait(10)
    if conf.stop_daemon_on_exit and mounter is not None:
        mounter.stop()
    metrics.close()
    sn.close()
    if os.path.exists(path):
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
