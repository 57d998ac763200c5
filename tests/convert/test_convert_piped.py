"""The converter hands each layer's tar to its build in memory (`builder.sources.TarPipe`): no
tar file is written and read back. The image still passes `nydusify-py check` against the
source, also when a layer repeats (each use of it downloads for its own build)."""

import asyncio
import os
import threading

import pytest

from nydus_py.builder.sources import TarPipe
from nydus_py.convert import converter
from nydus_py.convert.converter import ConvertOptions

from . import ociimage as oi
from . import regpush
from .test_check import check

pytestmark = [pytest.mark.slow]


def test_layer_tars_reach_their_builds_in_memory(tmp_path, plain_registry, monkeypatch):
    layers = oi.sample_layers(seed=3, big=1 << 20)
    img = oi.make_image([*layers, layers[0]])  # the first layer again on top
    regpush.push_image(plain_registry.url, "piped/app", "v1", img)
    src, dst = f"{plain_registry.host}/piped/app:v1", f"{plain_registry.host}/piped/app:v1-nydus"
    tar_files: list[str] = []
    real_file = converter._GrowingFile.__init__

    def spy_file(self, raw, growth):  # type: ignore[no-untyped-def]
        tar_files.append(raw.name)
        real_file(self, raw, growth)

    fed: list[int] = []
    lock = threading.Lock()
    real_feed = TarPipe.feed

    def spy_feed(self, data):  # type: ignore[no-untyped-def]
        with lock:
            fed.append(id(self))
        real_feed(self, data)

    monkeypatch.setattr(converter._GrowingFile, "__init__", spy_file)
    monkeypatch.setattr(TarPipe, "feed", spy_feed)
    work = tmp_path / "work"
    res = converter.convert(ConvertOptions(source=src, target=dst, source_insecure=True, target_insecure=True,
                                           work_dir=str(work), chunk_size=0x10000))
    assert tar_files == []
    assert len(set(fed)) == len(img.layers)  # one pipe per layer, the repeated one too
    assert res.layers == len(img.layers) and res.layers_built == len(img.layers)
    assert not os.path.exists(work) or not list(work.rglob("*.tar"))
    r = check("--source", src, "--target", dst)
    assert r.returncode == 0, r.stderr


def test_a_new_layer_above_cached_ones_downloads_once_they_joined(tmp_path, plain_registry, monkeypatch):
    """A rebuild: the layers below have build-cache records, the top one is new. Its download
    (and build) starts once the records are fetched and the cached layers joined the stack: their
    joining is ~20 ms of Python per layer, and beside the new layer's download, inflate and parse
    it held the GIL against all of them (on 2 cores, a 514 MiB image's rebuild took ~80 ms more
    than joining them first). (It used to start at once, before the records were fetched.)"""
    from .test_build_cache import app_layer, push, shared_layers

    lower = shared_layers(41)
    _, src1 = push(plain_registry, "piped/base", [*lower, app_layer(1)])
    _, src2 = push(plain_registry, "piped/next", [*lower, app_layer(2)])
    cache = f"{plain_registry.host}/piped/cache:v1"

    def opts(src: str, dst: str) -> ConvertOptions:
        return ConvertOptions(source=src, target=dst, source_insecure=True, target_insecure=True,
                              work_dir=str(tmp_path / "work"), chunk_size=0x10000, build_cache=cache,
                              build_cache_insecure=True)

    first = converter.convert(opts(src1, f"{plain_registry.host}/piped/base:v1-nydus"))
    assert first.layers_built == 3
    order: list[str] = []
    real_fetch, real_hits = converter.Converter._fetch, converter.Converter._cache_hits
    real_cached = converter.Converter._cached_layer

    async def spy_fetch(self, src, i, d, *a, **k):  # type: ignore[no-untyped-def]
        order.append(f"download {i}")
        return await real_fetch(self, src, i, d, *a, **k)

    async def spy_hits(self, *a, **k):  # type: ignore[no-untyped-def]
        got = await real_hits(self, *a, **k)
        order.append("records fetched")
        return got

    def spy_cached(self, stack, i, *a, **k):  # type: ignore[no-untyped-def]
        res = real_cached(self, stack, i, *a, **k)
        order.append(f"joined {i}")
        return res

    monkeypatch.setattr(converter.Converter, "_fetch", spy_fetch)
    monkeypatch.setattr(converter.Converter, "_cache_hits", spy_hits)
    monkeypatch.setattr(converter.Converter, "_cached_layer", spy_cached)
    res = converter.convert(opts(src2, f"{plain_registry.host}/piped/next:v1-nydus"))
    assert (res.layers_built, res.layers_cached) == (1, len(lower))
    assert order == ["records fetched", *(f"joined {i}" for i in range(len(lower))), f"download {len(lower)}"]
    r = check("--source", src2, "--target", f"{plain_registry.host}/piped/next:v1-nydus")
    assert r.returncode == 0, r.stderr


def test_cache_records_source_and_target_are_fetched_at_once(tmp_path, plain_registry, monkeypatch):
    """The build cache's manifest, the source image and the target probe are three round trips
    before any layer starts: they go at once. Here the cache is read only once the source is
    being resolved (it was read before: the conversion would wait for good)."""
    layers = oi.sample_layers(seed=7, big=1 << 16)
    img = oi.make_image(layers[:2])
    regpush.push_image(plain_registry.url, "piped/start", "v1", img)
    resolving = asyncio.Event()
    waited: list[bool] = []
    real_resolve, real_load = converter.resolve_sources, converter.load_cache

    async def spy_resolve(*a, **k):  # type: ignore[no-untyped-def]
        resolving.set()
        return await real_resolve(*a, **k)

    async def load_after_resolve(*a, **k):  # type: ignore[no-untyped-def]
        try:
            await asyncio.wait_for(resolving.wait(), 15)
            waited.append(True)
        except TimeoutError:
            waited.append(False)
        return await real_load(*a, **k)

    monkeypatch.setattr(converter, "resolve_sources", spy_resolve)
    monkeypatch.setattr(converter, "load_cache", load_after_resolve)
    res = converter.convert(ConvertOptions(
        source=f"{plain_registry.host}/piped/start:v1", target=f"{plain_registry.host}/piped/start:v1-nydus",
        source_insecure=True, target_insecure=True, work_dir=str(tmp_path / "work"), chunk_size=0x10000,
        build_cache=f"{plain_registry.host}/piped/start:cache", build_cache_insecure=True))
    assert waited == [True], "the source was resolved only after the build cache was read"
    assert res.layers_built == 2


def test_a_failing_cache_is_reported_before_a_failing_source(tmp_path, plain_registry):
    """Fetched at once, a failure is still reported in the old order: the cache's first."""
    with pytest.raises(Exception) as e:
        converter.convert(ConvertOptions(
            source=f"{plain_registry.host}/piped/missing:v1", target=f"{plain_registry.host}/piped/missing:v1-nydus",
            source_insecure=True, target_insecure=True, work_dir=str(tmp_path / "work"),
            build_cache="127.0.0.1:1/piped/cache:v1", build_cache_insecure=True))
    assert "reading the build cache" in str(e.value), str(e.value)
