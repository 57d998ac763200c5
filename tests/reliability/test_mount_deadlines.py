"""Issue 16 item 3: a mount cannot hang the daemon's control plane.

A bootstrap swapped for a FIFO (or a device) is refused at once; a mount that takes too long
answers 504 within its deadline, and mounts and umounts of other images go on meanwhile."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from nydus_py.daemon.errors import ApiError, BadRequest, Conflict, Timeout
from nydus_py.daemon.instance import Instance, MountCmd, register_fs_type
from nydus_py.daemon.service import DaemonOptions, DaemonService
from nydus_py.metrics.fsstats import FsStats
from nydus_py.rafs import FormatError, open_bootstrap
from tests.daemon.rig import Image, make_image, snapshotter_config
from tests.fuse.memfs import MemFS

DEADLINE = 20.0  # how long a test waits for something that must happen at once


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return make_image(tmp_path_factory.mktemp("img"), "a")


def run_with_deadline(fn: Any, *args: Any) -> Any:
    """Call fn in a thread; fail (instead of hanging the suite) if it is not back in DEADLINE."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {DEADLINE} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def service(tmp_path: Path, **opts: Any) -> DaemonService:
    return DaemonService(DaemonOptions(mode="fuse", mountpoint=str(tmp_path), **opts))


def test_open_bootstrap_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "boot"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        run_with_deadline(open_bootstrap, str(fifo))
    with pytest.raises(FormatError, match="not a regular file"):
        run_with_deadline(open_bootstrap, "/dev/zero")
    with pytest.raises(FormatError, match="not a regular file"):
        run_with_deadline(open_bootstrap, str(tmp_path))


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "chardev"])
def test_mount_of_a_fifo_source_is_a_400_and_the_daemon_goes_on(tmp_path: Path, image: Image, kind: str) -> None:
    svc = service(tmp_path)
    try:
        src = tmp_path / "boot"
        if kind == "chardev":
            src = Path("/dev/zero")
        else:
            os.mkfifo(tmp_path / "fifo")
            if kind == "fifo":
                src = tmp_path / "fifo"
            else:
                os.symlink(tmp_path / "fifo", src)
        cfg = snapshotter_config(image.blobs, "x")
        with pytest.raises(BadRequest, match="not a regular file"):
            run_with_deadline(svc.mount, "/bad", MountCmd("rafs", str(src), cfg))
        run_with_deadline(svc.mount, "/good", MountCmd("rafs", image.boot, cfg))
        assert sorted(svc.instances) == ["/good"]
    finally:
        svc.close_all()


class SlowFactory:
    """An fs_type whose instance is built only when the test says so."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.built: list[Instance] = []
        self.closed = threading.Event()

    def __call__(self, mountpoint: str, cmd: MountCmd, default: Any) -> Instance:
        self.entered.set()
        assert self.release.wait(60), "the test never released the slow mount"
        fs = MemFS()
        inst = Instance(mountpoint, cmd, fs, "Rafs", FsStats(mountpoint))
        fs.close = self.closed.set  # type: ignore[attr-defined]
        self.built.append(inst)
        return inst


def test_a_hung_mount_does_not_block_other_mounts_and_umounts(tmp_path: Path, image: Image) -> None:
    slow = SlowFactory()
    register_fs_type(("test-hungfs",), slow)
    svc = service(tmp_path, mount_timeout=3600.0)
    cfg = snapshotter_config(image.blobs, "x")
    errors: list[BaseException] = []

    def hung_mount() -> None:
        try:
            svc.mount("/hung", MountCmd("test-hungfs", "x", ""))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=hung_mount, daemon=True)
    t.start()
    try:
        assert slow.entered.wait(DEADLINE)
        # the same mountpoint is reserved meanwhile, and nothing may overlap it
        with pytest.raises(Conflict):
            run_with_deadline(svc.mount, "/hung", MountCmd("rafs", image.boot, cfg))
        with pytest.raises(Conflict):
            run_with_deadline(svc.mount, "/hung/inner", MountCmd("rafs", image.boot, cfg))
        # other images mount and umount while the first is stuck
        run_with_deadline(svc.mount, "/a", MountCmd("rafs", image.boot, cfg))
        run_with_deadline(svc.umount, "/a")
        run_with_deadline(svc.mount, "/b", MountCmd("rafs", image.boot, cfg))
        assert sorted(svc.instances) == ["/b"]
    finally:
        slow.release.set()
        t.join(DEADLINE)
    assert not t.is_alive() and not errors
    assert sorted(svc.instances) == ["/b", "/hung"]
    svc.close_all()


def test_a_mount_past_its_deadline_is_a_504_and_is_never_mounted(tmp_path: Path) -> None:
    slow = SlowFactory()
    register_fs_type(("test-latefs",), slow)
    svc = service(tmp_path, mount_timeout=0.2)
    try:
        with pytest.raises(Timeout) as ei:
            run_with_deadline(svc.mount, "/late", MountCmd("test-latefs", "x", ""))
        assert ei.value.status == 504 and isinstance(ei.value, ApiError)
        assert svc.mount_timeouts == 1
        assert "/late" not in svc.instances
        slow.release.set()
        # what it built after the deadline is closed, and the mountpoint is free again
        assert slow.closed.wait(DEADLINE)
        assert "/late" not in svc.instances
        slow2 = SlowFactory()
        slow2.release.set()
        register_fs_type(("test-latefs",), slow2)
        run_with_deadline(svc.mount, "/late", MountCmd("test-latefs", "x", ""))
        assert "/late" in svc.instances
    finally:
        slow.release.set()
        svc.close_all()
