"""OCI image layout tar archives as the source or the target of `nydusify-py convert`
(`--source-archive`, `--target-archive`), standing in for a registry client: the converter reads
manifests and blobs from them, and pushes into them, through the same few calls.

A source archive is read in place (members found once by their tar headers, then ranges of the
file), so a multi-GiB archive costs no copy; a gzip- or zstd-compressed one is first inflated into
the work directory (logged). The image in it is the one the index names after `--source`
(`io.containerd.image.name` with the whole reference, or `org.opencontainers.image.ref.name` with
the tag or the whole reference, as containerd's import matches them), or its only image. A
`docker save` archive of the older kind (`manifest.json`, no `index.json`) is read as containerd
imports it: the image whose `RepoTags` name `--source` (or the only one) is given an OCI manifest
made here, its layers' digests hashed once from the archive.

A target archive is an OCI layout built in the work directory and written as one tar at
`finish()`, atomically; the tagged manifest gets both name annotations, as containerd's export
writes them. Nothing is written when the conversion fails.
"""

import asyncio
import errno
import hashlib
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable
from typing import Any

from ..builder.atomic import atomic_output
from ..storage.registry.transfer import BlobSink
from . import oci
from .errors import ConvertError
from .reference import DIGEST, ImageRef

log = logging.getLogger(__name__)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
DOCKER_MANIFEST_FILE = "manifest.json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"


def _blob_name(digest: str) -> str:
    if not DIGEST.fullmatch(digest):
        raise OSError(errno.EINVAL, f"not a sha256 digest: {digest!r}")
    return "blobs/sha256/" + digest[7:]


def _inflate(path: str, work: str) -> str:
    """`path` itself when it is a plain tar, else its inflated copy in `work`."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(_GZIP) or magic == _ZSTD):
        return path
    out = os.path.join(work, "source-archive.tar")
    log.info("source archive %s is compressed; inflating it into %s first", path, out)
    if magic == _ZSTD:
        import zstandard

        with open(path, "rb") as src, open(out, "wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst)
    else:
        import gzip

        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


class LayoutArchiveSource:
    """The registry client calls the converter makes on its source, answered from an archive."""

    def __init__(self, path: str, ref: ImageRef, work: str) -> None:
        self.path = path
        self.ref = ref
        self.work = work
        self._members: dict[str, tuple[int, int]] = {}  # name -> (data offset, size)
        self._by_digest: dict[str, str] = {}  # digest -> member, for a docker save archive
        self._docker_manifest: bytes | None = None  # the OCI manifest made for a docker save image
        self._fd = -1

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        try:
            tar_path = _inflate(self.path, self.work)
            with tarfile.open(tar_path, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        self._members[os.path.normpath(m.name).lstrip("/")] = (m.offset_data, m.size)
        except (tarfile.TarError, EOFError) as e:
            raise ConvertError(f"source archive {self.path}: not a tar archive ({e})") from None
        self._fd = os.open(tar_path, os.O_RDONLY | os.O_CLOEXEC)
        if INDEX_FILE not in self._members:
            if DOCKER_MANIFEST_FILE not in self._members:
                raise ConvertError(f"source archive {self.path}: neither index.json (an OCI image layout) nor "
                                   "manifest.json (docker save)")
            self._docker_image()

    def _docker_image(self) -> None:
        """The OCI manifest of the `docker save` image `--source` names, and its blobs' digests."""
        entries = json.loads(self._read(DOCKER_MANIFEST_FILE))
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
            raise ConvertError(f"source archive {self.path}: manifest.json lists no image")
        want = {str(self.ref), f"{self.ref.repository}:{self.ref.reference}",
                f"{self.ref.repository.removeprefix('library/')}:{self.ref.reference}"}
        picked = [e for e in entries if want & set(e.get("RepoTags") or [])]
        if not picked and len(entries) == 1:
            picked = entries
        if not picked:
            tags = sorted(t for e in entries for t in e.get("RepoTags") or [])
            raise ConvertError(f"source archive {self.path} holds {len(entries)} images and none is tagged "
                               f"{self.ref}: {', '.join(tags) or 'no tags'}")
        entry = picked[0]
        config = self._read(os.path.normpath(str(entry.get("Config", ""))))
        layers = []
        for name in entry.get("Layers") or []:
            member = os.path.normpath(str(name))
            digest, size, media = self._hash_member(member)
            self._by_digest[digest] = member
            layers.append({"mediaType": media, "digest": digest, "size": size})
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        self._by_digest[config_digest] = os.path.normpath(str(entry["Config"]))
        manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                    "layers": layers}
        self._docker_manifest = oci.dumps(manifest)
        log.info("source archive %s: docker save format; image %s, %d layers", self.path,
                 ", ".join(entry.get("RepoTags") or ["(untagged)"]), len(layers))

    def _hash_member(self, name: str) -> tuple[str, int, str]:
        got = self._members.get(name)
        if got is None:
            raise ConvertError(f"source archive {self.path}: manifest.json names {name}, which is not in it")
        off, size = got
        h = hashlib.sha256()
        head = os.pread(self._fd, 4, off)
        pos = 0
        while pos < size:
            data = os.pread(self._fd, min(1 << 20, size - pos), off + pos)
            if not data:
                raise OSError(errno.EIO, f"{name}: the source archive {self.path} is cut short")
            h.update(data)
            pos += len(data)
        media = OCI_LAYER + ("+gzip" if head.startswith(_GZIP) else "+zstd" if head == _ZSTD else "")
        return "sha256:" + h.hexdigest(), size, media

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read(self, name: str, limit: int = oci.MAX_DOCUMENT) -> bytes:
        got = self._members.get(name)
        if got is None:
            raise OSError(errno.ENOENT, f"{name} is not in the source archive {self.path}")
        off, size = got
        if size > limit:
            raise OSError(errno.EFBIG, f"{name} in the source archive is {size} bytes, more than {limit}")
        data = os.pread(self._fd, size, off)
        if len(data) != size:
            raise OSError(errno.EIO, f"{name}: the source archive {self.path} is cut short")
        return data

    def _member(self, digest: str) -> str:
        return self._by_digest.get(digest) or _blob_name(digest)

    def _select(self) -> dict[str, Any]:
        index = oci.parse_json(self._read(INDEX_FILE), "source archive index.json")
        entries = [d for d in index.get("manifests") or [] if isinstance(d, dict)]
        if not entries:
            raise ConvertError(f"source archive {self.path}: its index lists no image")
        full = str(self.ref)
        names = {full, f"{self.ref.registry}/{self.ref.repository}:{self.ref.reference}"}
        tags = {self.ref.tag} if self.ref.tag else set()
        for d in entries:
            ann = d.get("annotations") or {}
            if ann.get(CONTAINERD_NAME) in names or ann.get(REF_NAME) in names | tags:
                return d
        if len(entries) == 1:
            return entries[0]
        named = sorted(str((d.get("annotations") or {}).get(CONTAINERD_NAME) or (d.get("annotations") or {})
                           .get(REF_NAME, "?")) for d in entries)
        raise ConvertError(f"source archive {self.path} holds {len(entries)} images and none is named {full}: "
                           f"{', '.join(named)}")

    async def fetch_manifest(self, reference: str,
                             accept: tuple[str, ...] = oci.ACCEPT) -> tuple[bytes, str, str] | None:
        if self._docker_manifest is not None:
            digest = "sha256:" + hashlib.sha256(self._docker_manifest).hexdigest()
            if DIGEST.fullmatch(reference) and reference != digest:
                return None
            return self._docker_manifest, oci.OCI_MANIFEST, digest
        if DIGEST.fullmatch(reference):
            desc: dict[str, Any] = {"digest": reference, "mediaType": ""}
        else:
            desc = self._select()
        digest = str(desc.get("digest", ""))
        try:
            body = self._read(_blob_name(digest))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise OSError(errno.EIO, f"manifest {digest} in the source archive does not match its digest")
        media = desc.get("mediaType") or json.loads(body).get("mediaType") or oci.OCI_MANIFEST
        return body, str(media), digest

    async def get_blob(self, digest: str) -> bytes:
        body = self._read(self._member(digest))
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise OSError(errno.EIO, f"blob {digest}: content does not match its digest")
        return body

    async def stream_blob(self, digest: str, sink: BlobSink, *, limit: int | None = None,
                          progress: Callable[[int], None] | None = None, stall: float = 60.0,
                          piece: int = 1 << 20) -> int:
        """The blob's bytes into `sink`, a piece at a time (the caller hashes them)."""
        off, size = self._members.get(self._member(digest)) or (0, -1)
        if size < 0:
            raise OSError(errno.ENOENT, f"blob {digest} is not in the source archive {self.path}")
        await sink.restart()
        end = size if limit is None else min(size, limit + 1)
        got = 0
        while got < end:
            data = await asyncio.to_thread(os.pread, self._fd, min(piece, end - got), off + got)
            if not data:
                raise OSError(errno.EIO, f"blob {digest}: the source archive {self.path} is cut short")
            got += len(data)
            await sink.write(data)
            if progress is not None:
                progress(len(data))
        return got


class LayoutArchiveTarget:
    """The registry client calls the converter makes on its target, into an OCI layout that
    `finish()` writes as a tar at `path`."""

    def __init__(self, path: str, ref: ImageRef | None, work: str) -> None:
        self.path = path
        self.ref = ref
        self.root = os.path.join(work, "target-layout")
        self.tagged: dict[str, Any] | None = None

    async def start(self) -> None:
        os.makedirs(os.path.join(self.root, "blobs", "sha256"), exist_ok=True)

    async def close(self) -> None:
        return None

    def _path(self, digest: str) -> str:
        return os.path.join(self.root, _blob_name(digest))

    async def blob_exists(self, digest: str) -> bool:
        return os.path.exists(self._path(digest))

    async def blob_size(self, blob_id: str) -> int:
        digest = blob_id if blob_id.startswith("sha256:") else f"sha256:{blob_id}"
        try:
            return os.path.getsize(self._path(digest))
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"blob {digest} is not in the target archive") from None

    async def mount_blob(self, digest: str, from_repo: str) -> bool:
        return False  # nothing to mount from: the caller copies the blob in

    async def fetch_manifest(self, reference: str,
                             accept: tuple[str, ...] = oci.ACCEPT) -> tuple[bytes, str, str] | None:
        if DIGEST.fullmatch(reference) and os.path.exists(self._path(reference)):
            with open(self._path(reference), "rb") as f:
                body = f.read()
            return body, str(json.loads(body).get("mediaType", "")), reference
        return None  # a new archive has no earlier image under the tag

    def _store(self, data: bytes, digest: str) -> None:
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise OSError(errno.EINVAL, f"data pushed as {digest} hashes to something else")
        with open(self._path(digest), "wb") as f:
            f.write(data)

    async def push_blob(self, data: bytes, digest: str | None = None, chunk_size: int = 0) -> str:
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        if not await self.blob_exists(digest):
            await asyncio.to_thread(self._store, data, digest)
        return digest

    async def push_blob_file(self, path: str, digest: str, *, piece: int = 1 << 20,
                             progress: Callable[[int], None] | None = None) -> bool:
        if await self.blob_exists(digest):
            return False
        await asyncio.to_thread(self._copy_in, path, digest, piece)
        if progress is not None:
            progress(os.path.getsize(path))
        return True

    def _copy_in(self, path: str, digest: str, piece: int) -> None:
        h = hashlib.sha256()
        tmp = self._path(digest) + ".part"
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while data := src.read(piece):
                h.update(data)
                dst.write(data)
        if "sha256:" + h.hexdigest() != digest:
            os.unlink(tmp)
            raise OSError(errno.EINVAL, f"{path} was pushed as {digest} but hashes to sha256:{h.hexdigest()}")
        os.replace(tmp, self._path(digest))

    async def push_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        digest = await self.push_blob(body)
        if not DIGEST.fullmatch(reference):
            ann = {REF_NAME: reference}
            if self.ref is not None:
                ann[CONTAINERD_NAME] = str(self.ref.with_tag(reference))
            self.tagged = {"mediaType": media_type, "digest": digest, "size": len(body), "annotations": ann}
        return digest

    def finish(self) -> str:
        """Write the layout as one tar at `path` (atomically); the tagged manifest is its image."""
        if self.tagged is None:
            raise ConvertError("nothing was converted into the target archive")
        with open(os.path.join(self.root, LAYOUT_FILE), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [self.tagged]}
        with open(os.path.join(self.root, INDEX_FILE), "w") as f:
            json.dump(index, f)
        with atomic_output(self.path, ".nydusify-archive-") as fd, os.fdopen(os.dup(fd), "wb") as out, \
                tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in (LAYOUT_FILE, INDEX_FILE):
                tf.add(os.path.join(self.root, name), name, recursive=False, filter=_plain)
            blobs = os.path.join(self.root, "blobs", "sha256")
            tf.add(os.path.join(self.root, "blobs"), "blobs", recursive=False, filter=_plain)
            tf.add(blobs, "blobs/sha256", recursive=False, filter=_plain)
            for name in sorted(os.listdir(blobs)):
                tf.add(os.path.join(blobs, name), f"blobs/sha256/{name}", recursive=False, filter=_plain)
        return self.path


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Archive members without this machine's owners and times."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info
