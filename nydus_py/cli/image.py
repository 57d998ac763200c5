"""`nydus-image-py`: build, merge, check, inspect, stat, compact, export and unpack RAFS images (peer of
`nydus-image`).

Every bad input (corrupt image, hostile tar, missing file) ends as one line on stderr and exit
code 1; argparse usage errors exit 2.

`create` decompresses gzip/zstd layer tars into anonymous files inside `--blob-dir` (never the
system temp dir; nothing is left behind, even on a crash) and refuses decompression bombs: a layer
that expands past `--max-expanded-size` (default 64G), or past `--max-expansion-ratio` (default
100) times its compressed size once it is beyond `--expansion-ratio-grace` (default 64M). 0
turns a cap off. See `builder.limits`.
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import stat
import sys
import tempfile
from typing import Any

from ..builder.limits import (
    DEFAULT_MAX_RATIO,
    DEFAULT_MAX_SIZE,
    DEFAULT_RATIO_GRACE,
    ExpansionLimits,
    human_size,
    parse_size,
)
from ..builder.options import BuildOptions, BuildResult
from ..builder.packed import Tree, as_tree
from ..builder.sources import SourceStats, detect_compression, tree_from_directory, tree_from_tar
from ..builder.tree import Inode
from ..rafs.constants import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Compressor, Digester
from ..rafs.errors import FormatError

PROG = "nydus-image-py"
log = logging.getLogger(PROG)
SOURCE_TYPES = ("dir-rafs", "tar-rafs", "targz-rafs")


def _chunk_size(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid chunk size {text!r}") from None
    if not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"chunk size {text} must be a power of two in [{MIN_CHUNK_SIZE:#x}, {MAX_CHUNK_SIZE:#x}]"
        )
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"ratio {text} must be a finite number >= 0")
    return value


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """The decompression-bomb caps (`builder.limits`), shared with nydusify-py."""
    p.add_argument("--max-expanded-size", type=_size, default=DEFAULT_MAX_SIZE, metavar="SIZE",
                   help=f"refuse a layer whose tar is larger than SIZE once decompressed (e.g. 512M, 64G; "
                        f"0: no cap; default {human_size(DEFAULT_MAX_SIZE)})")
    p.add_argument("--max-expansion-ratio", type=_ratio, default=DEFAULT_MAX_RATIO, metavar="RATIO",
                   help=f"refuse a layer that expands more than RATIO times its compressed size (0: no cap; "
                        f"default {DEFAULT_MAX_RATIO:g})")
    p.add_argument("--expansion-ratio-grace", type=_size, default=DEFAULT_RATIO_GRACE, metavar="SIZE",
                   help=f"check the ratio only once a layer has expanded past SIZE "
                        f"(default {human_size(DEFAULT_RATIO_GRACE)})")


def limits_from_args(a: argparse.Namespace) -> ExpansionLimits:
    return ExpansionLimits(a.max_expanded_size, a.max_expansion_ratio, a.expansion_ratio_grace)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Build and inspect RAFS (Nydus) images.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="build a bootstrap and a data blob from directories or layer tars")
    c.add_argument("sources", nargs="+", metavar="SOURCE", help="directory or tar(.gz); several = layers, lowest first")
    c.add_argument("--bootstrap", "-B", required=True, help="bootstrap file to write")
    c.add_argument("--blob-dir", "-D", required=True, help="directory for the data blob (named by blob id)")
    c.add_argument("--fs-version", type=int, choices=(5, 6), default=6)
    c.add_argument("--compressor", choices=("zstd", "lz4_block", "none", "gzip"), default="zstd")
    c.add_argument("--digester", choices=("blake3", "sha256"), default="blake3")
    c.add_argument("--chunk-size", type=_chunk_size, default=0x100000)
    c.add_argument("--type", "-t", choices=SOURCE_TYPES, help="source type (default: detected per source)")
    c.add_argument("--repeatable", action="store_true", help="do not record uid/gid explicitly")
    c.add_argument("--aligned-chunk", action="store_true",
                   help="4 KiB-aligned uncompressed chunk offsets (RAFS v5; v6 always is)")
    c.add_argument("--blob-id", help="name the new blob instead of using its sha256")
    c.add_argument("--prefetch-files", metavar="FILE", help="file listing absolute paths to prefetch, one per line")
    c.add_argument("--whiteout-spec", choices=("oci", "overlayfs", "none"), default="oci")
    c.add_argument("--parent-bootstrap", metavar="BOOTSTRAP", help="lowest layer: an existing bootstrap (data reused)")
    c.add_argument("--chunk-dict", metavar="bootstrap=PATH",
                   help="reference the chunks this image has from its blobs instead of storing them again "
                        "(same RAFS version, chunk size and digester)")
    c.add_argument("--output-json", metavar="FILE", help="write the build result as JSON")
    add_limit_args(c)

    m = sub.add_parser("merge", help="merge layer bootstraps (lowest first) into one image bootstrap")
    m.add_argument("bootstraps", nargs="+", metavar="BOOTSTRAP")
    m.add_argument("--bootstrap", "-B", required=True, help="merged bootstrap to write")
    m.add_argument("--blob-dir", "-D", help="where the layer blobs are (checked to exist)")
    m.add_argument("--fs-version", type=int, choices=(5, 6), help="default: the layers' version")
    m.add_argument("--whiteout-spec", choices=("oci", "overlayfs", "none"), default="oci")
    m.add_argument("--output-json", metavar="FILE", help="write the build result as JSON")

    k = sub.add_parser("check", help="validate a bootstrap and (with --blob-dir) every chunk")
    k.add_argument("--bootstrap", "-B", required=True)
    k.add_argument("--blob-dir", "-D")
    k.add_argument("--json", action="store_true", help="print the report as JSON")

    i = sub.add_parser("inspect", help="print the tree and parameters of a bootstrap")
    i.add_argument("--bootstrap", "-B", required=True)
    i.add_argument("--json", action="store_true")
    i.add_argument("--stats-only", action="store_true", help="omit the per-file tree")

    st = sub.add_parser("stat", help="chunk, size and dedup statistics of one or many bootstraps")
    st.add_argument("--bootstrap", "-B", action="append", default=[], metavar="BOOTSTRAP",
                    help="a base image (repeatable)")
    st.add_argument("--blob-dir", "-D", metavar="DIR",
                    help="every file without an extension in DIR is a base image (dedup across them)")
    st.add_argument("--target", "-T", action="append", default=[], metavar="BOOTSTRAP",
                    help="an image measured against the bases' chunks (repeatable)")
    st.add_argument("--digester", choices=("blake3", "sha256"), default="blake3",
                    help="accepted; chunks are matched by the digest each image records")
    st.add_argument("--config", "-C", metavar="FILE",
                    help="a storage config (v1 or v2, as nydusd takes): checked, then the statistics are read "
                         "from the bootstraps' chunk tables, so no blob is fetched")
    st.add_argument("--output-json", "-J", metavar="FILE", help="write the statistics as JSON instead of text")

    e = sub.add_parser("export", help="write a RAFS v6 image as a raw EROFS block disk with the data inline")
    e.add_argument("--block", action="store_true", required=True, help="a raw block disk (the only export kind)")
    e.add_argument("--bootstrap", "-B", help="the image's bootstrap (else the --config entry's metadata_path)")
    e.add_argument("--blob-dir", "--localfs-dir", "-D", dest="blob_dir", help="where the blobs are")
    e.add_argument("--config", "-C", metavar="FILE",
                   help="a BlobCacheEntry (JSON, type \"bootstrap\") whose config_v2 backend and cache give the "
                        "blobs, e.g. a registry; instead of --blob-dir")
    e.add_argument("--output", "-O", help="disk file to write (default: DIR/<bootstrap name>.disk)")
    e.add_argument("--verity", action="store_true",
                   help="append a dm-verity hash tree (sha256, 4 KiB blocks, no superblock) and print the "
                        "veritysetup options with its root digest")
    e.add_argument("--keep-device-table", action="store_true",
                   help="upstream's bytes: bootstrap verbatim, blob-relative chunk addresses (the kernel's flat "
                        "device mode reads it; fsck.erofs 1.5 does not)")
    e.add_argument("--threads", type=int, default=4, help="accepted for compatibility")

    cp = sub.add_parser("compact", help="rewrite an image whose blobs are mostly unused into fewer blobs")
    cp.add_argument("--bootstrap", "-B", required=True, help="bootstrap to compact")
    cp.add_argument("--blob-dir", "-D", help="where the blobs are; new blobs are written there too")
    cp.add_argument("--config", "-C", metavar="FILE",
                    help="compact config JSON (min_used_ratio, compact_blob_size, max_compact_size, "
                         "layers_to_compact, blobs_dir); the flags below override it")
    cp.add_argument("--min-used-ratio", type=int, metavar="0-99",
                    help="rebuild blobs whose used data is below this percent (0: off, the default)")
    cp.add_argument("--compact-blob-size", type=int, metavar="BYTES", help="merge blobs smaller than this (10 MiB)")
    cp.add_argument("--max-compact-size", type=int, metavar="BYTES", help="largest merged blob (100 MiB)")
    cp.add_argument("--layers-to-compact", type=int, metavar="N", help="compact only with >= N blobs (0: always)")
    cp.add_argument("--output-bootstrap", "-O", help="bootstrap to write (default: BOOTSTRAP.bootstrap.compact)")
    cp.add_argument("--chunk-dict", metavar="[bootstrap=]PATH", help="keep the blobs of this chunk dictionary as they are")
    cp.add_argument("--backend-type", help="only localfs: compact reads and writes local blobs")
    cp.add_argument("--backend-config", help="accepted with --backend-type localfs: {\"dir\": BLOB_DIR}")
    cp.add_argument("--backend-config-file", help="the same, from a file")
    cp.add_argument("--output-json", metavar="FILE", help="write the result as JSON")

    op = sub.add_parser("optimize", help="move the data of the files read at start into one new blob")
    op.add_argument("--bootstrap", "-B", required=True, help="bootstrap to optimize")
    op.add_argument("--prefetch-files", "-p", required=True, metavar="FILE",
                    help='hint file: {"version": "v1", "files": [{"path": "/abs", "ranges": [[off, size]]}]} '
                         "or one absolute path per line")
    src = op.add_mutually_exclusive_group(required=True)
    src.add_argument("--blob-dir", "-D", help="where the image's blobs are")
    src.add_argument("--blob", "-b", help="the image's one data blob file")
    op.add_argument("--output-bootstrap", "-O", help="bootstrap to write (default: BOOTSTRAP.optimized)")
    op.add_argument("--output-blob-dir", help="where the new blob goes (default: the blob dir)")
    op.add_argument("--output-json", metavar="FILE", help="write the result as JSON")

    cd = sub.add_parser("chunkdict", help="chunk dictionaries").add_subparsers(dest="chunkdict_command", required=True)
    g = cd.add_parser("generate", help="a chunk dictionary bootstrap of the chunks several images share")
    g.add_argument("sources", nargs="+", metavar="BOOTSTRAP", help="bootstraps of the images")
    g.add_argument("--bootstrap", "-B", required=True, help="dictionary bootstrap to write")
    g.add_argument("--blob-dir", "-D", help="accepted (the dictionary stores no data: its chunks stay in the "
                                            "sources' blobs)")
    g.add_argument("--database", help="accepted; no SQLite store is kept (the chunks are counted in memory)")
    g.add_argument("--min-images", type=int, default=2, metavar="N",
                   help="keep a chunk found in at least N of the images (default 2)")
    g.add_argument("--output-json", metavar="FILE", help="write the result as JSON")

    u = sub.add_parser("unpack", help="write the image as a tar")
    u.add_argument("--bootstrap", "-B", required=True)
    u.add_argument("--blob-dir", "-D", required=True)
    u.add_argument("--output", "-o", required=True, help="tar file to write ('-' for stdout)")
    return p


# --------------------------------------------------------------------------------------------


def _source_tree(
    path: str, kind: str | None, stats: SourceStats, limits: ExpansionLimits, spool_dir: str
) -> Tree:
    is_dir = os.path.isdir(path)
    if kind is None:
        kind = "dir-rafs" if is_dir else "tar-rafs"
    if kind == "dir-rafs":
        if not is_dir:
            raise ValueError(f"{path}: --type dir-rafs needs a directory")
        return tree_from_directory(path, stats)
    if is_dir:
        raise ValueError(f"{path}: --type {kind} needs a tar file, got a directory")
    if kind == "targz-rafs":
        with open(path, "rb") as f:
            if detect_compression(f.read(4)) != "gzip":
                raise FormatError(f"{path}: --type targz-rafs but the file is not gzip-compressed")
    try:
        return tree_from_tar(path, stats, limits=limits, spool_dir=spool_dir)
    except FormatError as e:
        raise type(e)(f"{path}: {e}") from None


def _prefetch_paths(list_file: str, root: "Inode | Tree") -> list[bytes]:
    tree = as_tree(root)
    out: list[bytes] = []
    with open(list_file, "rb") as f:
        for line in f:
            p = line.strip()
            if not p or p.startswith(b"#"):
                continue
            if not p.startswith(b"/"):
                p = b"/" + p
            p = b"/" + b"/".join(c for c in p.split(b"/") if c and c != b".")
            if tree.find(p) < 0:
                print(f"{PROG}: warning: prefetch path {p.decode('utf-8', 'replace')} is not in the image; ignored", file=sys.stderr)
                continue
            out.append(p)
    return out


def dump_json(path: str | None, result: Any) -> None:
    """--output-json: the result dataclass as JSON (nothing without a path)."""
    if path:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=2)


def _write_result(result: BuildResult, output_json: str | None) -> None:
    print(f"bootstrap: {result.bootstrap_path}")
    print(f"blob: {result.blob_id or '(none: no new data)'}")
    print(f"blobs: {', '.join(result.blob_ids) or '(none)'}")
    print(
        f"inodes: {result.inodes}  chunks: {result.chunks}  deduplicated: {result.deduplicated}  "
        f"bytes: {result.uncompressed_bytes} -> {result.compressed_bytes}"
    )
    dump_json(output_json, result)


def _make_dirs(path: str) -> list[str]:
    """`os.makedirs(path)`; returns the directories it created, outermost first."""
    missing: list[str] = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return missing[::-1]


def _chunk_dict_path(spec: str) -> str:
    """nydus-image's `--chunk-dict` value: `bootstrap=PATH` (the only kind), or a bare PATH."""
    kind, sep, path = spec.partition("=")
    if not sep:
        return spec
    if kind != "bootstrap" or not path:
        raise ValueError(f"--chunk-dict {spec!r}: expected bootstrap=PATH")
    return path


def cmd_create(a: argparse.Namespace) -> int:
    from ..builder.build import build_image
    from ..builder.merge import merge_layers, tree_from_image

    stats = SourceStats()
    made = _make_dirs(a.blob_dir)  # compressed layers are spooled in there
    parent = chunk_dict = None
    try:
        limits = limits_from_args(a)
        layers: list[Inode | Tree] = [_source_tree(s, a.type, stats, limits, a.blob_dir) for s in a.sources]
        if a.parent_bootstrap:
            from ..rafs import open_bootstrap

            parent = open_bootstrap(a.parent_bootstrap)
            layers.insert(0, tree_from_image(parent, a.blob_dir))
        root = layers[0] if len(layers) == 1 else merge_layers(layers, a.whiteout_spec)
        opts = BuildOptions(
            fs_version=a.fs_version,
            compressor=Compressor.from_name(a.compressor),
            digester=Digester.from_name(a.digester),
            chunk_size=a.chunk_size,
            repeatable=a.repeatable,
            blob_id=a.blob_id,
            aligned_chunk=a.aligned_chunk,
        )
        if a.prefetch_files:
            opts.prefetch_paths = _prefetch_paths(a.prefetch_files, root)
        if a.chunk_dict:
            from ..rafs import open_bootstrap

            chunk_dict = open_bootstrap(_chunk_dict_path(a.chunk_dict))
        result = build_image(root, a.bootstrap, a.blob_dir, opts, chunk_dict)
    except BaseException:
        for d in reversed(made):  # only if still empty: a failed build leaves nothing
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    finally:
        for img in (parent, chunk_dict):
            if img is not None:
                img.close()
    if stats.skipped_xattrs:
        names = ", ".join(sorted(n.decode("utf-8", "replace") for n in stats.skipped_xattr_names))
        print(f"{PROG}: warning: skipped {stats.skipped_xattrs} xattrs RAFS cannot store ({names})", file=sys.stderr)
    _write_result(result, a.output_json)
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from ..builder.build import build_image
    from ..builder.merge import merge_layers, tree_from_image
    from ..rafs import open_bootstrap

    images = []
    try:
        for path in a.bootstraps:
            images.append(open_bootstrap(path))
        layers = [tree_from_image(img, a.blob_dir) for img in images]
        root = merge_layers(layers, a.whiteout_spec)
        top = images[-1]
        opts = BuildOptions(
            fs_version=a.fs_version or max(img.version for img in images),
            compressor=top.compressor,
            digester=top.digester,
            chunk_size=max(img.chunk_size for img in images),
        )
        if a.blob_dir:
            result = build_image(root, a.bootstrap, a.blob_dir, opts)
        else:
            with tempfile.TemporaryDirectory(prefix="nydus-merge-") as tmp:
                result = build_image(root, a.bootstrap, tmp, opts)
                if result.blob_id is not None:
                    raise ValueError("merge had to write new blob data; pass --blob-dir")
    finally:
        for img in images:
            img.close()
    _write_result(result, a.output_json)
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from ..builder.check import check_image
    from ..rafs import open_bootstrap

    with open_bootstrap(a.bootstrap) as img:
        report = check_image(img, a.blob_dir)
        version = img.version
    if a.json:
        print(json.dumps({"bootstrap": a.bootstrap, "version": version, **report.as_dict()}, indent=2))
    else:
        for err in report.errors:
            print(f"{PROG}: {a.bootstrap}: {err}", file=sys.stderr)
        if report.error_count > len(report.errors):
            print(f"{PROG}: ... and {report.error_count - len(report.errors)} more problems", file=sys.stderr)
        verified = f", {report.chunks_verified} chunks verified" if a.blob_dir else ""
        print(
            f"RAFS v{version}: {report.inodes} inodes ({report.files} files, {report.dirs} dirs, "
            f"{report.symlinks} symlinks, {report.others} other), {report.chunk_refs} chunk refs{verified}: "
            + ("OK" if report.ok else f"{report.error_count} problem(s)")
        )
    return 0 if report.ok else 1


def _mode_str(kind: str, mode: int) -> str:
    ch = {"dir": "d", "symlink": "l", "chardev": "c", "blockdev": "b", "fifo": "p", "socket": "s"}.get(kind, "-")
    return ch + stat.filemode(mode)[1:]


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..builder.check import describe_image
    from ..rafs import open_bootstrap

    with open_bootstrap(a.bootstrap) as img:
        info = describe_image(img, with_tree=not a.stats_only)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"RAFS v{info['version']}  compressor {info['compressor']}  digester {info['digester']}  "
        f"chunk size {info['chunk_size']:#x}  flags {info['flags']:#x}"
    )
    for b in info["blobs"]:
        print(
            f"blob {b['index']}: {b['blob_id']}  {b['compressor']}/{b['digester']}  chunks {b['chunk_count']}  "
            f"compressed {b['compressed_size']}  uncompressed {b['uncompressed_size']}  features {b['features']:#x}"
        )
    s = info["stats"]
    print(
        f"inodes {s['inodes']}  files {s['files']}  dirs {s['dirs']}  symlinks {s['symlinks']}  "
        f"hardlinks {s['hardlinks']}  other {s['others']}  total size {s['total_size']}  chunks {s['chunks']}"
    )
    for e in info.get("tree", []):
        extra = f" -> {e['target']}" if "target" in e else ""
        if "rdev" in e:
            extra = f" {e['rdev'][0]},{e['rdev'][1]}"
        print(
            f"{_mode_str(e['type'], e['mode'])} {e['uid']:>5} {e['gid']:>5} {e['size']:>10} "
            f"{e['chunks']:>4}c  {e['path']}{extra}"
        )
    return 0


def cmd_unpack(a: argparse.Namespace) -> int:
    from ..builder.export import write_tar
    from ..builder.merge import tree_from_image
    from ..rafs import open_bootstrap

    with open_bootstrap(a.bootstrap) as img:
        root = tree_from_image(img, a.blob_dir, rewrite=True)
        if a.output == "-":
            stats = write_tar(root, sys.stdout.buffer)
        else:
            out_dir = os.path.dirname(os.path.abspath(a.output))
            fd, tmp = tempfile.mkstemp(prefix=".unpack-", dir=out_dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    stats = write_tar(root, f)
                os.replace(tmp, a.output)
            except BaseException:
                os.unlink(tmp)
                raise
    for p in stats.skipped:
        print(f"{PROG}: warning: {p.decode('utf-8', 'replace')}: socket not representable in tar, skipped", file=sys.stderr)
    if a.output != "-":
        print(f"wrote {stats.entries} entries ({stats.data_bytes} bytes of file data) to {a.output}")
    return 0


def cmd_stat(a: argparse.Namespace) -> int:
    from ..builder.stat import Stat, as_json, bootstraps_in

    bases = list(a.bootstrap)
    if a.blob_dir:
        if not os.path.isdir(a.blob_dir):
            raise ValueError(f"--blob-dir {a.blob_dir}: not a directory")
        targets = {os.path.abspath(t) for t in a.target}
        bases += [p for p in bootstraps_in(a.blob_dir) if os.path.abspath(p) not in targets]
    if not bases:
        raise ValueError("one of --bootstrap and --blob-dir must be given (and name at least one bootstrap)")
    if a.config:
        from ..config import read_config_file

        read_config_file(a.config)  # a bad config is an error, as upstream validates it before loading
        log.info("stat: %s checked; chunk sizes come from the bootstraps, no blob is read", a.config)
    st = Stat()
    for path in bases:
        st.add_base(path)
    for path in a.target:
        st.add_target(path)
    result = st.finalize(dedup=bool(a.blob_dir) or len(bases) > 1)
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(as_json(result), f, indent=2)
        return 0
    print(render_stat(result))
    return 0


def render_stat(r: Any) -> str:
    """Text like upstream's dump, one block per image, then the blobs and the dedup table."""
    out: list[str] = []

    def image(title: str, s: Any) -> None:
        out.append(f"{title}: {s.bootstrap}")
        for label, v in (("Directories", s.dirs), ("Files", s.files), ("Symlinks", s.symlinks),
                         ("Chunks", s.chunks), ("Distinct Chunks", s.distinct_chunks),
                         ("Dedup Ratio", f"{100 * s.dedup_ratio:.1f}%"), ("File Size", s.file_size),
                         ("Padding Size", s.padding_size), ("Uncompressed Size", s.uncomp_size),
                         ("Compressed Size", s.comp_size), ("Owned Chunk Count", s.own_chunks),
                         ("Owned Comp Size", s.own_comp_size), ("Referenced Chunk Count", s.ref_chunks),
                         ("Referenced Comp Size", s.ref_comp_size)):
            out.append(f"  {label + ':':<24}{v}")
        for b in s.blobs:
            out.append(f"  blob {b.blob_id[:16]}: {b.chunk_count} chunks, {b.compressed_size} compressed, "
                       f"{b.uncompressed_size} uncompressed; {b.chunk_refs} refs to {b.distinct_chunks} chunks "
                       f"(dedup ratio {100 * b.dedup_ratio:.1f}%)")

    for s in r.target_images:
        image("Target Image", s)
    for s in r.base_images:
        image("Base Image", s)
    if len(r.base_images) > 1:
        image("Base Images (all)", r.base_image)
        out.append(f"  {'Dedup Chunk Count:':<24}{r.base_image.dedup_chunks}")
        out.append(f"  {'Dedup Comp Size:':<24}{r.base_image.dedup_comp_size}")
    if r.dedup_info:
        out.append("Chunk Deduplication Statistics:")
        out.append("Global Dedup Thresh:\tRaw Chunks:\tDedup Chunks:\tComp Content Size:\tComp Base Size:\t"
                   "Comp Image Size:\tUncomp Content Size:\tUncomp Base Size\tUncomp Image Size")
        for i, d in enumerate(r.dedup_info):
            out.append(f"{i + 1:<24}0x{d.raw_chunks:<14x}0x{d.dedup_chunks:<14x}0x{d.comp_content_size:<14x}"
                       f"0x{d.comp_base_size:<14x}0x{d.comp_image_size:<14x}0x{d.uncomp_content_size:<14x}"
                       f"0x{d.uncomp_base_size:<14x}0x{d.uncomp_image_size:<14x}")
    return "\n".join(out)


def cmd_export(a: argparse.Namespace) -> int:
    from ..builder.block_export import export_block
    from ..config.blob_entry import read_blob_cache_entry

    if bool(a.blob_dir) == bool(a.config):
        raise ValueError("give exactly one of -D/--localfs-dir and -C/--config")
    source: Any = a.blob_dir
    bootstrap = a.bootstrap
    if a.config:
        from ..storage.factory import make_source

        entry = read_blob_cache_entry(a.config)
        if entry.blob_type != "bootstrap":
            raise ValueError(f"{a.config}: a \"bootstrap\" entry is needed, not "
                             f"{entry.blob_type!r}")
        bootstrap = bootstrap or entry.metadata_path
        if not bootstrap:
            raise ValueError(f"no --bootstrap and no metadata_path in {a.config}")
        source = make_source(entry.config.rafs)
    elif not bootstrap:
        raise ValueError("--bootstrap is needed with --localfs-dir")
    if not a.output and not a.blob_dir:
        raise ValueError("--output is needed with --config")
    output = a.output or os.path.join(a.blob_dir, os.path.basename(bootstrap) + ".disk")
    try:
        r = export_block(bootstrap, source, output, keep_device_table=a.keep_device_table, verity=a.verity)
    finally:
        if not isinstance(source, str):
            source.close()
    blobs = ", ".join(f"{bid[:12]} at block {start:#x} ({n} blocks)" for bid, start, n in r.blobs)
    print(f"wrote {r.output}: {r.blocks} blocks of 4096 ({r.size} bytes), bootstrap {r.bootstrap_bytes} bytes, "
          f"{r.chunks_written} chunks; blobs: {blobs or 'none'}")
    if r.verity is not None:
        print(r.verity.options())
    return 0


def _compact_config(a: argparse.Namespace) -> Any:
    from ..builder.compact import CompactConfig, config_from_json, config_from_mapping

    cfg = CompactConfig()
    if a.config:
        with open(a.config) as f:
            cfg = config_from_json(f.read(), f"compact config {a.config}")
    flags = {"min_used_ratio": a.min_used_ratio, "compact_blob_size": a.compact_blob_size,
             "max_compact_size": a.max_compact_size, "layers_to_compact": a.layers_to_compact}
    given = {k: v for k, v in flags.items() if v is not None}
    return config_from_mapping({**dataclasses.asdict(cfg), **given}, "compact options") if given else cfg


def _compact_blob_dir(a: argparse.Namespace, cfg: Any) -> str:
    """--blob-dir, else a localfs backend's dir, else the config's blobs_dir."""
    if a.backend_type not in (None, "localfs"):
        raise ValueError(f"compact reads local blobs only: backend type {a.backend_type!r} is not supported; "
                         "download the blobs and pass --blob-dir")
    text = a.backend_config
    if a.backend_config_file:
        with open(a.backend_config_file) as f:
            text = f.read()
    if text is not None:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"backend config: not JSON: {e}") from None
        d = doc.get("dir") if isinstance(doc, dict) else None
        if not isinstance(d, str) or not d:
            raise ValueError('backend config: expected a localfs config {"dir": BLOB_DIR}')
        if a.blob_dir and os.path.abspath(a.blob_dir) != os.path.abspath(d):
            raise ValueError(f"--blob-dir {a.blob_dir} and the backend config's dir {d} differ")
        return d
    if a.blob_dir:
        return str(a.blob_dir)
    if cfg.blobs_dir:
        return str(cfg.blobs_dir)
    raise ValueError("compact needs --blob-dir (or blobs_dir in --config)")


def cmd_compact(a: argparse.Namespace) -> int:
    from ..builder.compact import compact_image
    from ..rafs import open_bootstrap

    cfg = _compact_config(a)
    blob_dir = _compact_blob_dir(a, cfg)
    if not os.path.isdir(blob_dir):
        raise ValueError(f"blob dir {blob_dir}: not a directory")
    out = a.output_bootstrap or os.path.splitext(a.bootstrap)[0] + ".bootstrap.compact"
    pinned: frozenset[str] = frozenset()
    if a.chunk_dict:
        with open_bootstrap(_chunk_dict_path(a.chunk_dict)) as d:
            pinned = frozenset(b.blob_id for b in d.blobs)
    with open_bootstrap(a.bootstrap) as img:
        result = compact_image(img, out, cfg, blob_dir, pinned)
    dump_json(a.output_json, result)
    if result.bootstrap_path is None:
        print(f"{result.blobs_before} blobs, fewer than layers_to_compact {cfg.layers_to_compact}: nothing to compact")
        return 0
    print(f"compacted {result.blobs_before} blobs ({human_size(result.bytes_before)}) into {len(result.blob_ids)} "
          f"({human_size(result.bytes_after)}): {len(result.new_blobs)} new, {len(result.dropped)} no longer used; "
          f"bootstrap {out}")
    return 0


def cmd_optimize(a: argparse.Namespace) -> int:
    from ..builder.optimize import optimize_image, parse_prefetch_files
    from ..rafs import open_bootstrap
    from ..storage.localfs import LocalBlobDir, SingleBlobFile

    with open(a.prefetch_files, "rb") as hints:
        files = parse_prefetch_files(hints.read(64 << 20))
    out = a.output_bootstrap or a.bootstrap + ".optimized"
    out_dir = a.output_blob_dir or a.blob_dir or os.path.dirname(os.path.abspath(a.blob))
    source = SingleBlobFile(a.blob) if a.blob else LocalBlobDir(a.blob_dir)
    try:
        with open_bootstrap(a.bootstrap) as img:
            if a.blob and len(img.blobs) != 1:
                raise ValueError(f"--blob: the image has {len(img.blobs)} blobs; give --blob-dir")
            result = optimize_image(img, files, out, out_dir, source)
    finally:
        source.close()
    dump_json(a.output_json, result)
    print(f"moved {result.chunks_moved} chunks ({human_size(result.bytes_moved)}) of {result.files} files into blob "
          f"{result.blob_id or '(none: nothing to move)'}; {len(result.skipped)} listed paths skipped; bootstrap {out}")
    return 0


def cmd_chunkdict(a: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    from ..builder.chunkdict import generate_chunkdict
    from ..rafs import open_bootstrap

    if a.database:
        log.info("--database %s is not used: chunks are counted in memory", a.database)
    with contextlib.ExitStack() as stack:
        images = [stack.enter_context(open_bootstrap(p)) for p in a.sources]
        blob_dir = a.blob_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="chunkdict-"))
        result = generate_chunkdict(images, a.bootstrap, blob_dir, a.min_images)
    dump_json(a.output_json, result)
    print(f"chunk dictionary {a.bootstrap}: {result.chunks} of {result.distinct_chunks} distinct chunks "
          f"({human_size(result.uncompressed_bytes)}) in {len(result.blob_ids)} blobs of {result.images} images")
    return 0


COMMANDS = {
    "chunkdict": cmd_chunkdict,
    "optimize": cmd_optimize,
    "compact": cmd_compact,
    "stat": cmd_stat,
    "export": cmd_export,
    "create": cmd_create,
    "merge": cmd_merge,
    "check": cmd_check,
    "inspect": cmd_inspect,
    "unpack": cmd_unpack,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `inspect | head`: the reader went away, not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (FormatError, ValueError, OSError) as e:
        print(f"{PROG}: error: {_describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{os.fsdecode(e.filename)}: {e.strerror}"
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
