"""`nydusify-py`: convert an OCI/Docker image in a registry into a Nydus image in a registry,
and the tools around it (peer of nydusify's `convert`, `check`, `copy`, `mount`/`view`).

    nydusify-py convert --source REG/REPO:TAG --target REG/REPO:TAG [--source-insecure] ...
    nydusify-py check   --target REF [--source REF]        (cli/nydusify_check.py)
    nydusify-py copy    --source REF --target REF          (cli/nydusify_copy.py)
    nydusify-py mount   --target REF --mount-path DIR      (cli/nydusify_mount.py)
    nydusify-py optimize --source REF --target REF --prefetch-files FILE  (cli/nydusify_optimize.py)
    nydusify-py commit  --container ID --target REF        (cli/nydusify_commit.py)
    nydusify-py chunkdict generate --sources REF,REF --target REF  (cli/nydusify_chunkdict.py)

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
`--prefetch-dir PATH` is one prefetch path (without it or --prefetch-patterns there is no prefetch
table, where nydusify's default is "/", the whole image). `--fs-align-chunk` aligns v5 chunks to
4 KiB (v6 always is). `--with-referrer` sets the manifest's `subject` to the source manifest.
An upload answered 502-504, or whose connection fails, is tried again `--push-retry-count` times
in all (default 3), `--push-retry-delay` apart (Go syntax, default 5s); each retry is logged and
counted (`push_retries` in --output-json). `--batch-size` takes only 0; `--docker-v2-format` is
accepted with nydusify's deprecation warning. nydusify's environment variables set the flags
(SOURCE, TARGET, PLAIN_HTTP, FS_VERSION, ... ; a flag on the command line wins).
Errors end as one line on stderr and exit code 1 (nothing is pushed for bad input); usage
errors exit 2.

Layers are downloaded and decompressed inside `--work-dir` (removed at the end, also on failure);
a layer that expands past `--max-expanded-size` (default 64G), or more than
`--max-expansion-ratio` (default 100) times its compressed size once past
`--expansion-ratio-grace` (default 64M), fails the conversion (a decompression bomb).
"""

import gc

# The imports below make ~200k objects and no garbage, yet set off ~70 collections (~8 ms of a
# start-up that a --build-cache rebuild pays in full): the collector is off while they run, and
# what they made is frozen before it is on again (else its first collection walks all of it as
# young objects: the same ~10 ms at once). `main` freezes what the argument parsing adds.
_GC_WAS_ON = gc.isenabled()
gc.disable()
try:
    import argparse
    import dataclasses
    import json
    import logging
    import os
    import sys
    from collections.abc import Callable

    from ..convert.build_cache import DEFAULT_VERSION, MAX_RECORDS
    from ..convert.converter import ConvertOptions, ConvertResult, convert
    from ..convert.errors import ConvertError
    from ..convert.memory import tune_malloc
    from ..convert.progress import Progress, human
    from ..convert.push_retry import DEFAULT_COUNT, PushRetry
    from ..convert.reference import parse_reference
    from ..convert.reuse import cache_ref_for
    from ..rafs.errors import FormatError
    from . import (
        nydusify_check,
        nydusify_chunkdict,
        nydusify_commit,
        nydusify_copy,
        nydusify_mount,
        nydusify_optimize,
    )
    from .envflags import apply_env
    from .image import _chunk_size, add_limit_args, dump_json, limits_from_args
    from .nydusify_check import registry_flags
finally:
    if _GC_WAS_ON:
        gc.freeze()
        gc.enable()

PROG = "nydusify-py"
log = logging.getLogger("nydusify-py")

# nydusify's EnvVars for `convert`, by our dest names
CONVERT_ENV = {
    "source": "SOURCE", "target": "TARGET", "source_archive": "SOURCE_ARCHIVE", "target_archive": "TARGET_ARCHIVE",
    "target_suffix": "TARGET_SUFFIX", "source_insecure": "SOURCE_INSECURE",
    "target_insecure": "TARGET_INSECURE", "build_cache": "BUILD_CACHE", "build_cache_tag": "BUILD_CACHE_TAG",
    "build_cache_version": "BUILD_CACHE_VERSION", "build_cache_insecure": "BUILD_CACHE_INSECURE",
    "build_cache_max_records": "BUILD_CACHE_MAX_RECORDS", "chunk_dict": "CHUNK_DICT",
    "chunk_dict_insecure": "CHUNK_DICT_INSECURE", "merge_platform": "MERGE_PLATFORM",
    "with_referrer": "WITH_REFERRER", "oci": "OCI", "reverse": "REVERSE", "fs_version": "FS_VERSION", "fs_align_chunk": "FS_ALIGN_CHUNK",
    "prefetch_dir": "PREFETCH_DIR", "prefetch_patterns": "PREFETCH_PATTERNS", "compressor": "COMPRESSOR",
    "chunk_size": "FS_CHUNK_SIZE", "batch_size": "BATCH_SIZE", "work_dir": "WORK_DIR", "output_json": "OUTPUT_JSON",
    "plain_http": "PLAIN_HTTP", "push_retry_count": "PUSH_RETRY_COUNT", "push_retry_delay": "PUSH_RETRY_DELAY",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert container images to Nydus images.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="pull an OCI/Docker image, build its Nydus form, push it")
    c.add_argument("--source", required=True, metavar="REF", help="source image, e.g. registry:5000/app:v1")
    c.add_argument("--source-archive", metavar="FILE",
                   help="read the source image from this OCI image layout tar (plain, gzip or zstd) instead of a "
                        "registry; --source names the image in it (or it has only one)")
    t = c.add_mutually_exclusive_group()
    t.add_argument("--target", metavar="REF", help="target image (a tag)")
    t.add_argument("--target-suffix", metavar="SUFFIX",
                   help="target = the source reference (tagged) plus SUFFIX, e.g. -nydus (conflicts with --target)")
    c.add_argument("--target-archive", metavar="FILE",
                   help="write the Nydus image as an OCI image layout tar here instead of pushing it; the target "
                        "reference (default: the source's) names it inside")
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
    c.add_argument("--jobs", type=int, default=3, metavar="N", help="concurrent uploads, and layers downloaded and built at once (at most one per core) (default 3)")
    c.add_argument("--output-json", metavar="FILE", help="write the conversion summary as JSON")
    c.add_argument("--prefetch-patterns", action="store_true",
                   help="read prefetch paths from STDIN, one absolute path per line (files read at startup, in "
                        "order): they go first and contiguous in each layer's blob and into the prefetch table")
    c.add_argument("--prefetch-files", metavar="FILE", help="like --prefetch-patterns, from FILE")
    c.add_argument("--prefetch-dir", metavar="PATH",
                   help="one absolute path inside the image to prefetch (conflicts with --prefetch-patterns)")
    c.add_argument("--fs-align-chunk", "--backend-aligned-chunk", dest="fs_align_chunk", action="store_true",
                   help="4 KiB-aligned chunk data for RAFS v5 (v6 always is)")
    c.add_argument("--with-referrer", action="store_true",
                   help="the Nydus manifest's `subject` names the source manifest (OCI referrers API)")
    c.add_argument("--reverse", action="store_true",
                   help="experimental: convert a Nydus image back to an OCI image (one flattened gzip layer)")
    c.add_argument("--docker-v2-format", action="store_true", help="deprecated by nydusify; no effect (see --oci)")
    c.add_argument("--batch-size", default="0", metavar="SIZE", help="only 0 (batch chunks are not built here)")
    c.add_argument("--push-retry-count", type=int, default=DEFAULT_COUNT, metavar="N",
                   help=f"attempts per upload when the registry answers 502-504 or the connection fails "
                        f"(default {DEFAULT_COUNT}; 0 or less: the default)")
    c.add_argument("--push-retry-delay", default="5s", metavar="DURATION",
                   help="wait between upload attempts, Go syntax: 500ms, 5s, 1m (default 5s)")
    c.add_argument("--no-stream-push", dest="stream_push", action="store_false",
                   help="push each layer blob once it is complete (one PUT), not while it is written (PATCH "
                        "pieces; a registry that refuses them gets whole blobs anyway)")
    add_limit_args(c)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    c.add_argument("-v", "--verbose", action="store_true", help="log registry traffic decisions")
    apply_env(c, CONVERT_ENV)
    c.set_defaults(run=cmd_convert, usage_error=c.error)
    nydusify_check.add_parser(sub)
    nydusify_copy.add_parser(sub)
    nydusify_mount.add_parser(sub)
    nydusify_optimize.add_parser(sub)
    nydusify_commit.add_parser(sub)
    nydusify_chunkdict.add_parser(sub)
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
    if a.prefetch_dir:
        if a.prefetch_patterns or a.prefetch_files:
            raise ConvertError("--prefetch-dir conflicts with --prefetch-patterns")
        data = a.prefetch_dir.encode()
    elif a.prefetch_files:
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


def _batch_size(text: str) -> int:
    """nydusify's --batch-size value (decimal or 0x hex)."""
    try:
        return int(text, 0)
    except ValueError:
        raise ConvertError(f"--batch-size: {text!r} is not a number") from None


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
    if a.target is not None and a.target_suffix is not None:
        raise ConvertError("--target conflicts with --target-suffix")
    if a.target is None and a.target_suffix is None and not a.target_archive:
        a.usage_error("one of the arguments --target --target-suffix --target-archive is required")
    if a.source_archive and not os.path.isfile(a.source_archive):
        raise ConvertError(f"source archive not accessible: {a.source_archive}")
    if a.target_archive and not os.path.isdir(os.path.dirname(os.path.abspath(a.target_archive))):
        raise ConvertError(f"target archive directory not accessible: {os.path.dirname(a.target_archive)}")
    if a.target is not None:
        target = a.target
    elif a.target_suffix is not None:
        target = target_with_suffix(a.source, a.target_suffix)
    else:
        target = a.source
    if _batch_size(a.batch_size):
        raise ConvertError("--batch-size: batch chunks are not supported by nydusify-py; use 0")
    if a.docker_v2_format:
        log.warning("the option --docker-v2-format has been deprecated, use --oci instead")
    try:
        retry = PushRetry.from_flags(a.push_retry_count, a.push_retry_delay)
    except ValueError as e:
        raise ConvertError(f"--push-retry-delay: {e}") from None
    if not 1 <= a.build_cache_max_records <= MAX_RECORDS:
        raise ConvertError(f"--build-cache-max-records must be in 1..{MAX_RECORDS}")
    if a.reverse:
        return _reverse(a, target, retry)
    cache = cache_ref_for(target, a.build_cache_tag) if a.build_cache_tag else a.build_cache
    opts = ConvertOptions(
        **registry_flags(a), source=a.source, target=target, oci=a.oci, all_platforms=a.all_platforms,
        platform=a.platform, fs_version=a.fs_version, compressor=a.compressor, chunk_size=a.chunk_size,
        merge_platform=a.merge_platform,
        jobs=a.jobs, prefetch_patterns=_prefetch_patterns(a), expansion_limits=limits_from_args(a),
        build_cache=cache, build_cache_insecure=a.build_cache_insecure, build_cache_version=a.build_cache_version,
        build_cache_max_records=a.build_cache_max_records, chunk_dict=a.chunk_dict,
        chunk_dict_insecure=a.chunk_dict_insecure, push_retry=retry, with_referrer=a.with_referrer,
        fs_align_chunk=a.fs_align_chunk, source_archive=a.source_archive, target_archive=a.target_archive,
        stream_push=a.stream_push,
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


def _reverse(a: argparse.Namespace, target: str, retry: PushRetry) -> int:
    from ..convert.reverse import ReverseOptions, reverse_convert

    if a.source_archive or a.target_archive:
        raise ConvertError("--reverse reads from and pushes to registries; --source-archive/--target-archive are "
                           "for the forward conversion")
    r = reverse_convert(ReverseOptions(
        **registry_flags(a), source=a.source, target=target, platform=a.platform,
        push_retry=retry))
    print(f"converted {r.source} -> {r.target} (OCI, reversed): manifest {r.manifest_digest}\n"
          f"  one layer {r.layer_digest[:19]}: {human(r.layer_bytes)} gzip, {human(r.tar_bytes)} tar, "
          f"{r.entries} entries; fetched {human(r.fetched_bytes)} of blobs in {r.seconds:.1f}s")
    dump_json(a.output_json, r)
    return 0


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # before any thread: a dozen of them would each keep an arena (convert.memory)
    # what the imports made lives until exit: a full collection then need not walk it (one cost
    # ~15 ms in a 0.7 s --build-cache rebuild; the younger generations are collected as before)
    gc.freeze()
    try:
        parser = _parser()
    except ValueError as e:  # a nydusify environment variable with a bad value
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
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
