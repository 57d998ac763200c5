"""The snapshotter's TOML config: upstream nydus-snapshotter's `config.toml` (`version = 1`,
containerd/nydus-snapshotter config/config.go) and our older flat form, read into one `Settings`.

Why one reader for both: a host moving from nydus-snapshotter keeps its config file as is, and
our earlier files (`nydusd_path`, `nydusd_args`, `insecure_registries` at the top) keep working.

* A key of the wrong type is fatal, in one line naming the key, the type wanted and the value.
* An unknown key is logged once (a warning) and skipped, never fatal: upstream adds keys often.
* An upstream key we do not implement is logged once at info with why (`IGNORED`), and as a
  warning when it is set to something that changes behaviour upstream (`true`, a non-empty
  path): deploy/README.md lists them. `[image] validate_signature = true` is fatal: silently
  skipping a signature check would be a security hole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("nydus-snapshotter-py")

DAEMON_MODES = ("dedicated", "multiple", "shared", "none")  # multiple: upstream's alias of dedicated
RECOVER_POLICIES = ("none", "restart", "failover")
FAILOVER_POLICIES = ("none", "resend", "flush")
UPSTREAM_FS_DRIVERS = ("fscache", "blockdev", "proxy", "nodev")  # upstream's, not ours
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


class ConfigError(ValueError):
    """A config that cannot be used; the message is the one line the user sees."""


@dataclass
class Settings:
    """Every setting, flat: defaults < config file < command-line flags."""

    root: str = "/var/lib/containerd-nydus-py"
    address: str = "/run/containerd-nydus-py/containerd-nydus-grpc.sock"
    daemon_mode: str = "shared"  # dedicated | shared | none ("multiple" is read as dedicated)
    nydusd_path: str = ""
    nydusd_args: str = "--thread-num 4 --log-level info"
    nydusd_config: str = ""
    insecure_registries: list[str] = field(default_factory=list)
    skip_ssl_verify: bool = False  # [remote] skip_ssl_verify: every registry is insecure
    log_level: str = "info"
    log_to_stdout: bool = False
    stop_daemon_on_exit: bool = False  # also upstream's cleanup_on_close
    fs_driver: str = "fusedev"
    recover_policy: str = "restart"  # upstream's default (config/default.go)
    failover_policy: str = "resend"
    threads_number: int = 0  # 0: the daemon's default (or --thread-num in nydusd_args)
    log_rotation_size: int = 0  # MiB, 0: no rotation
    cache_dir: str = ""  # "": ROOT/cache
    metrics_address: str = ""  # "": no metrics server
    overlayfs_volatile: bool = False
    nydus_overlayfs: bool = False  # [snapshot] enable_nydus_overlayfs: fuse.nydus-overlayfs + extraoption (Kata)
    nydus_overlayfs_path: str = ""  # [snapshot] nydus_overlayfs_path: mount type fuse.<path> instead
    kubelet_providers: bool = False  # [remote.auth] enable_kubelet_credential_providers
    credential_provider_config: str = ""
    credential_provider_bin_dir: str = ""
    mirrors_dir: str = ""  # [remote.mirrors_config] dir
    uid: int = 0  # owner of the gRPC socket (mode 0660)
    gid: int = 0


# key -> (type, Settings field); a type of (bool,) etc. is checked with isinstance, int never as bool
Key = tuple[type, str]
TOP: dict[str, Key] = {
    "root": (str, "root"), "address": (str, "address"), "daemon_mode": (str, "daemon_mode"),
    "cleanup_on_close": (bool, "stop_daemon_on_exit"), "uid": (int, "uid"), "gid": (int, "gid"),
    # our flat form
    "nydusd_path": (str, "nydusd_path"), "nydusd_args": (str, "nydusd_args"), "nydusd_config": (str, "nydusd_config"),
    "insecure_registries": (list, "insecure_registries"), "log_level": (str, "log_level"),
    "stop_daemon_on_exit": (bool, "stop_daemon_on_exit"),
}
TABLES: dict[str, dict[str, Key]] = {
    "daemon": {"nydusd_path": (str, "nydusd_path"), "nydusd_config": (str, "nydusd_config"),
               "fs_driver": (str, "fs_driver"), "recover_policy": (str, "recover_policy"),
               "failover_policy": (str, "failover_policy"), "threads_number": (int, "threads_number"),
               "log_rotation_size": (int, "log_rotation_size"), "nydusd_args": (str, "nydusd_args")},
    "log": {"level": (str, "log_level"), "log_to_stdout": (bool, "log_to_stdout")},
    "metrics": {"address": (str, "metrics_address")},
    "cache_manager": {"cache_dir": (str, "cache_dir")},
    "remote": {"skip_ssl_verify": (bool, "skip_ssl_verify")},
    "remote.mirrors_config": {"dir": (str, "mirrors_dir")},
    "remote.auth": {"enable_kubelet_credential_providers": (bool, "kubelet_providers"),
                    "credential_provider_config": (str, "credential_provider_config"),
                    "credential_provider_bin_dir": (str, "credential_provider_bin_dir")},
    "snapshot": {"enable_overlayfs_volatile": (bool, "overlayfs_volatile"),
                 "enable_nydus_overlayfs": (bool, "nydus_overlayfs"),
                 "nydus_overlayfs_path": (str, "nydus_overlayfs_path")},
}
# upstream keys we read but do not act on: (type, why)
_K8S = "needs Kubernetes (credentials come from IMAGE_PULL_AUTH or docker config.json on this host)"
_ROT = "the snapshotter logs to stderr/stdout; rotation is journald's or logrotate's job"
IGNORED: dict[str, tuple[type, str]] = {
    "system.enable": (bool, "no system controller (debug/upgrade HTTP API)"),
    "system.address": (str, "no system controller"), "system.uid": (int, "no system controller"),
    "system.gid": (int, "no system controller"),
    "system.debug.daemon_cpu_profile_duration_secs": (int, "no daemon CPU profiling"),
    "system.debug.pprof_address": (str, "no pprof (a Go profiler)"),
    "daemon.nydusimage_path": (str, "the snapshotter never runs nydus-image (no tarfs conversion)"),
    "cgroup.enable": (bool, "no cgroup management: run the snapshotter in a systemd slice to limit nydusd-py"),
    "cgroup.memory_limit": (str, "no cgroup management"),
    "log.dir": (str, _ROT), "log.log_rotation_compress": (bool, _ROT), "log.log_rotation_local_time": (bool, _ROT),
    "log.log_rotation_max_age": (int, _ROT), "log.log_rotation_max_backups": (int, _ROT),
    "log.log_rotation_max_size": (int, _ROT),
    "metrics.hung_io_interval": (str, "no hung-I/O detector; the daemon's own metrics have per-request latencies"),
    "metrics.collect_interval": (str, "metrics are read at scrape time, not collected periodically"),
    "remote.convert_vpc_registry": (bool, "Alibaba Cloud VPC registry rewriting"),
    "remote.auth.enable_kubeconfig_keychain": (bool, _K8S), "remote.auth.kubeconfig_path": (str, _K8S),
    "remote.auth.enable_cri_keychain": (bool, "no CRI image-service proxy; " + _K8S),
    "remote.auth.image_service_address": (str, "no CRI image-service proxy"),
    "remote.auth.credential_renewal_interval": (str, "credentials are read at each mount, nothing is cached"),
    "snapshot.enable_kata_volume": (bool, "upstream adds io.katacontainers.volume= only for guest-pull (fs_driver "
                                    "proxy) and tarfs images, neither served here; Kata gets Nydus images through "
                                    "enable_nydus_overlayfs (the extraoption both Kata runtimes read)"),
    "snapshot.sync_remove": (bool, "Remove is always synchronous here"),
    "cache_manager.disable": (bool, "no recycle bin: the daemon's blob cache evicts by size"),
    "cache_manager.gc_period": (str, "no recycle bin: the daemon's blob cache evicts by size"),
    "image.public_key_file": (str, "no signature validation"),
    "image.validate_signature": (bool, "no signature validation"),
    "experimental.enable_stargz": (bool, "eStargz images are not served"),
    "experimental.enable_referrer_detect": (bool, "OCI referrers are not followed"),
    "experimental.enable_index_detect": (bool, "index detection is not implemented"),
    "experimental.enable_backend_source": (bool, "no system controller to serve backend sources"),
    "experimental.tarfs.enable_tarfs": (bool, "no tarfs"), "experimental.tarfs.mount_tarfs_on_host": (bool, "no tarfs"),
    "experimental.tarfs.tarfs_hint": (bool, "no tarfs"), "experimental.tarfs.max_concurrent_proc": (int, "no tarfs"),
    "experimental.tarfs.export_mode": (str, "no tarfs"),
}
# set to these, an ignored key changes nothing upstream either: logged at info, not warned about
_HARMLESS: dict[str, Callable[[Any], bool]] = {
    "snapshot.sync_remove": lambda v: True,
    "remote.auth.credential_renewal_interval": lambda v: v in ("", "0", "0s"),
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean (true/false)", list: "a list", dict: "a table"}


def _check(path: str, value: Any, want: type, where: str) -> None:
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: {path} must be {_TYPE_NAMES[want]}, got {type(value).__name__} {value!r}")


def _one_of(path: str, value: str, choices: tuple[str, ...], where: str, hint: str = "") -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {path} must be one of {', '.join(choices)}, got {value!r}{hint}")


def apply_document(doc: Mapping[str, Any], where: str, out: Settings | None = None) -> Settings:
    """`doc` (a parsed TOML file named `where` in messages) on top of `out` (defaults)."""
    s = out if out is not None else Settings()
    version = doc.get("version")
    if version is not None:
        _check("version", version, int, where)
        if version != 1:
            raise ConfigError(f"{where}: unsupported configuration version {version} (only version = 1)")

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            path = prefix + key
            head = prefix.rstrip(".")
            if path == "version":
                continue
            known = TOP.get(key) if not prefix else TABLES.get(head, {}).get(key)
            if known is not None:
                _check(path, value, known[0], where)
                setattr(s, known[1], value)
            elif path in IGNORED:
                want, why = IGNORED[path]
                _check(path, value, want, where)
                _note_ignored(path, value, why)
            elif isinstance(value, dict) and (path in TABLES or any(k.startswith(path + ".") for k in IGNORED)):
                walk(value, path + ".")
            else:
                log.warning("%s: unknown key %s ignored", where, path)

    walk(doc, "")
    validate(s, where)
    return s


def _note_ignored(path: str, value: Any, why: str) -> None:
    if path == "image.validate_signature" and value is True:
        raise ConfigError("image.validate_signature = true: nydus-snapshotter-py cannot validate image signatures; "
                          "set it to false or use nydus-snapshotter")
    inert = value in (False, "", 0) or _HARMLESS.get(path, lambda v: False)(value)
    (log.info if inert else log.warning)("config key %s = %r is not implemented by nydus-snapshotter-py (%s)",
                                        path, value, why)


def validate(s: Settings, where: str) -> None:
    """Values (not types) that cannot work, with the hint a user needs."""
    _one_of("daemon_mode", s.daemon_mode, DAEMON_MODES, where)
    if s.daemon_mode == "multiple":
        s.daemon_mode = "dedicated"
    if s.fs_driver in UPSTREAM_FS_DRIVERS:
        raise ConfigError(f"{where}: daemon.fs_driver {s.fs_driver!r} is not supported by nydus-snapshotter-py; "
                          "use fusedev, erofs (the kernel's EROFS driver, what fscache gives upstream) or auto")
    _one_of("daemon.fs_driver", s.fs_driver, ("fusedev", "erofs", "auto"), where)
    _one_of("daemon.recover_policy", s.recover_policy, RECOVER_POLICIES, where)
    _one_of("daemon.failover_policy", s.failover_policy, FAILOVER_POLICIES, where)
    _one_of("log.level", s.log_level, LOG_LEVELS, where)
    if not 0 <= s.threads_number <= 1024:
        raise ConfigError(f"{where}: daemon.threads_number must be within 0..1024, got {s.threads_number}")
    if s.log_rotation_size < 0:
        raise ConfigError(f"{where}: daemon.log_rotation_size must be >= 0 (MiB), got {s.log_rotation_size}")
    if not all(isinstance(h, str) for h in s.insecure_registries):
        raise ConfigError(f"{where}: insecure_registries must be a list of strings")
    if not s.root:
        raise ConfigError(f"{where}: root must not be empty")
    if s.mirrors_dir and not os.path.isdir(s.mirrors_dir):
        raise ConfigError(f"{where}: remote.mirrors_config.dir {s.mirrors_dir} does not exist or is not a directory")
    if s.kubelet_providers and not (s.credential_provider_config and s.credential_provider_bin_dir):
        raise ConfigError(f"{where}: remote.auth.enable_kubelet_credential_providers needs credential_provider_config "
                          "and credential_provider_bin_dir")


def load_file(path: str, out: Settings | None = None) -> Settings:
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    return apply_document(doc, path, out)
