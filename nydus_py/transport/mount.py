"""Mounting and unmounting a FUSE filesystem on an open /dev/fuse.

As root we call mount(2) directly with the options nydusd uses; otherwise `fusermount3` mounts
for us and hands the /dev/fuse fd back over a unix socket (SCM_RIGHTS), like libfuse does.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import subprocess

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOATIME = 1024
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2); OSError with the kernel's errno on failure."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} on {target}: {os.strerror(e)}")


def sys_umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


def fuse_mount(
    mountpoint: str,
    *,
    fsname: str = "rafs",
    allow_other: bool = True,
    readonly: bool = True,
    max_read: int = 0,
) -> int:
    """Mount a FUSE filesystem at `mountpoint` and return the /dev/fuse fd that serves it."""
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        st = os.stat(mountpoint)
        opts = [
            "default_permissions",
            f"fd={fd}",
            f"rootmode={st.st_mode & 0o170000:o}",
            f"user_id={os.geteuid()}",
            f"group_id={os.getegid()}",
        ]
        if max_read:
            opts.append(f"max_read={max_read}")
        if allow_other:
            opts.append("allow_other")
        flags = MS_NOSUID | MS_NODEV | MS_NOATIME | (MS_RDONLY if readonly else 0)
        try:
            sys_mount(fsname, mountpoint, "fuse", flags, ",".join(opts))
            return fd
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EPERM:
                raise
            log.warning("mount(2) refused (EPERM), falling back to fusermount3")
    return _fusermount(mountpoint, fsname, allow_other, readonly)


def _fusermount(mountpoint: str, fsname: str, allow_other: bool, readonly: bool) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    opts = ["default_permissions", f"fsname={fsname}", "nosuid", "nodev", "noatime"]
    if readonly:
        opts.append("ro")
    if allow_other:
        opts.append("allow_other")
    env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
    try:
        proc = subprocess.run(
            ["fusermount3", "-o", ",".join(opts), "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            check=False,
        )
        theirs.close()
        if proc.returncode != 0:
            raise OSError(errno.EPERM, f"fusermount3 failed: {proc.stderr.decode(errors='replace').strip()}")
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        if not fds:
            raise OSError(errno.EIO, "fusermount3 did not pass a /dev/fuse fd")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()


def fuse_umount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount; as non-root through fusermount3 -u."""
    if os.geteuid() == 0:
        sys_umount(mountpoint, MNT_DETACH if lazy else 0)
        return
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    proc = subprocess.run(args, capture_output=True, check=False)
    if proc.returncode != 0:
        raise OSError(errno.EBUSY, f"fusermount3 -u failed: {proc.stderr.decode(errors='replace').strip()}")


def real_mountpoint(path: str) -> str:
    """Canonical path of `path` without stat'ing `path` itself: on a FUSE mount whose daemon is
    not serving (a takeover in progress) that stat would wait for the daemon indefinitely."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name)


def is_mountpoint(path: str) -> bool:
    """Whether `path` is in this process's mount table (read from /proc, never from the mount)."""
    real = real_mountpoint(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and os.fsdecode(fields[4]).replace("\\040", " ") == real:
                return True
    return False


def mount_device(real_mountpoint: str) -> str | None:
    """"major:minor" of the topmost mount at `real_mountpoint` (already a realpath), from
    /proc/self/mountinfo. Nothing here touches the mount: a FUSE server calling this from its
    own worker would otherwise wait for itself (realpath lstat()s the mount root)."""
    real = real_mountpoint
    dev = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and os.fsdecode(fields[4]).replace("\\040", " ") == real:
                dev = fields[2].decode()
    return dev


def set_readahead_kb(mountpoint: str, kb: int) -> bool:
    """Set the read_ahead_kb of the mount's backing device info (root only); False if not possible.
    `mountpoint` must already be a realpath (see mount_device)."""
    dev = mount_device(mountpoint)
    if dev is None:
        return False
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        log.debug("cannot set read_ahead_kb of %s (%s): %s", mountpoint, dev, e)
        return False
    return True


FUSECTL = "/sys/fs/fuse/connections"


def connection_of(real_mountpoint: str) -> int:
    """FUSE connection id (/sys/fs/fuse/connections/<id>) of the mount at `real_mountpoint`, read
    from mountinfo (no request to the mount, which may be our own); -1 when it is not mounted."""
    dev = mount_device(real_mountpoint)
    if dev is None:
        return -1
    major, _, minor = dev.partition(":")
    return int(major) << 20 | int(minor)


def connection_mounted(conn: int) -> bool:
    """Whether a mount of FUSE connection `conn`'s device is in /proc/self/mountinfo: after our
    own mount was detached, its id may already be another mount's (ids are anonymous device
    numbers, reused once the detached superblock goes)."""
    dev = f"{conn >> 20}:{conn & 0xFFFFF}".encode()
    with open("/proc/self/mountinfo", "rb") as f:
        return any(len(fields) > 2 and fields[2] == dev for fields in map(bytes.split, f))


def abort_detached_connection(conn: int) -> bool:
    """`abort_connection` for the id of a mount we detached: refused (logged) when the id is
    mounted again, i.e. another mount's now."""
    if connection_mounted(conn):
        log.warning("FUSE connection %d is another mount's now (ours was detached); not aborting it", conn)
        return False
    return abort_connection(conn)


def abort_connection(conn: int) -> bool:
    """Abort FUSE connection `conn` through fusectl (mounted here when missing, as systemd does):
    its pending and future requests fail and its servers' reads see ENODEV."""
    path = f"{FUSECTL}/{conn}/abort"
    if not os.path.exists(f"{FUSECTL}/{conn}"):
        with contextlib.suppress(OSError):
            sys_mount("fusectl", FUSECTL, "fusectl", 0, "")
    try:
        with open(path, "w") as f:
            f.write("1")
        return True
    except OSError as e:
        log.error("cannot abort FUSE connection %d (%s)", conn, e)
        return False
