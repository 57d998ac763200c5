"""`nydusify-py mount`: a real FUSE mount of a converted image from a loopback registry; files
read back equal to the source's, and after SIGTERM (or SIGINT) nothing is mounted and the
command exits 0."""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.transport.mount import is_mountpoint
from tests.conftest import require_device
from tests.waiting import wait_until

from .test_check import convert, unique_source
from .test_convert_e2e import REPO, env

pytestmark = [pytest.mark.slow, pytest.mark.root]


class Mount:
    def __init__(self, target: str, mnt: Path, work: Path) -> None:
        self.mnt = mnt
        self.out = work / "mount.out"
        argv = [sys.executable, "-m", "nydus_py.cli.nydusify", "mount", "--target", target, "--plain-http",
                "--mount-path", str(mnt), "--work-dir", str(work / "w")]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=env())
        wait_until(self._mounted, 60, lambda: f"the image to be mounted:\n{self.out.read_text()}")

    def _mounted(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"nydusify-py mount exited with {self.proc.returncode}:\n{self.out.read_text()}")
        return "mounted " in self.out.read_text() and is_mountpoint(str(self.mnt))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if is_mountpoint(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_mount_reads_files_and_unmounts_on_signal(sig, tmp_path, plain_registry):
    require_device("/dev/fuse")
    img, src = unique_source(plain_registry, f"mount-{sig.name.lower()}", 40 + int(sig))
    target = f"{plain_registry.host}/mount/nydus-{sig.name.lower()}:v1"
    convert(src, target)
    mnt = tmp_path / "image-fs"
    m = Mount(target, mnt, tmp_path)
    try:
        entries = {e.name: e for layer in img.layers for e in layer.entries}
        assert hashlib.sha256((mnt / "lib/big").read_bytes()).digest() == hashlib.sha256(entries["lib/big"].data).digest()
        assert (mnt / "etc/conf").read_bytes() == entries["etc/conf"].data
        assert os.stat(mnt / "etc/conf").st_uid == 7 and os.readlink(mnt / "lib/link") == "big"
        assert not (mnt / "lib/old").exists()  # whited out by layer 2
        assert os.stat(mnt / "lib/big").st_ino == os.stat(mnt / "lib/big-again").st_ino
        m.proc.send_signal(sig)
        assert m.proc.wait(60) == 0, m.out.read_text()
        assert not is_mountpoint(str(mnt))
        assert "unmounted" in m.out.read_text()
        assert not (tmp_path / "w").exists() or os.listdir(tmp_path / "w") == []  # the work dir is removed
    finally:
        m.kill()


def test_mount_of_a_missing_image_is_one_error(tmp_path, plain_registry):
    require_device("/dev/fuse")
    r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "mount", "--target",
                        f"{plain_registry.host}/mount/nothing:v1", "--plain-http", "--mount-path", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env())
    assert r.returncode == 1 and r.stderr.count("nydusify-py: error:") == 1, r.stderr
    assert "not found" in r.stderr and not is_mountpoint(str(tmp_path / "m"))
    r = subprocess.run([sys.executable, "-m", "nydus_py.cli.nydusify", "mount", "--target",
                        f"{plain_registry.host}/mount/nothing:v1", "--mount-path", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env())
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--target-insecure or --plain-http" in r.stderr, r.stderr
