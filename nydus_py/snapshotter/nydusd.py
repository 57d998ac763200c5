"""The snapshotter's one shared `nydusd-py fuse` daemon (NYDUSD-CONTRACT.md 3.5 B).

Layout under the snapshotter root: `mnt/` (the FUSE root; image `/<sid>` appears as `mnt/<sid>`),
`nydusd/api.sock`, `nydusd/nydusd.pid`, `nydusd/nydusd.log`, and `cache/` (the blob cache shared
by every image, where the daemon also keeps the bootstraps it fetched).

The daemon is started on first need, as `<nydusd> fuse --mountpoint ROOT/mnt --apisock SOCK
<extra args>` in its own session (a snapshotter restart does not kill it). A daemon that
answers on the socket is adopted; one that died is cleaned up (lazy unmount of the dead FUSE
root, socket removed) and started again, and images are mounted again on demand.

Each image is mounted by reference: `POST /api/v1/mount?mountpoint=/<sid>` with source
`docker://REGISTRY/REPO@DIGEST` and a v1 config whose registry backend carries the credentials
found on this host (`IMAGE_PULL_AUTH`, else docker `config.json`): containerd never passes them.
Registries listed as insecure (and loopback ones, as Docker does) skip certificate checks and
fall back to plain HTTP.

With `fs_driver = "erofs"` (see `fsdriver`) the same call carries `"fs_driver": "erofs"` in the
config and, as its mountpoint, the host directory `ROOT/erofs/<sid>`, where the daemon has the
kernel's EROFS driver mount the image (a kernel mount cannot live inside our FUSE root); that
directory is the image's lower dir. EROFS mounts left by a daemon that died are detached before
a new daemon starts.

When a daemon dies (`recover_policy`, watched through a pidfd like upstream watches its API
socket): `none` leaves it dead until the next mount needs one; `restart` starts a new one and
mounts every image again (readers of the old mount see ENOTCONN, new opens work); `failover`
has the daemon run with `--supervisor`, keeps its state and /dev/fuse fd (`supervisor`) after
every start, mount and umount, and hands both to a new daemon, which serves the same mount:
readers never see an error. EROFS mounts cannot be handed over, so with `fs_driver = "erofs"`
failover is restart (logged). A failed failover falls back to restart (logged, counted).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api.client import ApiCallError, ApiClient
from ..config import CACHE_TYPES
from ..convert.errors import ConvertError
from ..convert.reference import ImageRef, is_loopback, parse_reference
from ..storage.registry.auth import resolve_credentials
from ..transport.mount import MNT_DETACH, fuse_umount, is_mountpoint, sys_umount
from .errors import Unavailable
from .mirrors import Mirror, select_mirror
from .pinning import pin_reference
from .supervisor import Supervisor, SupervisorError

log = logging.getLogger(__name__)

DEFAULT_ARGS = ("--thread-num", "4", "--log-level", "info")
BACKGROUND_RATE = 16 << 20  # bytes/s of the default config's background completion (fs_prefetch.prefetch_all)


def default_command() -> list[str]:
    """`nydusd-py` from PATH, else this interpreter running the daemon module."""
    found = shutil.which("nydusd-py")
    return [found] if found else [sys.executable, "-m", "nydus_py.cli.daemon"]


@dataclass
class DaemonSettings:
    command: list[str] = field(default_factory=default_command)
    args: list[str] = field(default_factory=lambda: list(DEFAULT_ARGS))
    insecure_registries: tuple[str, ...] = ()
    config_template: dict[str, Any] | None = None  # a v1 nydusd config (NYDUSD-CONTRACT.md 2.5)
    docker_config_paths: list[str] | None = None  # None: $DOCKER_CONFIG, ~/.docker
    env: Mapping[str, str] | None = None  # where IMAGE_PULL_AUTH is looked up (os.environ)
    start_timeout: float = 30.0
    mount_timeout: float = 600.0
    fs_driver: str = "fusedev"  # "fusedev" | "erofs" (`auto` is resolved before: fsdriver.resolve_fs_driver)
    skip_ssl_verify: bool = False  # every registry is insecure ([remote] skip_ssl_verify)
    cache_dir: str = ""  # the blob cache ([cache_manager] cache_dir); "": ROOT/cache
    recover_policy: str = "none"  # "none" | "restart" | "failover" (main passes the config's, default restart)
    failover_policy: str = "resend"  # the daemon's --failover-policy
    on_mount: Callable[[float], None] | None = None  # seconds of each image mount (metrics)
    credential_provider: Callable[[str], str | None] | None = None  # REGISTRY/REPO -> base64 user:pass (kubelet)
    mirrors_dir: str = ""  # [remote.mirrors_config] dir: certs.d-style hosts.toml files (mirrors.py)


def load_template(path: str) -> dict[str, Any]:
    """A v1 JSON nydusd config used as the template of every image's config."""
    with open(path, "rb") as f:
        text = f.read(1 << 20)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON nydusd config: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    backend = doc.get("device", {}).get("backend", {}) if isinstance(doc.get("device"), dict) else {}
    if backend and backend.get("type", "registry") != "registry":
        raise ValueError(f"{path}: device.backend.type must be registry, got {backend.get('type')!r}")
    return doc


class SharedDaemon:
    def __init__(self, root: str, settings: DaemonSettings | None = None, daemon_id: str = "shared",
                 directory: str = "", mnt: str = "") -> None:
        self.root = os.path.abspath(root)
        self.settings = settings or DaemonSettings()
        self.id = daemon_id
        self.dir = directory or os.path.join(self.root, "nydusd")
        self.mnt = mnt or os.path.join(self.root, "mnt")
        self.cache = os.path.abspath(self.settings.cache_dir) if self.settings.cache_dir else \
            os.path.join(self.root, "cache")
        self.erofs_dir = os.path.join(self.root, "erofs")  # fs_driver erofs: ROOT/erofs/<sid>
        self.sock = os.path.join(self.dir, "api.sock")
        self.pid_file = os.path.join(self.dir, "nydusd.pid")
        self.log_path = os.path.join(self.dir, "nydusd.log")
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._mounted: set[str] = set()
        self._sources: dict[str, str] = {}  # sid -> the image mounted there (remounted after a restart)
        self._api: ApiClient | None = None
        self._gen = 0  # bumped at each start and stop: a watcher of an older process does nothing
        self.policy = self.settings.recover_policy
        if self.policy == "failover" and self.erofs:
            log.warning("recover_policy failover: EROFS mounts cannot be handed over to a new daemon; "
                        "a daemon that dies is restarted instead")
            self.policy = "restart"
        self.supervisor = Supervisor(os.path.join(self.dir, "supervisor.sock")) if self.policy == "failover" else None
        self.recoveries: Counter[str] = Counter()  # "restart", "failover", "failed" (metrics)
        self.recovered = threading.Condition(self._lock)  # notified after each recovery attempt

    # -- process -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._pid

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        if self._pid is None:  # adopted without a pid file: ask the daemon
            return self._api is not None and self._state() == "RUNNING"
        try:
            os.kill(self._pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _state(self, timeout: float = 2.0) -> str | None:
        """The daemon's state over the API socket, or None when nothing answers."""
        if not os.path.exists(self.sock):
            return None
        api = ApiClient(self.sock, timeout=timeout)
        try:
            info = api.call("GET", "/api/v1/daemon")
        except (OSError, ApiCallError, ValueError):
            return None
        finally:
            api.close()
        return info.get("state") if isinstance(info, dict) else None

    def ensure_running(self) -> None:
        with self._lock:
            if self._alive() and self._api is not None:
                return
            if self._pid is not None and self.policy != "none":
                self._recover()  # died before its watcher noticed
                if self._alive() and self._api is not None:
                    return
            self._close_api()
            self._mounted.clear()
            if self._adopt():
                return
            self._clear_leftovers()
            self._start()

    def _adopt(self) -> bool:
        """A daemon from an earlier snapshotter run that still answers: use it."""
        if self._state() != "RUNNING":
            return False
        pid = None
        with contextlib.suppress(OSError, ValueError), open(self.pid_file) as f:
            pid = int(f.read().strip())
        self._proc, self._pid = None, pid
        self._api = ApiClient(self.sock, timeout=self.settings.mount_timeout)
        with contextlib.suppress(OSError, ApiCallError, ValueError):
            info = self._api.call("GET", "/api/v1/daemon")
            self._mounted = self._adopted_mounts(info.get("backend_collection") or {})
        log.info("adopted running nydusd-py (pid %s) on %s, %d images mounted", pid, self.sock, len(self._mounted))
        self._running(pid)
        return True

    def _adopted_mounts(self, collection: Mapping[str, Any]) -> set[str]:
        """The snapshot ids an adopted daemon already serves (its mountpoints are `/<sid>`)."""
        if self.erofs:
            return {os.path.basename(m) for m in collection if os.path.dirname(m) == self.erofs_dir}
        return {m.lstrip("/") for m in collection if m.startswith("/") and "/" not in m[1:]}

    def _running(self, pid: int | None) -> None:
        """A daemon is RUNNING: save its state for failover and watch for its death."""
        self._gen += 1
        self._save_state()
        if pid is not None and self.policy != "none":
            threading.Thread(target=self._watch, args=(pid, self._gen), name=f"watch-{self.id}", daemon=True).start()
        elif self.policy != "none":
            log.warning("nydusd-py %s: no pid known, its death will be noticed at the next mount only", self.id)

    def _save_state(self) -> None:
        if self.supervisor is None or self._api is None:
            return
        api = self._api
        try:
            self.supervisor.save(lambda: api.call("PUT", "/api/v1/daemon/fuse/sendfd"))
        except (SupervisorError, OSError, ApiCallError) as e:
            self.recoveries["save_failed"] += 1
            log.error("nydusd-py %s: cannot save its state for failover: %s", self.id, e)

    def _watch(self, pid: int, gen: int) -> None:
        """Wait for `pid` to exit (a pidfd, so an adopted daemon works too), then recover."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = -1
        if fd >= 0:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                while not poller.poll(500):
                    if self._gen != gen:
                        return  # stopped or replaced
            finally:
                os.close(fd)
        with self._lock:
            if self._gen != gen:
                return
            self._recover()

    def _recover(self) -> None:
        """The daemon died: restart it, or fail over to a new one (recover_policy)."""
        pid = self._pid
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)  # reap
        self._close_api()
        self._proc = self._pid = None
        self._gen += 1
        log.warning("nydusd-py %s (pid %s) died; recover_policy %s", self.id, pid, self.policy)
        try:
            if self.policy == "failover" and self.supervisor is not None and self.supervisor.has_state:
                try:
                    self._takeover()
                    self.recoveries["failover"] += 1
                    log.warning("nydusd-py %s: failed over to pid %s, mounts kept", self.id, self._pid)
                    return
                except Unavailable as e:
                    self.recoveries["failover_failed"] += 1
                    log.error("nydusd-py %s: failover failed (%s); restarting instead", self.id, e)
                    self._kill_current()
                    self.supervisor.close()
            self._mounted.clear()
            self._clear_leftovers()
            self._start()
            self._remount_all()
            self.recoveries["restart"] += 1
            log.warning("nydusd-py %s: restarted as pid %s", self.id, self._pid)
        except Unavailable as e:
            self.recoveries["failed"] += 1
            log.error("nydusd-py %s: cannot recover: %s", self.id, e)
        finally:
            self.recovered.notify_all()

    def _kill_current(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = self._pid = None
        self._close_api()

    def _remount_all(self) -> None:
        for sid, source in sorted(self._sources.items()):
            try:
                self.mount(sid, source)
            except Unavailable as e:
                log.error("remount of /%s (%s) after a restart failed: %s", sid, source, e)

    def _takeover(self) -> None:
        """Start a daemon with the same arguments; it finds its predecessor crashed, waits in INIT
        and gets the state and /dev/fuse fd from the supervisor (upstream doDaemonFailover)."""
        assert self.supervisor is not None
        join = self.supervisor.serve_restore()
        proc = self._spawn()
        api = ApiClient(self.sock, timeout=self.settings.mount_timeout)
        try:
            self._wait_state(proc, "INIT")
            api.call("PUT", "/api/v1/daemon/fuse/takeover")
            join()
            self._wait_state(proc, "READY")
            api.call("PUT", "/api/v1/daemon/start")
            self._wait_state(proc, "RUNNING")
        except (OSError, ApiCallError, SupervisorError) as e:
            api.close()
            raise Unavailable(f"takeover by pid {proc.pid}: {e}") from None
        self._api = api
        self._running(proc.pid)

    def _wait_state(self, proc: subprocess.Popen[bytes], state: str) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        while self._state() != state:
            if proc.poll() is not None:
                raise Unavailable(f"nydusd-py exited with status {proc.returncode}: {self.log_tail(300)}")
            if time.monotonic() > deadline:
                raise Unavailable(f"nydusd-py did not reach {state} within {self.settings.start_timeout:.0f}s")
            time.sleep(0.05)

    def _clear_leftovers(self) -> None:
        if is_mountpoint(self.mnt):  # first: a dead FUSE root fails every stat with ENOTCONN
            log.warning("unmounting the dead FUSE root %s", self.mnt)
            with contextlib.suppress(OSError):
                fuse_umount(self.mnt, lazy=True)
        self._detach_stale_erofs()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(self.mnt, mode=0o755, exist_ok=True)
        os.makedirs(self.cache, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)

    def _detach_stale_erofs(self) -> None:
        """EROFS mounts of a daemon that is gone: their blob views died with it (reads fail)."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self.erofs_dir) as it:
            for e in it:
                if is_mountpoint(e.path):
                    log.warning("detaching the EROFS mount %s of a daemon that is gone", e.path)
                    try:
                        sys_umount(e.path, MNT_DETACH)
                    except OSError as err:
                        log.error("cannot detach %s: %s", e.path, err)

    @property
    def erofs(self) -> bool:
        return self.settings.fs_driver == "erofs"

    def api_mountpoint(self, sid: str) -> str:
        """The `mountpoint` of the mount calls: `/<sid>` in the FUSE root, or with fs_driver
        erofs the host directory the kernel mounts the image at."""
        return self.mount_dir(sid) if self.erofs else f"/{sid}"

    def argv(self) -> list[str]:
        argv = [*self.settings.command, "fuse", "--mountpoint", self.mnt, "--apisock", self.sock,
                *self.settings.args]
        if self.supervisor is not None:
            argv += ["--id", self.id, "--supervisor", self.supervisor.path,
                     "--failover-policy", self.settings.failover_policy]
        if "--log-rotation-size" in self.settings.args:  # rotation needs the daemon to own its log file
            argv += ["--log-file", self.log_path]
        return argv

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = self.argv()
        log.info("starting %s", " ".join(argv))
        with open(self.log_path, "ab") as out:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True)
            except FileNotFoundError:
                raise Unavailable(f"nydusd not found: {argv[0]} does not exist; set [daemon] nydusd_path "
                                  "(or --nydusd-path) to nydusd-py") from None
            except OSError as e:
                raise Unavailable(f"cannot run {argv[0]}: {e.strerror or e}") from None
        self._proc, self._pid = proc, proc.pid
        with open(self.pid_file, "w") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def _start(self) -> None:
        proc = self._spawn()
        deadline = time.monotonic() + self.settings.start_timeout
        while True:
            if proc.poll() is not None:
                self._proc = self._pid = None
                raise Unavailable(f"nydusd-py exited with status {proc.returncode} at start-up: {self.log_tail()}")
            if is_mountpoint(self.mnt) and self._state() == "RUNNING":
                break
            if time.monotonic() > deadline:
                self._stop_proc(proc)
                raise Unavailable(f"nydusd-py did not become RUNNING within {self.settings.start_timeout:.0f}s: "
                                  f"{self.log_tail()}")
            time.sleep(0.05)
        self._api = ApiClient(self.sock, timeout=self.settings.mount_timeout)
        log.info("nydusd-py pid %d RUNNING, FUSE root %s", proc.pid, self.mnt)
        self._running(proc.pid)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - n))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return "(no log)"

    def _close_api(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    @staticmethod
    def _stop_proc(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the daemon (started or adopted), wait, then make sure the FUSE root is gone."""
        with self._lock:
            self._gen += 1
            self._close_api()
            self._mounted.clear()
            if self._proc is not None:
                self._stop_proc(self._proc, timeout)
            elif self._pid is not None and self._alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while self._alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self._alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self._pid, signal.SIGKILL)
            self._proc = self._pid = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_file)
            if self.supervisor is not None:
                self.supervisor.close()
            if is_mountpoint(self.mnt):
                with contextlib.suppress(OSError):
                    fuse_umount(self.mnt, lazy=True)

    # -- images --------------------------------------------------------------------------------
    def mount_dir(self, sid: str) -> str:
        return os.path.join(self.erofs_dir if self.erofs else self.mnt, sid)

    def is_mounted(self, sid: str) -> bool:
        with self._lock:
            return sid in self._mounted and self._alive()

    def select_mirror(self, ref: ImageRef) -> Mirror | None:
        """The mirror to fetch `ref` through ([remote.mirrors_config] dir), chosen at each mount."""
        return select_mirror(self.settings.mirrors_dir, ref.host) if self.settings.mirrors_dir else None

    @staticmethod
    def mount_source(image_ref: str, ref: ImageRef, mirror: Mirror | None) -> str:
        """The daemon takes the backend host from the source reference: a mirror goes there."""
        if mirror is None:
            return image_ref
        return "docker://" + str(ImageRef(mirror.host, ref.repository, ref.tag, ref.digest))

    def image_config(self, ref: ImageRef, sid: str, mirror: Mirror | None = None) -> dict[str, Any]:
        """The v1 config sent with the mount: the template (if any) with this image's registry,
        credentials, scheme, the shared blob cache and `device.id = /<sid>`."""
        cfg: dict[str, Any] = copy.deepcopy(self.settings.config_template) if self.settings.config_template else {
            "mode": "direct", "digest_validate": False, "enable_xattr": True,
            # background completion: after the image's prefetch hints, every file, at a capped
            # rate and behind on-demand reads (the daemon alone leaves it off)
            "fs_prefetch": {"enable": True, "prefetch_all": True, "threads_count": 4,
                            "bandwidth_rate": BACKGROUND_RATE}}
        device: dict[str, Any] = cfg.setdefault("device", {})
        device["id"] = f"/{sid}"
        backend: dict[str, Any] = device.setdefault("backend", {})
        backend["type"] = "registry"
        conf: dict[str, Any] = backend.setdefault("config", {})
        conf.update(host=ref.host, repo=ref.repository)
        if mirror is not None:
            conf.update(host=mirror.host, scheme=mirror.scheme)
            log.info("image %s through mirror %s://%s", ref, mirror.scheme, mirror.host)
        conf.setdefault("timeout", 30)
        conf.setdefault("connect_timeout", 10)
        if ref.host in self.settings.insecure_registries or ref.registry in self.settings.insecure_registries \
                or is_loopback(ref.host) or self.settings.skip_ssl_verify:
            conf["skip_verify"] = True
            conf.setdefault("scheme", "https")  # the client falls back to http:// when TLS fails
        try:
            auth = resolve_credentials(ref.host, conf.get("auth") or None, self.settings.env,
                                       self.settings.docker_config_paths)
        except ValueError as e:
            raise Unavailable(f"credentials for {ref.host}: {e}") from None
        if not auth and self.settings.credential_provider is not None:
            auth = self.settings.credential_provider(f"{ref.registry}/{ref.repository}")
        if auth:
            conf["auth"] = auth
        cache: dict[str, Any] = device.setdefault("cache", {"type": "blobcache"})
        cache.setdefault("type", "blobcache")
        cache.setdefault("config", {}).setdefault("work_dir", self.cache)
        cfg.pop("fs_driver", None)  # the snapshotter's setting wins over the template's
        if self.erofs:
            cfg["fs_driver"] = "erofs"
        return cfg

    def pin(self, image_ref: str) -> str:
        """`image_ref` by digest: a tag is resolved now, with this image's registry settings and
        credentials, so every later mount (restart, recovery) serves this very image."""
        try:
            ref = parse_reference(image_ref)
        except ConvertError as e:
            raise Unavailable(f"image reference {image_ref!r}: {e}") from None
        if ref.digest:
            return image_ref
        backend = self.image_config(ref, "pin", self.select_mirror(ref))["device"]["backend"]["config"]
        return pin_reference(ref, backend, self.settings.mount_timeout)

    def handoff(self, sid: str, image_ref: str, layer_digest: str) -> tuple[str, str]:
        """(bootstrap file, JSON config) for another daemon to mount image `/<sid>` (Kata's, from
        the extraoption): the bootstrap this daemon fetched into the blob cache as
        `<layer digest hex>.image.boot` and the config it mounted the image with (same registry,
        credentials and cache; without fs_driver: the other daemon serves it over virtio-fs)."""
        try:
            ref = parse_reference(image_ref)
        except ConvertError as e:
            raise Unavailable(f"image reference {image_ref!r}: {e}") from None
        cfg = self.image_config(ref, sid, self.select_mirror(ref))
        cfg.pop("fs_driver", None)
        cache = cfg["device"]["cache"]
        work_dir = cache.get("config", {}).get("work_dir", "") if cache.get("type") in CACHE_TYPES else ""
        if not work_dir:
            raise Unavailable(f"image {image_ref}: the nydusd config has no blob cache, so its bootstrap is not kept "
                              "on this host for Kata; remove device.cache from nydusd_config or make it a blobcache")
        algo, _, hexdigest = layer_digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise Unavailable(f"image {image_ref}: the snapshot labels give no bootstrap layer digest "
                              f"({layer_digest!r}), so its bootstrap cannot be handed to Kata")
        path = os.path.join(work_dir, f"{hexdigest}.image.boot")
        if not os.path.isfile(path):
            raise Unavailable(f"image {image_ref}: its bootstrap is not at {path} (was the cache cleaned under a "
                              "mounted image?); remove and pull the image again")
        return path, json.dumps(cfg)

    def mount(self, sid: str, image_ref: str) -> None:
        with self._lock:
            if sid in self._mounted and self._alive():
                return
            self.ensure_running()
            try:
                ref = parse_reference(image_ref)
            except ConvertError as e:
                raise Unavailable(f"image reference {image_ref!r}: {e}") from None
            mirror = self.select_mirror(ref)
            body = {"fs_type": "rafs", "source": self.mount_source(image_ref, ref, mirror),
                    "config": json.dumps(self.image_config(ref, sid, mirror))}
            if self.erofs:
                os.makedirs(self.mount_dir(sid), mode=0o755, exist_ok=True)
            assert self._api is not None
            t0 = time.monotonic()
            try:
                self._api.call("POST", "/api/v1/mount", {"mountpoint": self.api_mountpoint(sid)}, body)
            except ApiCallError as e:
                msg = e.body.get("message", e.body) if isinstance(e.body, dict) else e.body
                raise Unavailable(f"nydusd-py could not mount {image_ref}: {msg}") from None
            except OSError as e:
                self._close_api()
                raise Unavailable(f"nydusd-py API {self.sock}: {e}") from None
            self.observe_mount(time.monotonic() - t0)
            self._mounted.add(sid)
            self._sources[sid] = image_ref
            self._save_state()

    def observe_mount(self, seconds: float) -> None:
        if self.settings.on_mount is not None:
            self.settings.on_mount(seconds)

    def stats(self) -> dict[str, Any]:
        """For the snapshotter's metrics: running daemons, mounted images, recoveries."""
        with self._lock:
            up = self._api is not None and self._alive()
            return {"daemons": int(up), "mounts": len(self._mounted) if up else 0, "recoveries": dict(self.recoveries)}

    def umount(self, sid: str) -> None:
        with self._lock:
            self._mounted.discard(sid)
            self._sources.pop(sid, None)
            if self._api is None or not self._alive():
                return
            try:
                self._api.call("DELETE", "/api/v1/mount", {"mountpoint": self.api_mountpoint(sid)})
            except ApiCallError as e:
                if e.status != 404:
                    log.warning("umount /%s: %s", sid, e)
            except OSError as e:
                self._close_api()
                log.warning("umount /%s: %s", sid, e)
            if self.erofs:
                with contextlib.suppress(OSError):
                    os.rmdir(self.mount_dir(sid))  # (not when still mounted: EBUSY)
            self._save_state()

    def metrics(self, kind: str, sid: str) -> Any:
        """`GET /api/v1/metrics[/kind]?id=/<sid>` (kind "" for the filesystem counters)."""
        with self._lock:
            self.ensure_running()
            assert self._api is not None
            path = "/api/v1/metrics" + (f"/{kind}" if kind else "")
            return self._api.call("GET", path, {"id": f"/{sid}"})
