"""The README's main job runs end to end (registry, push, convert, lazy mount by reference,
chroot busybox, metrics, clean-up)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_device, require_tool

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.root
def test_demo_runs_and_fetches_only_part_of_the_image(tmp_path):
    require_device("/dev/fuse")
    require_tool("docker-registry")
    keep = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "nydus_py.demo", "--keep", str(keep)], capture_output=True, text=True,
                       timeout=300, cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.count("hello from nydus-py-demo on Linux") == 2 and "/etc/motd: whited out" in out
    m = re.search(r"registry reads, (\d+) bytes of (\d+) blob bytes", out)
    assert m and 0 < int(m.group(1)) < int(m.group(2)) // 2, out
    assert "nydusd-py exited 0, still mounted: False" in out and "docker-registry stopped" in out
