"""dm-verity hash trees for exported block disks (`nydus-image export --block --verity`).

The tree is the kernel's dm-verity format 1 with no superblock, as `veritysetup format
--no-superblock --format=1 -s "" --hash=sha256 --data-block-size=4096 --hash-block-size=4096`
writes it: level 1 holds the sha256 of every data block, each higher level the sha256 of every
4 KiB block of the level below, 128 digests to a block, until one block is left; the levels are
stored top first from the hash offset, and the root digest is the sha256 of that top block (or of
the only data block when there is one). Spare room at the end of a level's last block is zero, as
dm-verity and `veritysetup verify` expect; upstream's generator fills it with the digest of a
zero block instead, which the kernel accepts but `veritysetup verify` refuses, so the root digests
of the two differ whenever a level does not fill its last block.

`hash_tree` is pure (digests in, hash area out); `append_hash_tree` is the I/O around it.
"""

import hashlib
import os
from dataclasses import dataclass

BLOCK = 4096
DIGEST = 32
PER_BLOCK = BLOCK // DIGEST
READ_STEP = 1 << 20
_ZERO_STEP = bytes(READ_STEP)
_ZERO_DIGEST = hashlib.sha256(bytes(BLOCK)).digest()


@dataclass(frozen=True)
class VerityTree:
    data_blocks: int
    hash_offset: int  # bytes from the start of the disk where the hash area begins
    hash_bytes: int  # size of the hash area (0 for a one-block disk)
    root: bytes

    def options(self) -> str:
        """The line upstream prints: what `veritysetup open` needs besides the device paths."""
        return (f'dm-verity options: --no-superblock --format=1 -s "" --hash=sha256 --data-block-size={BLOCK} '
                f"--hash-block-size={BLOCK} --data-blocks {self.data_blocks} --hash-offset {self.hash_offset} "
                f"{self.root.hex()}")


def _blocks_of(level: bytes) -> bytes:
    """`level` padded with zeros to whole hash blocks."""
    spare = -len(level) % BLOCK
    return level + bytes(spare) if spare else level


def hash_tree(leaf_digests: bytes) -> tuple[bytes, bytes]:
    """(hash area, root digest) for the concatenated sha256 digests of the data blocks."""
    if not leaf_digests or len(leaf_digests) % DIGEST:
        raise ValueError("need the digests of at least one data block")
    if len(leaf_digests) == DIGEST:
        return b"", leaf_digests
    levels = [_blocks_of(leaf_digests)]
    while len(levels[-1]) > BLOCK:
        below = memoryview(levels[-1])
        levels.append(_blocks_of(b"".join(hashlib.sha256(below[i:i + BLOCK]).digest()
                                          for i in range(0, len(below), BLOCK))))
    return b"".join(reversed(levels)), hashlib.sha256(levels[-1]).digest()


def data_digests(fd: int, data_blocks: int) -> bytes:
    """sha256 of each of the first `data_blocks` blocks of `fd`; a short file reads as zeros
    (sparse disks are the usual case, and runs of zeros cost one compare)."""
    out = bytearray()
    end = data_blocks * BLOCK
    pos = 0
    while pos < end:
        want = min(READ_STEP, end - pos)
        piece = os.pread(fd, want, pos)
        if len(piece) < want:
            piece += bytes(want - len(piece))
        if piece == _ZERO_STEP[:want]:
            out += _ZERO_DIGEST * (want // BLOCK)
        else:
            mv = memoryview(piece)
            for i in range(0, want, BLOCK):
                out += hashlib.sha256(mv[i:i + BLOCK]).digest()
        pos += want
    return bytes(out)


def append_hash_tree(fd: int, data_blocks: int) -> VerityTree:
    """Hash the first `data_blocks` blocks of `fd` and write the tree right after them."""
    if data_blocks < 1:
        raise ValueError("a disk has at least one block")
    area, root = hash_tree(data_digests(fd, data_blocks))
    offset = data_blocks * BLOCK
    if area:
        os.pwrite(fd, area, offset)
    return VerityTree(data_blocks, offset, len(area), root)
