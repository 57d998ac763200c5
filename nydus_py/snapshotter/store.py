"""Snapshot metadata in one sqlite file, with the semantics of containerd's bolt MetaStore
(`snapshots/storage/bolt.go` at v1.6.20), which the built-in overlayfs snapshotter uses.

* Keys are the snapshotter's names (`<ns>/<n>/<key>` from containerd's metadata layer, or a
  chainID for the remote snapshots made here). Every snapshot gets a numeric id from a sequence
  that never goes back; directories are `snapshots/<id>`, and committing keeps the id.
* A parent must exist (NotFound) and be committed (InvalidArgument); a key is unique
  (AlreadyExists); committing needs an active snapshot (FailedPrecondition) and a free name
  (AlreadyExists); a snapshot with children cannot be removed (FailedPrecondition).
* Two columns the bolt store does not have: `remote` ("" for ordinary snapshots, "blob" or
  "bootstrap" for the Nydus layers made by a remote Prepare) and `source` (the image the bootstrap
  snapshot mounts), kept out of the labels so an Update can never lose them.

One connection, serialised by a lock; `tx()` is one sqlite transaction (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

MAX_LABEL_BYTES = 4096  # key + value, as containerd's metadata layer enforces
MAX_CHAIN = 4096  # parent chain length guard against a corrupt database

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key TEXT PRIMARY KEY,
    id INTEGER NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent TEXT NOT NULL DEFAULT '',
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('next_id', 1);
"""


class Kind(IntEnum):
    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Info:
    name: str
    parent: str = ""
    kind: Kind = Kind.UNKNOWN
    created_ns: int = 0
    updated_ns: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One row: the id, the info, the committed usage and the remote marks."""

    id: str
    info: Info
    size: int
    inodes: int
    remote: str
    source: str


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot with its parent chain, nearest parent first."""

    id: str
    kind: Kind
    parents: tuple[Record, ...]

    @property
    def parent_ids(self) -> list[str]:
        return [p.id for p in self.parents]


def check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label key and value greater than maximum size ({MAX_LABEL_BYTES} bytes), "
                                  f"key: {k[:64]}")


def _now_ns() -> int:
    return time.time_ns()


class Tx:
    """Operations inside one transaction (obtained from MetaStore.tx())."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def _row(self, key: str) -> Record | None:
        row = self.db.execute("SELECT key, id, kind, parent, created, updated, labels, size, inodes, remote, source "
                              "FROM snapshots WHERE key = ?", (key,)).fetchone()
        return None if row is None else _record(row)

    def get(self, key: str) -> Record:
        rec = self._row(key)
        if rec is None:
            raise NotFound(f"snapshot {key} does not exist")
        return rec

    def exists(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone() is not None

    def _next_id(self) -> int:
        (value,) = self.db.execute("SELECT value FROM meta WHERE name = 'next_id'").fetchone()
        self.db.execute("UPDATE meta SET value = ? WHERE name = 'next_id'", (value + 1,))
        return int(value)

    def chain(self, parent: str) -> tuple[Record, ...]:
        out: list[Record] = []
        while parent:
            rec = self._row(parent)
            if rec is None:
                raise NotFound(f"missing parent {parent}")
            out.append(rec)
            if len(out) > MAX_CHAIN:
                raise FailedPrecondition(f"parent chain of {parent} is longer than {MAX_CHAIN}")
            parent = rec.info.parent
        return tuple(out)

    def snapshot(self, key: str) -> Snapshot:
        """The active/view snapshot `key` with its parents (FailedPrecondition when committed)."""
        rec = self.get(key)
        if rec.info.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {key} not active or view")
        return Snapshot(rec.id, rec.info.kind, self.chain(rec.info.parent))

    def create(self, kind: Kind, key: str, parent: str, labels: dict[str, str], remote: str = "",
               source: str = "") -> Snapshot:
        """A new active/view snapshot, or (with `remote`) a committed one made by this snapshotter."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        if kind not in (Kind.ACTIVE, Kind.VIEW) and not (kind == Kind.COMMITTED and remote):
            raise InvalidArgument(f"snapshot type {kind.name} invalid; only snapshots of type Active or View "
                                  "can be created")
        check_labels(labels)
        parents: tuple[Record, ...] = ()
        if parent:
            prec = self._row(parent)
            if prec is None:
                raise NotFound(f"missing parent {parent!r} bucket")
            if prec.info.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
            parents = self.chain(parent)
        if self.exists(key):
            raise AlreadyExists(f"snapshot {key} already exists")
        sid = self._next_id()
        now = _now_ns()
        self.db.execute("INSERT INTO snapshots (key, id, kind, parent, created, updated, labels, remote, source) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (key, sid, int(kind), parent, now, now, json.dumps(labels, sort_keys=True), remote, source))
        return Snapshot(str(sid), kind, parents)

    def commit(self, key: str, name: str, size: int, inodes: int, labels: dict[str, str]) -> str:
        check_labels(labels)
        if self.exists(name):
            raise AlreadyExists(f"committed snapshot {name} already exists")
        rec = self._row(key)
        if rec is None:
            raise NotFound(f"failed to get active snapshot {key!r}")
        if rec.info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        now = _now_ns()
        self.db.execute("UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, labels = ?, size = ?, "
                        "inodes = ? WHERE key = ?",
                        (name, int(Kind.COMMITTED), now, now, json.dumps(labels, sort_keys=True), size, inodes, key))
        return rec.id

    def remove(self, key: str) -> Record:
        rec = self.get(key)
        if self.db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone() is not None:
            raise FailedPrecondition(f"cannot remove snapshot {key} with child")
        self.db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
        return rec

    def update(self, info: Info, fieldpaths: list[str]) -> Info:
        rec = self._row(info.name)
        if rec is None:
            raise NotFound(f"snapshot {info.name} does not exist")
        updated = rec.info
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels."):]
                    if k in info.labels:
                        updated.labels[k] = info.labels[k]
                    else:  # bolt writes the zero value, and empty labels are not stored
                        updated.labels.pop(k, None)
                elif path == "labels":
                    updated.labels = dict(info.labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
        else:
            updated.labels = dict(info.labels)
        updated.labels = {k: v for k, v in updated.labels.items() if v != ""}
        check_labels(updated.labels)
        updated.updated_ns = _now_ns()
        self.db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE key = ?",
                        (json.dumps(updated.labels, sort_keys=True), updated.updated_ns, info.name))
        return updated

    def all(self) -> list[Record]:
        rows = self.db.execute("SELECT key, id, kind, parent, created, updated, labels, size, inodes, remote, source "
                               "FROM snapshots ORDER BY key").fetchall()
        return [_record(r) for r in rows]

    def ids(self) -> set[str]:
        return {str(r[0]) for r in self.db.execute("SELECT id FROM snapshots")}


def _record(row: tuple) -> Record:
    key, sid, kind, parent, created, updated, labels, size, inodes, remote, source = row
    info = Info(key, parent, Kind(kind), created, updated, json.loads(labels))
    return Record(str(sid), info, size, inodes, remote, source)


class MetaStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
