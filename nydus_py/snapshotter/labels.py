"""The snapshot labels a remote Prepare carries, and which Nydus layer they describe.

containerd's unpacker passes `containerd.io/snapshot.ref=<chainID>` plus the layer descriptor's
annotations under `containerd.io/snapshot/` (so a Nydus manifest's `nydus-blob` and
`nydus-bootstrap` annotations arrive as labels), and the image reference from whichever handler
wrapper the client installed:

* CRI (`disable_snapshot_annotations = false`): `cri.image-ref`, `cri.layer-digest`,
  `cri.manifest-digest`, `cri.image-layers`;
* `ctr-remote images rpull` (stargz-snapshotter): `remote/stargz.reference`,
  `remote/stargz.digest`, `remote/stargz.layers`.

Both sets are accepted. Credentials never come this way (E2E-RIGS.md 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..convert.errors import ConvertError
from ..convert.reference import ImageRef, parse_reference

TARGET_REF = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"

BLOB = "blob"
BOOTSTRAP = "bootstrap"


@dataclass(frozen=True)
class RemoteLayer:
    kind: str  # BLOB | BOOTSTRAP
    target: str  # the chainID the committed snapshot is named after
    image_ref: str
    layer_digest: str
    manifest_digest: str

    def mount_ref(self) -> ImageRef:
        """The image the daemon mounts: pinned to the manifest digest when CRI gave one."""
        try:
            ref = parse_reference(self.image_ref)
        except ConvertError as e:
            raise ValueError(str(e)) from None
        if self.manifest_digest and not ref.digest:
            return ImageRef(ref.registry, ref.repository, None, self.manifest_digest)
        return ref


def remote_layer(labels: Mapping[str, str]) -> RemoteLayer | None:
    """The Nydus layer a Prepare's labels describe, or None for an ordinary Prepare (no target,
    no image reference, or a layer that is neither a Nydus blob nor a Nydus bootstrap)."""
    target = labels.get(TARGET_REF, "")
    image_ref = labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE) or ""
    if not target or not image_ref:
        return None
    if labels.get(NYDUS_BOOTSTRAP, "").lower() == "true":
        kind = BOOTSTRAP
    elif labels.get(NYDUS_BLOB, "").lower() == "true":
        kind = BLOB
    else:
        return None
    digest = labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST) or ""
    return RemoteLayer(kind, target, image_ref, digest, labels.get(CRI_MANIFEST_DIGEST, ""))
