"""The converter hands each layer's tar to its build in memory (`builder.sources.TarPipe`): no
tar file is written and read back. The image still passes `nydusify-py check` against the
source, also when a layer repeats (each use of it downloads for its own build)."""

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
