"""Mount-by-reference config handling (the fetch itself runs against real registries in
tests/convert/test_convert_e2e.py and tests/daemon/test_image_start.py)."""

import json
from pathlib import Path

import pytest

from nydus_py.config.forms import parse_any
from nydus_py.convert.reference import parse_reference
from nydus_py.daemon.errors import BadRequest
from nydus_py.daemon.image_ref import image_config, image_source, is_image_source, prepare_image_mount
from nydus_py.daemon.instance import MountCmd, create_instance
from tests.storage import images


def test_sources():
    assert image_source("127.0.0.1:5000/a:b") == "docker://127.0.0.1:5000/a:b"
    assert image_source("docker://r.io/a:b") == "docker://r.io/a:b"
    assert is_image_source("docker://x/y") and not is_image_source("/path/image.boot")


def test_default_config_is_http_only_on_loopback():
    local = image_config(parse_reference("127.0.0.1:5000/test/app:v1"), None)
    assert local.rafs.backend.type == "registry"
    assert local.rafs.cache.type == "blobcache"  # the default is one that caches
    assert local.rafs.backend.config == {"host": "127.0.0.1:5000", "repo": "test/app", "scheme": "http"}
    remote = image_config(parse_reference("busybox"), None)
    assert remote.rafs.backend.config == {"host": "index.docker.io", "repo": "library/busybox", "scheme": "https"}


def test_image_mounts_without_a_cache_get_the_default_one(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = parse_reference("127.0.0.1:5000/test/app:v1")
    monkeypatch.delenv("NYDUS_PY_CACHE_DIR", raising=False)
    monkeypatch.delenv("NYDUS_PY_CACHE_SIZE", raising=False)
    made = image_config(ref, None).rafs.cache
    assert (made.type, made.work_dir, made.size_limit) == ("blobcache", "/var/lib/nydus-py/cache", 10 << 30)
    # adaptive fetching on, background completion (prefetch_all) off: the daemon's defaults (the
    # image's own prefetch table is fetched: test_the_made_up_config_prefetches_the_table_only)
    assert made.stream_size > 0 and not image_config(ref, None).rafs.prefetch_all
    monkeypatch.setenv("NYDUS_PY_CACHE_DIR", "/srv/cache")
    monkeypatch.setenv("NYDUS_PY_CACHE_SIZE", str(1 << 30))
    no_cache = parse_any(json.dumps({"device": {"backend": {"type": "registry", "config": {
        "host": "x", "repo": "y"}}}}))
    got = image_config(ref, no_cache).rafs.cache
    assert (got.type, got.work_dir, got.size_limit) == ("blobcache", "/srv/cache", 1 << 30)
    monkeypatch.setenv("NYDUS_PY_CACHE_SIZE", "lots")
    with pytest.raises(BadRequest, match="NYDUS_PY_CACHE_SIZE"):
        image_config(ref, None)


def test_given_config_keeps_everything_but_host_and_repo():
    cfg = {"device": {"id": "/snap", "backend": {"type": "registry", "config": {
        "host": "old.example", "repo": "old/repo", "scheme": "http", "auth": "dXNlcjpwYXNz", "timeout": 7}},
        "cache": {"type": "blobcache", "config": {"work_dir": "/var/cache/x"}}},
        "mode": "direct", "digest_validate": True, "iostats_files": True, "access_pattern": True}
    parsed = parse_any(json.dumps(cfg))
    out = image_config(parse_reference("reg.io:5000/new/repo@sha256:" + "a" * 64), parsed)
    b = out.rafs.backend.config
    assert (b["host"], b["repo"], b["auth"], b["timeout"], b["scheme"]) == (
        "reg.io:5000", "new/repo", "dXNlcjpwYXNz", 7, "http")
    assert out.rafs.cache.work_dir == "/var/cache/x" and out.rafs.digest_validate and out.access_pattern
    assert parsed.rafs.backend.config["host"] == "old.example"  # the daemon's default config is untouched


def test_unusable_input_is_a_bad_request():
    local = parse_any(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": "/tmp"}}}}))
    with pytest.raises(BadRequest, match="needs a registry backend"):
        image_config(parse_reference("reg.io/a:b"), local)
    with pytest.raises(BadRequest, match="invalid image reference"):
        prepare_image_mount("docker://NOT/valid", "", None)
    with pytest.raises(BadRequest, match="config"):
        prepare_image_mount("docker://reg.io/a:b", "{not json", None)
    with pytest.raises(BadRequest, match="127.0.0.1:9/a:b"):  # nothing listens there
        prepare_image_mount("docker://127.0.0.1:9/a:b", json.dumps({"device": {"backend": {
            "type": "registry", "config": {"scheme": "http", "timeout": 1, "retry_limit": 1}}}}), None)


def test_the_made_up_config_prefetches_the_table_only() -> None:
    cfg = image_config(parse_reference("127.0.0.1:5000/test/app:v1"), None).rafs
    assert cfg.prefetch_enable and not cfg.prefetch_all


@pytest.mark.parametrize("table", [False, True])
def test_a_prefetcher_is_started_only_with_something_to_prefetch(tmp_path: Path, table: bool) -> None:
    """fs_prefetch on an image without a prefetch table (and no files, no prefetch_all) starts no
    threads: a shared daemon would carry them per image for nothing."""
    img = images.build(tmp_path, prefetch=[b"/etc"] if table else None)
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(img.blob_dir)}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
           "mode": "direct", "fs_prefetch": {"enable": True, "prefetch_all": False, "threads_count": 2}}
    inst = create_instance("/m", MountCmd("rafs", str(img.boot), json.dumps(cfg)))
    try:
        assert (inst.prefetcher is not None) == table
        if inst.prefetcher is not None:
            assert inst.prefetcher.done.wait(30)
    finally:
        inst.close()
