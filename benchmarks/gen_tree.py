"""Deterministic test tree for benchmarks, shaped like PERF-NOTES' image (seed 42).

Default: ~19k small files (256 B - 64 KiB, log-uniform), 400 medium files (64 KiB - 1 MiB) with
.so symlinks, a few big files in opt/models (bigfile_100m.bin is the sequential-read file);
content mixes text-like, binary-like and random data; mtimes fixed at 1700000000.
`--scale` shrinks everything for quick runs.
"""

import argparse
import math
import os
import random

MTIME = 1_700_000_000
WORDS = [w.encode() for w in ["import", "def", "class", "return", "self", "value", "data", "nydus", "chunk", "blob", "layer", "image", "file", "path"]]


class _Corpus:
    """Pre-made text-like and binary-like material, sliced per file so generation stays fast."""

    def __init__(self, rng: random.Random) -> None:
        words = bytearray()
        while len(words) < 4 << 20:
            words += rng.choice(WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
        self.text = bytes(words)
        binary = bytearray(4 << 20)
        binary[0::2] = rng.randbytes(len(binary) // 2)
        self.binary = bytes(binary)

    def content(self, rng: random.Random, size: int) -> bytes:
        kind = rng.random()
        if kind < 0.8:
            src = self.text if kind < 0.45 else self.binary
            if size >= len(src):
                return (src * (size // len(src) + 1))[:size]
            start = rng.randrange(len(src) - size + 1)
            return src[start : start + size]
        return rng.randbytes(size)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def generate(root: str, scale: float = 1.0, seed: int = 42) -> dict[str, int]:
    rng = random.Random(seed)
    corpus = _Corpus(rng)
    _content = corpus.content
    stats = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
    dirs: list[str] = []

    def mkdir(p: str) -> None:
        os.makedirs(p, exist_ok=True)

    def write(p: str, data: bytes) -> None:
        with open(p, "wb") as f:
            f.write(data)
        os.utime(p, (MTIME, MTIME))
        stats["files"] += 1
        stats["bytes"] += len(data)

    tops = ["usr/lib/python3.11/site-packages", "usr/lib/node_modules", "usr/share", "etc"]
    n_small = int(19_000 * scale)
    n_dirs = max(4, int(2_000 * scale))
    for i in range(n_dirs):
        d = os.path.join(root, tops[i % len(tops)], f"pkg{i:04d}", "sub" if i % 3 == 0 else "")
        mkdir(d)
        dirs.append(d)
    for i in range(n_small):
        d = dirs[rng.randrange(len(dirs))]
        write(os.path.join(d, f"f{i:05d}.py"), _content(rng, _log_uniform(rng, 256, 65536)))
    lib = os.path.join(root, "usr/lib/x86_64-linux-gnu")
    binp = os.path.join(root, "usr/bin")
    mkdir(lib)
    mkdir(binp)
    for i in range(int(400 * scale)):
        size = _log_uniform(rng, 65536, 1 << 20)
        if i % 2:
            write(os.path.join(binp, f"tool{i:03d}"), _content(rng, size))
        else:
            name = f"lib{i:03d}.so.1.2.3"
            write(os.path.join(lib, name), _content(rng, size))
            for alias in (f"lib{i:03d}.so.1", f"lib{i:03d}.so"):
                os.symlink(name, os.path.join(lib, alias))
                stats["symlinks"] += 1
    models = os.path.join(root, "opt/models")
    mkdir(models)
    n_big = max(1, int(15 * scale))
    for i in range(n_big):
        size = 100 << 20 if i == 0 else _log_uniform(rng, 10 << 20, 100 << 20)
        size = int(size * (1 if i == 0 else scale)) or 1
        name = "bigfile_100m.bin" if i == 0 else f"model{i:02d}.bin"
        chunk = _content(rng, 1 << 20)
        with open(os.path.join(models, name), "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                chunk = chunk[1:] + chunk[:1] if i == 0 else rng.randbytes(1 << 20)
                left -= n
        os.utime(os.path.join(models, name), (MTIME, MTIME))
        stats["files"] += 1
        stats["bytes"] += size
    for dirpath, _dirnames, _files in os.walk(root):
        stats["dirs"] += 1
        os.utime(dirpath, (MTIME, MTIME))
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    print(generate(args.root, args.scale, args.seed))


if __name__ == "__main__":
    main()
