"""A QEMU guest that mounts a virtio-fs share and runs a shell script in it (VIRTIOFS-NOTES.md).

Everything is fetched or built here, so a fresh machine only needs the Debian packages
(qemu-system-x86, busybox-static; scripts/install.sh): the kernel package that
linux-image-amd64 depends on is `apt-get download`ed and unpacked once into CACHE_DIR
(default /var/cache/nydus_py/vm, outside the repo; NYDUS_PY_VM_CACHE overrides), and the vmlinux
ELF is pulled out of its bzImage so QEMU can PVH-boot it (2.5 s instead of 5 s under TCG). The
initramfs is an uncompressed newc archive written per run: static busybox, the virtio/fuse
modules and an /init that mounts the tag, runs the script with cwd=/mnt and prints its stdout
between markers on the second serial port.

TCG only (KVM on these hosts is PVM and can't boot a stock kernel), -smp 1, 512 MiB. Timeouts
on both sides: a guest watchdog powers off after `timeout - 5` s, the host kills QEMU by pid at
`timeout`, and a watched backend pid that dies stops QEMU at once.
"""

import contextlib
import lzma
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.waiting import WaitTimeout, wait_until

CACHE_DIR = Path(os.environ.get("NYDUS_PY_VM_CACHE", "/var/cache/nydus_py/vm"))
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "fuse",
           "virtiofs")
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
. /guest.env
out() { echo "$*" > /dev/ttyS1; }
(sleep "$WATCHDOG"; out "@@VFS-END rc=timeout@@"; poweroff -f) &
for m in @MODULES@; do
  if [ -f /lib/modules/$m.ko ] && ! insmod /lib/modules/$m.ko; then
    out "@@VFS-END rc=insmod-$m@@"; poweroff -f
  fi
done
mkdir -p /mnt
mount -t virtiofs $MOUNT_OPTS "$TAG" /mnt
rc=$?
out "@@VFS-BEGIN mount_rc=$rc@@"
if [ $rc -ne 0 ]; then out "@@VFS-END rc=mount-failed@@"; poweroff -f; fi
(cd /mnt && sh /guest.sh) > /dev/ttyS1 2> /dev/console
rc=$?
out "@@VFS-END rc=$rc@@"
poweroff -f
"""


class RigError(RuntimeError):
    """The guest could not be prepared or did not finish (the message says which step)."""


@dataclass
class GuestResult:
    rc: str  # the script's exit code, or timeout / mount-failed / insmod-X / no-end
    output: str  # the script's stdout (between the markers)
    console: str  # the guest console (kernel messages, the script's stderr)
    seconds: float

    def check(self) -> str:
        if self.rc != "0":
            raise AssertionError(f"guest rc={self.rc}\n--- output ---\n{self.output[-3000:]}\n"
                                 f"--- console ---\n{self.console[-3000:]}")
        return self.output


# -- kernel ---------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RigError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1]
    _run(["apt-get", "update", "-qq"])
    for line in _run(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
        if line.strip().startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1]
    raise RigError("linux-image-amd64 names no kernel package")


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage (xz payload), or None if not found."""
    pos = bzimage.find(b"\xfd7zXZ\x00")
    while pos >= 0:
        try:
            data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[pos:])
        except lzma.LZMAError:
            data = b""
        if data.startswith(b"\x7fELF"):
            return data
        pos = bzimage.find(b"\xfd7zXZ\x00", pos + 1)
    return None


def ensure_kernel() -> tuple[Path, Path]:
    """(kernel image to boot, modules dir); downloads and unpacks on first use."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    marker = CACHE_DIR / "kernel.txt"
    if marker.exists():
        kernel, mods = marker.read_text().split("\n")[:2]
        if Path(kernel).exists() and Path(mods).is_dir():
            return Path(kernel), Path(mods)
    pkg = _kernel_package()
    root = CACHE_DIR / pkg
    if not (root / "boot").is_dir():
        debs = list(CACHE_DIR.glob(f"{pkg}_*.deb"))
        if not debs:
            _run(["apt-get", "download", "-q", pkg], cwd=CACHE_DIR)
            debs = list(CACHE_DIR.glob(f"{pkg}_*.deb"))
        if not debs:
            raise RigError(f"apt-get download {pkg} produced no .deb")
        tmp = CACHE_DIR / (pkg + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)])
        os.replace(tmp, root)
        for d in debs:
            d.unlink()
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name[len("vmlinuz-"):]
    mods = root / "lib" / "modules" / version
    kernel = vmlinuz
    vmlinux = root / "vmlinux"
    if not vmlinux.exists():
        elf = extract_vmlinux(vmlinuz.read_bytes())
        if elf is not None:
            vmlinux.write_bytes(elf)
    if vmlinux.exists():
        kernel = vmlinux
    marker.write_text(f"{kernel}\n{mods}\n")
    return kernel, mods


# -- initramfs --------------------------------------------------------------------------------------
def _newc(name: str, data: bytes, mode: int, ino: int) -> bytes:
    nameb = name.encode() + b"\0"
    head = b"070701" + b"".join(b"%08X" % v for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
    out = head + nameb
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(modules_dir: Path, script: str, env: dict[str, str],
                    extra: dict[str, bytes] | None = None) -> bytes:
    """`extra`: more executables, by path inside the guest (e.g. "bin/xattrs")."""
    files: list[tuple[str, bytes, int]] = [
        (d, b"", 0o40755) for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules", "tmp")]
    files.append(("bin/busybox", Path(BUSYBOX).read_bytes(), 0o100755))
    files.append(("bin/sh", b"busybox", 0o120777))
    for m in MODULES:
        found = list(modules_dir.rglob(f"{m}.ko"))
        if found:
            files.append((f"lib/modules/{m}.ko", found[0].read_bytes(), 0o100644))
    for name, data in (extra or {}).items():
        files.append((name, data, 0o100755))
    files.append(("init", INIT.replace("@MODULES@", " ".join(MODULES)).encode(), 0o100755))
    files.append(("guest.sh", script.encode(), 0o100644))
    envtext = "".join(f"{k}='{v}'\n" for k, v in env.items())
    files.append(("guest.env", envtext.encode(), 0o100644))
    out = b"".join(_newc(n, d, m, i + 1) for i, (n, d, m) in enumerate(files))
    return out + _newc("TRAILER!!!", b"", 0, 0)


# -- running ----------------------------------------------------------------------------------------
def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def run_guest(sock: str | Path, script: str, workdir: Path, *, tag: str = "myfs", timeout: float = 120.0,
              watch_pid: int | None = None, mount_opts: str = "", mem_mb: int = 512,
              socket_wait: float = 10.0, extra: dict[str, bytes] | None = None,
              device_opts: str = "") -> GuestResult:
    """Boot a guest against the vhost-user socket `sock`, run `script` in the mounted share.
    `device_opts` are appended to the vhost-user-fs-pci device (e.g. "num-request-queues=2")."""
    kernel, mods = ensure_kernel()
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = workdir / "initrd.cpio"
    env = {"TAG": tag, "WATCHDOG": str(max(5, int(timeout) - 5)), "MOUNT_OPTS": mount_opts}
    initrd.write_bytes(build_initramfs(mods, script, env, extra))
    console, result = workdir / "console.log", workdir / "result.log"
    for f in (console, result):
        f.write_bytes(b"")

    def socket_there() -> bool:
        if os.path.exists(sock):
            return True
        if watch_pid is not None and not _alive(watch_pid):
            raise RigError("backend exited before its socket appeared")
        return False

    try:
        wait_until(socket_there, socket_wait, f"backend socket {sock}")
    except WaitTimeout as e:
        raise RigError(str(e)) from None
    cmd = [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-M", "q35", "-smp", "1", "-m", f"{mem_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on", "-numa", "node,memdev=mem",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
        "-display", "none", "-vga", "none", "-nodefaults", "-no-reboot", "-no-user-config", "-monitor", "none",
        "-serial", f"file:{console}", "-serial", f"file:{result}",
        "-chardev", f"socket,id=char0,path={sock}",
        "-device", f"vhost-user-fs-pci,queue-size=1024,chardev=char0,tag={tag}" + (f",{device_opts}" if device_opts else ""),
    ]
    t0 = time.monotonic()
    with open(workdir / "qemu.stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    rc = "no-end"
    try:
        how = watch_guest(proc, result, timeout, watch_pid)
        if how == "end":
            proc.wait(15)
        elif how != "exited":
            rc = how
    finally:
        _kill(proc)
    secs = time.monotonic() - t0
    text = result.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    cons = console.read_bytes().decode(errors="replace") + (workdir / "qemu.stderr").read_text(errors="replace")
    out = ""
    if "@@VFS-BEGIN" in text:
        after = text.split("@@VFS-BEGIN", 1)[1].split("\n", 1)
        body = after[1] if len(after) > 1 else ""
        if "@@VFS-END rc=" in body:
            out, end = body.split("@@VFS-END rc=", 1)
            rc = end.split("@@", 1)[0]
        else:
            out = body
    elif "@@VFS-END rc=" in text:
        rc = text.split("@@VFS-END rc=", 1)[1].split("@@", 1)[0]
    return GuestResult(rc, out, cons, secs)


def watch_guest(proc: subprocess.Popen[bytes], result: Path, timeout: float, watch_pid: int | None) -> str:
    """How a guest run ended: "end" (its script finished), "exited" (QEMU quit first),
    "backend-died" or "host-timeout"."""

    def ended() -> str | None:
        if "@@VFS-END" in result.read_bytes().decode(errors="replace"):
            return "end"
        if proc.poll() is not None:
            return "exited"
        if watch_pid is not None and not _alive(watch_pid):
            return "backend-died"
        return None

    try:
        return wait_until(ended, timeout, "the guest")
    except WaitTimeout:
        return "host-timeout"


def _alive(pid: int) -> bool:
    try:
        wpid, _ = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_pid(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds (a backend started by a test)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _kill(proc)


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None and os.path.exists(BUSYBOX)


XATTRS_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>
/* xattrs PATH...: print "PATH\tNAME=HEX" per xattr; xattrs -s PATH NAME VALUE: set one */
int main(int argc, char **argv) {
  static char names[65536];
  static unsigned char val[65536];
  if (argc == 5 && !strcmp(argv[1], "-s"))
    return lsetxattr(argv[2], argv[3], argv[4], strlen(argv[4]), 0) ? 1 : 0;
  for (int i = 1; i < argc; i++) {
    ssize_t n = llistxattr(argv[i], names, sizeof names);
    if (n < 0) { printf("%s\t!\n", argv[i]); continue; }
    for (char *p = names; p < names + n; p += strlen(p) + 1) {
      ssize_t m = lgetxattr(argv[i], p, val, sizeof val);
      printf("%s\t%s=", argv[i], p);
      for (ssize_t k = 0; k < m; k++) printf("%02x", val[k]);
      printf("\n");
    }
  }
  return 0;
}
"""


def xattr_tool(gcc: str) -> bytes:
    """A static `xattrs` binary for the guest (busybox has no getfattr/setfattr)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    out = CACHE_DIR / "xattrs"
    src = CACHE_DIR / "xattrs.c"
    if not out.exists() or not src.exists() or src.read_text() != XATTRS_C:
        src.write_text(XATTRS_C)
        _run([gcc, "-static", "-O1", "-o", str(out) + ".tmp", str(src)])
        os.replace(str(out) + ".tmp", out)
    return out.read_bytes()


__all__ = ["CACHE_DIR", "GuestResult", "RigError", "build_initramfs", "ensure_kernel", "extract_vmlinux",
           "run_guest", "stop_pid"]
