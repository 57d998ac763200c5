"""A full `TarPipe` wakes its writer once the reader has drained half of it, not after each
piece the reader lets go: with the build behind the inflater (the usual case), a wake-up per
256 KiB piece was a futex call and a thread switch each, which cost the GIL hand-offs around it."""

import threading

from nydus_py.builder.sources import TarPipe
from tests.waiting import wait_until

PIECE = 4096
PIECES = 64


def test_a_full_pipe_wakes_its_writer_once_half_of_it_is_read() -> None:
    pipe = TarPipe(limit=8 * PIECE)
    data = [bytes([i]) * PIECE for i in range(PIECES)]

    def writer() -> None:
        for piece in data:
            pipe.feed(piece)
        pipe.close()

    t = threading.Thread(target=writer)
    t.start()
    got = []
    try:
        for k in range(PIECES):
            # a slow reader: each read comes while the writer waits on the full pipe (or is done)
            wait_until(lambda: pipe.writer_blocked or pipe.written == PIECES * PIECE, what="the writer blocked")
            got.append(pipe.read(k * PIECE, PIECE, pipe.generation))
    finally:
        pipe.release()
        t.join(10)
    assert b"".join(got) == b"".join(data)
    assert pipe.peak_held <= 8 * PIECE
    # one wake-up per piece read (56) before; with half the pipe drained first, about 56 / 4
    assert pipe.writer_waits <= PIECES // 4, pipe.writer_waits


def test_a_reader_waiting_for_more_than_the_limit_is_served() -> None:
    """(Guard) the hysteresis keeps the escape of a read bigger than the limit."""
    pipe = TarPipe(limit=2 * PIECE)
    data = bytes(range(256)) * (6 * PIECE // 256)

    def writer() -> None:
        for i in range(0, len(data), PIECE):
            pipe.feed(data[i:i + PIECE])
        pipe.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert pipe.read(0, 5 * PIECE, pipe.generation) == data[:5 * PIECE]
        assert pipe.read(5 * PIECE, PIECE, pipe.generation) == data[5 * PIECE:]
    finally:
        pipe.release()
        t.join(10)
