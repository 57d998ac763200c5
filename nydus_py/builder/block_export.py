"""`nydus-image export --block`: a RAFS v6 image as one raw EROFS disk with the file data inline,
for a loop device, NBD or virtio-blk (Kata) and the kernel EROFS driver.

Layout, as upstream's `service/src/block_device.rs` builds it: the bootstrap at block 0 (it is
an EROFS image already), then each data blob's uncompressed, 4 KiB-aligned view (every chunk
decompressed to its `uncompressed_offset`) at its device slot's `mapped_blkaddr`; holes stay
sparse. Chunks are read through `BlobDevice`, so each one is checked against its digest.

Upstream copies the bootstrap verbatim and relies on the kernel's "flat device" mode (chunk
indexes keep device id N and a blob-relative block address; the kernel adds the slot's
`mapped_blkaddr`). Tools that do not know that mode (fsck.erofs 1.5 refuses the image: "extra
devices don't match") cannot read such a disk, so by default the bootstrap copy in the disk is
made self-contained: every chunk index gets its absolute block address, `extra_devices` becomes
0 (the kernel then masks device ids away) and `blocks` the disk's size. The data sits at the same
block addresses either way. `keep_device_table=True` gives upstream's bytes exactly.

With `verity=True` a dm-verity hash tree of the disk's blocks follows them (`verity`), for a
guest or host that opens the disk through dm-verity.
"""

import os
import stat
from dataclasses import dataclass

from ..rafs.chunkdata import BlobSource
from ..rafs.errors import FormatError
from ..rafs.layout_common import U16, U32
from ..rafs.layout_v6 import CHUNK_INDEX, EROFS_SUPER_OFFSET, SUPERBLOCK
from ..rafs.loader import open_bootstrap
from ..rafs.model import ChunkInfo
from ..rafs.v6 import V6Image
from ..storage.device import BlobDevice, ChunkSource
from ..storage.localfs import LocalBlobDir
from .atomic import atomic_output
from .verity import VerityTree, append_hash_tree

BLOCK = 4096
MAPPED_ALIGN = 0x8_0000  # where nydus starts each blob (512 KiB), for images whose slots say 0


@dataclass
class BlockExport:
    output: str
    size: int  # bytes of the disk (sparse)
    blocks: int
    bootstrap_bytes: int
    blobs: list[tuple[str, int, int]]  # blob id, first block, blocks
    chunks_written: int
    rewritten_indexes: int  # chunk index entries given absolute addresses (0 with keep_device_table)
    verity: VerityTree | None = None  # the hash tree after the data blocks, when asked for


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def export_block(bootstrap: str, source: str | BlobSource | ChunkSource, output: str, *,
                 keep_device_table: bool = False, verity: bool = False) -> BlockExport:
    """Write the disk to `output` (atomically: a temp file renamed into place), reading the
    chunks from `source`: a blob directory (closed after), or a backend or cache the caller owns."""
    with open(bootstrap, "rb") as f:
        boot = bytearray(f.read())
    image = open_bootstrap(bootstrap)
    try:
        if not isinstance(image, V6Image):
            raise FormatError(f"{bootstrap}: RAFS v{image.version}; a block disk needs RAFS v6 (EROFS)")
        return _export(image, boot, source, output, keep_device_table, verity)
    finally:
        image.close()


def _layout(image: V6Image, meta_end: int, keep: bool) -> list[tuple[str, int, int]]:
    """(blob id, first block, blocks) of each blob, checked not to overlap the metadata or
    each other."""
    out = []
    pos = _align(meta_end, BLOCK) // BLOCK
    for i, slot in enumerate(image.devices):
        blocks = _align(image.blobs[i].uncompressed_size, BLOCK) // BLOCK
        start = slot.mapped_blkaddr
        if start == 0:
            if keep:
                raise FormatError(f"blob {slot.blob_id}: its device slot has mapped_blkaddr 0 (an image built "
                                  "before flat disks); only the rewritten layout can place it")
            start = _align(pos * BLOCK, MAPPED_ALIGN) // BLOCK
        if start < pos:
            raise FormatError(f"blob {slot.blob_id}: mapped_blkaddr {start:#x} overlaps what comes before it "
                              f"(free from block {pos:#x})")
        if slot.blocks < blocks:
            raise FormatError(f"blob {slot.blob_id}: device slot has {slot.blocks} blocks, the blob needs {blocks}")
        out.append((slot.blob_id, start, blocks))
        pos = start + blocks
    if pos >= 1 << 32:
        raise FormatError(f"the disk would need {pos} blocks, more than EROFS addresses")
    return out


def _export(image: V6Image, boot: bytearray, source: str | BlobSource | ChunkSource, output: str, keep: bool,
            verity: bool) -> BlockExport:
    layout = _layout(image, len(boot), keep)
    total_blocks = max([_align(len(boot), BLOCK) // BLOCK, *(s + n for _b, s, n in layout)])
    rewritten = 0
    inodes: list[int] = []
    seen: set[int] = set()
    for _path, ino in image.walk():
        if ino not in seen and stat.S_ISREG(image.getattr(ino).mode):
            seen.add(ino)
            inodes.append(ino)
    if not keep:
        for ino in inodes:
            off, count = image.chunk_index_span(ino)
            for k in range(count):
                pos = off + k * CHUNK_INDEX.size
                advise, device_id, blkaddr = CHUNK_INDEX.unpack_from(boot, pos)
                if blkaddr == 0xFFFF_FFFF:
                    continue  # a hole stays a hole
                blob_index = (device_id & 0xFF) - 1
                if not 0 <= blob_index < len(layout):
                    raise FormatError(f"inode {ino} chunk {k}: device id {device_id & 0xFF} names no blob")
                CHUNK_INDEX.pack_into(boot, pos, advise, device_id, blkaddr + layout[blob_index][1])
                rewritten += 1
        U16.pack_into(boot, EROFS_SUPER_OFFSET + SUPERBLOCK.offset("extra_devices"), 0)
        U32.pack_into(boot, EROFS_SUPER_OFFSET + SUPERBLOCK.offset("blocks"), total_blocks)
    owned = LocalBlobDir(source) if isinstance(source, str) else None
    written = 0
    tree = None
    try:
        with atomic_output(output, ".disk-", total_blocks * BLOCK) as fd:
            os.pwrite(fd, bytes(boot), 0)
            device = BlobDevice(image, owned or source, validate=True)  # type: ignore[arg-type]
            done: set[tuple[int, int]] = set()
            for ino in inodes:
                for c in image.chunks(ino):
                    key = (c.blob_index, c.uncompressed_offset)
                    if key in done:
                        continue
                    done.add(key)
                    _write_chunk(fd, device, c, layout[c.blob_index][1])
                    written += 1
            if verity:
                tree = append_hash_tree(fd, total_blocks)
    finally:
        if owned is not None:
            owned.close()
    size = total_blocks * BLOCK + (tree.hash_bytes if tree else 0)
    return BlockExport(output, size, total_blocks, len(boot), layout, written, rewritten, tree)


def _write_chunk(fd: int, device: BlobDevice, c: ChunkInfo, first_block: int) -> None:
    if c.uncompressed_offset % BLOCK:
        raise FormatError(f"blob {c.blob_index}: chunk at uncompressed offset {c.uncompressed_offset:#x} is not "
                          "block aligned; EROFS cannot address it")
    data = device.load_chunk(c)
    if len(data) != c.uncompressed_size:
        raise FormatError(f"blob {c.blob_index}: chunk at {c.uncompressed_offset:#x} decoded to {len(data)} bytes, "
                          f"not {c.uncompressed_size}")
    os.pwrite(fd, data, first_block * BLOCK + c.uncompressed_offset)
