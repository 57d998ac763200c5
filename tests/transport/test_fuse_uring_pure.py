"""FUSE over io_uring without a kernel: INIT answers FUSE_OVER_IO_URING only when the transport
asks for it and the kernel offers it, the queue count comes from the possible-CPU list, the
module parameter check explains itself, and the counters add up per queue."""

from pathlib import Path

from nydus_py.fuse.abi import InitFlags
from nydus_py.transport.fuse_uring import UringStats, enable_uring_param, possible_cpus
from tests.fuse.kernel import KERNEL_645_FLAGS, KERNEL_645_FLAGS2, decode_init_out
from tests.fuse.test_init import new

URING_BIT2 = 1 << (41 - 32)  # FUSE_OVER_IO_URING in flags2


def test_init_answers_over_io_uring_only_when_asked_and_offered() -> None:
    k, _, session = new()
    _, out = k.init(45, KERNEL_645_FLAGS, KERNEL_645_FLAGS2 | URING_BIT2)
    assert not decode_init_out(out)["flags2"] & URING_BIT2  # offered, not asked for
    k, _, session = new()
    session.transport_flags |= int(InitFlags.OVER_IO_URING)
    _, out = k.init(45, KERNEL_645_FLAGS, KERNEL_645_FLAGS2 & ~URING_BIT2)
    assert not decode_init_out(out)["flags2"] & URING_BIT2  # asked for, not offered (enable_uring N)
    assert not session.flags & InitFlags.OVER_IO_URING
    k, _, session = new()
    session.transport_flags |= int(InitFlags.OVER_IO_URING)
    _, out = k.init(45, KERNEL_645_FLAGS, KERNEL_645_FLAGS2 | URING_BIT2)
    assert decode_init_out(out)["flags2"] & URING_BIT2
    assert session.flags & InitFlags.OVER_IO_URING


def test_possible_cpus() -> None:
    assert possible_cpus("0-1\n") == 2
    assert possible_cpus("0") == 1
    assert possible_cpus("0-3,8,10-11") == 7


def test_enable_uring_param(tmp_path: Path) -> None:
    p = tmp_path / "enable_uring"
    p.write_text("Y\n")
    assert enable_uring_param(str(p)) is None
    p.write_text("N\n")
    assert "is N" in str(enable_uring_param(str(p)))
    assert "no FUSE over io_uring" in str(enable_uring_param(str(tmp_path / "missing")))


def test_stats_add_up_per_queue() -> None:
    s = UringStats()
    s.queues = 2
    s.worker_requests, s.worker_qid = [3, 4, 5, 6], [0, 0, 1, 0]  # (queue 0 has three ring threads)
    s.worker_kept, s.worker_handed = [1, 0, 2, 0], [0, 1, 1, 1]
    d = s.as_dict()
    assert d["queue_requests"] == [13, 5] and d["ring_requests"] == 18
    assert d["reads_kept"] == 3 and d["handed_off"] == 3
    s.add("fallbacks")
    assert s.as_dict()["fallbacks"] == 1
