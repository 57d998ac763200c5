"""RecentFailures: a range that just failed answers EIO at once, only inside it, only for a moment."""

from nydus_py.fs.failed_reads import RecentFailures


def test_a_failed_range_is_remembered_for_the_hold_only() -> None:
    now = [100.0]
    f = RecentFailures(hold=2.0, clock=lambda: now[0])
    assert not f.covers(5, 0, 4096)
    f.failed(5, 0, 131072)
    assert f.covers(5, 0, 4096)  # the kernel's follow-up READ of the first page
    assert f.covers(5, 65536, 131072)
    assert not f.covers(5, 126976, 135168)  # reaches past the failed range
    assert not f.covers(6, 0, 4096)  # another inode
    assert f.fast_failures == 2
    now[0] += 2.0
    assert not f.covers(5, 0, 4096)  # the hold has passed: the backend is asked again
    assert f.fast_failures == 2


def test_the_memory_is_bounded() -> None:
    f = RecentFailures(hold=60.0)
    for ino in range(10_000):
        f.failed(ino, 0, 1)
    assert len(f._ranges) <= 4096
    assert f.covers(9_999, 0, 1) and not f.covers(0, 0, 1)
