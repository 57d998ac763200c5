"""`nydusify-py commit`: push a new Nydus image made of a containerd container's changes to its
Nydus image (see convert/committer.py).

    nydusify-py commit --container ID --target REG/REPO:TAG [--containerd-address SOCK] [-n NS]
"""

import argparse
import logging
from typing import Any

from ..convert.errors import ConvertError
from .envflags import apply_env
from .image import dump_json
from .nydusify_check import add_endpoint_args, registry_flags

log = logging.getLogger("nydusify-py")


def add_parser(sub: Any) -> None:
    c = sub.add_parser("commit", help="push a new Nydus image from a container's changes to its Nydus image")
    c.add_argument("--container", required=True, metavar="ID", help="the container (ID or a unique prefix)")
    c.add_argument("--target", required=True, metavar="REF", help="where the committed image goes (a tag)")
    add_endpoint_args(c, ("source", "target"))
    c.add_argument("--containerd-address", default="/run/containerd/containerd.sock", metavar="SOCK",
                   help="containerd's socket, optionally unix:// (default /run/containerd/containerd.sock)")
    c.add_argument("--namespace", "-n", default="default", help="the container's namespace (default: default)")
    c.add_argument("--maximum-times", type=int, default=400, metavar="N",
                   help="refuse when the image was committed N times already (default 400)")
    c.add_argument("--with-path", "--with-mount-path", action="append", default=[], metavar="PATH",
                   help="not supported: mounts inside the container are not committed")
    c.add_argument("--work-dir", metavar="DIR", help="where the new layer is built (removed at the end)")
    c.add_argument("--nydus-image", metavar="PATH", help="accepted; the build runs in this process")
    c.add_argument("--output-json", metavar="FILE", help="write the result as JSON")
    c.add_argument("-v", "--verbose", action="store_true", help="log registry traffic decisions")
    c.set_defaults(run=cmd_commit)
    apply_env(c, {"containerd_address": "CONTAINERD_ADDRESS"})


def cmd_commit(a: argparse.Namespace) -> int:
    from ..convert.committer import CommitOptions, commit  # (here: not loaded by the other commands)

    if a.with_path:
        raise ConvertError("--with-path is not supported: only the container's root filesystem is committed")
    if a.nydus_image:
        log.info("--nydus-image %s is not used: the image is built in this process", a.nydus_image)
    r = commit(CommitOptions(
        **registry_flags(a), container=a.container, target=a.target, containerd_address=a.containerd_address,
        namespace=a.namespace, maximum_times=a.maximum_times))
    print(f"committed container {r.container} ({r.source}) -> {r.target} ({r.manifest_digest})")
    print(f"  new blob {r.blob_id or '(none: no file data changed)'}; {r.committed_layers} commit layers; "
          f"{'paused while read' if r.paused else 'not running'}; time {r.seconds:.2f} s")
    dump_json(a.output_json, r)
    return 0
