"""`nydusd-py virtiofs` serving a real Linux guest (QEMU TCG, Debian kernel, busybox initramfs).

Each test boots one short-lived VM (a few seconds under TCG) against a daemon subprocess and
compares what the guest sees with the host: sha256 of every file, `ls -lnR`, xattrs, symlinks
and hard links of a RAFS image; passthrough writes seen on the host, and a second VM on the same
daemon (a reconnect) seeing the first one's writes.
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nydus_py.rafs import open_bootstrap
from nydus_py.storage.prefetch import resolve_path
from nydus_py.storage.registry import RegistryBackend, parse_registry_config

from ..conftest import REPO, require_tool
from ..storage import images
from ..storage import registry_rig as rig
from ..storage.fault_proxy import FaultProxy, Request
from ..waiting import WaitTimeout, wait_until
from .virtio_rig import qemu_available, run_guest, stop_pid, xattr_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def guest_tools() -> dict[str, bytes]:
    require_tool("qemu-system-x86_64")
    require_tool("busybox")
    assert qemu_available()
    return {"bin/xattrs": xattr_tool(require_tool("gcc"))}


def start_daemon(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(tmp / "vfs.sock")
    logf = tmp / "daemon.log"
    cmd = [sys.executable, "-m", "nydus_py.cli.daemon", "virtiofs", "--sock", sock, "--log-file", str(logf), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL)
    return proc, sock


def sections(output: str) -> dict[str, str]:
    out: dict[str, str] = {}
    cur = ""
    for line in output.splitlines(keepends=True):
        if line.startswith("##"):
            cur = line.strip()[2:]
            out[cur] = ""
        elif cur:
            out[cur] += line
    return out


def normalize_ls(text: str) -> list[str]:
    """busybox `ls -lnR --full-time` lines without "total" lines and directory sizes (a RAFS directory's
    size is not the host filesystem's)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("total ") or not line.strip():
            continue
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[0].startswith("d"):
            parts[4] = "-"
            line = " ".join(parts)
        elif len(parts) == 6:
            line = " ".join(parts)
        lines.append(line)
    return lines


def build_tree(src: Path) -> None:
    rnd = random.Random(6)
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "many").mkdir()
    (src / "big.bin").write_bytes(rnd.randbytes(3 * 1024 * 1024 + 12345))  # 4 chunks
    (src / "empty").write_bytes(b"")
    (src / "small.txt").write_bytes(b"hello virtio-fs\n")
    (src / "dir" / "sub" / "deep.txt").write_bytes(b"deep\n" * 1000)
    (src / "dir" / "hard1").write_bytes(b"linked content\n")
    os.link(src / "dir" / "hard1", src / "dir" / "hard2")
    (src / "link-rel").symlink_to("dir/sub/deep.txt")
    (src / "link-abs").symlink_to("/nonexistent/target")
    (src / "dangling").symlink_to("missing")
    (src / "dirlink").symlink_to("dir")
    (src / "xattr.txt").write_bytes(b"with xattrs\n")
    os.setxattr(src / "xattr.txt", "user.greeting", b"hello")
    os.setxattr(src / "xattr.txt", "user.bin", b"\x00\x01\xff")
    os.setxattr(src / "dir", "user.dir", b"d")
    for i in range(50):
        (src / "many" / f"f{i:02d}").write_bytes(rnd.randbytes(i * 97))
    for p in sorted(src.rglob("*"), reverse=True):
        os.utime(p, (1_700_000_000 + len(p.name), 1_700_000_000 + len(p.name)), follow_symlinks=False)


def host_xattrs(src: Path) -> list[str]:
    out = []
    for p in [src, *sorted(src.rglob("*"))]:
        rel = "." if p == src else "./" + str(p.relative_to(src))
        if p.is_symlink():
            continue
        for name in os.listxattr(p):
            out.append(f"{rel}\t{name}={os.getxattr(p, name).hex()}")
    return sorted(out)


RAFS_SCRIPT = r"""
echo "##SHA"; find . -type f -print0 | xargs -0 sha256sum | sort -k2
echo "##LS"; ls -lnR --full-time .
echo "##XATTR"; find . ! -type l | sort | xargs xattrs | sort
echo "##LINKS"; for l in link-rel link-abs dangling dirlink; do readlink $l; done; cat dirlink/sub/deep.txt | sha256sum
stat -c '%i %h' dir/hard1 dir/hard2 | uniq | wc -l; stat -c '%h' dir/hard1
test -e dangling || echo dangling-does-not-resolve
echo "##DIRECT"; dd if=big.bin bs=1M iflag=direct 2>/dev/null | sha256sum
"""


@pytest.fixture(scope="module")
def rafs_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("rafs")
    src = tmp / "src"
    src.mkdir()
    build_tree(src)
    boot, blobs = tmp / "image.boot", tmp / "blobs"
    blobs.mkdir()
    subprocess.run([sys.executable, "-m", "nydus_py.cli.image", "create", "--bootstrap", str(boot), "--blob-dir",
                    str(blobs), str(src)], cwd=REPO, check=True, capture_output=True, timeout=120)
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}},
                               "mode": "direct", "enable_xattr": True}))
    return src, boot, cfg


def test_rafs_image_in_guest(guest_tools: dict[str, bytes], rafs_image: tuple[Path, Path, Path],
                             tmp_path: Path) -> None:
    src, boot, cfg = rafs_image
    proc, sock = start_daemon(tmp_path, "--bootstrap", str(boot), "--config", str(cfg))
    try:
        r = run_guest(sock, RAFS_SCRIPT, tmp_path / "vm", timeout=150, watch_pid=proc.pid, extra=guest_tools)
    finally:
        stop_pid(proc)
    out = sections(r.check())
    # sha256 of every regular file
    expect = sorted(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(src)}"
                    for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    got = sorted(out["SHA"].splitlines())
    assert got == expect
    # ls -lnR against busybox ls on the host tree
    host_ls = subprocess.run(["busybox", "ls", "-lnR", "--full-time", "."], cwd=src, capture_output=True, text=True,
                             check=True, env={"TZ": "UTC"}).stdout
    assert normalize_ls(out["LS"]) == normalize_ls(host_ls)
    assert sorted(out["XATTR"].splitlines()) == host_xattrs(src)
    links = out["LINKS"].splitlines()
    assert links[:4] == ["dir/sub/deep.txt", "/nonexistent/target", "missing", "dir"]
    assert links[4].split()[0] == hashlib.sha256(b"deep\n" * 1000).hexdigest()
    assert links[5:] == ["1", "2", "dangling-does-not-resolve"]
    assert out["DIRECT"].split()[0] == hashlib.sha256((src / "big.bin").read_bytes()).hexdigest()
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]


WRITE_SCRIPT = r"""
set -e
echo "##READ"; cat host.txt
echo hello from the guest > new.txt
mkdir -p d/e; echo x > d/f; mv d/f d/g
ln -s new.txt sl; ln new.txt hl
rm old.txt; rmdir emptydir
chmod 600 new.txt
dd if=/dev/zero of=zeros bs=64k count=20 2>/dev/null
printf 'abcdefghij' > trunc.txt; truncate -s 4 trunc.txt
xattrs -s new.txt user.k guestvalue
dd if=/dev/urandom of=rand bs=1M count=2 2>/dev/null
sha256sum rand | cut -d' ' -f1 > rand.sha
sync
echo "##LS"; ls -n | wc -l
"""

SECOND_SCRIPT = r"""
echo "##READ"; cat new.txt host2.txt; sha256sum rand | cut -d' ' -f1; cat rand.sha
dd if=rand bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
rm rand
"""


def test_passthrough_writes_and_reconnect(guest_tools: dict[str, bytes], tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "host.txt").write_text("from the host\n")
    (share / "old.txt").write_text("to be removed\n")
    (share / "emptydir").mkdir()
    proc, sock = start_daemon(tmp_path, "--shared-dir", str(share))
    try:
        r = run_guest(sock, WRITE_SCRIPT, tmp_path / "vm1", timeout=150, watch_pid=proc.pid, extra=guest_tools)
        out = sections(r.check())
        assert out["READ"] == "from the host\n"
        assert (share / "new.txt").read_text() == "hello from the guest\n"
        assert (share / "new.txt").stat().st_mode & 0o777 == 0o600
        assert (share / "d" / "g").read_text() == "x\n" and (share / "d" / "e").is_dir()
        assert not (share / "d" / "f").exists()
        assert os.readlink(share / "sl") == "new.txt"
        assert (share / "hl").stat().st_ino == (share / "new.txt").stat().st_ino
        assert not (share / "old.txt").exists() and not (share / "emptydir").exists()
        assert (share / "zeros").read_bytes() == bytes(20 * 65536)
        assert (share / "trunc.txt").read_bytes() == b"abcd"
        assert os.getxattr(share / "new.txt", "user.k") == b"guestvalue"
        assert hashlib.sha256((share / "rand").read_bytes()).hexdigest() == (share / "rand.sha").read_text().strip()
        # a second VM on the same daemon (the listening socket stays) sees the first one's writes
        (share / "host2.txt").write_text("second host file\n")
        r2 = run_guest(sock, SECOND_SCRIPT, tmp_path / "vm2", timeout=120, watch_pid=proc.pid, extra=guest_tools)
        lines = sections(r2.check())["READ"].splitlines()
        assert lines[:2] == ["hello from the guest", "second host file"]
        assert lines[2] == lines[3] == lines[4]  # O_DIRECT reads too
        assert not (share / "rand").exists()
    finally:
        stop_pid(proc)
    assert proc.returncode == 0
    log = (tmp_path / "daemon.log").read_text()
    assert "front-end connected (connection 2)" in log, log[-3000:]


KATA_SCRIPT = r"""
echo "##BOOT"; ls; ls containers
touch containers/booted
i=0; while [ ! -e rafs/c1/lowerdir/small.txt ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
echo "##SHA"; (cd rafs/c1/lowerdir && find . -type f -print0 | xargs -0 sha256sum | sort -k2)
echo "##READ"; cat rafs/c1/lowerdir/small.txt; echo from-guest > containers/guest.txt
i=0; while [ -e rafs/c1/lowerdir/small.txt ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
echo "##AFTER"; ls; ls containers; test -e rafs || echo rafs-gone
"""


def test_kata_flow(guest_tools: dict[str, bytes], rafs_image: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Kata's sequence: empty share, /containers passthrough, then an image mounted at
    /rafs/<id>/lowerdir while the guest runs, read there, and unmounted again."""
    from ..daemon.rig import Api, wait_state

    src, boot, cfg = rafs_image
    share = tmp_path / "shared"
    share.mkdir()
    (share / "hello").write_text("sandbox\n")
    apisock = str(tmp_path / "api.sock")
    proc, sock = start_daemon(tmp_path, "--apisock", apisock)
    api = Api(apisock)
    events: list[str] = []
    try:
        wait_until(lambda: os.path.exists(apisock), 15, f"the API socket {apisock}")
        wait_state(api, "RUNNING")
        r = api.request("POST", "/api/v1/mount", {"mountpoint": "/containers"},
                        {"fs_type": "passthrough_fs", "source": str(share), "config": ""})
        assert r.status == 204, r.body

        def host_side() -> None:
            """Mount the image once the guest is up, unmount it once the guest has read it."""
            if not wait_for(share / "booted", 120):
                return
            r = api.request("POST", "/api/v1/mount", {"mountpoint": "/rafs/c1/lowerdir"},
                            {"fs_type": "rafs", "source": str(boot), "config": cfg.read_text()})
            events.append(f"mount {r.status}")
            if not wait_for(share / "guest.txt", 60):
                return
            r = api.request("DELETE", "/api/v1/mount", {"mountpoint": "/rafs/c1/lowerdir"})
            events.append(f"umount {r.status}")

        t = threading.Thread(target=host_side, daemon=True)
        t.start()
        r = run_guest(sock, KATA_SCRIPT, tmp_path / "vm", tag="kataShared", timeout=150, watch_pid=proc.pid,
                      extra=guest_tools)
        t.join(10)
    finally:
        api.close()
        stop_pid(proc)
    out = sections(r.check())
    assert out["BOOT"].split() == ["containers", "hello"]
    assert events == ["mount 204", "umount 204"]
    expect = sorted(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(src)}"
                    for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert sorted(out["SHA"].splitlines()) == expect
    assert out["READ"] == (src / "small.txt").read_text()
    assert (share / "guest.txt").read_text() == "from-guest\n"
    assert out["AFTER"].split() == ["containers", "booted", "guest.txt", "hello", "rafs-gone"]
    assert proc.returncode == 0


def wait_for(path: Path, timeout: float) -> bool:
    """Whether `path` appeared within `timeout` seconds."""
    try:
        wait_until(path.exists, timeout, str(path))
    except WaitTimeout:
        return False
    return True


STALL_SCRIPT = r"""
for f in etc/passwd etc/motd; do dd if=$f bs=64k iflag=direct 2>/dev/null | sha256sum; done > /tmp/warm
(sha256sum big/b.bin > /tmp/slow.sum; touch /tmp/slow.done) &
i=0
while [ ! -e /tmp/slow.done ] && [ $i -lt 3000 ]; do
  dd if=etc/passwd bs=64k iflag=direct 2>/dev/null | sha256sum | cut -c1-16 | sed 's/^/fast-ok /'
  i=$((i+1))
done
wait
echo "##SLOW"; cat /tmp/slow.sum
"""


@pytest.fixture(scope="module")
def registry_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, Any]]:
    """A Nydus image pushed to a local docker-registry: (BuiltImage, pulled bootstrap, registry)."""
    work = tmp_path_factory.mktemp("stall")
    reg = rig.plain_registry(require_tool("docker-registry"), work / "registries")
    try:
        img = images.build(work / "img", seed=19)
        cfg = parse_registry_config(images.registry_config(reg.host, "test/stall"), env={}, docker_config_paths=[])
        with RegistryBackend(cfg) as b:
            images.push_image(b, img, "v1")
            boot = images.pull_bootstrap(b, "v1", work / "pulled.boot")
        yield img, boot, reg
    finally:
        reg.stop()


def test_stalled_chunk_does_not_hold_up_cached_reads(guest_tools: dict[str, bytes], registry_image: tuple[Any, Path, Any],
                                                    tmp_path: Path) -> None:
    """One guest reader waits on a chunk the registry holds back; another keeps reading a cached
    file meanwhile (its requests share the one request queue). The host lets the chunk through
    only once the cached reads are seen completing during the stall (or after a deadline, which
    fails the test: with one worker per queue the cached reads queue up behind the stalled one)."""
    img, boot, reg = registry_image
    with open_bootstrap(str(boot)) as image:
        slow = [(c.compressed_offset, c.compressed_offset + c.compressed_size)
                for c in image.chunks(resolve_path(image, b"/big/b.bin"))]
    lo, hi = min(a for a, _ in slow), max(b for _, b in slow)

    def overlaps_slow(r: Request) -> bool:
        if r.method != "GET" or "/blobs/sha256:" not in r.path or r.range is None:
            return False
        a, b = r.range.split("=")[1].split("-")
        return int(a) < hi and lo < int(b) + 1

    proxy = FaultProxy(reg.url)
    proxy.hold_if = overlaps_slow
    cfg = tmp_path / "config.json"
    backend = images.registry_config(proxy.host, "test/stall", timeout=120, read_deadline=300)
    cfg.write_text(json.dumps(images.nydusd_config(backend, str(tmp_path / "cache"), amplify_io=images.CHUNK)))
    proc, sock = start_daemon(tmp_path, "--bootstrap", str(boot), "--config", str(cfg), "--virtio-workers", "8")
    released: list[str] = []
    result = tmp_path / "vm" / "result.log"

    def fast_lines() -> int:
        return result.read_text(errors="replace").count("fast-ok") if result.exists() else 0

    def host_side() -> None:
        """Release the held chunk once 5 cached reads completed while it was held."""
        try:
            wait_until(lambda: proxy.held, 150, "the guest's read of big/b.bin to reach the registry")
            seen = fast_lines()
            wait_until(lambda: fast_lines() >= seen + 5, 60, "cached reads completing during the stall")
            released.append("after cached reads")
        except WaitTimeout as e:
            released.append(f"deadline: {e}")
        finally:
            proxy.release_held()

    t = threading.Thread(target=host_side, daemon=True)
    t.start()
    try:
        r = run_guest(sock, STALL_SCRIPT, tmp_path / "vm", timeout=240, watch_pid=proc.pid, extra=guest_tools)
        t.join(30)
    finally:
        proxy.release_held()
        stop_pid(proc)
        proxy.stop()
    out = r.check()
    assert released == ["after cached reads"], (released, out[-2000:])
    want = hashlib.sha256(img.files["etc/passwd"]).hexdigest()[:16]
    fast = [line for line in out.splitlines() if line.startswith("fast-ok")]
    assert fast and all(line == f"fast-ok {want}" for line in fast)
    assert sections(out)["SLOW"].split()[0] == hashlib.sha256(img.files["big/b.bin"]).hexdigest()
    assert proxy.held >= 1
