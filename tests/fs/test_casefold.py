"""Case-insensitive LOOKUP (fs.casefold): folding, the per-directory indexes and their bounds,
collisions, and the RAFS and passthrough filesystems with the option on and off."""

import errno
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from nydus_py.config import parse_any
from nydus_py.daemon.errors import BadRequest
from nydus_py.daemon.instance import MountCmd, create_instance
from nydus_py.fs.casefold import CaseFolder, fold
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

from ..conftest import require_device
from .mountrig import build, nydusd


def test_fold() -> None:
    assert fold(b"ReadMe.TXT") == fold(b"readme.txt") == b"README.TXT"
    assert fold("Übersicht".encode()) == fold("üBERSICHT".encode())
    assert fold("ΣΊΣΥΦΟΣ".encode()) == fold("σίσυφος".encode()) == fold("σίσυφοσ".encode())  # final sigma
    assert fold("straße".encode()) != fold(b"STRASSE")  # no multi-letter expansion (NTFS keeps them apart)
    assert fold(b"caf\xe9") == b"CAF\xe9"  # not UTF-8: those bytes fold as themselves
    assert fold(b"a\xff\xfeB") == b"A\xff\xfeB"


class Listing:
    """A directory's names for CaseFolder, counting how often it was listed."""

    def __init__(self, names: list[bytes]) -> None:
        self.names = names
        self.calls = 0

    def __call__(self) -> Iterable[bytes]:
        self.calls += 1
        return iter([b".", b"..", *self.names])


def test_index_is_built_once_per_directory_and_answers_hits_and_misses() -> None:
    cf = CaseFolder("test")
    d = Listing([b"Docs", b"ReadMe.TXT", b"x"])
    assert cf.resolve(5, b"readme.txt", d) == b"ReadMe.TXT"
    assert cf.resolve(5, b"DOCS", d) == b"Docs"
    assert cf.resolve(5, b"missing", d) is None
    assert cf.resolve(5, b"..", d) is None and cf.resolve(5, b".", d) is None
    assert d.calls == 1
    snap = cf.snapshot()
    assert (snap["fallback_hits"], snap["misses"], snap["indexes_built"], snap["indexed_dirs"]) == (2, 1, 1, 1)
    assert snap["indexed_names"] == 3


def test_names_that_differ_only_in_case_stay_exact_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    cf = CaseFolder("test")
    d = Listing([b"Makefile", b"makefile", b"other"])
    with caplog.at_level(logging.WARNING, logger="nydus_py.fs.casefold"):
        for _ in range(3):
            assert cf.resolve(7, b"MAKEFILE", d) is None
        assert cf.resolve(7, b"OTHER", d) == b"other"
    assert sum("differ only in case" in r.message for r in caplog.records) == 1
    snap = cf.snapshot()
    assert (snap["collisions"], snap["ambiguous_lookups"], snap["fallback_hits"]) == (1, 3, 1)


def test_version_change_rebuilds_the_index() -> None:
    cf = CaseFolder("test")
    d = Listing([b"A"])
    assert cf.resolve(1, b"a", d, version=1) == b"A"
    d.names = [b"B"]
    assert cf.resolve(1, b"b", d, version=1) is None  # same version: the index stands
    assert cf.resolve(1, b"b", d, version=2) == b"B"
    assert d.calls == 2
    assert cf.snapshot()["indexed_names"] == 1


def test_indexes_are_bounded_by_directories_and_names() -> None:
    cf = CaseFolder("test", max_dirs=3, max_entries=10)
    for ino in range(10):
        assert cf.resolve(ino, b"f", Listing([b"F", b"g"])) == b"F"
    snap = cf.snapshot()
    assert snap["indexed_dirs"] == 3 and snap["indexes_evicted"] == 7
    big = Listing([b"n%d" % i for i in range(8)])
    assert cf.resolve(100, b"N3", big) == b"n3"
    snap = cf.snapshot()
    assert snap["indexed_names"] <= 10 and snap["indexed_dirs"] <= 3
    # the most recently used directory is kept
    assert cf.resolve(100, b"N4", big) == b"n4" and big.calls == 1


def test_directory_too_large_to_index_is_scanned_per_miss(caplog: pytest.LogCaptureFixture) -> None:
    cf = CaseFolder("test", max_dir_entries=5)
    d = Listing([b"n%d" % i for i in range(20)] + [b"Late"])
    with caplog.at_level(logging.WARNING, logger="nydus_py.fs.casefold"):
        assert cf.resolve(3, b"LATE", d) == b"Late"  # found past the index limit
        assert cf.resolve(3, b"N0", d) == b"n0"
        assert cf.resolve(3, b"nope", d) is None
    assert d.calls == 3
    snap = cf.snapshot()
    assert snap["uncached_scans"] == 3 and snap["indexed_dirs"] == 0
    assert sum("scan it each time" in r.message for r in caplog.records) == 1


# -- the filesystems ---------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "Docs" / "Sub").mkdir(parents=True)
    (root / "Docs" / "ReadMe.TXT").write_bytes(b"read me\n")
    (root / "Docs" / "Sub" / "Leaf").write_bytes(b"leaf\n")
    (root / "Makefile").write_bytes(b"upper\n")
    (root / "makefile").write_bytes(b"lower\n")
    (root / "Übersicht.txt").write_bytes(b"u\n")


def rafs_fs(tmp_path: Path, src: Path, *, ci: bool) -> RafsFilesystem:
    img = build(str(src), str(tmp_path / ("img-ci" if ci else "img")), views=False)
    image = open_bootstrap(img.boot)
    return RafsFilesystem(image, BlobDevice(image, LocalBlobDir(img.blob_dir)), case_insensitive=ci)


def walk(fs: RafsFilesystem | PassthroughFilesystem, *names: bytes) -> int:
    ino = 1
    for n in names:
        ino = fs.lookup(ino, n).ino
    return ino


@pytest.mark.parametrize("kind", ["rafs", "passthrough"])
def test_filesystem_lookups(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)

    def make(ci: bool) -> RafsFilesystem | PassthroughFilesystem:
        return rafs_fs(tmp_path, src, ci=ci) if kind == "rafs" else PassthroughFilesystem(str(src), case_insensitive=ci)

    off = make(False)
    assert off.casefold is None
    with pytest.raises(OSError) as ei:
        walk(off, b"docs")
    assert ei.value.errno == errno.ENOENT

    fs = make(True)
    exact = walk(fs, b"Docs", b"Sub", b"Leaf")
    assert walk(fs, b"DOCS", b"sub", b"leaf") == exact
    assert fs.getattr(walk(fs, b"docs", b"readme.txt"))[0].size == 8
    assert walk(fs, "übersicht.TXT".encode()) == walk(fs, "Übersicht.txt".encode())
    # Makefile / makefile: exact lookups work, a third spelling does not guess
    assert walk(fs, b"Makefile") != walk(fs, b"makefile")
    with pytest.raises(OSError) as ei:
        walk(fs, b"MAKEFILE")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(OSError) as ei:
        walk(fs, b"docs", b"missing")
    assert ei.value.errno == errno.ENOENT
    assert fs.casefold is not None
    snap = fs.casefold.snapshot()
    assert snap["fallback_hits"] == 7 and snap["collisions"] == 1 and snap["misses"] == 1
    assert snap["indexed_dirs"] == 3  # root, Docs, Sub: only directories where a miss happened


def test_passthrough_index_follows_directory_changes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    fs = PassthroughFilesystem(str(src), case_insensitive=True)
    docs = walk(fs, b"docs")
    with pytest.raises(OSError):
        fs.lookup(docs, b"NEW.txt")
    (src / "Docs" / "New.TXT").write_bytes(b"n")
    assert fs.getattr(fs.lookup(docs, b"NEW.txt").ino)[0].size == 1
    os.rename(src / "Docs" / "New.TXT", src / "Docs" / "renamed")
    with pytest.raises(OSError):
        fs.lookup(docs, b"new.txt")
    (src / "Docs" / "readme.txt").write_bytes(b"now two")  # a collision appears
    with pytest.raises(OSError):
        fs.lookup(docs, b"README.TXT")
    assert fs.casefold is not None and fs.casefold.snapshot()["collisions"] == 1
    assert fs.casefold.snapshot()["indexed_dirs"] == 2  # the root and Docs
    fs.destroy()  # the guest went away: its inode numbers (the index keys) mean nothing now
    assert fs.casefold.snapshot()["indexed_dirs"] == 0


# -- configuration -----------------------------------------------------------------------------------


def test_config_key_v1_and_v2() -> None:
    backend = {"type": "localfs", "config": {"dir": "/tmp"}}
    assert not parse_any(json.dumps({"device": {"backend": backend}})).rafs.case_insensitive
    v1 = parse_any(json.dumps({"device": {"backend": backend}, "case_insensitive": True}))
    assert v1.rafs.case_insensitive
    assert v1.redacted_v2()["rafs"]["case_insensitive"] is True
    v2 = parse_any(json.dumps({"version": 2, "backend": {"type": "localfs", "localfs": {"dir": "/tmp"}},
                               "rafs": {"case_insensitive": True}}))
    assert v2.rafs.case_insensitive
    with pytest.raises(ValueError, match="case_insensitive"):
        parse_any(json.dumps({"device": {"backend": backend}, "case_insensitive": "yes"}))


def test_mount_body_and_passthrough_config(tmp_path: Path) -> None:
    cmd = MountCmd.from_json({"fs_type": "passthrough_fs", "source": str(tmp_path), "config": "",
                              "case_insensitive": True})
    assert cmd.case_insensitive and cmd.to_json()["case_insensitive"] is True
    assert "case_insensitive" not in MountCmd("rafs", "/b", "").to_json()
    with pytest.raises(BadRequest):
        MountCmd.from_json({"fs_type": "rafs", "source": "/b", "config": "", "case_insensitive": 1})
    inst = create_instance("/share", cmd)
    assert inst.casefold_counters() is not None
    inst.close()
    by_config = create_instance("/share", MountCmd("passthrough_fs", str(tmp_path), '{"case_insensitive": true}'))
    assert by_config.casefold_counters() is not None
    by_config.close()
    plain = create_instance("/share", MountCmd("passthrough_fs", str(tmp_path), "not json"))
    assert plain.casefold_counters() is None
    plain.close()


# -- over a /dev/fuse mount (the option is accepted by `nydusd-py fuse` too) -------------------------


@pytest.mark.slow
def test_fuse_mount_case_insensitive(tmp_path: Path) -> None:
    """The kernel caches dentries by exact name: a folded name gets a dentry of its own for the
    same inode, which reads the same."""
    require_device("/dev/fuse")
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    img = build(str(src), str(tmp_path / "img"), views=False)
    mnt = tmp_path / "mnt"
    with nydusd(img.boot, img.blob_dir, str(mnt), str(tmp_path), args=("--case-insensitive",)) as d:
        assert (mnt / "docs" / "readme.txt").read_bytes() == b"read me\n"
        assert (mnt / "DOCS" / "SUB" / "leaf").read_bytes() == b"leaf\n"
        assert os.stat(mnt / "Docs").st_ino == os.stat(mnt / "dOcS").st_ino
        assert sorted(os.listdir(mnt / "docs")) == ["ReadMe.TXT", "Sub"]
        assert sorted(os.listdir(mnt / "Docs")) == ["ReadMe.TXT", "Sub"]
        assert (mnt / "Makefile").read_bytes() == b"upper\n" and (mnt / "makefile").read_bytes() == b"lower\n"
        with pytest.raises(FileNotFoundError):
            (mnt / "MAKEFILE").read_bytes()
        assert (mnt / "übersicht.TXT").read_bytes() == b"u\n"
    assert d.log_text().count("differ only in case") == 1


def test_not_with_the_kernel_erofs_driver(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    img = build(str(src), str(tmp_path / "img"), views=False)
    cfg = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": img.blob_dir}}},
                      "case_insensitive": True})
    with pytest.raises(BadRequest, match="case_insensitive needs fs_driver fusedev"):
        create_instance("/", MountCmd("rafs", img.boot, cfg, fs_driver="erofs", target=str(tmp_path / "m")))
