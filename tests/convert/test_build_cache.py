"""`nydusify-py convert --build-cache` against a loopback docker-registry: a second image sharing
its lower layers converts only its new layer (the result's layer counts; the target registry's
access log shows the shared blobs mounted, not uploaded), and gives the same manifest as a
conversion without the cache; a cache hit needs the same build parameters; the image passes
`check`; the cache manifest has nydusify's layout."""

import errno
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nydus_py.convert import build_cache as bc
from nydus_py.convert import converter, oci
from nydus_py.convert.converter import ConvertOptions
from nydus_py.convert.errors import ConvertError
from nydus_py.convert.stack import LayerStack
from nydus_py.rafs.errors import FormatError
from nydus_py.storage.registry.transfer import ImageTransfer
from tests.storage import registry_rig as rig

from . import ociimage as oi
from . import regpush
from .test_check import check, nydusify
from .test_convert_e2e import convert, get_manifest, http_get

pytestmark = [pytest.mark.slow]


def shared_layers(seed: int) -> list[oi.Layer]:
    rng = random.Random(seed)
    base = [oi.Entry("./", "dir", mode=0o755), oi.Entry("usr", "dir", mode=0o755),
            oi.Entry("usr/lib", "dir", mode=0o755), oi.Entry("usr/lib/libbig.so", data=rng.randbytes(600_000)),
            oi.Entry("usr/lib/old", data=b"old\n"), oi.Entry("etc", "dir", mode=0o755),
            oi.Entry("etc/os-release", data=b"ID=test\n")]
    mid = [oi.Entry("usr", "dir", mode=0o755), oi.Entry("usr/lib", "dir", mode=0o755),
           oi.Entry("usr/lib/.wh.old"), oi.Entry("usr/lib/libmid.so", data=rng.randbytes(300_000)),
           oi.Entry("usr/lib/libbig-copy.so", data=rng.randbytes(50_000))]
    return [oi.compress(oi.Layer(base, "gzip")), oi.compress(oi.Layer(mid, "zstd"))]


def app_layer(seed: int) -> oi.Layer:
    rng = random.Random(seed)
    return oi.compress(oi.Layer([oi.Entry("app", "dir", mode=0o755),
                                 oi.Entry("app/main", data=rng.randbytes(200_000), mode=0o755),
                                 oi.Entry("app/version", data=f"{seed}\n".encode())], "gzip"))


def push(reg: rig.Registry, repo: str, layers: list[oi.Layer]) -> tuple[oi.OciImage, str]:
    img = oi.make_image(layers)
    regpush.push_image(reg.url, repo, "v1", img)
    return img, f"{reg.host}/{repo}:v1"


def uploads(reg: rig.Registry, repo: str) -> tuple[int, int]:
    """(uploads started, mounts asked) in `repo`, from the registry's access log."""
    text = reg.log_text()
    started = len(re.findall(rf'"POST /v2/{re.escape(repo)}/blobs/uploads/ HTTP', text))
    mounts = text.count(f'"POST /v2/{repo}/blobs/uploads/?mount=')
    return started, mounts


def cache_manifest(reg: rig.Registry, repo: str, tag: str) -> dict:
    return get_manifest(reg, repo, tag)


def test_second_image_converts_only_its_new_layer(tmp_path: Path, plain_registry: rig.Registry) -> None:
    base = shared_layers(1)
    img_a, src_a = push(plain_registry, "bc/app-a", [*base, app_layer(10)])
    img_b, src_b = push(plain_registry, "bc/app-b", [*base, app_layer(11)])
    cache = f"{plain_registry.host}/bc/cache:v1"

    first = convert(tmp_path, src_a, f"{plain_registry.host}/bc/a-nydus:v1", "--build-cache", cache)
    assert (first["layers_built"], first["layers_cached"]) == (3, 0)
    assert first["build_cache"]["misses"] == 3 and first["build_cache"]["records"] == 3

    # the cache has nydusify's layout: per record a bootstrap layer, then its blob, by ChainID
    m = cache_manifest(plain_registry, "bc/cache", "v1")
    assert m["annotations"][bc.ANNO_CACHE] == "v1" and m["annotations"][oci.ANNO_FS_VERSION] == "6"
    chains = bc.chain_ids([ly.diff_id for ly in img_a.layers])
    boots = [ly for ly in m["layers"] if ly["annotations"].get(oci.ANNO_NYDUS_BOOTSTRAP) == "true"]
    assert {b["annotations"][bc.ANNO_SOURCE_CHAINID] for b in boots} == set(chains)
    blobs = [ly for ly in m["layers"] if ly["mediaType"] == oci.NYDUS_BLOB]
    assert all(b["annotations"][bc.ANNO_SOURCE_CHAINID] in chains for b in blobs) and len(blobs) == 3

    before = uploads(plain_registry, "bc/b-nydus")
    second = convert(tmp_path, src_b, f"{plain_registry.host}/bc/b-nydus:v1", "--build-cache", cache)
    assert (second["layers_built"], second["layers_cached"]) == (1, 2)
    assert second["build_cache"]["hits"] == 2 and second["build_cache"]["records"] == 4
    after = uploads(plain_registry, "bc/b-nydus")
    nydus_b = get_manifest(plain_registry, "bc/b-nydus", "v1")
    cached_blobs = {ly["digest"] for ly in nydus_b["layers"]} & {b["digest"] for b in blobs}
    assert len(cached_blobs) == 2  # the two shared layers' blobs come from the cache ...
    assert sorted(second["mounted"]) == sorted(cached_blobs)  # ... mounted from its repository
    assert after[1] - before[1] == 2
    # ... and only the new layer's blob, the bootstrap layer and the config are uploaded
    assert after[0] - before[0] == 3, (before, after)

    # byte for byte what a conversion without the cache makes
    plain = convert(tmp_path, src_b, f"{plain_registry.host}/bc/b-plain:v1")
    assert (plain["layers_built"], plain["layers_cached"]) == (3, 0)
    assert plain["manifest_digest"] == second["manifest_digest"]

    r = check("--source", src_b, "--target", f"{plain_registry.host}/bc/b-nydus:v1")
    assert r.returncode == 0, r.stderr
    assert "paths equal to the source's layers" in r.stdout


def test_cached_base_layers_join_before_the_new_layer_is_built(tmp_path: Path, plain_registry: rig.Registry,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """When every layer below a new one comes from the build cache, they join the stack before
    the new layer is prepared (the old converter prepared it at once, beside their joining, which
    held the GIL against its whole pipeline: 0 layers had joined when it started). So the new
    layer's file that a cached layer has is referenced, not stored, and its blob pushed while it
    was written is the final one (a shared chunk stored before the cached layers joined used to
    drop that stream). The image is the uncached conversion's."""
    host = plain_registry.host
    rng = random.Random(9)
    big = rng.randbytes(300_000)
    base = [oi.compress(oi.Layer([oi.Entry("lib", "dir", mode=0o755), oi.Entry("lib/big.so", data=big)], "gzip")),
            oi.compress(oi.Layer([oi.Entry("etc", "dir", mode=0o755),
                                  oi.Entry("etc/conf", data=rng.randbytes(100_000))], "zstd"))]

    def top(seed: int) -> oi.Layer:
        return oi.compress(oi.Layer([oi.Entry("app", "dir", mode=0o755), oi.Entry("app/big.so", data=big),
                                     oi.Entry("app/main", data=random.Random(seed).randbytes(200_000))], "gzip"))

    _, src_a = push(plain_registry, "bc/join-a", [*base, top(1)])
    _, src_b = push(plain_registry, "bc/join-b", [*base, top(2)])
    cache = f"{host}/bc/join-nydus:cache"

    def opts(src: str, dst: str, work: str, **kw: str) -> ConvertOptions:
        return ConvertOptions(source=src, target=dst, source_insecure=True, target_insecure=True,
                              work_dir=str(tmp_path / work), **kw)

    converter.convert(opts(src_a, f"{host}/bc/join-nydus:a", "w1", build_cache=cache))
    joined: list[tuple[int | None, int]] = []  # (layer prepared, layers in the stack then)
    real = LayerStack.prepare_layer

    def spy(self: LayerStack, tar, progress=None, position=None, growth=None, watch=None):  # type: ignore[no-untyped-def]
        joined.append((position, len(self.layers)))
        return real(self, tar, progress, position=position, growth=growth, watch=watch)

    monkeypatch.setattr(LayerStack, "prepare_layer", spy)
    res = converter.convert(opts(src_b, f"{host}/bc/join-nydus:b", "w2", build_cache=cache))
    monkeypatch.setattr(LayerStack, "prepare_layer", real)
    assert joined == [(2, 2)]
    assert (res.layers_built, res.layers_cached) == (1, 2)
    assert res.stream_push["streamed"] == 1 and res.stream_push["dropped"] == res.stream_push["whole"] == 0
    assert res.deduplicated >= 1  # app/big.so: the cached base's chunk
    plain = converter.convert(opts(src_b, f"{host}/bc/join-plain:b", "w3"))
    assert plain.manifest_digest == res.manifest_digest


def test_cache_hits_need_the_same_parameters(tmp_path: Path, plain_registry: rig.Registry) -> None:
    _img, src = push(plain_registry, "bc/params", [*shared_layers(2), app_layer(20)])
    cache = f"{plain_registry.host}/bc/params-cache:v1"
    target = f"{plain_registry.host}/bc/params-nydus"
    first = convert(tmp_path, src, f"{target}:zstd", "--build-cache", cache)
    assert first["layers_built"] == 3
    lz4 = convert(tmp_path, src, f"{target}:lz4", "--build-cache", cache, "--compressor", "lz4_block")
    assert (lz4["layers_built"], lz4["layers_cached"]) == (3, 0)  # another compressor: all misses
    chunk = convert(tmp_path, src, f"{target}:chunk", "--build-cache", cache, "--fs-chunk-size", "0x10000")
    assert (chunk["layers_built"], chunk["layers_cached"]) == (3, 0)
    v5 = convert(tmp_path, src, f"{target}:v5", "--build-cache", cache, "--fs-version", "5")
    assert (v5["layers_built"], v5["layers_cached"]) == (3, 0)
    # the zstd records stayed in the cache (12 records now): a zstd rerun hits them all
    again = convert(tmp_path, src, f"{target}:zstd-again", "--build-cache", cache)
    assert (again["layers_built"], again["layers_cached"]) == (0, 3)
    assert again["manifest_digest"] == first["manifest_digest"]
    assert again["build_cache"]["records"] == 12
    lz4_again = convert(tmp_path, src, f"{target}:lz4-again", "--build-cache", cache, "--compressor", "lz4_block")
    assert (lz4_again["layers_built"], lz4_again["layers_cached"]) == (0, 3)
    assert lz4_again["manifest_digest"] == lz4["manifest_digest"]
    for tag in ("lz4-again", "v5"):
        r = check("--source", src, "--target", f"{target}:{tag}")
        assert r.returncode == 0, r.stderr


def test_max_records_and_version(tmp_path: Path, plain_registry: rig.Registry) -> None:
    _img, src = push(plain_registry, "bc/lru", [*shared_layers(3), app_layer(30)])
    cache = "bc/lru-nydus:cache"  # --build-cache-tag: the target's repository
    target = f"{plain_registry.host}/bc/lru-nydus:v1"
    res = convert(tmp_path, src, target, "--build-cache-tag", "cache", "--build-cache-max-records", "2")
    assert res["build_cache"]["records"] == 2
    m = get_manifest(plain_registry, *cache.split(":"))
    chains = bc.chain_ids([d for d in json.loads(oi.make_image([*shared_layers(3), app_layer(30)]).config)
                           ["rootfs"]["diff_ids"]])
    kept = [ly["annotations"][bc.ANNO_SOURCE_CHAINID] for ly in m["layers"]
            if ly["annotations"].get(oci.ANNO_NYDUS_BOOTSTRAP) == "true"]
    assert kept == chains[:2]  # the most recent first, in layer order; the third fell out
    res = convert(tmp_path, src, target, "--build-cache-tag", "cache")
    assert (res["layers_built"], res["layers_cached"]) == (1, 2)
    # another cache version: the cache is replaced, nothing reused
    res = convert(tmp_path, src, target, "--build-cache-tag", "cache", "--build-cache-version", "v2")
    assert (res["layers_built"], res["layers_cached"]) == (3, 0)
    assert res["build_cache"]["discarded"].startswith("cache version 'v1'")
    m = get_manifest(plain_registry, *cache.split(":"))
    assert m["annotations"][bc.ANNO_CACHE] == "v2" and res["build_cache"]["records"] == 3


def test_unusable_records_are_converted(tmp_path: Path, plain_registry: rig.Registry) -> None:
    """A record whose bootstrap is not one (here: a blob's bytes) is a miss, counted; with the
    same layer lower down converted already, its download is not reused after it was let go."""
    base = shared_layers(4)
    layers = [base[0], base[1], base[0]]  # the same layer twice (another ChainID each time)
    img, src = push(plain_registry, "bc/dup", layers)
    cache = f"{plain_registry.host}/bc/dup-nydus:cache"
    target = f"{plain_registry.host}/bc/dup-nydus"
    first = convert(tmp_path, src, f"{target}:v1", "--build-cache", cache)
    assert first["layers_built"] == 3
    m = get_manifest(plain_registry, "bc/dup-nydus", "cache")
    chains = bc.chain_ids([ly.diff_id for ly in img.layers])

    def chain(ly: dict) -> str:
        return ly["annotations"].get(bc.ANNO_SOURCE_CHAINID, "")

    # layer 1 has no record any more; layer 3's bootstrap "layer" is really a blob
    some_blob = next(ly for ly in m["layers"] if ly["mediaType"] == oci.NYDUS_BLOB)
    tampered = []
    for ly in m["layers"]:
        if chain(ly) == chains[0]:
            continue
        if chain(ly) == chains[2] and ly["annotations"].get(oci.ANNO_NYDUS_BOOTSTRAP) == "true":
            ly = {**ly, "digest": some_blob["digest"], "size": some_blob["size"]}
        tampered.append(ly)
    body = json.dumps({**m, "layers": tampered}).encode()
    regpush.push_manifest(plain_registry.url, "bc/dup-nydus", "cache", body, oci.OCI_MANIFEST)

    again = convert(tmp_path, src, f"{target}:v2", "--build-cache", cache)
    assert (again["layers_built"], again["layers_cached"]) == (2, 1)
    assert again["build_cache"]["unusable"] == 1 and again["build_cache"]["misses"] == 2
    assert again["manifest_digest"] == first["manifest_digest"]
    # the misses made good records again
    third = convert(tmp_path, src, f"{target}:v3", "--build-cache", cache)
    assert (third["layers_built"], third["layers_cached"]) == (0, 3)


def test_all_platforms_share_one_cache(tmp_path: Path, plain_registry: rig.Registry) -> None:
    base = shared_layers(5)
    images = {"amd64": oi.make_image([*base, app_layer(50)], "amd64"),
              "arm64": oi.make_image([*base, app_layer(51)], "arm64")}
    regpush.push_index(plain_registry.url, "bc/multi", "v1", images)
    src = f"{plain_registry.host}/bc/multi:v1"
    cache = f"{plain_registry.host}/bc/multi-nydus:cache"
    first = convert(tmp_path, src, f"{plain_registry.host}/bc/multi-nydus:v1", "--all-platforms",
                    "--build-cache", cache)
    # the second platform already finds the shared base layers recorded by the first
    assert [(p["layers_built"], p["layers_cached"]) for p in first["platforms"]] == [(3, 0), (1, 2)]
    assert first["build_cache"]["records"] == 4
    again = convert(tmp_path, src, f"{plain_registry.host}/bc/multi-nydus:v2", "--all-platforms",
                    "--build-cache", cache)
    assert [(p["layers_built"], p["layers_cached"]) for p in again["platforms"]] == [(0, 3), (0, 3)]
    assert again["manifest_digest"] == first["manifest_digest"]
    for arch in ("amd64", "arm64"):
        r = check("--source", src, "--target", f"{plain_registry.host}/bc/multi-nydus:v2", "--platform",
                  f"linux/{arch}")
        assert r.returncode == 0, r.stderr

    r = nydusify("convert", "-q", "--source", src, "--target", cache, "--plain-http", "--build-cache", cache)
    assert r.returncode == 1 and "is the target itself" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cached_and_misfit_layers_among_parallel_builds(tmp_path: Path, plain_registry: rig.Registry) -> None:
    """The converter prepares the layers the cache does not serve at once: a cached layer joins
    the stack at its place, a record that does not fit the stack there is converted at its place
    (pulled and prepared then, after the layer above it), and the layers above find the chunks of
    both (a file repeated from each): the manifest is byte for byte a conversion without the cache."""
    rng = random.Random(6)
    low_data, mid_data = rng.randbytes((5 << 20) // 2), rng.randbytes(3 << 20)
    low = oi.compress(oi.Layer([oi.Entry("lib", "dir", mode=0o755), oi.Entry("lib/low", data=low_data)], "gzip"))
    mid = oi.compress(oi.Layer([oi.Entry("lib", "dir", mode=0o755), oi.Entry("lib/low-copy", data=low_data),
                                oi.Entry("lib/mid", data=mid_data)], "gzip"))
    top = oi.compress(oi.Layer([oi.Entry("app", "dir", mode=0o755), oi.Entry("app/mid-copy", data=mid_data),
                                oi.Entry("app/low-copy", data=low_data), oi.Entry("app/own", data=rng.randbytes(9000))],
                               "zstd"))
    img, src = push(plain_registry, "bc/par", [low, mid, top])
    cache = f"{plain_registry.host}/bc/par-nydus:cache"
    target = f"{plain_registry.host}/bc/par-nydus"
    first = convert(tmp_path, src, f"{target}:v1", "--build-cache", cache)
    assert first["layers_built"] == 3
    plain = convert(tmp_path, src, f"{target}:plain")
    assert plain["manifest_digest"] == first["manifest_digest"]

    # layer 2's record gets layer 1's bootstrap (it names no new blob of its own: it does not fit
    # once layer 1 is in), layer 3 loses its record (prepared from the start)
    m = get_manifest(plain_registry, "bc/par-nydus", "cache")
    chains = bc.chain_ids([ly.diff_id for ly in img.layers])

    def boot_of(chain: str) -> dict:
        return next(ly for ly in m["layers"] if ly["annotations"].get(bc.ANNO_SOURCE_CHAINID) == chain
                    and ly["annotations"].get(oci.ANNO_NYDUS_BOOTSTRAP) == "true")

    low_boot = boot_of(chains[0])
    tampered = []
    for ly in m["layers"]:
        chain = ly["annotations"].get(bc.ANNO_SOURCE_CHAINID)
        if chain == chains[2]:
            continue
        if ly is boot_of(chains[1]):
            ly = {**ly, "digest": low_boot["digest"], "size": low_boot["size"]}
        tampered.append(ly)
    regpush.push_manifest(plain_registry.url, "bc/par-nydus", "cache", json.dumps({**m, "layers": tampered}).encode(),
                          oci.OCI_MANIFEST)

    again = convert(tmp_path, src, f"{target}:v2", "--build-cache", cache)
    assert (again["layers_built"], again["layers_cached"]) == (2, 1)
    assert again["build_cache"]["hits"] == 1 and again["build_cache"]["unusable"] == 1
    assert again["build_cache"]["misses"] == 2
    assert again["manifest_digest"] == first["manifest_digest"]
    r = check("--source", src, "--target", f"{target}:v2")
    assert r.returncode == 0, r.stderr


def _spy_pushes(monkeypatch: pytest.MonkeyPatch,
                fail: Callable[[str], bool] = lambda _path: False) -> list[tuple[str, str]]:
    """Every upload the conversion starts, in order: ("blob", digest) or ("manifest", reference);
    the upload of a file whose path `fail`s raises EACCES (not retried)."""
    events: list[tuple[str, str]] = []
    real_file, real_blob, real_manifest = (ImageTransfer.push_blob_file, ImageTransfer.push_blob,
                                           ImageTransfer.push_manifest)

    async def push_blob_file(self: ImageTransfer, path: str, digest: str, **kw: Any) -> Any:
        events.append(("blob", digest))
        if fail(path):
            raise OSError(errno.EACCES, "refused by the test")
        return await real_file(self, path, digest, **kw)

    async def push_blob(self: ImageTransfer, data: bytes, digest: str | None = None, chunk_size: int = 0) -> str:
        events.append(("blob", digest or ""))
        return await real_blob(self, data, digest, chunk_size)

    async def push_manifest(self: ImageTransfer, reference: str, body: bytes, media_type: str) -> str:
        events.append(("manifest", reference))
        return await real_manifest(self, reference, body, media_type)

    monkeypatch.setattr(ImageTransfer, "push_blob_file", push_blob_file)
    monkeypatch.setattr(ImageTransfer, "push_blob", push_blob)
    monkeypatch.setattr(ImageTransfer, "push_manifest", push_manifest)
    return events


def _rebuild_rig(tmp_path: Path, reg: rig.Registry, name: str) -> tuple[Callable[..., ConvertOptions], str, str]:
    """Two images that differ in their top layer, the first converted with a build cache (the
    target's repository, tag `cache`): (options maker, the second's source, the cache ref)."""
    base = shared_layers(5)
    _, src_a = push(reg, f"bc/{name}-a", [*base, app_layer(50)])
    _, src_b = push(reg, f"bc/{name}-b", [*base, app_layer(51)])
    cache = f"{reg.host}/bc/{name}-nydus:cache"

    def opts(src: str, tag: str, **kw: Any) -> ConvertOptions:
        return ConvertOptions(source=src, target=f"{reg.host}/bc/{name}-nydus:{tag}", source_insecure=True,
                              target_insecure=True, work_dir=str(tmp_path / tag), build_cache=cache, **kw)

    converter.convert(opts(src_a, "a"))
    return opts, src_b, cache


def test_cache_content_goes_up_beside_the_image_pushes(tmp_path: Path, plain_registry: rig.Registry,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The new record's bootstrap and the cache config are uploaded beside the image's last
    pushes: the bootstrap starts before the image manifest (the old converter started them only
    after it: ~20 ms more of a rebuild's serial tail); the cache manifest still goes last, once
    the image is pushed, and names only blobs the cache repository has."""
    opts, src_b, _cache = _rebuild_rig(tmp_path, plain_registry, "beside")
    events = _spy_pushes(monkeypatch)
    res = converter.convert(opts(src_b, "b"))
    assert (res.layers_built, res.layers_cached) == (1, 2)
    m = cache_manifest(plain_registry, "bc/beside-nydus", "cache")
    boots = {ly["digest"] for ly in m["layers"] if ly["annotations"].get(oci.ANNO_NYDUS_BOOTSTRAP) == "true"}
    new_boot = [i for i, (kind, d) in enumerate(events) if kind == "blob" and d in boots]
    config = [i for i, (kind, d) in enumerate(events) if kind == "blob" and d == m["config"]["digest"]]
    image_manifest = events.index(("manifest", "b"))
    assert len(new_boot) == 1 and len(config) == 1, events
    # the record's bootstrap starts before the image manifest (the old converter: after it); the
    # config follows the record blobs, so it may land either side of the image manifest
    assert new_boot[0] < image_manifest and new_boot[0] < config[0], events
    assert events[-1] == ("manifest", "cache") and max(image_manifest, config[0]) < len(events) - 1
    for ly in m["layers"]:
        status, _ = http_get(f"{plain_registry.url}/v2/bc/beside-nydus/blobs/{ly['digest']}")
        assert status == 200, ly


def test_a_failed_cache_push_fails_the_command_after_the_image_is_pushed(
        tmp_path: Path, plain_registry: rig.Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache upload that fails while the image is still being pushed does not stop the image:
    its manifest is pushed, then the conversion fails naming the cache (as when the cache's
    pushes came after the image's); the cache manifest is not replaced."""
    opts, src_b, _cache = _rebuild_rig(tmp_path, plain_registry, "fails")
    before = cache_manifest(plain_registry, "bc/fails-nydus", "cache")
    events = _spy_pushes(monkeypatch, fail=lambda path: path.endswith(".boot.tar.gz"))  # a record's bootstrap
    with pytest.raises(ConvertError, match="the image is pushed, but pushing the build cache failed"):
        converter.convert(opts(src_b, "b"))
    assert ("manifest", "b") in events and ("manifest", "cache") not in events
    assert get_manifest(plain_registry, "bc/fails-nydus", "b")["layers"]
    assert cache_manifest(plain_registry, "bc/fails-nydus", "cache") == before


def test_a_record_that_fails_leaves_no_manifest(tmp_path: Path, plain_registry: rig.Registry,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The new layer's record is written after the merged bootstrap, beside the image's pushes,
    but the image manifest still waits for it: a record that fails fails the conversion with no
    image manifest and no new cache manifest pushed."""
    opts, src_b, _cache = _rebuild_rig(tmp_path, plain_registry, "recfail")
    before = cache_manifest(plain_registry, "bc/recfail-nydus", "cache")

    def broken(self: LayerStack, path: str, layer: object = None) -> list[str]:
        raise FormatError("record writer broken by the test")

    monkeypatch.setattr(LayerStack, "write_layer_bootstrap", broken)
    events = _spy_pushes(monkeypatch)
    with pytest.raises(FormatError, match="broken by the test"):
        converter.convert(opts(src_b, "b"))
    assert not [e for e in events if e[0] == "manifest"], events
    assert http_get(f"{plain_registry.url}/v2/bc/recfail-nydus/manifests/b")[0] == 404
    assert cache_manifest(plain_registry, "bc/recfail-nydus", "cache") == before
