"""The snapshotter itself, without gRPC: containerd's overlayfs snapshotter plus Nydus layers.

Ordinary snapshots behave like `snapshots/overlay/overlay.go` (v1.6.20): `ROOT/snapshots/<id>/fs`
(and `work` for active ones), the metadata in `ROOT/metadata.db`, and the same mounts:

* no parent: `bind` of `fs`, `rw` (active) or `ro` (view), with `rbind`;
* a view with one lower directory: `bind ro,rbind` of it;
* otherwise `overlay` with `[index=off,] [userxattr,] [workdir=..,upperdir=..,] lowerdir=a:b:c`
  (nearest parent first). For an `overlay` mount containerd's differ writes straight into
  `upperdir`, which is why the shape must match the built-in one.

Nydus layers (labels.py): a Prepare that carries a target chainID, an image reference and the
`nydus-blob` or `nydus-bootstrap` annotation makes a *committed* snapshot named after the chainID,
with the given parent and labels, and answers AlreadyExists. containerd then never downloads the
layer. A data-blob snapshot stays empty. A bootstrap snapshot is mounted by reference in the shared
`nydusd-py` (`/<id>` in its FUSE root); in a child's lower directories that mount stands for the
bootstrap snapshot and everything below it (the bootstrap holds the whole merged image). The
reference is always a digest: a tag (`ctr-remote rpull` gives no manifest digest) is resolved at
the Prepare and the digest recorded as the snapshot's `source`, which every later mount uses.

With `[snapshot] enable_nydus_overlayfs` (upstream's `remoteMountWithExtraOptions`), a mount with
a Nydus image below is `fuse.nydus-overlayfs` (source `overlay`) with the overlay options plus
`extraoption=` (extraoption.py): the bootstrap file, the config the shared daemon mounts the image
with and the snapshot's directory, for a Kata runtime to mount the image in its own virtio-fs
daemon. runc gets the same mount; the `nydus-overlayfs` helper drops the option and mounts a
plain overlay. A view is then an overlay of the image and the view's own directory, as upstream.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from .errors import AlreadyExists, SnapshotError, Unavailable
from .extraoption import HEADER_BYTES, MOUNT_TYPE, SOURCE, ExtraOption, ExtraOptionError, detect_fs_version
from .labels import BOOTSTRAP, remote_layer
from .store import Info, Kind, MetaStore, Record, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""


class ImageMounter(Protocol):
    """What the snapshotter needs from the shared daemon (nydusd.SharedDaemon)."""

    def mount(self, sid: str, image_ref: str) -> None:
        """Mount image `image_ref` at `/<sid>`; a no-op when it is mounted. Unavailable on failure."""

    def umount(self, sid: str) -> None:
        """Unmount `/<sid>` when mounted; never raises for an unknown id."""

    def mount_dir(self, sid: str) -> str:
        """The host directory where `/<sid>` appears."""

    def stop(self) -> None:
        """Stop the daemons (the snapshotter exits with cleanup_on_close)."""

    def pin(self, image_ref: str) -> str:
        """`image_ref` (docker://...) by digest: a tag resolved now. Unavailable on failure."""

    def handoff(self, sid: str, image_ref: str, layer_digest: str) -> tuple[str, str]:
        """(bootstrap file, JSON config) with which another daemon (Kata's) can mount the image
        mounted at `/<sid>`; `layer_digest` is its bootstrap layer's. Unavailable when the
        bootstrap is not on this host."""


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes, inodes) of a tree like containerd's fs.DiskUsage: 512-byte blocks of each inode
    counted once (hard links), the root included."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def add(p: str) -> None:
        nonlocal size
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        k = (st.st_dev, st.st_ino)
        if k not in seen:
            seen.add(k)
            size += st.st_blocks * 512

    if not os.path.lexists(path):
        return 0, 0
    add(path)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            add(os.path.join(dirpath, name))
    return size, len(seen)


def _needs_userxattr() -> bool:
    """overlayfs in a user namespace needs `userxattr` (containerd's NeedsUserXAttr, simplified:
    only outside the initial user namespace, where the trusted.* namespace is unusable)."""
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields[:3] != ["0", "0", "4294967295"]


class Snapshotter:
    def __init__(self, root: str, mounter: ImageMounter | None = None, overlay_volatile: bool = False,
                 nydus_overlayfs: bool = False, nydus_overlayfs_path: str = "") -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.makedirs(self.snapshots_dir, mode=0o700, exist_ok=True)
        self.store = MetaStore(os.path.join(self.root, "metadata.db"))
        self.mounter = mounter
        self.index_off = os.path.exists("/sys/module/overlay/parameters/index")
        self.userxattr = _needs_userxattr()
        self.volatile = overlay_volatile  # [snapshot] enable_overlayfs_volatile: no syncs of upperdir
        self.nydus_overlayfs = nydus_overlayfs  # [snapshot] enable_nydus_overlayfs: extraoption for Kata
        # [snapshot] nydus_overlayfs_path: the helper's path in the type (mount.fuse runs it)
        self.nydus_overlayfs_type = f"fuse.{nydus_overlayfs_path}" if nydus_overlayfs_path else MOUNT_TYPE
        self.on_pull: Callable[[float], None] | None = None  # seconds of each Nydus image's remote Prepare

    @property
    def snapshots_dir(self) -> str:
        return os.path.join(self.root, "snapshots")

    def upper_path(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid, "fs")

    def work_path(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid, "work")

    def close(self) -> None:
        self.store.close()

    # -- queries -------------------------------------------------------------------------------
    def stat(self, key: str) -> Info:
        with self.store.tx() as tx:
            return tx.get(key).info

    def walk(self) -> list[Info]:
        with self.store.tx() as tx:
            return [r.info for r in tx.all()]

    def usage(self, key: str) -> tuple[int, int]:
        with self.store.tx() as tx:
            rec = tx.get(key)
        if rec.info.kind == Kind.ACTIVE:
            return disk_usage(self.upper_path(rec.id))
        return rec.size, rec.inodes

    def update(self, info: Info, fieldpaths: list[str]) -> Info:
        with self.store.tx() as tx:
            return tx.update(info, fieldpaths)

    def bootstrap_snapshots(self) -> list[Record]:
        with self.store.tx() as tx:
            return [r for r in tx.all() if r.remote == BOOTSTRAP]

    # -- creating ------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        if remote_layer(labels) is not None:
            self._prepare_remote(key, parent, labels)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _new_dir(self, kind: Kind) -> str:
        td = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
        os.mkdir(os.path.join(td, "fs"), 0o755)
        if kind == Kind.ACTIVE:
            os.mkdir(os.path.join(td, "work"), 0o711)
        return td

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        with self.store.tx() as tx:
            td = self._new_dir(kind)
            try:
                snap = tx.create(kind, key, parent, labels)
                os.rename(td, os.path.join(self.snapshots_dir, snap.id))
            except BaseException:
                shutil.rmtree(td, ignore_errors=True)
                raise
        try:
            mounts, lowers = self._mounts(snap)
            if lowers:
                st = os.stat(lowers[0])
                os.lchown(self.upper_path(snap.id), st.st_uid, st.st_gid)
        except BaseException:
            self._drop(key)
            raise
        return mounts

    def _prepare_remote(self, key: str, parent: str, labels: dict[str, str]) -> NoReturn:
        """A committed snapshot for a Nydus layer; always ends in AlreadyExists (or an error)."""
        remote = remote_layer(labels)
        assert remote is not None
        t0 = time.monotonic()
        source = ""
        if remote.kind == BOOTSTRAP:
            if self.mounter is None:
                raise Unavailable("this snapshotter runs with daemon_mode none and cannot mount Nydus images; set "
                                  "daemon_mode to shared or dedicated")
            try:
                source = "docker://" + str(remote.mount_ref())
            except ValueError as e:
                raise Unavailable(f"image reference {remote.image_ref!r}: {e}") from None
            pinned = self.mounter.pin(source)  # always by digest: restarts must mount this very image
            if pinned != source:
                log.info("prepare %s: %s is %s", key, source, pinned)
            source = pinned
        with self.store.tx() as tx:
            if tx.exists(remote.target):
                raise AlreadyExists(f"target snapshot {remote.target!r}")
            td = self._new_dir(Kind.COMMITTED)
            try:
                snap = tx.create(Kind.COMMITTED, remote.target, parent, labels, remote=remote.kind, source=source)
                os.rename(td, os.path.join(self.snapshots_dir, snap.id))
            except BaseException:
                shutil.rmtree(td, ignore_errors=True)
                raise
        if remote.kind == BOOTSTRAP:
            assert self.mounter is not None
            try:
                self.mounter.mount(snap.id, source)
            except SnapshotError:
                self._drop(remote.target)
                raise
            log.info("prepare %s: Nydus image %s mounted at /%s for %s", key, source, snap.id, remote.target)
            if self.on_pull is not None:
                self.on_pull(time.monotonic() - t0)
        else:
            log.info("prepare %s: Nydus data layer %s needs no content (%s)", key, remote.layer_digest,
                     remote.target)
        raise AlreadyExists(f"target snapshot {remote.target!r}")

    def _drop(self, key: str) -> None:
        """Undo a snapshot just created (its mount or its lchown failed)."""
        try:
            self.remove(key)
        except SnapshotError as e:
            log.warning("could not roll back snapshot %s: %s", key, e)

    # -- mounts --------------------------------------------------------------------------------
    def mounts(self, key: str) -> list[Mount]:
        with self.store.tx() as tx:
            snap = tx.snapshot(key)
        return self._mounts(snap)[0]

    def _lowers(self, parents: tuple[Record, ...]) -> tuple[list[str], Record | None]:
        """The lower directories, nearest first, and the Nydus bootstrap snapshot among the
        parents (None without one)."""
        lowers: list[str] = []
        for p in parents:
            if p.remote == BOOTSTRAP:
                if self.mounter is None:
                    raise Unavailable(f"snapshot {p.info.name} is a Nydus image, but this snapshotter runs with "
                                      "daemon_mode none; set daemon_mode to shared or dedicated")
                self.mounter.mount(p.id, p.source)  # after a daemon restart: mount it again
                lowers.append(self.mounter.mount_dir(p.id))
                return lowers, p  # the bootstrap is the whole image: the (empty) data layers below add nothing
            lowers.append(self.upper_path(p.id))
        return lowers, None

    def _mounts(self, snap: Snapshot) -> tuple[list[Mount], list[str]]:
        if not snap.parents:
            ro = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", self.upper_path(snap.id), [ro, "rbind"])], []
        lowers, boot = self._lowers(snap.parents)
        kata = self.nydus_overlayfs and boot is not None
        options: list[str] = []
        if self.index_off:
            options.append("index=off")
        if self.userxattr:
            options.append("userxattr")
        if snap.kind == Kind.ACTIVE:
            if self.volatile:
                options.append("volatile")
            options += [f"workdir={self.work_path(snap.id)}", f"upperdir={self.upper_path(snap.id)}"]
        elif not kata and len(lowers) == 1:
            return [Mount("bind", lowers[0], ["ro", "rbind"])], lowers
        view_own = [self.upper_path(snap.id)] if kata and snap.kind == Kind.VIEW else []
        options.append("lowerdir=" + ":".join(lowers + view_own))
        if boot is not None and kata:
            options.append(self._extra_option(snap, boot).encode())  # (never logged: it may hold credentials)
            return [Mount(self.nydus_overlayfs_type, SOURCE, options)], lowers
        return [Mount("overlay", "overlay", options)], lowers

    def _extra_option(self, snap: Snapshot, boot: Record) -> ExtraOption:
        """What Kata needs to mount image `boot` itself for container snapshot `snap`."""
        assert self.mounter is not None
        remote = remote_layer(boot.info.labels)
        digest = remote.layer_digest if remote is not None else ""
        bootstrap, config = self.mounter.handoff(boot.id, boot.source, digest)
        try:
            with open(bootstrap, "rb") as f:
                version = detect_fs_version(f.read(HEADER_BYTES))
        except OSError as e:
            raise Unavailable(f"bootstrap {bootstrap} of {boot.source}: {e.strerror or e}") from None
        except ExtraOptionError as e:
            raise Unavailable(f"bootstrap {bootstrap} of {boot.source}: {e}") from None
        return ExtraOption(bootstrap, config, os.path.join(self.snapshots_dir, snap.id), version)

    # -- commit, remove, cleanup ---------------------------------------------------------------
    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        with self.store.tx() as tx:
            rec = tx.get(key)
            size, inodes = disk_usage(self.upper_path(rec.id))
            tx.commit(key, name, size, inodes, labels)

    def remove(self, key: str) -> None:
        with self.store.tx() as tx:
            rec = tx.remove(key)
            removals = self._unreferenced_dirs(tx.ids())
        if rec.remote == BOOTSTRAP and self.mounter is not None:
            self.mounter.umount(rec.id)
        for d in removals:
            shutil.rmtree(d, ignore_errors=True)

    def cleanup(self) -> None:
        with self.store.tx() as tx:
            removals = self._unreferenced_dirs(tx.ids())
        for d in removals:
            shutil.rmtree(d, ignore_errors=True)

    def _unreferenced_dirs(self, ids: set[str]) -> list[str]:
        return [os.path.join(self.snapshots_dir, d) for d in sorted(os.listdir(self.snapshots_dir)) if d not in ids]
