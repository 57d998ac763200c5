"""WalkAhead predicts the directory a depth-first walk lists next; checked against the order in
which a real depth-first walk (os.walk top-down, as find and ls -R go) lists a tree's directories."""

import os
import random
from pathlib import Path

from nydus_py.fs.walk_ahead import WalkAhead


def _tree(root: Path, rng: random.Random, depth: int = 0) -> None:
    for i in range(rng.randrange(0, 5 if depth < 4 else 1)):
        d = root / f"d{i}"
        d.mkdir()
        (d / "f").write_bytes(b"x")
        _tree(d, rng, depth + 1)


def test_the_predictions_follow_a_depth_first_walk(tmp_path: Path) -> None:
    rng = random.Random(5)
    _tree(tmp_path, rng)
    order = []  # directories in the order a top-down walk lists them, with their subdirectories
    for top, dirs, _files in os.walk(tmp_path):
        dirs.sort()  # (listing order: the image's sorted names)
        order.append((top, [os.path.join(top, d) for d in dirs]))
    assert len(order) > 30
    ids = {top: n for n, (top, _s) in enumerate(order)}
    walk = WalkAhead()
    for n, (top, subdirs) in enumerate(order):
        predicted = walk.listed(ids[top], [ids[s] for s in subdirs])
        assert predicted == (n + 1 if n + 1 < len(order) else None), top
    assert walk.predicted == len(order) - 1
    assert not walk._after  # every waiting directory had its turn


def test_a_full_table_is_cleared_and_a_walk_out_of_order_only_loses_predictions() -> None:
    walk = WalkAhead(cap=2)
    assert walk.listed(1, [2, 3, 4]) == 2  # waiting: 2 -> 3, 3 -> 4
    assert walk.listed(2, [5, 6]) == 5  # 1 + 2 entries > 2: cleared, then 5 -> 6, 6 -> 3
    assert walk.listed(5, []) == 6
    assert walk.listed(6, []) == 3
    assert walk.listed(3, []) is None  # 3 -> 4 was forgotten with the clear
    assert walk.listed(99, []) is None  # never seen
    assert walk.listed(4, [7]) == 7 and walk.listed(7, []) is None
