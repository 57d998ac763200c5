"""Test images: built by our builder, pushed to a registry by our own client as a Nydus image
(data blob layers + a gzip tar bootstrap layer `image/image.boot`, NYDUSD-CONTRACT.md 7)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions, BuildResult
from nydus_py.builder.sources import tree_from_directory
from nydus_py.rafs.constants import Compressor
from nydus_py.storage.registry import RegistryBackend

CHUNK = 0x10000
BLOB_MEDIA = "application/vnd.oci.image.layer.nydus.blob.v1"
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"


def make_tree(root: Path, seed: int = 7) -> dict[str, bytes]:
    """Files of several chunks (random, so chunks do not dedup), small files and a text file;
    returns path -> content."""
    rng = random.Random(seed)
    files = {
        "big/a.bin": rng.randbytes(6 * CHUNK + 1234),
        "big/b.bin": rng.randbytes(5 * CHUNK),
        "big/c.bin": rng.randbytes(9 * CHUNK + 17),
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n" * 3,
        "etc/motd": b"hello from a lazily loaded image\n",
        "text/log.txt": b"".join(b"line %06d of a compressible file\n" % i for i in range(20_000)),
    }
    for i in range(30):
        files[f"small/f{i:02d}"] = rng.randbytes(rng.randrange(1, 3000))
    return write_files(root, files)


def write_files(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write `files` (relative path -> bytes) under `root`, making directories; returns `files`."""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


@dataclass
class BuiltImage:
    src: Path
    boot: Path
    blob_dir: Path
    result: BuildResult
    files: dict[str, bytes]

    @property
    def blob_id(self) -> str:
        assert self.result.blob_id is not None
        return self.result.blob_id

    def blob_bytes(self) -> bytes:
        return (self.blob_dir / self.blob_id).read_bytes()


def build(work: Path, seed: int = 7, compressor: Compressor = Compressor.ZSTD,
          prefetch: list[bytes] | None = None) -> BuiltImage:
    src = work / "src"
    files = make_tree(src, seed)
    blob_dir = work / "blobs"
    blob_dir.mkdir(parents=True, exist_ok=True)
    opts = BuildOptions(chunk_size=CHUNK, compressor=compressor, prefetch_paths=prefetch or [])
    result = build_image(tree_from_directory(src), str(work / "image.boot"), str(blob_dir), opts)
    return BuiltImage(src, work / "image.boot", blob_dir, result, files)


def bootstrap_layer(boot: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("image",):
            d = tarfile.TarInfo(name)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
        ti = tarfile.TarInfo("image/image.boot")
        ti.size, ti.mode = len(boot), 0o644
        tar.addfile(ti, io.BytesIO(boot))
    return gzip.compress(buf.getvalue(), mtime=0)


def push_image(backend: RegistryBackend, image: BuiltImage, tag: str, chunked: bool = False) -> str:
    """Push blob(s), bootstrap layer, config and manifest; returns the manifest digest."""
    layers = []
    for bid in image.result.blob_ids:
        data = (image.blob_dir / bid).read_bytes()
        digest = backend.push_blob(data, chunk_size=(len(data) // 3 + 1) if chunked else 0)
        assert digest == f"sha256:{bid}"
        layers.append({"mediaType": BLOB_MEDIA, "digest": digest, "size": len(data),
                       "annotations": {"containerd.io/snapshot/nydus-blob": "true"}})
    boot_layer = bootstrap_layer(image.boot.read_bytes())
    boot_digest = backend.push_blob(boot_layer)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": boot_digest,
                   "size": len(boot_layer), "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                                                             "containerd.io/snapshot/nydus-fs-version": "6"}})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "config": {}}).encode()
    config_digest = backend.push_blob(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": len(config)},
                           "layers": layers}).encode()
    return backend.push_manifest(tag, manifest, MANIFEST_MEDIA)


def pull_bootstrap(backend: RegistryBackend, tag: str, dest: Path) -> Path:
    """Fetch the manifest, take its last layer (the bootstrap) and extract image/image.boot."""
    body, _ctype = backend.get_manifest(tag)
    manifest = json.loads(body)
    layer = manifest["layers"][-1]
    assert layer["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    data = backend.get_blob(layer["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        member = tar.extractfile("image/image.boot")
        assert member is not None
        dest.write_bytes(member.read())
    return dest


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def registry_config(host: str, repo: str, **extra: object) -> dict[str, object]:
    return {"host": host, "repo": repo, "scheme": "http", "timeout": 3, "connect_timeout": 2, **extra}


def nydusd_config(backend: dict[str, object], work_dir: str | None, **extra: object) -> dict[str, object]:
    device: dict[str, object] = {"id": "/test", "backend": {"type": "registry", "config": backend}}
    if work_dir is not None:
        device["cache"] = {"type": "blobcache", "config": {"work_dir": work_dir}}
    return {"device": device, "mode": "direct", "digest_validate": False, "enable_xattr": True, **extra}


def env_without_auth() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "IMAGE_PULL_AUTH" and not k.startswith("NYDUS_HEADER_")}
