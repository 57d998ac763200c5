"""`nydusify-py copy`: copy an image (Nydus or not) between registries or repositories, blobs
the target already has skipped (see convert/copier.py).

    nydusify-py copy --source REG/REPO:TAG --target REG/REPO:TAG [--all-platforms | --platform P]
"""

import argparse
from typing import Any

from ..convert.errors import ConvertError
from ..convert.progress import human
from .envflags import push_chunk_size
from .image import dump_json
from .nydusify_check import add_endpoint_args, registry_flags


def add_parser(sub: Any) -> None:
    c = sub.add_parser("copy", help="copy an image between registries (reusing blobs already there)")
    c.add_argument("--source", required=True, metavar="REF", help="image to copy")
    c.add_argument("--target", required=True, metavar="REF", help="where to (a tag)")
    add_endpoint_args(c, ("source", "target"))
    c.add_argument("--platform", metavar="OS/ARCH[/VARIANT][,...]", help="platform(s) to copy (default: this machine's)")
    c.add_argument("--all-platforms", action="store_true", help="copy every platform of an index")
    c.add_argument("--work-dir", metavar="DIR", help="where blobs pass through (default: $TMPDIR)")
    c.add_argument("--jobs", type=int, default=3, metavar="N", help="concurrent blob copies (default 3)")
    c.add_argument("--push-chunk-size", default="0MB", metavar="SIZE",
                   help="upload blobs as PATCH requests of SIZE (e.g. 10MB, 16MiB) for registries or proxies "
                        "that limit a request's size; 0MB (default): one streamed PUT per blob")
    c.add_argument("--output-json", metavar="FILE", help="write what was copied as JSON")
    c.add_argument("-v", "--verbose", action="store_true", help="log registry traffic decisions")
    c.set_defaults(run=cmd_copy)


def cmd_copy(a: argparse.Namespace) -> int:
    from ..convert.copier import CopyOptions, copy  # (here: not on the start-up path of `convert`)

    if a.jobs < 1 or a.jobs > 64:
        raise ConvertError("--jobs must be in 1..64")
    r = copy(CopyOptions(
        **registry_flags(a), source=a.source, target=a.target, platform=a.platform,
        all_platforms=a.all_platforms, jobs=a.jobs,
        push_chunk_size=push_chunk_size(a.push_chunk_size)))
    print(f"copied {r.source} -> {r.target} ({r.digest})")
    print(f"  manifests {len(r.manifests)}; uploaded {len(r.uploaded)} blobs ({human(r.uploaded_bytes)}), "
          f"{len(r.reused)} already in the target ({human(r.reused_bytes)}); time {r.seconds:.2f} s")
    dump_json(a.output_json, r)
    return 0
