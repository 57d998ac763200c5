"""`nydus-image-py export --block -C ENTRY` with a registry backend: the blobs are read from a real
docker-registry (through a blob cache), and the disk is the one a local export writes."""

import hashlib
import json
import os

import pytest

from nydus_py.cli.image import main as image_cli
from tests.builder.test_block_export import two_blob_image

from .regpush import push_blob

pytestmark = pytest.mark.slow


def test_export_reads_the_blobs_from_a_registry(plain_registry, tmp_path):
    _src, boot, blobs, blob_ids = two_blob_image(tmp_path)
    for bid in blob_ids:
        data = (blobs / bid).read_bytes()
        assert hashlib.sha256(data).hexdigest() == bid
        push_blob(plain_registry.url, "export/disk", data)
    local = tmp_path / "local.disk"
    assert image_cli(["export", "--block", "-B", str(boot), "-D", str(blobs), "-O", str(local), "--verity"]) == 0
    for bid in blob_ids:
        os.unlink(blobs / bid)  # from here on only the registry has them
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"type": "bootstrap", "id": "disk", "config_v2": {
        "version": 2, "id": "factory",
        "backend": {"type": "registry", "registry": {"host": plain_registry.host, "repo": "export/disk",
                                                     "scheme": "http", "timeout": 10, "retry_limit": 1}},
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(tmp_path / "cache")}},
        "metadata_path": str(boot)}}))
    remote = tmp_path / "remote.disk"
    assert image_cli(["export", "--block", "-C", str(entry), "-O", str(remote), "--verity"]) == 0
    assert remote.read_bytes() == local.read_bytes()
    assert {p.name.split(".")[0] for p in (tmp_path / "cache").iterdir()} >= set(blob_ids)
