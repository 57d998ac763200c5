"""`nydusify-py chunkdict generate`: a chunk dictionary image from several Nydus images (see
convert/chunkdict.py), for `convert --chunk-dict REF`.

    nydusify-py chunkdict generate --sources REF,REF[,...] --target REG/REPO:TAG
"""

import argparse
from typing import Any

from ..convert.progress import human
from .image import dump_json
from .nydusify_check import add_endpoint_args, registry_flags


def add_parser(sub: Any) -> None:
    c = sub.add_parser("chunkdict", help="chunk dictionaries of Nydus images")
    g = c.add_subparsers(dest="chunkdict_command", required=True).add_parser(
        "generate", help="a chunk dictionary image of the chunks several Nydus images share")
    g.add_argument("--sources", required=True, metavar="REF,REF,...", help="the Nydus images, comma-separated")
    g.add_argument("--target", required=True, metavar="REF", help="where the dictionary image goes (a tag)")
    add_endpoint_args(g, ("source", "target"))
    g.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform of the sources (default: this machine's)")
    g.add_argument("--min-images", type=int, default=2, metavar="N",
                   help="keep a chunk found in at least N of the images (default 2)")
    g.add_argument("--work-dir", metavar="DIR", help="where bootstraps go (removed at the end)")
    g.add_argument("--output-json", metavar="FILE", help="write the result as JSON")
    g.add_argument("-v", "--verbose", action="store_true", help="log registry traffic decisions")
    g.set_defaults(run=cmd_generate)


def cmd_generate(a: argparse.Namespace) -> int:
    from ..convert.chunkdict import ChunkdictOptions, generate  # (here: not loaded by the other commands)

    sources = [s for s in a.sources.split(",") if s]
    r = generate(ChunkdictOptions(
        **registry_flags(a), sources=sources, target=a.target, platform=a.platform,
        min_images=a.min_images))
    print(f"chunk dictionary {r.target} ({r.manifest_digest}): {r.chunks} of {r.distinct_chunks} distinct chunks "
          f"({human(r.uncompressed_bytes)}) of {len(r.sources)} images, in {len(r.blobs)} of their blobs")
    dump_json(a.output_json, r)
    return 0
