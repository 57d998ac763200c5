"""`nydusify-py optimize`: move the data of the files a workload reads at start into one new
blob of a Nydus image and push the result (see convert/optimizer.py).

    nydusify-py optimize --source REG/REPO:TAG --target REG/REPO:TAG --prefetch-files FILE

FILE is nydus-image's hint file (`{"version": "v1", "files": [{"path": "/abs", "ranges":
[[offset, size]]}]}`) or one absolute path per line.
"""

import argparse
import logging
from typing import Any

from ..convert.errors import ConvertError
from ..convert.progress import human
from ..convert.push_retry import PushRetry
from .envflags import apply_env, push_chunk_size
from .image import dump_json
from .nydusify_check import add_endpoint_args, registry_flags

log = logging.getLogger("nydusify-py")

# convert.optimizer.POLICY (a test keeps them equal): the optimizer, its builder and its pulls are
# imported when the command runs, not by every nydusify-py start (a convert: ~3.5 ms)
POLICY = "separated-blob-with-prefetch-files"

OPTIMIZE_ENV = {"source": "SOURCE", "target": "TARGET", "source_insecure": "SOURCE_INSECURE",
                "target_insecure": "TARGET_INSECURE", "policy": "OPTIMIZE_POLICY", "prefetch_files": "PREFETCH_FILES",
                "work_dir": "WORK_DIR"}


def add_parser(sub: Any) -> None:
    c = sub.add_parser("optimize", help="move the data of the files read at start into one new blob, push the image")
    c.add_argument("--source", required=True, metavar="REF", help="the Nydus image")
    c.add_argument("--target", required=True, metavar="REF", help="where the optimized image goes (a tag)")
    add_endpoint_args(c, ("source", "target"))
    c.add_argument("--prefetch-files", required=True, metavar="FILE",
                   help="hint file: nydus-image's JSON (paths and ranges) or one absolute path per line")
    c.add_argument("--policy", default=POLICY, help=f"only {POLICY} (the default)")
    c.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to optimize (default: this machine's)")
    c.add_argument("--work-dir", metavar="DIR", help="where the fetched ranges and new blob go (removed at the end)")
    c.add_argument("--nydus-image", metavar="PATH", help="accepted; the build runs in this process")
    c.add_argument("--push-chunk-size", default="0MB", metavar="SIZE",
                   help="upload blobs as PATCH requests of SIZE (e.g. 10MB, 16MiB) for registries or proxies "
                        "that limit a request's size; 0MB (default): one streamed PUT per blob")
    c.add_argument("--output-json", metavar="FILE", help="write the result as JSON")
    c.add_argument("-v", "--verbose", action="store_true", help="log registry traffic decisions")
    c.set_defaults(run=cmd_optimize)
    apply_env(c, OPTIMIZE_ENV)


def cmd_optimize(a: argparse.Namespace) -> int:
    from ..convert.optimizer import OptimizeOptions, optimize

    if a.policy != POLICY:
        raise ConvertError(f"--policy {a.policy!r}: only {POLICY} is supported")
    if a.nydus_image:
        log.info("--nydus-image %s is not used: the image is built in this process", a.nydus_image)
    with open(a.prefetch_files, "rb") as f:
        hints = f.read(64 << 20)
    r = optimize(OptimizeOptions(
        **registry_flags(a), source=a.source, target=a.target, prefetch_files=hints, platform=a.platform,
        push_retry=PushRetry(), push_chunk_size=push_chunk_size(a.push_chunk_size)))
    print(f"optimized {r.source} -> {r.target} ({r.manifest_digest})")
    print(f"  {r.files} files: {r.chunks_moved} chunks ({human(r.bytes_moved)}) in blob {r.blob_id[:12]}; fetched "
          f"{human(r.fetched_bytes)} from the source; {len(r.skipped)} listed paths skipped; time {r.seconds:.2f} s")
    dump_json(a.output_json, r)
    return 0
