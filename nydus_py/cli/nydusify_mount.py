"""`nydusify-py mount` (alias `view`): mount a Nydus image from a registry for inspection until
SIGINT/SIGTERM, then unmount and clean up, as nydusify's viewer does with nydusd.

    nydusify-py mount --target REG/REPO:TAG [--mount-path ./image-fs] [--prefetch] ...

A dedicated `nydusd-py fuse --image REF` child serves the mount (lazy reads through a blob cache
inside --work-dir, removed at the end). The command waits for the mount to appear (or the
daemon to fail, whose log is then shown), then blocks in sigwait on SIGINT, SIGTERM and SIGCHLD;
on a signal it stops the daemon with SIGTERM, which unmounts. A daemon that dies on its own
ends the command with exit 1.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from ..convert.errors import ConvertError
from ..convert.pull import resolve_nydus
from ..convert.reference import ImageRef, parse_reference
from ..convert.remote import Endpoint, endpoint_config, normalize_auth, transport_error
from ..storage.registry import RegistryClient

MOUNT_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}


def is_mountpoint(path: str) -> bool:
    from ..transport.mount import is_mountpoint as check  # (here: ctypes is not loaded by the other commands)

    return check(path)


def add_parser(sub: Any) -> None:
    c = sub.add_parser("mount", aliases=["view"], help="mount a Nydus image until Ctrl-C / SIGTERM")
    c.add_argument("--target", required=True, metavar="REF", help="the Nydus image")
    c.add_argument("--target-insecure", action="store_true", help="skip TLS checks / allow plain HTTP")
    c.add_argument("--target-auth", metavar="USER:PASSWORD", help="credentials (default: docker config)")
    c.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registry")
    c.add_argument("--mount-path", default="./image-fs", metavar="DIR", help="where to mount (default ./image-fs)")
    c.add_argument("--prefetch", action="store_true", help="prefetch the whole image's data in the background")
    c.add_argument("--platform", metavar="OS/ARCH", help="accepted; the daemon picks this machine's platform")
    c.add_argument("--work-dir", metavar="DIR", help="blob cache and daemon files (default: $TMPDIR; removed)")
    c.add_argument("-v", "--verbose", action="store_true", help="daemon log at info level")
    c.set_defaults(run=cmd_mount)


def daemon_config(ref_host: str, repo: str, a: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    """The nydusd v1 config of the mount: registry backend at the image, blob cache in the work dir."""
    backend: dict[str, Any] = {"host": ref_host, "repo": repo, "scheme": "http" if a.plain_http else "https",
                               "skip_verify": bool(a.target_insecure), "timeout": 30, "connect_timeout": 10}
    if a.target_auth:
        backend["auth"] = normalize_auth(a.target_auth)
    cfg: dict[str, Any] = {
        "device": {"backend": {"type": "registry", "config": backend},
                   "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}},
        "mode": "direct", "digest_validate": True, "enable_xattr": True,
    }
    if a.prefetch:
        cfg["fs_prefetch"] = {"enable": True, "prefetch_all": True, "threads_count": 4}
    return cfg


def cmd_mount(a: argparse.Namespace) -> int:
    if a.platform:
        print(f"nydusify-py: warning: --platform {a.platform} is not passed on; the daemon mounts this machine's "
              "platform of an index", file=sys.stderr)
    ref = parse_reference(a.target)
    _resolve(ref, a)  # a missing image or an unreachable registry: one clear line before any mount
    mnt = os.path.abspath(a.mount_path)
    os.makedirs(mnt, exist_ok=True)
    if is_mountpoint(mnt):
        raise ConvertError(f"{mnt} is already a mount point")
    if a.work_dir:
        os.makedirs(a.work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="nydusify-mount-", dir=a.work_dir)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    proc: subprocess.Popen[bytes] | None = None
    log_path = os.path.join(work, "nydusd.log")
    try:
        cfg_path = os.path.join(work, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(daemon_config(ref.host, ref.repository, a, os.path.join(work, "cache")), f)
        argv = [sys.executable, "-m", "nydus_py.cli.daemon", "fuse", "--mountpoint", mnt, "--image", str(ref),
                "--config", cfg_path, "--log-level", "info" if a.verbose else "warn"]
        with open(log_path, "ab") as log:
            # the child must not inherit the blocked signals: it handles SIGTERM itself
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask))
        if not _wait_mounted(proc, mnt):
            raise ConvertError(f"mounting {ref} failed: {_tail(log_path)}")
        print(f"mounted {ref} at {mnt}; send SIGINT (Ctrl-C) or SIGTERM to unmount", flush=True)
        while True:
            sig = signal.sigwait(_SIGNALS)
            if sig == signal.SIGCHLD:
                if proc.poll() is None:
                    continue
                raise ConvertError(f"the daemon exited with {proc.returncode}: {_tail(log_path)}")
            break
        return _stop(proc, mnt, log_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if is_mountpoint(mnt):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        shutil.rmtree(work, ignore_errors=True)


def _resolve(ref: ImageRef, a: argparse.Namespace) -> None:
    """The image must be a Nydus image the registry has (the daemon would find out too, but
    later and with less to say)."""
    ep = Endpoint("target", ref, a.target_insecure, a.plain_http, a.target_auth)

    async def run() -> None:
        client = RegistryClient(endpoint_config(ep, None))
        await client.start()
        try:
            await resolve_nydus(client, ref)
        except OSError as e:
            raise transport_error(ep, e) from None
        finally:
            await client.close()

    asyncio.run(run())


def _wait_mounted(proc: subprocess.Popen[bytes], mnt: str) -> bool:
    """Until the FUSE mount appears or the daemon exits: SIGCHLD (blocked, so not lost) wakes
    us for the exit; the mount itself has no event to wait on, so it is looked at between
    short timed waits, until MOUNT_TIMEOUT."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if is_mountpoint(mnt):
            return True
        if proc.poll() is not None:
            return False
        got = signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        if got is not None and proc.poll() is not None:
            return is_mountpoint(mnt)
    return False


def _stop(proc: subprocess.Popen[bytes], mnt: str, log_path: str) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise ConvertError(f"the daemon did not stop within {STOP_TIMEOUT:.0f}s; killed") from None
    if is_mountpoint(mnt):
        raise ConvertError(f"{mnt} is still mounted after the daemon exited")
    if rc != 0:
        raise ConvertError(f"the daemon exited with {rc}: {_tail(log_path)}")
    print(f"unmounted {mnt}", flush=True)
    return 0


def _tail(path: str, n: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "(no daemon log)"
    return " | ".join(lines[-n:]) or "(empty daemon log)"
