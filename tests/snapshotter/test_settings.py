"""The snapshotter's config file: upstream nydus-snapshotter's config.toml read as is, our flat
form, unknown keys (logged once, never fatal), keys we do not implement (logged with why), and
one-line errors for values that cannot work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nydus_py.snapshotter.main import build_parser, daemon_args, main, settings_from
from nydus_py.snapshotter.settings import ConfigError, Settings, load_file

# containerd/nydus-snapshotter misc/snapshotter/config.toml at a7a1f071c194c3cb88eee5656a8e78783d0b0351
# (2026-07-24), verbatim.
UPSTREAM_CONFIG = """version = 1
# Snapshotter's own home directory where it stores and creates necessary resources
root = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus"
# The snapshotter's GRPC server socket, containerd will connect to plugin on this socket
address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
# The nydus daemon mode can be one of the following options: multiple, dedicated, shared, or none.
# If `daemon_mode` option is not specified, the default value is multiple.
daemon_mode = "dedicated"
# Whether snapshotter should try to clean up resources when it is closed
cleanup_on_close = false

[system]
# Snapshotter's debug and trace HTTP server interface
enable = true
# Unix domain socket path where system controller is listening on
address = "/run/containerd-nydus/system.sock"

[system.debug]
# Snapshotter can profile the CPU utilization of each nydusd daemon when it is being started.
# This option specifies the profile duration when nydusd is downloading and uncomproessing data.
daemon_cpu_profile_duration_secs = 5
# Enable by assigning an address, empty indicates pprof server is disabled
pprof_address = ""

[daemon]
# Specify a configuration file for nydusd
nydusd_config = "/etc/nydus/nydusd-config.fusedev.json"
nydusd_path = "/usr/local/bin/nydusd"
nydusimage_path = "/usr/local/bin/nydus-image"
# The fs driver can be one of the following options: fusedev, fscache, blockdev, proxy, or nodev.
# If `fs_driver` option is not specified, the default value is fusedev.
fs_driver = "fusedev"
# How to process when daemon dies: "none", "restart" or "failover"
recover_policy = "failover"
# Nydusd worker thread number to handle FUSE or fscache requests, [0-1024].
# Setting to 0 will use the default configuration of nydusd.
threads_number = 4
# Log rotation size for nydusd, in unit MB(megabytes). (default 100MB)
log_rotation_size = 100
# Nydusd failover policy, can be "none", "resend" or "flush"
failover_policy = "resend"

[cgroup]
# Whether to use separate cgroup for nydusd.
enable = true
# The memory limit for nydusd cgroup, which contains all nydusd processes.
# Percentage is supported as well, please ensure it is end with "%".
# The default unit is bytes. Acceptable values include "209715200", "200MiB", "200Mi" and "10%".
memory_limit = ""

[log]
# Print logs to stdout rather than logging files
log_to_stdout = false
# Snapshotter's log level
level = "info"
log_rotation_compress = true
log_rotation_local_time = true
# Max number of days to retain logs
log_rotation_max_age = 7
log_rotation_max_backups = 5
# In unit MB(megabytes)
log_rotation_max_size = 100

[metrics]
# Enable by assigning an address, empty indicates metrics server is disabled
address = ":9110"
# The maximum duration an I/O operation can be pending before it's considered hung.
hung_io_interval = "10s"
# The interval at which metrics are collected and updated.
collect_interval = "1m"

[remote]
convert_vpc_registry = false

[remote.mirrors_config]
# Snapshotter will rewrite nydusd's backend host to the first reachable mirror
# loaded from this directory before each mount. Mirror selection is done by the
# snapshotter (ping_url health check) and falls back to the origin registry host
# when no mirror is available. Set to "" or an empty directory to disable it.
#dir = "/etc/nydus/certs.d"

[remote.auth]
# Fetch the private registry auth by listening to K8s API server
enable_kubeconfig_keychain = false
# synchronize `kubernetes.io/dockerconfigjson` secret from kubernetes API server with specified kubeconfig (default `$KUBECONFIG` or `~/.kube/config`)
kubeconfig_path = ""
# Fetch the private registry auth as CRI image service proxy
enable_cri_keychain = false
# the target image service when using image proxy
#image_service_address = "/run/containerd/containerd.sock"
# Periodically renew cached credentials from renewable providers.
# Set to a positive duration (e.g., "10m", "1h") to enable. 0 disables.
credential_renewal_interval = "0s"

[snapshot]
# Let containerd use nydus-overlayfs mount helper
enable_nydus_overlayfs = false
# Path to the nydus-overlayfs binary or name of the binary in $PATH
nydus_overlayfs_path = "nydus-overlayfs"
# Insert Kata Virtual Volume option to `Mount.Options`
enable_kata_volume = false
# Whether to remove resources when a snapshot is removed
sync_remove = false
# Globally enable the "volatile" overlayfs mount option on all writable snapshots.
# This skips sync on the upper layer, improving write performance for ephemeral
# container filesystems. Safe for most workloads where the writable layer does not
# need to survive a crash.
enable_overlayfs_volatile = false

[cache_manager]
# Disable or enable recyclebin
disable = false
# How long to keep deleted files in recyclebin
gc_period = "24h"
# Directory to host cached files
cache_dir = ""

[image]
public_key_file = ""
validate_signature = false

# The configuraions for features that are not production ready
[experimental]
# Whether to enable stargz support
enable_stargz = false
# Whether to enable referrers support
# The option enables trying to fetch the Nydus image associated with the OCI image and run it.
# Also see https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers
enable_referrer_detect = false
# Whether to enable index detection support
# The option enables trying to fetch the Nydus image present in the same OCI index as the original OCI image and run it.
# Also see https://github.com/containerd/nydus-snapshotter/blob/main/docs/index-detection.md
enable_index_detect = false
# Whether to enable authentication support
# The option enables nydus snapshot to provide backend information to nydusd.
enable_backend_source = false
[experimental.tarfs]
# Whether to enable nydus tarfs mode. Tarfs is supported by:
# - The EROFS filesystem driver since Linux 6.4
# - Nydus Image Service release v2.3
enable_tarfs = false
# Mount rafs on host by loopdev and EROFS
mount_tarfs_on_host = false
# Only enable nydus tarfs mode for images with `tarfs hint` label when true
tarfs_hint = false
# Maximum of concurrence to converting OCIv1 images to tarfs, 0 means default
max_concurrent_proc = 0
# Mode to export tarfs images:
# - "none" or "": do not export tarfs
# - "layer_verity_only": only generate disk verity information for a layer blob
# - "image_verity_only": only generate disk verity information for all blobs of an image
# - "layer_block": generate a raw block disk image with tarfs for a layer
# - "image_block": generate a raw block disk image with tarfs for an image
# - "layer_block_with_verity": generate a raw block disk image with tarfs for a layer with dm-verity info
# - "image_block_with_verity": generate a raw block disk image with tarfs for an image with dm-verity info
export_mode = ""
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return str(p)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_upstream_config_is_read_as_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    s = load_file(write(tmp_path, UPSTREAM_CONFIG))
    assert (s.root, s.address) == ("/var/lib/containerd/io.containerd.snapshotter.v1.nydus",
                                   "/run/containerd-nydus/containerd-nydus-grpc.sock")
    assert s.daemon_mode == "dedicated" and s.stop_daemon_on_exit is False
    assert (s.nydusd_config, s.nydusd_path) == ("/etc/nydus/nydusd-config.fusedev.json", "/usr/local/bin/nydusd")
    assert (s.fs_driver, s.recover_policy, s.failover_policy) == ("fusedev", "failover", "resend")
    assert (s.threads_number, s.log_rotation_size) == (4, 100)
    assert (s.log_level, s.log_to_stdout, s.metrics_address, s.cache_dir) == ("info", False, ":9110", "")
    assert s.overlayfs_volatile is False and s.skip_ssl_verify is False
    assert not [m for m in warnings(caplog) if "unknown key" in m]  # every upstream key is known
    infos = caplog.text
    for key in ("system.enable", "cgroup.enable", "daemon.nydusimage_path", "log.log_rotation_max_size",
                "experimental.tarfs.export_mode", "remote.auth.enable_kubeconfig_keychain", "cache_manager.gc_period"):
        assert f"config key {key} = " in infos, key  # each not-implemented key is named once, with why
        assert infos.count(f"config key {key} = ") == 1
    # set to true upstream, these would change behaviour: warned about
    warned = warnings(caplog)
    assert any("system.enable = True" in m for m in warned) and any("cgroup.enable = True" in m for m in warned)
    assert not any("snapshot.sync_remove" in m for m in warned)  # Remove is synchronous here anyway


def test_upstream_values_reach_the_daemon_command(tmp_path: Path) -> None:
    s = load_file(write(tmp_path, UPSTREAM_CONFIG))
    assert daemon_args(s) == ["--thread-num", "4", "--log-level", "info", "--thread-num", "4",
                              "--log-rotation-size", "100"]
    assert daemon_args(Settings()) == ["--thread-num", "4", "--log-level", "info"]


def test_flat_config_keeps_working(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, 'root = "/r"\nnydusd_path = "/bin/nydusd-py"\nnydusd_args = "--thread-num 2"\n'
                           'insecure_registries = ["reg:5000"]\nlog_level = "debug"\nstop_daemon_on_exit = true\n'
                           '[daemon]\nfs_driver = "auto"\n')
    s = settings_from(build_parser().parse_args(["--config", path]))
    assert (s.root, s.nydusd_path, s.nydusd_args, s.insecure_registries) == ("/r", "/bin/nydusd-py",
                                                                             "--thread-num 2", ["reg:5000"])
    assert (s.log_level, s.stop_daemon_on_exit, s.fs_driver, s.daemon_mode) == ("debug", True, "auto", "shared")
    assert warnings(caplog) == []
    s = settings_from(build_parser().parse_args(["--config", path, "--fs-driver", "erofs", "--root", "/x",
                                                 "--daemon-mode", "multiple", "--nydusd", "/n"]))
    assert (s.fs_driver, s.root, s.daemon_mode, s.nydusd_path) == ("erofs", "/x", "dedicated", "/n")  # flags win


def test_unknown_keys_are_logged_once_and_never_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, 'version = 1\nfuture_key = 1\n[daemon]\nthreads = 4\nfs_driver = "erofs"\n'
                           '[brand_new]\nx = 1\n')
    s = load_file(path)
    assert s.fs_driver == "erofs"
    w = warnings(caplog)
    for key in ("future_key", "daemon.threads", "brand_new"):
        assert len([m for m in w if f"unknown key {key} " in m]) == 1, (key, w)


@pytest.mark.parametrize("text,message", [
    ('[daemon]\nthreads_number = "4"\n', "daemon.threads_number must be an integer, got str '4'"),
    ("root = 7\n", "root must be a string, got int 7"),
    ('[log]\nlog_to_stdout = "yes"\n', "log.log_to_stdout must be a boolean (true/false), got str 'yes'"),
    ("[cgroup]\nenable = 1\n", "cgroup.enable must be a boolean (true/false), got int 1"),
    ('[daemon]\nrecover_policy = "reboot"\n', "daemon.recover_policy must be one of none, restart, failover, "
                                                 "got 'reboot'"),
    ('daemon_mode = "single"\n', "daemon_mode must be one of dedicated, multiple, shared, none, got 'single'"),
    ('[daemon]\nfs_driver = "fscache"\n', "daemon.fs_driver 'fscache' is not supported by nydus-snapshotter-py; "
                                            "use fusedev, erofs"),
    ("version = 2\n", "unsupported configuration version 2 (only version = 1)"),
    ("[image]\nvalidate_signature = true\n", "cannot validate image signatures"),
    ("[daemon]\nthreads_number = 2000\n", "daemon.threads_number must be within 0..1024, got 2000"),
    ("root = [\n", "not valid TOML"),
])
def test_bad_values_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_file(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_main_reports_a_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[daemon]\nthreads_number = "4"\n')
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"nydus-snapshotter-py: error: {path}: daemon.threads_number must be an integer, got str '4'"
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"nydus-snapshotter-py: error: config file {tmp_path / 'missing.toml'}: No such file or directory"


def test_overlayfs_volatile_marks_writable_snapshots(tmp_path: Path) -> None:
    from nydus_py.snapshotter.snapshotter import Snapshotter

    path = write(tmp_path, "version = 1\n[snapshot]\nenable_overlayfs_volatile = true\n")
    sn = Snapshotter(str(tmp_path / "state"), None, overlay_volatile=load_file(path).overlayfs_volatile)
    try:
        sn.prepare("a", "", {})
        sn.commit("A", "a", {})
        (m,) = sn.prepare("b", "A", {})
        assert m.type == "overlay" and "volatile" in m.options
        (v,) = sn.view("v", "A", {})
        assert "volatile" not in v.options  # read-only: nothing to sync
    finally:
        sn.close()
