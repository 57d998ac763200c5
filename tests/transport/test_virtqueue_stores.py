"""The device's stores into the rings are single stores of the final value. Guest memory is
read by the driver at any moment: a used index or avail_event that passes through another
value on its way (struct's pack_into clears its bytes before it writes them) can be seen by a
driver polling the used ring (Linux: "id N is not a head!", the queue broken, or a stale used
element taken for a reply) or deciding whether to kick."""

import mmap
import os
import subprocess
import sys
import time

from nydus_py.transport.vhost_user.virtqueue import GuestMemory, Region, Virtqueue

SIZE = 0x10000
NUM = 256
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000
FLAGS = 0x8000  # [0]: the watcher is watching, [1]: stop; then its counters (u64: reads, odd values)
UVA = 0x7000_0000

# The driver's side, in another process: reads the used index and avail_event in a tight loop
# and counts the values no store of the device ever meant (the used index only moves forward
# from 1 here; avail_event is always AVAIL_EVENT).
WATCHER = """
import mmap, os, sys
fd, used, num, flags, event = (int(a) for a in sys.argv[1:])
m = mmap.mmap(fd, 0x10000)
u = memoryview(m)[used : used + 6 + 8 * num].cast("H")
f = memoryview(m)[flags : flags + 24]
c = f[8:].cast("Q")
ev = 2 + 4 * num
reads = odd = 0
f[0] = 1
while not f[1]:
    for _ in range(1000):
        if u[1] == 0 or u[ev] != event:
            odd += 1
    reads += 1000
    c[0] = reads
    c[1] = odd
"""
AVAIL_EVENT = 0x1234


def test_used_index_and_avail_event_are_never_seen_with_another_value() -> None:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, SIZE)
    m = mmap.mmap(fd, SIZE)
    try:
        mem = GuestMemory([Region(0, SIZE, UVA, memoryview(m))])
        vq = Virtqueue(mem, NUM, UVA + DESC, UVA + AVAIL, UVA + USED, event_idx=True, last_avail=AVAIL_EVENT)
        vq.push(0, 1)
        vq.set_avail_event()
        watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(fd), str(USED), str(NUM), str(FLAGS),
                                    str(AVAIL_EVENT)], pass_fds=[fd])
        try:
            deadline = time.monotonic() + 30
            while not m[FLAGS]:
                assert watcher.poll() is None and time.monotonic() < deadline, "the watcher did not start"
                time.sleep(0.001)
            counters = memoryview(m)[FLAGS + 8 : FLAGS + 24].cast("Q")
            # until the watcher has read a good many times while we store (or a deadline: a busy machine)
            deadline = time.monotonic() + 10
            while counters[0] < 1_000_000 and time.monotonic() < deadline:
                vq.used_idx = 1  # (the used index never wraps to 0)
                for _ in range(20_000):
                    vq.push(0, 1)
                    vq.set_avail_event()
            m[FLAGS + 1] = 1
            assert watcher.wait(30) == 0
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        reads, odd = counters.tolist()
        assert reads > 0
        assert odd == 0, f"the driver saw {odd} values in flight in {reads} reads"
    finally:
        os.close(fd)  # (the mapping goes with the views of it)
