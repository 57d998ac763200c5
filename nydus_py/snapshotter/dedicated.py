"""`daemon_mode = "dedicated"`: one `nydusd-py` per image, as upstream starts them
(pkg/manager BuildDaemonCommand: `nydusd fuse --mountpoint <mnt> --config <file> --bootstrap
<file> --apisock <sock> [--supervisor <sock> --id <id>]`).

Ours mounts by reference instead of a bootstrap file: `nydusd-py fuse --mountpoint ROOT/mnt/<sid>
--image docker://REG/REPO@DIGEST --config ROOT/nydusd/<sid>/config.json --apisock
ROOT/nydusd/<sid>/api.sock`, with `--fs-driver erofs` for the kernel driver (the EROFS mount is
then at the same path). The image is mounted when the daemon starts, so a restart is just a
start; everything else (adoption after a snapshotter restart, recover_policy, failover) is the
shared daemon's code, per image. Isolation is why one would choose this: a daemon that dies
takes one image with it, not all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from typing import Any

from ..convert.errors import ConvertError
from ..convert.reference import parse_reference
from .errors import Unavailable
from .nydusd import DaemonSettings, SharedDaemon

log = logging.getLogger(__name__)


class DedicatedDaemon(SharedDaemon):
    """One image's daemon: the image is part of its command line."""

    def __init__(self, root: str, settings: DaemonSettings, sid: str) -> None:
        root = os.path.abspath(root)
        super().__init__(root, settings, daemon_id=f"d{sid}", directory=os.path.join(root, "nydusd", sid),
                         mnt=os.path.join(root, "mnt", sid))
        self.sid = sid
        self.source = ""
        self.config_path = os.path.join(self.dir, "config.json")

    def argv(self) -> list[str]:
        argv = [*super().argv(), "--image", self.source, "--config", self.config_path]
        return argv + (["--fs-driver", "erofs"] if self.erofs else [])

    def mount_dir(self, sid: str) -> str:
        return self.mnt

    def _adopted_mounts(self, collection: object) -> set[str]:
        return {self.sid}

    def _clear_leftovers(self) -> None:
        super()._clear_leftovers()  # (the dead mount at self.mnt, FUSE or EROFS, is detached there)

    def _remount_all(self) -> None:
        if self._alive():
            self._mounted.add(self.sid)  # the image came with the start

    def mount(self, sid: str, image_ref: str) -> None:
        with self._lock:
            if self._mounted and self._alive():
                return
            try:
                ref = parse_reference(image_ref)
            except ConvertError as e:
                raise Unavailable(f"image reference {image_ref!r}: {e}") from None
            mirror = self.select_mirror(ref)
            self.source = self.mount_source(image_ref, ref, mirror)
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            cfg = self.image_config(ref, sid, mirror)
            cfg.pop("fs_driver", None)  # (--fs-driver on the command line)
            with open(self.config_path + ".tmp", "w") as f:
                json.dump(cfg, f)
            os.chmod(self.config_path + ".tmp", 0o600)  # it may carry credentials
            os.replace(self.config_path + ".tmp", self.config_path)
            t0 = time.monotonic()
            self.ensure_running()
            self.observe_mount(time.monotonic() - t0)
            self._mounted = {sid}
            self._sources = {sid: image_ref}

    def umount(self, sid: str) -> None:
        with self._lock:
            self._sources.clear()
            self.stop()
            with contextlib.suppress(OSError):
                os.rmdir(self.mnt)
            shutil.rmtree(self.dir, ignore_errors=True)


class DedicatedDaemons:
    """The ImageMounter of dedicated mode: a DedicatedDaemon per snapshot id."""

    def __init__(self, root: str, settings: DaemonSettings) -> None:
        self.root = os.path.abspath(root)
        self.settings = settings
        self._lock = threading.Lock()
        self.daemons: dict[str, DedicatedDaemon] = {}

    def _get(self, sid: str) -> DedicatedDaemon:
        with self._lock:
            d = self.daemons.get(sid)
            if d is None:
                d = self.daemons[sid] = DedicatedDaemon(self.root, self.settings, sid)
            return d

    def mount(self, sid: str, image_ref: str) -> None:
        self._get(sid).mount(sid, image_ref)

    def umount(self, sid: str) -> None:
        with self._lock:
            d = self.daemons.pop(sid, None)
        if d is not None:
            d.umount(sid)

    def mount_dir(self, sid: str) -> str:
        return os.path.join(self.root, "mnt", sid)

    def handoff(self, sid: str, image_ref: str, layer_digest: str) -> tuple[str, str]:
        return self._get(sid).handoff(sid, image_ref, layer_digest)

    def pin(self, image_ref: str) -> str:
        return DedicatedDaemon(self.root, self.settings, "pin").pin(image_ref)  # (never started)

    def is_mounted(self, sid: str) -> bool:
        with self._lock:
            d = self.daemons.get(sid)
        return d is not None and d.is_mounted(sid)

    def stop(self) -> None:
        with self._lock:
            daemons = list(self.daemons.values())
        for d in daemons:
            d.stop()

    def all(self) -> list[SharedDaemon]:
        with self._lock:
            return list(self.daemons.values())

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {"daemons": 0, "mounts": 0, "recoveries": Counter()}
        for d in self.all():
            st = d.stats()
            total["daemons"] += st["daemons"]
            total["mounts"] += st["mounts"]
            total["recoveries"].update(st["recoveries"])
        return total

    @property
    def recoveries(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self.all():
            total.update(d.recoveries)
        return total
