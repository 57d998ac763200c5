"""Build cache and chunk dictionary without a registry: a stack taking any subset of its layers
from their cached bootstraps writes the same bootstrap byte for byte; a cached layer that names
blobs the stack lacks is refused; a chunk dictionary's chunks are referenced, not stored; the
cache manifest round-trips, keeps its LRU bound and ignores other versions and formats."""

import io
import itertools
import json
import os
import random
from pathlib import Path

import pytest

from nydus_py.builder.chunk_dict import ChunkDictError
from nydus_py.builder.options import BuildOptions
from nydus_py.convert import build_cache as bc
from nydus_py.convert import oci
from nydus_py.convert.errors import ConvertError
from nydus_py.convert.reuse import parse_chunk_dict
from nydus_py.convert.stack import CacheMismatch, LayerStack
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.chunkdata import read_file_range
from nydus_py.rafs.constants import Compressor
from nydus_py.storage.localfs import LocalBlobDir

from .ociimage import Entry, make_tar
from .test_stack import CS, layers


def tars(seed: int) -> list[bytes]:
    return [make_tar(entries) for entries in layers(seed)]


def build(work: Path, opts: BuildOptions, tar_list: list[bytes], cached: dict[int, tuple[str, str | None]],
          name: str, dict_boot: str | None = None) -> tuple[bytes, list[tuple[str, str | None]]]:
    """Stack `tar_list` (layers in `cached` from those bootstraps); (bootstrap, per layer
    (its bootstrap, its blob id)) of the layers built."""
    blob_dir = work / "blobs"
    blob_dir.mkdir(exist_ok=True)
    stack = LayerStack(opts, str(blob_dir))
    if dict_boot:
        stack.add_dict(open_bootstrap(dict_boot))
    made: list[tuple[str, str | None]] = []
    for i, tar in enumerate(tar_list):
        if i in cached:
            boot, blob = cached[i]
            res = stack.add_cached_layer(open_bootstrap(boot), blob)
            assert res.cached
            made.append(cached[i])
        else:
            res = stack.add_layer(io.BytesIO(tar))
            boot = str(work / f"{name}-layer{i}.boot")
            stack.write_layer_bootstrap(boot)
            made.append((boot, res.blob.blob_id if res.blob else None))
    out = work / f"{name}.boot"
    stack.finish(str(out))
    return out.read_bytes(), made


@pytest.mark.parametrize("fs_version", [5, 6])
def test_any_cached_subset_gives_the_same_bootstrap(tmp_path: Path, fs_version: int) -> None:
    opts = BuildOptions(fs_version=fs_version, chunk_size=CS)
    tl = tars(1)
    want, records = build(tmp_path, opts, tl, {}, "full")
    assert records[1][1] is not None
    for k in range(1, len(tl) + 1):
        for subset in itertools.combinations(range(len(tl)), k):
            got, _ = build(tmp_path, opts, tl, {i: records[i] for i in subset}, f"c{''.join(map(str, subset))}")
            assert got == want, subset


def build_in_parallel(work: Path, opts: BuildOptions, tar_list: list[bytes],
                      cached: dict[int, tuple[str, str | None]], name: str, dict_boot: str | None = None,
                      misfit: int | None = None) -> tuple[bytes, int]:
    """The converter's order with both features: the chunk dictionary first, every layer the
    cache does not serve prepared before any commit (upper layers first: the most rewrites),
    then in layer order each prepared layer committed (its layer bootstrap written right after,
    as a cache record is) and each cached one added in its place. Layer `misfit` has a record
    that does not fit: refused at its place, it is prepared there and committed. Returns the
    bootstrap and how many held blobs were written again."""
    stack = LayerStack(opts, str(work / f"{name}-blobs"), workers=2)
    if dict_boot:
        stack.add_dict(open_bootstrap(dict_boot))
    prepared = {i: stack.prepare_layer(io.BytesIO(tar_list[i]), position=i)
                for i in reversed(range(len(tar_list))) if i not in cached}
    for i, tar in enumerate(tar_list):
        if i in cached:
            boot, blob = cached[i]
            if i != misfit:
                assert stack.add_cached_layer(open_bootstrap(boot), blob).cached
                continue
            with pytest.raises(CacheMismatch):
                stack.add_cached_layer(open_bootstrap(boot), "f" * 64)
            prepared[i] = stack.prepare_layer(io.BytesIO(tar), position=i)
        stack.commit_layer(prepared.pop(i))
        stack.write_layer_bootstrap(str(work / f"{name}-layer{i}.boot"))
    out = work / f"{name}.boot"
    rewrites = stack.rewrites
    stack.finish(str(out))
    return out.read_bytes(), rewrites


@pytest.mark.parametrize("with_dict", [False, True])
def test_cached_layers_among_layers_prepared_in_parallel(tmp_path: Path, with_dict: bool) -> None:
    """Any subset of cached layers, the others prepared at once and out of order (and a record
    that does not fit, converted at its place) gives the bootstrap of building every layer one
    after the other: the layers above a cached one find its chunks (its held blob written again
    without them when it stored them first), with or without a chunk dictionary."""
    opts = BuildOptions(chunk_size=CS)
    rng = random.Random(1)
    shared = rng.randbytes(3 * CS + 100)  # the `shared` of layers(1)
    tl = [*tars(1), make_tar([Entry("z1", data=shared), Entry("z2", data=b"linked" * 1000)])]
    dict_boot = None
    if with_dict:
        dstack = LayerStack(opts, str(tmp_path / "dict"))
        dstack.add_layer(io.BytesIO(tl[2]))  # layer 2 then stores nothing
        dict_boot = str(tmp_path / "dict.boot")
        dstack.finish(dict_boot)
    want, records = build(tmp_path, opts, tl, {}, "full", dict_boot)
    rewrites = 0
    for k in range(len(tl) + 1):
        for subset in itertools.combinations(range(len(tl)), k):
            for misfit in (None, *subset[:1]):
                name = f"p{''.join(map(str, subset))}-{misfit}"
                got, n = build_in_parallel(tmp_path, opts, tl, {i: records[i] for i in subset}, name, dict_boot,
                                           misfit)
                assert got == want, (subset, misfit)
                rewrites += n
    assert rewrites > 0  # some layers stored chunks of a cached (or late) layer below: written again


def test_cached_layer_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    opts = BuildOptions(chunk_size=CS)
    tl = tars(2)
    _boot, records = build(tmp_path, opts, tl, {}, "full")
    # layer 2's chunks point into layer 1's blob too: without that blob below, it cannot be used
    stack = LayerStack(opts, str(tmp_path / "blobs"))
    with pytest.raises(CacheMismatch, match="no lower layer has"):
        stack.add_cached_layer(open_bootstrap(records[1][0]), records[1][1])
    assert stack.blobs == [] and stack.layers == []
    # a record naming a blob its bootstrap does not have
    stack.add_cached_layer(open_bootstrap(records[0][0]), records[0][1])
    with pytest.raises(CacheMismatch, match="as a new one"):
        stack.add_cached_layer(open_bootstrap(records[0][0]), records[0][1])
    with pytest.raises(CacheMismatch, match="chunk size"):
        LayerStack(BuildOptions(chunk_size=CS * 2), str(tmp_path / "b2")).add_cached_layer(
            open_bootstrap(records[0][0]), records[0][1])


def test_chunk_dict_chunks_are_referenced_not_stored(tmp_path: Path) -> None:
    rng = random.Random(5)
    big = rng.randbytes(5 * CS + 7)
    opts = BuildOptions(chunk_size=CS)
    dict_dir = tmp_path / "dict"
    dict_dir.mkdir()
    dstack = LayerStack(opts, str(dict_dir))
    dstack.add_layer(io.BytesIO(make_tar([Entry("lib", "dir"), Entry("lib/big", data=big)])))
    dboot = str(tmp_path / "dict.boot")
    dict_blobs = dstack.finish(dboot).blob_ids

    tar = make_tar([Entry("opt", "dir"), Entry("opt/big-copy", data=big), Entry("opt/new", data=rng.randbytes(CS))])
    stack = LayerStack(opts, str(tmp_path / "blobs"))
    assert stack.add_dict(open_bootstrap(dboot)) == 6
    res = stack.add_layer(io.BytesIO(tar))
    assert res.new_chunks == 1 and res.deduplicated == 6
    out = tmp_path / "image.boot"
    merged = stack.finish(str(out))
    assert merged.blob_ids == [*dict_blobs, res.blob.blob_id]  # type: ignore[union-attr]
    for d in dict_blobs:  # the reader finds every blob in one directory
        os.link(dict_dir / d, tmp_path / "blobs" / d)
    img = open_bootstrap(str(out))
    src = LocalBlobDir(str(tmp_path / "blobs"))
    opt = img.lookup(img.root_ino, b"opt")
    assert opt is not None
    ino = img.lookup(opt, b"big-copy")
    assert ino is not None
    assert read_file_range(src, img, ino, 0, len(big), validate=True) == big
    assert {img.blobs[c.blob_index].blob_id for c in img.chunks(ino)} == set(dict_blobs)

    # built differently, the dictionary cannot serve
    for bad, what in ((BuildOptions(chunk_size=CS * 2), "chunk size"), (BuildOptions(fs_version=5, chunk_size=CS),
                                                                          "RAFS v6")):
        with pytest.raises(ChunkDictError, match=what):
            LayerStack(bad, str(tmp_path / "x")).add_dict(open_bootstrap(dboot))
    # another compressor is fine: each blob names its own
    assert LayerStack(BuildOptions(chunk_size=CS, compressor=Compressor.LZ4_BLOCK),
                      str(tmp_path / "y")).add_dict(open_bootstrap(dboot)) == 6


def test_chain_ids() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    import hashlib

    assert bc.chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]


def _rec(n: int, params: str = "p", blob: bool = True, refs: tuple[str, ...] = ()) -> bc.Record:
    h = f"{n:064x}"
    return bc.Record(f"sha256:{h}", params, bc.Blob(f"sha256:{'b' * 63}{n % 10}", 10 + n), f"sha256:{'d' * 64}",
                     bc.Blob(f"sha256:{'c' * 63}{n % 10}", 100 + n) if blob else None, refs)


def test_cache_manifest_round_trip_lru_and_versions() -> None:
    cache = bc.BuildCache(max_records=3)
    ref = bc.Blob("sha256:" + "e" * 64, 77)
    cache.add_reference(ref)
    cache.record([_rec(1, refs=("e" * 64,)), _rec(2, blob=False)])
    cache.record([_rec(3), _rec(1, params="q")])  # another parameter set: a record of its own
    assert [(r.chain_id[-1], r.params) for r in cache.records] == [("3", "p"), ("1", "q"), ("1", "p")]
    _config, cdesc, body, mtype = cache.export()
    doc = json.loads(body)
    assert mtype == oci.OCI_MANIFEST and doc["annotations"][bc.ANNO_CACHE] == "v1"
    assert doc["layers"][0]["digest"] == ref.digest and bc.ANNO_SOURCE_CHAINID not in doc["layers"][0]["annotations"]
    assert len(doc["layers"]) == 1 + 2 + 2 + 2
    again = bc.BuildCache(max_records=3)
    assert again.load(body) is None
    assert again.records == cache.records and again.references == cache.references
    assert again.lookup(_rec(1).chain_id, "q") == _rec(1, params="q") and again.lookup(_rec(2).chain_id, "p") is None
    assert bc.BuildCache(version="v2").load(body) == "cache version 'v1', not 'v2'"
    foreign = json.loads(body)
    del foreign["annotations"][bc.ANNO_FORMAT]  # e.g. written by upstream nydusify
    assert "not written by nydus-py" in (bc.BuildCache().load(json.dumps(foreign).encode()) or "")
    broken = json.loads(body)
    broken["layers"][1]["annotations"][oci.ANNO_UNCOMPRESSED] = "nonsense"
    partial = bc.BuildCache()
    assert partial.load(json.dumps(broken).encode()) is None
    assert partial.skipped == 2 and len(partial.records) == 2  # its bootstrap and then its lone blob
    with pytest.raises(ValueError, match="max-records"):
        bc.BuildCache(max_records=0)


def test_parameters_key_everything_that_changes_a_blob() -> None:
    base = bc.build_params(BuildOptions())
    others = [BuildOptions(fs_version=5), BuildOptions(compressor=Compressor.LZ4_BLOCK), BuildOptions(chunk_size=CS),
              BuildOptions(blob_toc=False), BuildOptions(prefetch_paths=[b"/x"])]
    keys = {bc.build_params(o) for o in others} | {bc.build_params(BuildOptions(), "sha256:" + "1" * 64)}
    assert base not in keys and len(keys) == len(others) + 1


def test_chunk_dict_spec() -> None:
    assert parse_chunk_dict("bootstrap:registry:localhost:5000/a/b:dict") == ("registry", "localhost:5000/a/b:dict")
    assert parse_chunk_dict("bootstrap:local:/x/y.boot") == ("local", "/x/y.boot")
    assert parse_chunk_dict("bootstrap=/x/y.boot") == ("local", "/x/y.boot")
    assert parse_chunk_dict("reg:5000/a/b:dict") == ("registry", "reg:5000/a/b:dict")
    with pytest.raises(ConvertError, match="expected bootstrap:registry:REF"):
        parse_chunk_dict("bootstrap:oss:x")
