"""Test images as plain Python OCI layouts (no internet, no umoci): a busybox-static root file
system in the first layer, then layers with a file whiteout, a directory whiteout, an opaque
directory, hard links, a dotfile, duplicated content (cross-layer dedup) and an incompressible
multi-chunk file nobody reads (lazy loading). Layers come gzip, zstd and plain; mtimes are fixed,
so the same seed always gives the same digests.

`unpack_for_overlay` turns the same layers into overlayfs lower directories (whiteouts as 0/0
character devices, opaque directories as `trusted.overlay.opaque=y`): the reference tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BUSYBOX = "/bin/busybox"
MTIME = 1_700_000_000
APPLETS = ("sh", "ls", "cat", "echo", "test", "sha256sum", "wc", "stat", "head")


@dataclass
class Entry:
    name: str
    kind: str = "file"  # file | dir | symlink | link
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # symlink target or hard link source
    mtime: int = MTIME
    uid: int = 0
    gid: int = 0


@dataclass
class Layer:
    entries: list[Entry]
    compression: str = "gzip"  # gzip | zstd | none
    tar: bytes = b""
    blob: bytes = b""
    media_type: str = ""

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def make_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mtime, ti.uid, ti.gid, ti.mode = e.mtime, e.uid, e.gid, e.mode
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
                tar.addfile(ti)
            elif e.kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
                tar.addfile(ti)
            else:
                ti.size = len(e.data)
                tar.addfile(ti, io.BytesIO(e.data))
    return buf.getvalue()


def compress(layer: Layer) -> Layer:
    layer.tar = make_tar(layer.entries)
    if layer.compression == "gzip":
        layer.blob = gzip.compress(layer.tar, mtime=0)
        layer.media_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    elif layer.compression == "zstd":
        layer.blob = zstandard.ZstdCompressor(level=3).compress(layer.tar)
        layer.media_type = "application/vnd.oci.image.layer.v1.tar+zstd"
    else:
        layer.blob = layer.tar
        layer.media_type = "application/vnd.oci.image.layer.v1.tar"
    return layer


def busybox_entries() -> list[Entry]:
    data = Path(BUSYBOX).read_bytes()
    out = [Entry("./", "dir", mode=0o755), Entry("bin", "dir", mode=0o755),
           Entry("bin/busybox", data=data, mode=0o755)]
    out += [Entry(f"bin/{a}", "symlink", target="busybox", mode=0o777) for a in APPLETS]
    return out


def sample_layers(seed: int = 1, big: int = 4 << 20) -> list[Layer]:
    """Three layers (gzip, zstd, plain) exercising whiteouts, opaque dirs, hard links, dotfiles."""
    rng = random.Random(seed)
    blob = rng.randbytes(big)
    l1 = busybox_entries() + [
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/motd", data=b"this motd is whited out above\n"),
        Entry("data", "dir", mode=0o755),
        Entry("data/gone", "dir", mode=0o755),
        Entry("data/gone/x", data=b"x"),
        Entry("data/opq", "dir", mode=0o755),
        Entry("data/opq/a", data=b"a from layer 1\n"),
        Entry("data/opq/sub", "dir", mode=0o700),
        Entry("data/opq/sub/deep", data=b"deep\n"),
        Entry("usr", "dir", mode=0o755),
        Entry("usr/share", "dir", mode=0o755),
        Entry("usr/share/big.bin", data=blob),
        Entry("tmp", "dir", mode=0o1777),
    ]
    l2 = [
        Entry("./", "dir", mode=0o755, mtime=MTIME + 1),
        Entry("etc", "dir", mode=0o755, mtime=MTIME + 1),
        Entry("etc/.wh.motd", data=b""),
        Entry("data", "dir", mode=0o755, mtime=MTIME + 1),
        Entry("data/.wh.gone", data=b""),
        Entry("data/opq", "dir", mode=0o750, mtime=MTIME + 1),
        Entry("data/opq/.wh..wh..opq", data=b""),
        Entry("data/opq/b", data=b"b from layer 2\n"),
        Entry("data/hl", "dir", mode=0o755),
        Entry("data/hl/one", data=b"hard linked content\n" * 50, mode=0o640),
        Entry("data/hl/two", "link", target="data/hl/one", mode=0o640),  # a link header repeats its target's mode
        Entry(".dotfile", data=b"hidden but present\n", mode=0o600, uid=1000, gid=1000),
        Entry("usr", "dir", mode=0o755),
        Entry("usr/share", "dir", mode=0o755),
        Entry("usr/share/big-copy.bin", data=blob),  # identical chunks: deduplicated against layer 1
        Entry("bin", "dir", mode=0o755),
        Entry("bin/hello.sh", data=b"#!/bin/sh\necho hello from $(cat /etc/hostname-ish)\n", mode=0o755),
    ]
    l3 = [
        Entry("./", "dir", mode=0o755, mtime=MTIME + 2),
        Entry("etc", "dir", mode=0o755, mtime=MTIME + 2),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnydus:x:1000:1000::/home/nydus:/bin/sh\n"),
        Entry("etc/hostname-ish", data=b"nydus-py\n"),
        Entry("data", "dir", mode=0o755, mtime=MTIME + 2),
        Entry("data/new.txt", data=b"".join(b"line %d\n" % i for i in range(5000))),
        Entry("data/empty", data=b""),
        Entry("data/link-to-opq", "symlink", target="opq", mode=0o777),
    ]
    return [compress(Layer(l1, "gzip")), compress(Layer(l2, "zstd")), compress(Layer(l3, "none"))]


@dataclass
class OciImage:
    layers: list[Layer]
    config: bytes = b""
    manifest: bytes = b""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def make_image(layers: list[Layer], arch: str = "amd64") -> OciImage:
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [ly.diff_id for ly in layers]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": ly.media_type, "digest": ly.digest, "size": len(ly.blob)} for ly in layers],
    }).encode()
    return OciImage(layers, config, manifest)


def write_layout(root: Path, tag: str, image: OciImage) -> Path:
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/...) with `tag`."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h

    for ly in image.layers:
        put(ly.blob)
    put(image.config)
    digest = put(image.manifest)
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                               "size": len(image.manifest),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return root


def skopeo_push(skopeo: str, layout: Path, tag: str, dest: str) -> None:
    """`skopeo copy oci:LAYOUT:TAG docker://DEST` to a plain-HTTP registry, digests preserved."""
    subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{layout}:{tag}", f"docker://{dest}"], check=True, capture_output=True, timeout=120)


# -- overlayfs reference ------------------------------------------------------------------------------


def unpack_for_overlay(layer: Layer, dest: Path) -> Path:
    """Extract one layer as an overlayfs lower directory (OCI whiteouts -> overlay whiteouts)."""
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
        members = tar.getmembers()
        tar.extractall(dest, numeric_owner=True, filter="fully_trusted")
    for m in members:
        p = dest / m.name
        base = os.path.basename(m.name.rstrip("/"))
        if base == ".wh..wh..opq":
            os.unlink(p)
            os.setxattr(p.parent, "trusted.overlay.opaque", b"y")
        elif base.startswith(".wh."):
            os.unlink(p)
            os.mknod(p.parent / base[4:], stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for m in members:  # whiteout handling touched directories: put their mtimes back
        if m.isdir():
            os.utime(dest / m.name, (m.mtime, m.mtime), follow_symlinks=False)
    return dest


def overlay_mount(lowers: list[Path], mnt: Path) -> None:
    """Read-only overlay of `lowers` (lowest first) at `mnt`."""
    mnt.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(str(p) for p in reversed(lowers))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True, capture_output=True)


def umount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def snapshot(root: Path) -> dict[str, tuple]:
    """path -> comparable facts (type, mode, uid, gid, mtime, size/target/sha256, nlink for files),
    plus hard link groups under the key '#links'."""
    out: dict[str, tuple] = {}
    by_ino: dict[int, list[str]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        p = os.path.join(root, rel) if rel else str(root)
        st = os.lstat(p)
        fmt = stat.S_IFMT(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            out[rel or "/"] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime))
            for name in sorted(os.listdir(p)):
                stack.append(os.path.join(rel, name))
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", os.readlink(p), st.st_uid, st.st_gid)
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                h = hashlib.sha256(f.read()).hexdigest()
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime), st.st_size, h,
                        st.st_nlink)
            if st.st_nlink > 1:
                by_ino.setdefault(st.st_ino, []).append(rel)
        else:
            out[rel] = ("other", fmt, stat.S_IMODE(st.st_mode), st.st_rdev)
    out["#links"] = tuple(sorted(tuple(sorted(v)) for v in by_ino.values()))
    return out


def rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
