"""CPU per pop of a 1 MiB READ's chain (virtio_read_micro's shape: one indirect table of 259
descriptors, 256 scattered pages), the table being the one remembered from the READ before (dd
reusing its buffer): `Virtqueue.walk` alone, and `InflightQueue.pop_or_arm` (lock, avail entry,
walk, in-flight table). Best of 5 timeit runs.

python3 benchmarks/virtio_pop_micro.py [--json out.json]
"""

import argparse
import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from virtio_read_micro import GuestRing  # noqa: E402

N = 50000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    g = GuestRing(False)
    vq, ring = g.vq, g.ring
    g.offer(1, 0, 1, 0)
    head = vq.pop_head()
    assert head is not None
    vq.walk(head)  # (remembered from now on)

    def pop() -> None:
        vq.last_avail = (vq.last_avail - 1) & 0xFFFF  # the same avail entry again
        vq._ahead = 0
        assert ring.pop_or_arm() is not None
        ring.inflight.clear()

    out = {"walk_us": min(timeit.repeat(lambda: vq.walk(0), number=N, repeat=5)) / N * 1e6,
           "pop_or_arm_us": min(timeit.repeat(pop, number=N, repeat=5)) / N * 1e6}
    print(f"walk {out['walk_us']:.2f} us  pop_or_arm {out['pop_or_arm_us']:.2f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
