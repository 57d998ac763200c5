"""The bootstrap of a Nydus image in a registry: what a daemon needs to mount it by reference.

Resolution follows nydus-snapshotter: a Nydus manifest is one whose last layer carries the
`nydus-bootstrap` annotation; from an index, the entry for the platform marked as Nydus
(`artifactType` or `os.features`) is taken, else a plain entry whose manifest is a Nydus one. The
bootstrap layer is streamed to a temp file, checked against its digest, and `image/image.boot`
is extracted. Data blobs are not touched: the daemon reads them lazily through its registry
backend, whose host and repository are the reference's.
"""

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass

from ..rafs.errors import FormatError
from ..storage.registry import RegistryClient, RegistryConfig
from . import oci
from .bootstrap_layer import extract_bootstrap
from .errors import ConvertError
from .reference import ImageRef


@dataclass
class NydusImage:
    ref: ImageRef
    manifest_digest: str
    bootstrap: oci.Descriptor
    blob_ids: list[str]
    fs_version: str
    bootstrap_path: str = ""
    manifest: oci.Manifest | None = None  # the Nydus manifest itself


async def resolve_nydus(client: RegistryClient, ref: ImageRef, platform: oci.Platform | None = None) -> NydusImage:
    """The Nydus manifest `ref` names (directly or through an index)."""
    want = platform or oci.host_platform()
    got = await client.fetch_manifest(ref.reference, oci.ACCEPT)
    if got is None:
        raise ConvertError(f"image {ref} not found")
    body, ctype, _ = got
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest and digest != ref.digest:
        raise ConvertError(f"image {ref}: the manifest the registry sent hashes to {digest}")
    doc = oci.parse_document(body, ctype)
    if isinstance(doc, oci.Index):
        try:
            desc = oci.select_manifest(doc, want, nydus=True)
        except ConvertError:
            desc = oci.select_manifest(doc, want, nydus=False)
        got = await client.fetch_manifest(desc.digest, oci.MANIFEST_TYPES)
        if got is None:
            raise ConvertError(f"image {ref}: the index names manifest {desc.digest}, which is missing")
        body = got[0]
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if digest != desc.digest:
            raise ConvertError(f"image {ref}: manifest {desc.short} does not match its digest")
        sub = oci.parse_document(body, got[1], f"manifest {desc.short}")
        if not isinstance(sub, oci.Manifest):
            raise FormatError(f"manifest {desc.short}: an index inside an index is not supported")
        doc = sub
    boot = oci.nydus_bootstrap(doc)
    return NydusImage(ref, digest, boot, oci.nydus_blob_ids(doc), boot.annotations.get(oci.ANNO_FS_VERSION, "6"),
                      manifest=doc)


async def fetch_bootstrap(client: RegistryClient, ref: ImageRef, dest_dir: str,
                          platform: oci.Platform | None = None) -> NydusImage:
    """Resolve `ref` and extract its bootstrap into `dest_dir` as `<layer digest hex>.image.boot`
    (written to a temp file, then renamed); one already there is reused, since the name is the
    digest of the layer it came from."""
    image = await resolve_nydus(client, ref, platform)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f"{image.bootstrap.hex}.image.boot")
    image.bootstrap_path = dest
    if os.path.isfile(dest) and os.path.getsize(dest) > 0:
        return image
    with tempfile.TemporaryFile(dir=dest_dir) as layer:
        try:
            got_hex, n = await client.download_blob(image.bootstrap.digest, layer, limit=image.bootstrap.size)
        except OSError as e:
            raise ConvertError(f"image {ref}: bootstrap layer {image.bootstrap.short}: {e.strerror or e}") from None
        if n != image.bootstrap.size or got_hex != image.bootstrap.hex:
            raise ConvertError(f"image {ref}: bootstrap layer {image.bootstrap.short} does not match its "
                               f"descriptor ({n} bytes hashing to sha256:{got_hex[:12]})")
        layer.seek(0)
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".boot-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                extract_bootstrap(layer, out)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return image


def fetch_bootstrap_sync(cfg: RegistryConfig, ref: ImageRef, dest_dir: str,
                         platform: oci.Platform | None = None, timeout: float = 600.0) -> NydusImage:
    """`fetch_bootstrap` with its own client and event loop in a helper thread, so it can be
    called from any thread, including one that runs an event loop."""

    async def run() -> NydusImage:
        client = RegistryClient(cfg)
        await client.start()
        try:
            return await fetch_bootstrap(client, ref, dest_dir, platform)
        finally:
            await client.close()

    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="image-ref")
    try:
        return ex.submit(asyncio.run, run()).result(timeout)
    except concurrent.futures.TimeoutError:
        raise ConvertError(f"image {ref}: fetching the bootstrap took more than {timeout:.0f}s") from None
    finally:
        ex.shutdown(wait=False)
