"""dm-verity hash trees (`builder/verity`) against cryptsetup's `veritysetup`: the same root digest
and hash area bytes as `veritysetup format` writes for the same data, and `veritysetup verify`
accepts ours and refuses it once a data block changes."""

import os
import random
import subprocess
from pathlib import Path

import pytest

from nydus_py.builder.verity import BLOCK, append_hash_tree, hash_tree
from tests.conftest import require_tool

VERITY_ARGS = ["--no-superblock", "--format=1", "-s", "", "--hash=sha256", f"--data-block-size={BLOCK}",
               f"--hash-block-size={BLOCK}"]


def veritysetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("veritysetup"), *args], capture_output=True, text=True)


def reference(data: Path, blocks: int, tmp: Path) -> tuple[bytes, bytes]:
    """(root digest, hash area) as `veritysetup format` makes them, into a separate hash file."""
    hashes = tmp / "ref.hash"
    hashes.write_bytes(b"")
    r = veritysetup("format", *VERITY_ARGS, f"--data-blocks={blocks}", str(data), str(hashes))
    assert r.returncode == 0, r.stdout + r.stderr
    root = next(line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("Root hash"))
    return bytes.fromhex(root), hashes.read_bytes()


def make_disk(path: Path, blocks: int, seed: int, sparse: bool) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(blocks * BLOCK)
        for b in range(blocks):
            if not sparse or rng.random() < 0.3:
                f.seek(b * BLOCK)
                f.write(rng.randbytes(rng.choice((BLOCK, 100, 1))))


@pytest.mark.parametrize("blocks", [1, 2, 127, 128, 129, 300, 128 * 128 + 1])
def test_the_tree_is_the_one_veritysetup_makes(blocks, tmp_path):
    disk = tmp_path / "disk"
    make_disk(disk, blocks, blocks, sparse=blocks > 1000)
    root, area = reference(disk, blocks, tmp_path)
    fd = os.open(disk, os.O_RDWR)
    try:
        tree = append_hash_tree(fd, blocks)
    finally:
        os.close(fd)
    assert tree.root == root
    assert tree.hash_offset == blocks * BLOCK and tree.hash_bytes == len(area)
    written = disk.read_bytes()
    assert written[tree.hash_offset:] == area  # every level, top first, spare room zero
    check = veritysetup("verify", *VERITY_ARGS, f"--data-blocks={blocks}", f"--hash-offset={tree.hash_offset}",
                        str(disk), str(disk), root.hex())
    assert check.returncode == 0, check.stdout + check.stderr


def test_verify_fails_once_a_data_block_changes(tmp_path):
    disk = tmp_path / "disk"
    make_disk(disk, 200, 1, sparse=False)
    fd = os.open(disk, os.O_RDWR)
    try:
        tree = append_hash_tree(fd, 200)
        os.pwrite(fd, b"\xff", 150 * BLOCK + 7)
    finally:
        os.close(fd)
    check = veritysetup("verify", *VERITY_ARGS, "--data-blocks=200", f"--hash-offset={tree.hash_offset}",
                        str(disk), str(disk), tree.root.hex())
    assert check.returncode != 0


def test_hash_tree_edges():
    with pytest.raises(ValueError):
        hash_tree(b"")
    with pytest.raises(ValueError):
        hash_tree(b"x" * 33)
    one = bytes(range(32))
    assert hash_tree(one) == (b"", one)  # one data block: its own digest is the root, no hash area
    area, _root = hash_tree(one * 129)  # two level-1 blocks under one level-2 block
    assert len(area) == 3 * BLOCK and area[64:BLOCK] == bytes(BLOCK - 64)
