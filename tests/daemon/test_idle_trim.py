"""The idle trimmer (issue 12, memory): a mount no request reached for a whole round gives back
its bootstrap's mapped pages, which a walk had made resident (0.44 MiB per 2.3k-entry image of a
shared daemon); a mount in use is left alone, and trimmed again once idle after use."""

import json
import os
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.daemon.instance import MountCmd
from nydus_py.daemon.service import DaemonOptions, DaemonService
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tree")
    for d in range(20):
        (root / f"d{d:02d}").mkdir()
        for f in range(40):
            (root / f"d{d:02d}" / f"f{f:02d}").write_bytes(b"y" * (f + 1))
    out = tmp_path_factory.mktemp("img")
    build_image(tree_from_directory(root), str(out / "image.boot"), str(out), BuildOptions())
    return out / "image.boot", out


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                inside = len(head) > 5 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_an_idle_mount_gives_back_its_bootstrap_pages(image: tuple[Path, Path]) -> None:
    boot, blobs = image
    assert os.path.getsize(boot) >= 64 << 10
    svc = DaemonService(DaemonOptions(mode="fuse", trim_interval=0.05))
    cfg = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}}, "mode": "direct"})
    try:
        svc.mount("/img", MountCmd("rafs", str(boot), cfg))
        inst = svc.instances["/img"]
        assert inst.image is not None
        for _path, ino in inst.image.walk():  # (a walk through the image: every page resident)
            inst.image.getattr(ino)
        wait_until(lambda: svc.trims >= 1, 10, "the idle mount to be trimmed")
        assert mapped_kib(boot) < 16, mapped_kib(boot)  # (the root's page may be touched again)
        assert sum(1 for _ in inst.image.walk()) == 1 + 20 * 41  # served from the page cache again

        inst.stats.hits[1] += 1  # a request reached it: trimmed again once idle after that
        wait_until(lambda: svc.trims >= 2, 10, "the mount, idle again, to be trimmed again")
    finally:
        svc.exit_event.set()
        svc.close_all()
