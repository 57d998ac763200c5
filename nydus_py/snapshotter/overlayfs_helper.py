"""`nydus-overlayfs-py`: the mount helper behind mount type `fuse.nydus-overlayfs`.

A Nydus rootfs mount with `extraoption=` (extraoption.py) is for Kata; when runc gets the same
mount, containerd runs `mount.fuse overlay <target> -o ... -t nydus-overlayfs` and mount.fuse
runs `nydus-overlayfs overlay <target> -o <options>`. Like upstream's cmd/nydus-overlayfs this
drops `extraoption=` and `io.katacontainers.volume=` and mounts overlayfs with the rest: runc's
container gets a plain overlay.

Install it where mount.fuse looks, as `nydus-overlayfs` in PATH (a symlink to this script), or
as `/sbin/mount.fuse.nydus-overlayfs` for mount(8). Argv: `<source> <target> -o <options>` as
upstream, where source must be `overlay`; also accepted, for mount(8)'s helper convention, more
than one `-o` (joined) and the flags -s -f -n -v and `-t TYPE`, which change nothing here.

Differences from upstream's binary (deliberate): `rw`, `dev`, `suid`, `exec`, `atime`, `async`
clear their flags instead of setting the opposite ones (mount(8) semantics); `remount` and
`bind` are refused (an overlay helper has no business doing either).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .extraoption import strip

# MS_* from <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_MANDLOCK, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 64, 128, 1024, 2048
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24

SET = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "sync": MS_SYNCHRONOUS,
       "mand": MS_MANDLOCK, "dirsync": MS_DIRSYNC, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
       "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
CLEAR = {"rw": MS_RDONLY, "suid": MS_NOSUID, "dev": MS_NODEV, "exec": MS_NOEXEC, "async": MS_SYNCHRONOUS,
         "nomand": MS_MANDLOCK, "atime": MS_NOATIME, "diratime": MS_NODIRATIME, "norelatime": MS_RELATIME,
         "nostrictatime": MS_STRICTATIME}
IGNORED = {"defaults"}
REFUSED = {"remount", "bind", "rbind"}
USAGE = "usage: nydus-overlayfs-py overlay <target> -o <options>"


class HelperError(ValueError):
    """Bad arguments; the message is one line."""


@dataclass(frozen=True)
class Args:
    source: str
    target: str
    options: list[str]  # Nydus options already dropped


def parse_argv(argv: Sequence[str]) -> Args:
    """`<source> <target> [-o opts]... [-t type] [-s|-f|-n|-v]` (argv without the program name)."""
    positional: list[str] = []
    opts: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-o", "-t", "-N"):
            if i + 1 >= len(argv):
                raise HelperError(f"{a} needs a value; {USAGE}")
            if a == "-N":
                raise HelperError("-N (mount namespace) is not supported")
            if a == "-o":
                opts += [o for o in argv[i + 1].split(",") if o]
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts += [o for o in a[2:].split(",") if o]
        elif a in ("-s", "-f", "-n", "-v"):
            pass
        elif a.startswith("-"):
            raise HelperError(f"unknown flag {a}; {USAGE}")
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise HelperError(f"expected a source and a target, got {positional}; {USAGE}")
    source, target = positional
    if source != "overlay":
        raise HelperError(f"invalid filesystem type {source} for overlayfs (the source must be 'overlay')")
    if not target:
        raise HelperError("empty overlayfs mount target")
    kept = strip(opts)
    if not kept:
        raise HelperError("empty overlayfs mount options")
    return Args(source, target, kept)


def flags_and_data(options: Sequence[str]) -> tuple[int, str]:
    """The mount(2) flags and the overlayfs data string of `options`."""
    flags = 0
    data: list[str] = []
    for o in options:
        if o in REFUSED:
            raise HelperError(f"option {o} is not allowed for an overlay mount")
        if o in SET:
            flags |= SET[o]
        elif o in CLEAR:
            flags &= ~CLEAR[o]
        elif o not in IGNORED:
            data.append(o)
    return flags, ",".join(data)


def compact_lowerdir(options: Sequence[str]) -> tuple[str, list[str]]:
    """(directory to chdir into, options with paths relative to it) when the lower, upper and
    work directories share a parent, as containerd (and upstream's helper) do for long option
    strings; ("", options) when there is nothing to shorten."""
    opts = list(options)
    idx = next((i for i, o in enumerate(opts) if o.startswith("lowerdir=")), -1)
    if idx < 0:
        return "", opts
    dirs = opts[idx][len("lowerdir="):].split(":")
    if len(dirs) <= 1:
        return "", opts
    paths = dirs + [o.split("=", 1)[1] for o in opts if o.startswith(("upperdir=", "workdir="))]
    common = os.path.commonprefix(paths)
    common = os.path.dirname(common)  # back to a whole directory name
    if common in ("", "/", "."):
        return "", opts
    common += "/"
    if any(len(p) <= len(common) for p in paths):
        return "", opts
    out = []
    for i, o in enumerate(opts):
        if i == idx:
            out.append("lowerdir=" + ":".join(d[len(common):] for d in dirs))
        elif o.startswith(("upperdir=", "workdir=")):
            k, v = o.split("=", 1)
            out.append(f"{k}={v[len(common):]}")
        else:
            out.append(o)
    return common, out


def mount(args: Args) -> None:
    """mount(2) overlayfs at args.target (chdir'ing first when the data would not fit a page)."""
    from ..transport.mount import sys_mount

    flags, data = flags_and_data(args.options)
    if len(data) >= os.sysconf("SC_PAGE_SIZE") - 512:
        chdir, options = compact_lowerdir(args.options)
        if chdir:
            os.chdir(chdir)
            flags, data = flags_and_data(options)
    sys_mount("overlay", args.target, "overlay", flags, data)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        args = parse_argv(args_in)
        mount(args)
    except HelperError as e:
        print(f"nydus-overlayfs-py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"nydus-overlayfs-py: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
