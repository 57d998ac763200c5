"""The `extraoption=` mount option: how a Nydus image reaches a Kata runtime (sans-IO codec).

Upstream nydus-snapshotter (snapshot/mount_option.go, `remoteMountWithExtraOptions`) appends to a
Nydus image's overlay options `extraoption=` + base64 (standard alphabet, padded) of the Go
struct `ExtraOption` marshalled by encoding/json, fields in this order:

    {"source": <bootstrap file>, "config": <the daemon's JSON config, as a string>,
     "snapshotdir": <ROOT/snapshots/<id> of the container's snapshot>, "fs_version": "v5" | "v6"}

The mount type becomes `fuse.nydus-overlayfs`. Kata's Go runtime (virtcontainers/nydusd.go
`parseExtraOption`) decodes it and needs source, config and snapshotdir non-empty; runtime-rs
(kata-types mount.rs `NydusExtraOptions`) needs exactly one such option and all four fields. The
runtime then asks its virtio-fs nydusd to mount `source` with `config` at `/rafs/<cid>/lowerdir`
and has the guest build the overlay on top (upper `snapshotdir/fs`, work `snapshotdir/work`).
`nydus-overlayfs` (overlayfs_helper) drops the option again when runc mounts the same rootfs.

Why base64: the JSON holds commas, which would split containerd's comma-joined option string.
Why Go's escaping: the option is then byte-for-byte what upstream makes of the same fields.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "extraoption="
KATA_VOLUME_PREFIX = "io.katacontainers.volume="  # KataVirtualVolume (upstream strips it too)
MOUNT_TYPE = "fuse.nydus-overlayfs"
SOURCE = "overlay"  # upstream's KataVirtualVolumeDefaultSource: the mount's source field

RAFS_V5_MAGIC, RAFS_V5_VERSION = 0x52414653, 0x500
RAFS_V6_MAGIC, RAFS_V6_SB_OFFSET, RAFS_V6_SB_SIZE = 0xE0F5E1E2, 1024, 1024 + 128 + 256
HEADER_BYTES = 8192  # enough for both superblocks (upstream reads 4096)


class ExtraOptionError(ValueError):
    """A malformed extraoption or bootstrap header; the message is one line."""


@dataclass(frozen=True)
class ExtraOption:
    source: str  # the RAFS bootstrap file
    config: str  # the nydusd JSON config text the runtime's daemon mounts it with
    snapshotdir: str  # the container snapshot's directory (fs/ and work/ inside)
    fs_version: str  # "v5" | "v6"

    def encode(self) -> str:
        """`extraoption=<base64 JSON>` as upstream's json.Marshal + base64.StdEncoding."""
        body = "{" + ",".join(f"{_go_json(k)}:{_go_json(v)}" for k, v in (
            ("source", self.source), ("config", self.config), ("snapshotdir", self.snapshotdir),
            ("fs_version", self.fs_version))) + "}"
        return PREFIX + base64.b64encode(body.encode()).decode()


def _go_json(s: str) -> str:
    """A JSON string as Go's encoding/json writes it: UTF-8 kept, but <, >, & and the JS line
    separators escaped as \\u00XX (HTML-safe), other control characters as Python does."""
    out = json.dumps(s, ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        out = out.replace(ch, esc)
    return out


def decode(value: str) -> ExtraOption:
    """An `extraoption=...` option (or just its value) back into its fields, checked as Kata's
    runtimes check them. ExtraOptionError says what is wrong, in one line."""
    raw = value[len(PREFIX):] if value.startswith(PREFIX) else value
    try:
        text = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ExtraOptionError(f"extraoption is not standard base64 ({e})") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ExtraOptionError(f"extraoption is not JSON after base64 decoding ({e})") from None
    if not isinstance(doc, dict):
        raise ExtraOptionError(f"extraoption must be a JSON object, got {type(doc).__name__}")
    fields = {}
    for name in ("source", "config", "snapshotdir", "fs_version"):
        v = doc.get(name)
        if not isinstance(v, str):
            raise ExtraOptionError(f"extraoption field {name!r} must be a string, got {v!r}")
        if not v and name != "fs_version":  # Kata's Go runtime: "extra option is not correct"
            raise ExtraOptionError(f"extraoption field {name!r} is empty")
        fields[name] = v
    return ExtraOption(**fields)


def find(options: Iterable[str]) -> ExtraOption | None:
    """The extraoption among a mount's options (None without one); more than one is an error,
    as in Kata's runtime-rs."""
    found = [o for o in options if o.startswith(PREFIX)]
    if len(found) > 1:
        raise ExtraOptionError(f"{len(found)} extraoption options in one mount, expected one")
    return decode(found[0]) if found else None


def strip(options: Iterable[str]) -> list[str]:
    """The options without the Nydus-specific ones (what nydus-overlayfs passes to overlayfs)."""
    return [o for o in options if not o.startswith((PREFIX, KATA_VOLUME_PREFIX))]


def detect_fs_version(header: bytes) -> str:
    """"v5" or "v6" from a bootstrap's first bytes, as upstream's layout.DetectFsVersion."""
    if len(header) < 8:
        raise ExtraOptionError(f"bootstrap header too short ({len(header)} bytes) to tell its RAFS version")
    magic, version = struct.unpack_from("<II", header)
    if magic == RAFS_V5_MAGIC and version == RAFS_V5_VERSION:
        return "v5"
    if len(header) >= RAFS_V6_SB_SIZE and struct.unpack_from("<I", header, RAFS_V6_SB_OFFSET)[0] == RAFS_V6_MAGIC:
        return "v6"
    raise ExtraOptionError("not a RAFS bootstrap (neither the v5 nor the v6 superblock magic)")
