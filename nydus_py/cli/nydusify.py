"""`nydusify-py`: convert an OCI/Docker image in a registry into a Nydus image in a registry,
and the tools around it (peer of nydusify's `convert`, `check`, `copy`, `mount`/`view`).

    nydusify-py convert --source REG/REPO:TAG --target REG/REPO:TAG [--source-insecure] ...
    nydusify-py check   --target REF [--source REF]        (cli/nydusify_check.py)
    nydusify-py copy    --source REF --target REF          (cli/nydusify_copy.py)
    nydusify-py mount   --target REF --mount-path DIR      (cli/nydusify_mount.py)

Credentials: `--source-auth/--target-auth USER:PASSWORD`, else the registry's entry in the
docker config.json (`$DOCKER_CONFIG`, `~/.docker`), else anonymous; bearer tokens are fetched as
the registry asks. `--*-insecure` skips TLS verification and falls back to plain HTTP;
`--plain-http` talks plain HTTP to both registries from the start (nydusify's flag). A plain-HTTP
registry reached without either gets a one-line hint naming them.

nydusify's names work too: `--fs-chunk-size` (= `--chunk-size`), `--multi-platform`
(= `--merge-platform`), `--target-suffix=-nydus` (target = the tagged source + suffix),
`--platform a,b` / `--all-platforms` (several images: an index of Nydus manifests), `--oci`
(OCI media types; without it a Docker source keeps Docker ones, as nydusify does).
`--build-cache REF` (or `--build-cache-tag TAG`: the target's repository with that tag) reuses
layers converted before: a layer whose ChainID and build parameters have a record is neither
pulled nor built, its blob is mounted (same registry) or copied into the target, and the cache
image is pushed at the end (at most `--build-cache-max-records` records, least recently used out;
`--build-cache-version` discards caches of another version). `--chunk-dict
bootstrap:registry:REF | bootstrap:local:PATH | REF` deduplicates against an existing Nydus
image's chunks: they are referenced from its blobs, which join the new image.
Errors end as one line on stderr and exit code 1 (nothing is pushed for bad input); usage
errors exit 2.

Layers are downloaded and decompressed inside `--work-dir` (removed at the end, also on failure);
a layer that expands past `--max-expanded-size` (default 64G), or more than
`--max-expansion-ratio` (default 100) times its compressed size once past
`--expansion-ratio-grace` (default 64M), fails the conversion (a decompression bomb).
"""

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable

from ..convert.build_cache import DEFAULT_VERSION, MAX_RECORDS
from ..convert.converter import ConvertOptions, ConvertResult, convert
from ..convert.errors import ConvertError
from ..convert.progress import Progress, human
from ..convert.reference import parse_reference
from ..convert.reuse import cache_ref_for
from ..rafs.errors import FormatError
from . import nydusify_check, nydusify_copy, nydusify_mount
from .image import _chunk_size, add_limit_args, limits_from_args

PROG = "nydusify-py"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert container images to Nydus images.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="pull an OCI/Docker image, build its Nydus form, push it")
    c.add_argument("--source", required=True, metavar="REF", help="source image, e.g. registry:5000/app:v1")
    t = c.add_mutually_exclusive_group(required=True)
    t.add_argument("--target", metavar="REF", help="target image (a tag)")
    t.add_argument("--target-suffix", metavar="SUFFIX",
                   help="target = the source reference (tagged) plus SUFFIX, e.g. -nydus (conflicts with --target)")
    c.add_argument("--source-insecure", action="store_true", help="skip TLS checks / allow plain HTTP for the source")
    c.add_argument("--target-insecure", action="store_true", help="skip TLS checks / allow plain HTTP for the target")
    c.add_argument("--plain-http", action="store_true", help="talk plain HTTP to both registries")
    c.add_argument("--source-auth", metavar="USER:PASSWORD", help="source credentials (default: docker config.json)")
    c.add_argument("--target-auth", metavar="USER:PASSWORD", help="target credentials (default: docker config.json)")
    c.add_argument("--platform", metavar="OS/ARCH[/VARIANT][,...]",
                   help="platform(s) to convert, comma-separated (default: this machine's); several give an index")
    c.add_argument("--all-platforms", action="store_true",
                   help="convert every platform of a source index into an index (conflicts with --platform)")
    c.add_argument("--oci", action="store_true",
                   help="OCI media types for the Nydus image even when the source has Docker ones")
    c.add_argument("--fs-version", type=int, choices=(5, 6), default=6, help="RAFS version (default 6)")
    c.add_argument("--compressor", choices=("zstd", "lz4_block", "none"), default="zstd")
    c.add_argument("--fs-chunk-size", "--chunk-size", dest="chunk_size", type=_chunk_size, default=0x100000,
                   help="power of two, 0x1000..0x1000000 (default 0x100000)")
    c.add_argument("--merge-platform", "--multi-platform", dest="merge_platform", action="store_true",
                   help="push an OCI index holding both the original and the Nydus manifest")
    c.add_argument("--work-dir", metavar="DIR", help="where temporary files go (default: $TMPDIR)")
    bc = c.add_mutually_exclusive_group()
    bc.add_argument("--build-cache", metavar="REF", help="cache image of converted layers (a tag), read and updated")
    bc.add_argument("--build-cache-tag", metavar="TAG", help="use TARGET-REPOSITORY:TAG as --build-cache")
    c.add_argument("--build-cache-version", default=DEFAULT_VERSION, metavar="V",
                   help=f"cache version; a cache of another version is replaced (default {DEFAULT_VERSION})")
    c.add_argument("--build-cache-insecure", action="store_true",
                   help="skip TLS checks / allow plain HTTP for the cache registry")
    c.add_argument("--build-cache-max-records", type=int, default=MAX_RECORDS, metavar="N",
                   help=f"records kept in the cache image, 1..{MAX_RECORDS} (default {MAX_RECORDS})")
    c.add_argument("--chunk-dict", metavar="SPEC",
                   help="deduplicate against a Nydus image's chunks: bootstrap:registry:REF, bootstrap:local:PATH "
                        "(its blobs must be in the target repository) or REF")
    c.add_argument("--chunk-dict-insecure", action="store_true",
                   help="skip TLS checks / allow plain HTTP for the chunk dict registry")
    c.add_argument("--jobs", type=int, default=3, metavar="N", help="concurrent downloads and uploads (default 3)")
    c.add_argument("--output-json", metavar="FILE", help="write the conversion summary as JSON")
    c.add_argument("--prefetch-patterns", action="store_true",
                   help="read prefetch paths from STDIN, one absolute path per line (files read at startup, in "
                        "order): they go first and contiguous in each layer's blob and into the prefetch table")
    c.add_argument("--prefetch-files", metavar="FILE", help="like --prefetch-patterns, from FILE")
    add_limit_args(c)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    c.add_argument("-v", "--verbose", action="store_true", help="log registry traffic decisions")
    c.set_defaults(run=cmd_convert)
    nydusify_check.add_parser(sub)
    nydusify_copy.add_parser(sub)
    nydusify_mount.add_parser(sub)
    return p


def summary(r: ConvertResult) -> str:
    if r.platforms:
        return "\n".join([f"converted {r.source} -> {r.target}: index {r.index_digest}",
                          *(summary(p) for p in r.platforms)])
    lines = [
        f"converted {r.source} ({r.platform}) -> {r.target}",
        f"  manifest {r.manifest_digest}" + (f"  index {r.index_digest}" if r.index_digest else ""),
        f"  layers {r.layers}: {human(r.source_bytes)} compressed, {human(r.tar_bytes)} tar, "
        f"{human(r.file_bytes)} file data",
        f"  nydus: blobs {human(r.blob_bytes)}, bootstrap {human(r.bootstrap_bytes)} "
        f"(layer {human(r.bootstrap_layer_bytes)})",
        f"  chunks {r.chunks}, {r.deduplicated} deduplicated (dedup ratio {100 * r.dedup_ratio:.1f}%)",
        f"  pushed {len(r.uploaded)} blobs ({human(r.uploaded_bytes)}), {len(r.reused)} already in the target "
        f"({human(r.reused_bytes)})",
        f"  time {r.seconds:.2f} s",
    ]
    if r.build_cache:
        c = r.build_cache
        lines.insert(-1, f"  build cache: {r.layers_cached} layers reused, {r.layers_built} converted "
                         f"({c['unusable']} records not usable), {c['records']} records kept")
    if r.dict_blobs:
        lines.insert(-1, f"  chunk dict: {len(r.dict_blobs)} of its blobs referenced")
    return "\n".join(lines)


def _prefetch_patterns(a: argparse.Namespace) -> list[bytes]:
    if a.prefetch_files:
        with open(a.prefetch_files, "rb") as f:
            data = f.read(16 << 20)
    elif a.prefetch_patterns:
        data = sys.stdin.buffer.read(16 << 20)
    else:
        return []
    paths = [line.strip() for line in data.splitlines() if line.strip()]
    bad = [p for p in paths if not p.startswith(b"/")]
    if bad:
        raise ConvertError(f"prefetch paths must be absolute: {bad[0].decode(errors='replace')!r}")
    return paths


def target_with_suffix(source: str, suffix: str) -> str:
    """nydusify's --target-suffix: the source reference, tagged (`latest` by default), plus `suffix`."""
    ref = parse_reference(source)
    if ref.digest:
        raise ConvertError(f"--target-suffix needs a tagged source, not a digest: {ref}")
    target = f"{ref}{suffix}"
    parse_reference(target)  # the suffix must leave a valid tag
    return target


def cmd_convert(a: argparse.Namespace) -> int:
    if a.jobs < 1 or a.jobs > 64:
        raise ConvertError("--jobs must be in 1..64")
    if a.all_platforms and a.platform:
        raise ConvertError("--all-platforms conflicts with --platform")
    target = a.target if a.target is not None else target_with_suffix(a.source, a.target_suffix)
    if not 1 <= a.build_cache_max_records <= MAX_RECORDS:
        raise ConvertError(f"--build-cache-max-records must be in 1..{MAX_RECORDS}")
    cache = cache_ref_for(target, a.build_cache_tag) if a.build_cache_tag else a.build_cache
    opts = ConvertOptions(
        source=a.source, target=target, plain_http=a.plain_http, oci=a.oci, all_platforms=a.all_platforms,
        source_insecure=a.source_insecure, target_insecure=a.target_insecure,
        source_auth=a.source_auth, target_auth=a.target_auth, platform=a.platform, fs_version=a.fs_version,
        compressor=a.compressor, chunk_size=a.chunk_size, merge_platform=a.merge_platform, work_dir=a.work_dir,
        jobs=a.jobs, prefetch_patterns=_prefetch_patterns(a), expansion_limits=limits_from_args(a),
        build_cache=cache, build_cache_insecure=a.build_cache_insecure, build_cache_version=a.build_cache_version,
        build_cache_max_records=a.build_cache_max_records, chunk_dict=a.chunk_dict,
        chunk_dict_insecure=a.chunk_dict_insecure,
    )
    progress = Progress(sys.stderr, quiet=a.quiet)
    try:
        result = convert(opts, progress)
    finally:
        progress.close()
    print(summary(result))
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump({**dataclasses.asdict(result), "dedup_ratio": result.dedup_ratio}, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    if not args.verbose:
        logging.getLogger("nydus_py.storage.registry").setLevel(logging.ERROR)
    try:
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except (ConvertError, FormatError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e.strerror or e}" if e.filename is None else f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
