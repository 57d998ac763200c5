"""The daemon: state machine, VFS with its mounted instances, FUSE/virtio-fs transport, metrics.

`DaemonService` is the one implementation behind the HTTP API and the gRPC API: every endpoint is
a method here that returns plain JSON-able data (or None for "204, no body") and raises
`daemon.errors.ApiError` subclasses, which both front-ends turn into the same status and
`{code, message}` body. Methods that mount, unmount or change state serialise on one lock (nydusd
handles one API request at a time); they block, so the HTTP front-end runs them in an executor.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ParsedConfig
from ..fuse.protocol import FuseSession, notify_resend
from ..metrics.fsstats import FsStats, FuseMetrics
from ..transport.base import Transport
from ..transport.fusedev import DEFAULT_POLL_US, FuseDevSession
from ..transport.mount import connection_of, real_mountpoint
from ..vfs import INO_MASK, INO_SHIFT, MAX_INDEX, Vfs, VfsError, normalize_path
from . import supervisor
from .errors import ApiError, BadRequest, Conflict, InternalError, NotFound, NotReady, Timeout, Unsupported
from .heap import trim_heap
from .instance import Instance, MountCmd, create_instance, fs_driver_of, restore_erofs
from .logsetup import EventRing, set_level
from .state import DaemonState, Event, StateMachine
from .version import build_info

if TYPE_CHECKING:  # (imported where used: only --io-uring daemons load the ring code)
    from ..transport.fuse_uring import FuseUringSession

log = logging.getLogger("nydusd-py")

OVERRIDE_KEYS = ("registry_auth", "proxy_url", "dragonfly_scheduler_endpoint")
STATE_FORMAT = "nydus_py/takeover/1"  # the fd handed over is /dev/fuse itself
# With EROFS mounts: the fd is a bundle (supervisor.bundle_fds) of /dev/fuse and the blob-view
# fds, and the state says which is which ("fuse_fd", each "erofs" entry's "fd"). A daemon that
# only knows /1 refuses it instead of mistaking the bundle for /dev/fuse.
STATE_FORMAT_BUNDLE = "nydus_py/takeover/2"


DEFAULT_WARM_KB = 128


@dataclass
class DaemonOptions:
    mode: str = "fuse"  # fuse | virtiofs
    mountpoint: str = ""
    threads: int = 4
    apisock: str | None = None
    id: str | None = None
    supervisor: str | None = None
    failover_policy: str = "resend"
    upgrade: bool = False
    debug: bool = False
    # seconds a mount may take to build its instance (bootstrap, backend, cache); past it the
    # mount answers 504 and whatever it builds later is closed
    mount_timeout: float = 120.0
    # --fuse-poll-us: how long a /dev/fuse worker may poll for the next request (transport/fusedev)
    fuse_poll_us: int = DEFAULT_POLL_US
    # --fuse-warm-kb: a /dev/fuse LOOKUP of a regular file up to this size decodes its data right
    # after the reply, for the READ that likely follows, and a listing's end decodes the next
    # directory of a depth-first walk (FuseSession.warm_max; 0: neither)
    fuse_warm_kb: int = DEFAULT_WARM_KB
    # FUSE over io_uring (--io-uring / "fuse_io_uring": true); falls back to /dev/fuse reads
    io_uring: bool = False
    # --case-insensitive: every mount of this daemon gets case-insensitive LOOKUP (fs.casefold)
    case_insensitive: bool = False
    # seconds between the idle trimmer's rounds: a mount no request reached during a whole round
    # gives back its bootstrap's mapped pages (Instance.trim); 0 = never
    trim_interval: float = 10.0


def _strip_id(value: str) -> str:
    return value.strip("/")


class DaemonService:
    def __init__(self, opts: DaemonOptions, events: EventRing | None = None) -> None:
        self.opts = opts
        self.events = events or EventRing()
        self.sm = StateMachine(on_change=self._on_state)
        self.vfs = Vfs()
        if opts.mode == "virtiofs":  # a writable passthrough may be mounted beside the images
            from ..fs.writable_vfs import WritableVfs

            self.vfs = WritableVfs()
        self.session = FuseSession(self.vfs, debug=opts.debug)
        self.metrics = FuseMetrics(self._route)
        self.session.set_observer(self.metrics)
        self.instances: dict[str, Instance] = {}
        self._by_index: list[Instance | None] = [None] * (MAX_INDEX + 1)
        self._lock = threading.RLock()
        self._building: set[str] = set()  # mountpoints whose instance is being built
        self.mount_timeouts = 0
        self.transport: Transport | None = None  # FuseDevSession (fusedev) or the vhost-user server
        self.fuse_fd = -1  # the /dev/fuse fd (fusedev), also when taken over and not yet started
        self._replay_pending = False  # taken over: apply the failover policy at start
        self.handing_over = False  # PUT /daemon/exit: a successor takes over what was sent
        self.overrides: dict[str, dict[str, str]] = {}
        self.default_config: ParsedConfig | None = None
        self.started_at = time.time()
        # set when the process should end: (exit code, unmount first)
        self.exit_request: tuple[int, bool] | None = None
        self.exit_event = threading.Event()
        self.on_exit: Callable[[], None] | None = None
        self._trimmer: threading.Thread | None = None  # started with the first mount
        self.trims = 0  # mounts trimmed by the idle trimmer

    # -- plumbing -------------------------------------------------------------------------------
    def _on_state(self, old: DaemonState, new: DaemonState, event: Event) -> None:
        log.info("state %s --%s--> %s", old.value, event.value, new.value)

    def _route(self, nodeid: int) -> tuple[FsStats | None, int]:
        # (Vfs.split, inline: on every request)
        inst = self._by_index[nodeid >> INO_SHIFT]
        if inst is None:
            return None, nodeid
        return inst.stats, nodeid & INO_MASK

    @property
    def state(self) -> DaemonState:
        return self.sm.state

    def request_exit(self, code: int, unmount: bool) -> None:
        if self.exit_request is None:
            self.exit_request = (code, unmount)
        self.exit_event.set()
        if self.on_exit is not None:
            self.on_exit()

    # -- mounts ---------------------------------------------------------------------------------
    def normalize_mountpoint(self, mountpoint: str | None) -> str:
        if mountpoint is None or mountpoint == "":
            raise BadRequest("'mountpoint' should be specified in query string")
        try:
            return normalize_path(mountpoint)
        except VfsError as e:
            raise BadRequest(str(e)) from None

    def mount(self, mountpoint: str | None, cmd: MountCmd) -> None:
        """Mount `cmd` at `mountpoint` in the VFS; with fs_driver erofs the mountpoint is a host
        path where the kernel EROFS mount goes (the VFS is not involved)."""
        mp = self.normalize_mountpoint(mountpoint)
        cmd = self._with_daemon_options(cmd)
        kernel = fs_driver_of(cmd, self.default_config) == "erofs"
        with self._lock:
            if self.state == DaemonState.STOPPED:
                raise NotReady("the daemon is stopping")
            old = self.instances.get(mp)
            if old is not None:
                if old.cmd.to_json() == cmd.to_json():
                    log.info("mount %s: already mounted with the same source and config", mp)
                    return
                raise Conflict(f"{mp} is already mounted")
            self._check_mountable(mp, kernel)
            self._building.add(mp)  # reserved: the instance is built without the lock held
        try:
            inst = self._build(mp, cmd)
            with self._lock:
                if inst.erofs is not None:
                    self.instances[mp] = inst
                    self._start_trimmer()
                    log.info("mounted %s (%s) at %s with the kernel EROFS driver", cmd.source, cmd.fs_type,
                             inst.erofs.target)
                    return
                try:
                    inst.index = self.vfs.mount(mp, inst.fs)
                except VfsError as e:
                    inst.close()
                    raise (Conflict(str(e)) if e.errno in (errno.EEXIST, errno.EBUSY)
                           else BadRequest(str(e))) from None
                self.instances[mp] = inst
                self._by_index[inst.index] = inst
                self._start_trimmer()
        finally:
            with self._lock:
                self._building.discard(mp)
        log.info("mounted %s (%s) at %s, index %d", cmd.source, cmd.fs_type, mp, inst.index)

    def _start_trimmer(self) -> None:
        """(With the lock held.) One thread per daemon, from its first mount on."""
        if self._trimmer is None and self.opts.trim_interval > 0:
            self._trimmer = threading.Thread(target=self._trim_idle, name="trim", daemon=True)
            self._trimmer.start()

    def _trim_idle(self) -> None:
        """Each round, trim the mounts no request reached since the previous round (once per
        idle spell: a mount is trimmed again only after it was used)."""
        seen: dict[Instance, int] = {}
        trimmed: dict[Instance, int] = {}
        while not self.exit_event.wait(self.opts.trim_interval):
            with self._lock:
                live = list(self.instances.values())
            round_trims = 0
            for inst in live:
                n = inst.activity()
                try:
                    if seen.get(inst) == n and trimmed.get(inst) != n and inst.trim():
                        trimmed[inst] = n
                        round_trims += 1
                        log.debug("trimmed idle mount %s", inst.mountpoint)
                except Exception:  # (a mount closing meanwhile; the next round tries again)
                    log.exception("trimming %s failed", inst.mountpoint)
                seen[inst] = n
            if round_trims:  # what their requests left in the malloc heaps goes back too
                trim_heap()
                self.trims += round_trims
            for gone in set(seen) - set(live):
                seen.pop(gone, None)
                trimmed.pop(gone, None)

    def _check_mountable(self, mp: str, kernel: bool = False) -> None:
        """Refuse before building anything what the VFS would refuse (no half-made instances).
        A kernel (EROFS) mount only needs its host path to be free of our own mounts."""
        if mp in self._building:
            raise Conflict(f"a mount at {mp} is in progress")
        if kernel:
            return
        vfs_mounts = [m for m, i in self.instances.items() if i.erofs is None]
        for other in (*vfs_mounts, *self._building):
            if other == "/" or mp == "/" or mp.startswith(other + "/") or other.startswith(mp + "/"):
                raise Conflict(f"cannot mount {mp}: it overlaps the mount at {other}")

    def _build(self, mp: str, cmd: MountCmd) -> Instance:
        """`create_instance` in a thread of its own, within `mount_timeout`, so a slow backend or
        a hung source cannot hold up other mounts, umounts or the API thread. An instance that
        is finished after the deadline is closed, never mounted."""
        box: dict[str, Any] = {}
        done = threading.Event()
        lock = threading.Lock()

        def work() -> None:
            try:
                inst = create_instance(mp, cmd, self.default_config)
            except BaseException as e:  # handed to the caller (or logged when it gave up)
                with lock:
                    box["error"] = e
                    late = "late" in box
                if late:
                    log.warning("mount %s failed after its deadline: %s", mp, e)
                done.set()
                return
            with lock:
                box["inst"] = inst
                late = "late" in box
            if late:
                log.warning("mount %s finished after its deadline; discarding it", mp)
                inst.close()
            done.set()

        threading.Thread(target=work, name=f"mount {mp}", daemon=True).start()
        if not done.wait(self.opts.mount_timeout):
            with lock:
                if "inst" not in box and "error" not in box:
                    box["late"] = True
                    self.mount_timeouts += 1
                    log.error("mount %s (%s): not done after %.0f s; giving up", mp, cmd.source,
                              self.opts.mount_timeout)
                    raise Timeout(f"mount {mp}: not done after {self.opts.mount_timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        inst: Instance = box["inst"]
        return inst

    def _with_daemon_options(self, cmd: MountCmd) -> MountCmd:
        """`cmd` with what the daemon's command line turns on for every mount."""
        if self.opts.case_insensitive and not cmd.case_insensitive:
            return dataclasses.replace(cmd, case_insensitive=True)
        return cmd

    def remount(self, mountpoint: str | None, cmd: MountCmd) -> None:
        mp = self.normalize_mountpoint(mountpoint)
        cmd = self._with_daemon_options(cmd)
        with self._lock:
            if mp not in self.instances:
                raise NotFound(f"{mp} is not mounted")
            if self.instances[mp].erofs is not None or fs_driver_of(cmd, self.default_config) == "erofs":
                raise Unsupported("remount with fs_driver erofs is not supported; umount and mount again")
        inst = self._build(mp, cmd)
        with self._lock:
            old = self.instances.get(mp)
            if old is None:  # umounted meanwhile
                inst.close()
                raise NotFound(f"{mp} is not mounted")
            inst.index = old.index
            self.vfs.replace(mp, inst.fs)
            self.instances[mp] = inst
            self._by_index[inst.index] = inst
        old.close()
        log.info("remounted %s at %s", cmd.source, mp)

    def umount(self, mountpoint: str | None) -> None:
        mp = self.normalize_mountpoint(mountpoint)
        with self._lock:
            inst = self.instances.get(mp)
            if inst is None:
                raise NotFound(f"{mp} is not mounted")
            if inst.erofs is None:
                self.vfs.umount(mp)
            del self.instances[mp]
            if inst.index >= 0 and self._by_index[inst.index] is inst:
                self._by_index[inst.index] = None
        inst.close()
        log.info("umounted %s", mp)

    def close_all(self, kernel_only: bool = False) -> None:
        """Close every instance. `kernel_only` (the FUSE mount stays: a hand-over exit, or its
        session ended): the EROFS ones, except, at a hand-over (`exit`), those sent to the
        supervisor, left mounted for the successor."""
        with self._lock:
            for mp in sorted(self.instances, key=len, reverse=True):
                inst = self.instances[mp]
                if kernel_only and inst.erofs is None:
                    continue
                if kernel_only and self.handing_over and inst.erofs is not None and inst.erofs.handed_over:
                    log.info("%s: left mounted for the daemon that takes over", mp)
                    continue
                del self.instances[mp]
                if inst.erofs is None:
                    with contextlib.suppress(VfsError):
                        self.vfs.umount(mp, wait=2.0)
                    self._by_index[inst.index] = None
                try:
                    inst.close()
                except Exception:
                    log.exception("closing %s failed", mp)

    # -- daemon ---------------------------------------------------------------------------------
    # Read-only endpoints never take `_lock`: a mount or takeover holding it must not stall the
    # state polls (the dict copies below are atomic under the GIL).
    def daemon_info(self, v2: bool = False) -> dict[str, Any]:
        collection = None if v2 else {mp: i.collection_entry() for mp, i in sorted(self.instances.items())}
        return {"version": dict(build_info()), "id": self.opts.id, "supervisor": self.opts.supervisor,
                "state": self.state.value, "backend_collection": collection}

    def configure(self, body: Any) -> None:
        if not isinstance(body, dict) or "log_level" not in body:
            raise BadRequest("body must be {\"log_level\": <level>}")
        level = body["log_level"]
        try:
            set_level(level)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        log.warning("log level set to %s", level)

    def events_json(self) -> dict[str, Any]:
        return self.events.json()

    def backend_info(self, mountpoint: str | None) -> dict[str, Any]:
        mp = self.normalize_mountpoint(mountpoint)
        inst = self.instances.get(mp)
        if inst is None:
            raise NotFound(f"{mp} is not mounted")
        return inst.superblock()

    def start(self) -> None:
        """PUT /daemon/start: READY -> RUNNING (after a takeover: the failover policy, then
        serving the fds; here, not at takeover, so that it also covers the requests a hot
        upgrade's predecessor read before it exited)."""
        with self._lock:
            self.sm.peek(Event.START)
            replay, self._replay_pending = self._replay_pending, False
            if self.transport is None and self.fuse_fd >= 0:
                if replay:
                    self._failover_policy(self.fuse_fd)
                self._attach_transport(self.fuse_fd)
            for inst in self.instances.values():
                if inst.erofs is not None:
                    inst.erofs.resume(self._failover_policy if replay else None)
            if self.instances:  # (taken over: mounted without mount())
                self._start_trimmer()
            self.sm.fire(Event.START)

    def exit(self) -> None:
        """PUT /daemon/exit: stop without unmounting (the hand-over path), then the process ends."""
        with self._lock:
            if self.state == DaemonState.RUNNING:
                self.sm.fire(Event.STOP)
            if self.state == DaemonState.READY:
                self.sm.fire(Event.EXIT)
            elif self.state == DaemonState.INIT:
                self.sm.fire(Event.STOP)
            else:
                self.sm.peek(Event.EXIT)
            self.handing_over = True
        self.request_exit(0, unmount=False)

    def shutdown(self) -> None:
        """SIGTERM/SIGINT: stop, unmount (unless still in INIT), exit 0."""
        with self._lock:
            state = self.state
            if state == DaemonState.STOPPED:
                return
            if state == DaemonState.RUNNING:
                self.sm.fire(Event.STOP)
            self.sm.fire(Event.STOP)
        self.request_exit(0, unmount=state != DaemonState.INIT)

    # -- transports -----------------------------------------------------------------------------
    def _new_fusedev(self) -> FuseDevSession:
        self.session.warm_max = self.opts.fuse_warm_kb << 10
        return FuseDevSession(self.session.handle_vectored, self.opts.mountpoint, threads=self.opts.threads,
                              poll_us=self.opts.fuse_poll_us, read_waits=self.session.read_waits)

    def _attach_transport(self, fd: int) -> None:
        if self.opts.io_uring:  # the predecessor's INIT decided; its ring entries died with it
            log.warning("io_uring is not set up on a taken-over FUSE connection; serving /dev/fuse reads")
        t = self._new_fusedev()
        t.attach(fd)
        self.transport = t
        self._set_notifier(fd)

    def _set_notifier(self, fd: int) -> None:
        def notify(msg: bytes) -> None:
            os.write(fd, msg)

        self.vfs.notifier = notify

    def fuse_mount(self) -> None:
        """Mount the FUSE filesystem and start serving it (Mount -> READY, Start -> RUNNING)."""
        t: FuseDevSession | FuseUringSession = self._new_fusedev()
        if self.opts.io_uring:
            from ..transport.fuse_uring import FuseUringSession as Uring

            # no warming: a ring thread serves its queue on the requester's own CPU, where work
            # after the reply only delays the requester
            self.session.warm_max = 0
            t = Uring(self.session, self.opts.mountpoint, threads=self.opts.threads, poll_us=self.opts.fuse_poll_us,
                      read_waits=self.session.read_waits)
        t.mount()
        self.transport = t
        self.fuse_fd = t.fd
        self._set_notifier(t.fd)
        self.sm.fire(Event.MOUNT)
        self.sm.fire(Event.START)

    def transport_wait(self, timeout: float | None) -> bool:
        t = self.transport
        return t.wait(timeout) if t is not None else False

    # -- failover / upgrade -----------------------------------------------------------------------
    def _state_blob(self) -> tuple[bytes, list[int], list[Any]]:
        """(state, the fds to hand over, the EROFS serves in it). Without EROFS mounts: the
        /1 format and the /dev/fuse fd alone, as ever. The view fds are dups (the caller
        closes fds[1:] or all of them when there is no /dev/fuse), taken under the lock: an
        umount closes its fd after the lock, and a bare number could by then be another file."""
        fds: list[int] = [self.fuse_fd] if self.fuse_fd >= 0 else []
        with self._lock:
            mounts = [{"mountpoint": mp, "index": i.index, "cmd": i.cmd.to_json()}
                      for mp, i in sorted(self.instances.items()) if i.erofs is None]
            erofs, serves = [], []
            for mp, i in sorted(self.instances.items()):
                if i.erofs is None:
                    continue
                fd = i.erofs.view_fd
                if fd >= 0:
                    fd = os.dup(fd)
                erofs.append({"mountpoint": mp, "cmd": i.cmd.to_json(), "serve": i.erofs.handover_state(),
                              "fd": len(fds) if fd >= 0 else -1})
                serves.append(i.erofs)
                if fd >= 0:
                    fds.append(fd)
            state: dict[str, Any] = {
                "format": STATE_FORMAT, "mountpoint": self.opts.mountpoint, "mounts": mounts,
                "vfs": self.vfs.export_layout(), "fuse": self.session.export_state(),
                "default_config": self.default_config.v1 if self.default_config is not None else None}
            if serves:
                state.update({"format": STATE_FORMAT_BUNDLE, "fds": len(fds),
                              "fuse_fd": 0 if self.fuse_fd >= 0 else -1, "erofs": erofs})
        return json.dumps(state).encode(), fds, serves

    def sendfd(self) -> None:
        """PUT /daemon/fuse/sendfd: hand state + /dev/fuse fd (or, with EROFS mounts, the fd
        bundle that holds it and the blob-view fds) to the supervisor."""
        if self.opts.mode != "fuse":
            raise Unsupported("sendfd is only available for fusedev")
        if not self.opts.supervisor:
            raise Unsupported("the daemon was started without --supervisor")
        kernel = any(i.erofs is not None for i in list(self.instances.values()))
        if self.fuse_fd < 0 and not kernel:
            raise NotReady("the FUSE connection is not set up")
        # Always connect (the snapshotter blocks in accept() until we do), after FUSE INIT if
        # it comes within a few seconds.
        deadline = time.monotonic() + 5
        while self.fuse_fd >= 0 and not self.session.initialized and time.monotonic() < deadline:
            time.sleep(0.01)
        blob, fds, serves = self._state_blob()
        dups = fds[1 if self.fuse_fd >= 0 else 0:] if serves else []
        try:
            fd = supervisor.bundle_fds(fds) if serves else fds[0]
        except (OSError, ValueError) as e:
            raise InternalError(f"sendfd: {e}") from None
        finally:
            for dup in dups:
                os.close(dup)
        try:
            supervisor.send_state(self.opts.supervisor, fd, blob)
        except OSError as e:
            raise InternalError(f"sendfd to {self.opts.supervisor}: {e}") from None
        finally:
            if serves:
                os.close(fd)
        for serve in serves:
            serve.handed_over = True
        log.info("state and %s sent to supervisor %s", f"fd bundle ({len(fds)} fds)" if serves else "FUSE fd",
                 self.opts.supervisor)

    def takeover(self) -> None:
        """PUT /daemon/fuse/takeover (INIT only): receive state + fd, rebuild the mounts -> READY."""
        if self.opts.mode != "fuse":
            raise Unsupported("takeover is only available for fusedev")
        if not self.opts.supervisor:
            raise Unsupported("the daemon was started without --supervisor")
        with self._lock:
            self.sm.peek(Event.TAKEOVER)
            try:
                blob, fds = supervisor.recv_state(self.opts.supervisor)
            except OSError as e:
                raise InternalError(f"takeover from {self.opts.supervisor}: {e}") from None
            if not fds:
                raise InternalError("takeover: the supervisor sent no file descriptor")
            for extra in fds[1:]:
                os.close(extra)
            try:
                self.fuse_fd = self._restore(blob, fds[0])
            except (ApiError, ValueError, KeyError, TypeError, OSError) as e:
                for inst in self.instances.values():
                    if inst.erofs is not None:
                        inst.erofs.release()  # the kernel mounts stay, for another takeover
                self.close_all()
                msg = e.message if isinstance(e, ApiError) else f"unusable takeover state: {e}"
                raise InternalError(msg) from None
            self._replay_pending = True
            self.sm.fire(Event.TAKEOVER)
        log.info("took over %d mounts from supervisor %s", len(self.instances), self.opts.supervisor)

    def _restore(self, blob: bytes, fd: int) -> int:
        """Rebuild the mounts of a saved state from the supervisor's `fd` (owned: every fd ends
        up with an instance, the transport or closed); returns the /dev/fuse fd (-1: none)."""
        fds = [fd]
        try:
            state = json.loads(blob)
            if not isinstance(state, dict) or state.get("format") not in (STATE_FORMAT, STATE_FORMAT_BUNDLE):
                raise ValueError("not a nydus_py takeover state (an upstream nydusd state cannot be restored)")
            if state["format"] == STATE_FORMAT_BUNDLE:
                fds = supervisor.unbundle_fds(fd, int(state["fds"]))
                os.close(fd)
                fuse_fd = fds[state["fuse_fd"]] if state["fuse_fd"] >= 0 else -1
            else:
                fuse_fd = fd
            if state.get("default_config") is not None and self.default_config is None:
                from ..config import parse_any

                self.default_config = parse_any(json.dumps(state["default_config"]))
            self.vfs.restore_layout(state["vfs"])
            for m in state["mounts"]:
                cmd = MountCmd.from_json(m["cmd"])
                inst = create_instance(m["mountpoint"], cmd, self.default_config)
                inst.index = self.vfs.mount(m["mountpoint"], inst.fs, index=m["index"] or None)
                self.instances[m["mountpoint"]] = inst
                self._by_index[inst.index] = inst
            self.session.restore_state(state["fuse"])
            for e in state.get("erofs", ()):  # (absent from /1 states)
                k = e["fd"]
                view_fd, fds[k] = (fds[k], -1) if k >= 0 else (-1, -1)  # the instance's from here on
                cmd = MountCmd.from_json(e["cmd"])
                cmd.fs_driver = str(e["cmd"].get("fs_driver", ""))  # (a dedicated daemon's, from its command line)
                from ..fs.erofs_serve import ErofsGone

                try:
                    inst = restore_erofs(e["mountpoint"], cmd, self.default_config, e["serve"], view_fd)
                except ErofsGone as gone:
                    log.warning("takeover of %s: %s", e["mountpoint"], gone)
                    continue
                self.instances[e["mountpoint"]] = inst
        except BaseException:
            for other in fds:
                if other >= 0:
                    with contextlib.suppress(OSError):
                        os.close(other)
            raise
        return fuse_fd

    def _failover_policy(self, fd: int, conn: int = -1) -> None:
        """Requests the dead daemon had read but not answered: ask the kernel to resend them.
        `conn`: the FUSE connection of `fd` (default: the mount at our mountpoint's)."""
        policy = self.opts.failover_policy
        if policy == "none":
            return
        if policy == "resend":
            try:
                os.write(fd, notify_resend())
                return
            except OSError as e:
                log.warning("FUSE NOTIFY_RESEND failed (%s); trying the connection's sysfs file", e)
        # from mountinfo: a stat of the mountpoint would wait for us (nothing serves it yet)
        if conn < 0:
            conn = connection_of(real_mountpoint(self.opts.mountpoint))
        if conn < 0:
            log.warning("failover policy %s: %s is not mounted", policy, self.opts.mountpoint)
            return
        try:
            for base in ("/sys/fs/fuse/connections", "/proc/sys/fs/fuse/connections"):
                path = f"{base}/{conn}/{policy}"
                if os.path.exists(path):
                    with open(path, "w") as f:
                        f.write("1")
                    return
        except OSError as e:
            log.warning("failover policy %s: %s", policy, e)

    # -- metrics --------------------------------------------------------------------------------
    def _pick(self, id: str | None, key: Callable[[Instance], list[str]], what: str) -> Instance:
        insts = list(self.instances.values())
        if id is None:
            if len(insts) == 1:
                return insts[0]
            raise NotFound(f"{what}: no id given and {len(insts)} filesystems are mounted (NoCounter)")
        want = _strip_id(id)
        for inst in insts:
            if any(_strip_id(k) == want for k in key(inst)):
                return inst
        raise NotFound(f"{what}: no metrics for id {id!r} (NoCounter)")

    def metrics_fs(self, id: str | None) -> dict[str, Any]:
        inst = self._pick(id, lambda i: [i.mountpoint], "metrics")
        out = inst.stats.fs_io_stats()
        counters = inst.casefold_counters()
        if counters is not None:  # (not a nydusd field: only there when the option is on)
            out["case_insensitive"] = counters
        return out

    def metrics_files(self, id: str | None, latest: bool) -> Any:
        stats = self._pick(id, lambda i: [i.mountpoint], "files metrics").stats
        return stats.take_latest() if latest else stats.files()

    def metrics_pattern(self, id: str | None) -> list[dict[str, int]]:
        return self._pick(id, lambda i: [i.mountpoint], "access pattern").stats.access_patterns()

    def metrics_backend(self, id: str | None) -> dict[str, Any]:
        inst = self._pick(id, lambda i: [i.mountpoint, i.blobcache_id], "backend metrics")
        if inst.backend_stats is None:
            raise NotFound(f"{inst.mountpoint} has no storage backend (NoCounter)")
        return inst.backend_stats.json()

    def metrics_blobcache(self, id: str | None) -> dict[str, Any]:
        return self._pick(id, lambda i: [i.blobcache_id, i.mountpoint], "blobcache metrics").blobcache()

    def metrics_transport(self) -> dict[str, Any]:
        """How FUSE requests reach the daemon: /dev/fuse reads or io_uring (with its counters,
        fallbacks included)."""
        t = self.transport
        uring = sys.modules.get("nydus_py.transport.fuse_uring")  # (not loaded: not in use)
        if uring is not None and isinstance(t, uring.FuseUringSession):
            return {"transport": "fuse_io_uring" if t.stats.active else "fusedev", "io_uring": t.stats.as_dict(),
                    "fusedev": t.dev.poll_metrics(), "warm": self._warm_metrics()}
        if isinstance(t, FuseDevSession):
            return {"transport": "fusedev", "io_uring": None, "fusedev": t.poll_metrics(), "warm": self._warm_metrics()}
        raise Unsupported("transport metrics are only available for fusedev")

    def _warm_metrics(self) -> dict[str, int]:
        """Small files decoded after their LOOKUP (--fuse-warm-kb): the session's gate, and the
        files its mounts decoded, READs took and pushed out unread."""
        g = self.session.warm_gate
        out = {"warm_kb": self.session.warm_max >> 10, "lookups_warmed": g.warmed, "lookups_skipped": g.skipped,
               "followed": g.followed, "unfollowed": g.unfollowed, "warmed": 0, "hits": 0, "wasted": 0}
        for inst in list(self.instances.values()):
            if inst.device is not None:
                w = inst.device.warmed
                out["warmed"] += w.warmed
                out["hits"] += w.hits
                out["wasted"] += w.wasted
        return out

    def metrics_inflight(self) -> list[dict[str, int]] | None:
        if self.opts.mode != "fuse":
            raise Unsupported("in-flight metrics are only available for fusedev")
        return self.metrics.inflight_list() or None

    # -- runtime config -------------------------------------------------------------------------
    def get_config(self, id: str | None) -> dict[str, Any]:
        """Stored overrides; credentials are shown as <redacted> (upstream echoes them)."""
        if id is not None:
            return {k: ("<redacted>" if k == "registry_auth" else v)
                    for k, v in dict(self.overrides.get(_strip_id(id), {})).items()}
        return {f"/{i}:{k}": ("<redacted>" if k == "registry_auth" else v)
                for i, kv in sorted(self.overrides.items()) for k, v in dict(kv).items()}

    def put_config(self, id: str | None, body: Any) -> None:
        if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
            raise BadRequest("body must be a flat JSON object of strings")
        bad = [k for k in body if k not in OVERRIDE_KEYS]
        if bad:
            raise BadRequest(f"unsupported config keys {bad} (allowed: {', '.join(OVERRIDE_KEYS)})")
        key = _strip_id(id or "")
        with self._lock:
            # id "/" (dedicated daemons) or "" means every instance
            targets = [i for i in self.instances.values()
                       if key == "" or key in (_strip_id(i.mountpoint), _strip_id(i.blobcache_id))]
            for inst in targets:
                self._apply_override(inst, body)
            self.overrides.setdefault(key, {}).update(body)

    @staticmethod
    def _apply_override(inst: Instance, body: dict[str, str]) -> None:
        """registry_auth goes to a registry backend now; the other keys are only stored."""
        from ..metrics.backend import unwrap

        if "registry_auth" not in body:
            return
        setter = getattr(unwrap(inst.source), "set_registry_auth", None)
        if not callable(setter):
            log.info("%s: the backend has no registry credentials to update", inst.mountpoint)
            return
        try:
            setter(body["registry_auth"])
        except ValueError as e:
            raise BadRequest(f"registry_auth: {e}") from None
        failures = getattr(inst.fs, "failures", None)  # (RafsFilesystem, or the EROFS blob views)
        if failures is not None:
            failures.clear()  # reads that failed with the old credentials may work now
        log.info("%s: registry credentials updated", inst.mountpoint)

    # -- fscache blobs (singleton mode) ----------------------------------------------------------
    def blobs(self, method: str) -> None:
        raise Unsupported(f"{method} /api/v2/blobs: fscache (singleton) mode is not supported by nydusd-py")
