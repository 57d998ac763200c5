"""`nydusify-py check`: validate a Nydus image in a registry (see convert/checker.py for the rules).

    nydusify-py check --target REG/REPO:TAG [--source REG/REPO:TAG] [--multi-platform] ...

Exit 0 when every rule passes; 1 with one line per problem (rule: path or layer: what differs)
otherwise, or when the check cannot start (target missing, registry unreachable).
"""

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..convert.progress import human

if TYPE_CHECKING:  # (imported when the subcommand runs: `convert` starts ~45 ms sooner without it)
    from ..convert.checker import CheckReport


def add_endpoint_args(p: argparse.ArgumentParser, sides: tuple[str, ...]) -> None:
    """--SIDE, --SIDE-insecure, --SIDE-auth for each side, and --plain-http (nydusify's names)."""
    for side in sides:
        p.add_argument(f"--{side}-insecure", action="store_true",
                       help=f"skip TLS checks / allow plain HTTP for the {side}")
        p.add_argument(f"--{side}-auth", metavar="USER:PASSWORD", help=f"{side} credentials (default: docker config)")
    p.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registries")


def registry_flags(a: argparse.Namespace) -> dict[str, Any]:
    """The `RegistryFlags` of a tool's options, from `add_endpoint_args`' flags and --work-dir."""
    return {k: getattr(a, k) for k in ("source_insecure", "target_insecure", "plain_http", "source_auth",
                                       "target_auth", "work_dir")}


def add_parser(sub: Any) -> None:
    c = sub.add_parser("check", help="verify a Nydus image's manifest, bootstrap, blobs and (with --source) files")
    c.add_argument("--target", required=True, metavar="REF", help="the Nydus image")
    c.add_argument("--source", metavar="REF", help="the image it was converted from (enables the filesystem rule)")
    add_endpoint_args(c, ("source", "target"))
    c.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to check (default: this machine's)")
    c.add_argument("--multi-platform", action="store_true",
                   help="the target must be an index holding the original and the Nydus manifest")
    c.add_argument("--no-fs-check", action="store_true",
                   help="skip comparing the file trees of source and target (on by default with --source)")
    c.add_argument("--work-dir", metavar="DIR", help="where downloads go (default: $TMPDIR; removed at the end)")
    c.add_argument("-v", "--verbose", action="store_true", help="log registry traffic decisions")
    c.set_defaults(run=cmd_check)


def render(r: "CheckReport") -> str:
    if not r.ok:
        head = f"check of {r.target} failed: {len(r.problems)} problem(s)"
        return "\n".join([head, *(f"  {p}" for p in r.problems)])
    lines = [f"checked {r.target} (manifest {r.manifest_digest[:19]}, RAFS v{r.fs_version}): OK",
             f"  bootstrap: {r.inodes} inodes walked",
             f"  blobs: {r.blobs} ({human(r.blob_bytes)}) present with their digests, "
             f"{r.chunks_verified} chunks verified"]
    if "filesystem" in r.rules:
        lines.append(f"  filesystem: {r.paths_compared} paths equal to the source's layers")
    return "\n".join(lines)


def cmd_check(a: argparse.Namespace) -> int:
    from ..convert.checker import CheckOptions, check

    opts = CheckOptions(
        **registry_flags(a), target=a.target, source=a.source, platform=a.platform,
        multi_platform=a.multi_platform, fs_check=not a.no_fs_check)
    report = check(opts)
    if report.ok:
        print(render(report))
        return 0
    print(render(report), file=sys.stderr)
    return 1
