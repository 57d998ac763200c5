"""`converter._InflateSink`: the event loop hands a layer's pieces to the inflating thread through
a bounded queue. It goes on reading while a piece is inflated (it waits only when `ahead` bytes
are queued), one pool job inflates every piece queued while it runs, the tar and its diff_id are
those of the whole layer, and a failed tar write stops the download with its error."""

import asyncio
import gzip
import hashlib
import io
import random
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nydus_py.builder.sources import Growth
from nydus_py.convert import converter

DEADLINE = 30.0  # (a deadline for what must happen, never a measure of speed)


def layer(seed: int = 1) -> tuple[bytes, bytes]:
    """(gzip layer, its tar)."""
    rng = random.Random(seed)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n in range(4):
            data = rng.randbytes(40_000) + b"text " * 8_000
            ti = tarfile.TarInfo(f"f{n}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0), raw.getvalue()


class GatedGrowth(Growth):
    """A tar file follower whose `grew` (called from the inflating thread on each tar write)
    blocks until the gate opens, or raises `fail` once set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail: OSError | None = None

    def grew(self, total: int) -> None:
        self.entered.set()
        if not self.gate.wait(DEADLINE):
            raise AssertionError("the gate was never opened")
        if self.fail is not None:
            raise self.fail
        super().grew(total)


def pieces(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i:i + step] for i in range(0, len(data), step)]


def test_pieces_are_queued_while_one_is_inflated_and_one_job_inflates_them(tmp_path: Path) -> None:
    """While the first piece's inflate is held (its tar write blocked), the next pieces are
    handed over at once (the old sink waited for each piece's inflate before taking the next: the
    second write never returned while the first was held). One pool job then inflates them all,
    and the tar file and diff_id are the layer's."""
    gz, tar = layer()
    growth = GatedGrowth()
    parts = pieces(gz, 4)

    async def go() -> tuple[str, int, str]:
        with ThreadPoolExecutor(2) as pool:
            sink = converter._InflateSink(pool, str(tmp_path / "l.tar"), None, len(gz), None, growth,
                                          ahead=len(gz))
            await sink.restart()
            await sink.write(parts[0])
            assert await asyncio.to_thread(growth.entered.wait, DEADLINE)  # the first piece is being inflated
            for p in parts[1:]:
                await asyncio.wait_for(sink.write(p), DEADLINE)  # handed over while it is held
            assert sink.jobs == 1
            growth.gate.set()
            await asyncio.wait_for(sink.settle(), DEADLINE)
            assert sink.jobs == 1  # the pieces queued meanwhile went with the running job
            got = sink.finish()
            assert sink.layer_hex() == hashlib.sha256(gz).hexdigest()
            await sink.close()
            return got

    diff_id, size, kind = asyncio.run(go())
    assert (diff_id, size, kind) == (hashlib.sha256(tar).hexdigest(), len(tar), "gzip")
    assert (tmp_path / "l.tar").read_bytes() == tar


def test_a_full_queue_makes_the_loop_wait_and_everything_arrives_in_order(tmp_path: Path) -> None:
    """With `ahead` smaller than a piece, every write waits for the inflating (bounded memory);
    the tar still comes out whole, in order."""
    gz, tar = layer(2)

    async def go() -> tuple[str, int, str]:
        with ThreadPoolExecutor(1) as pool:
            sink = converter._InflateSink(pool, str(tmp_path / "l.tar"), None, len(gz), None, None, ahead=1000)
            await sink.restart()
            for p in pieces(gz, 40):
                await asyncio.wait_for(sink.write(p), DEADLINE)
                assert sink._queued <= 1000 or len(p) > 1000
            await sink.settle()
            got = sink.finish()
            await sink.close()
            return got

    assert asyncio.run(go()) == (hashlib.sha256(tar).hexdigest(), len(tar), "gzip")
    assert (tmp_path / "l.tar").read_bytes() == tar


def test_a_tar_write_error_stops_the_download_with_it(tmp_path: Path) -> None:
    """A failed write of the tar (disk full) is raised by the next write or by `settle`, and
    the pieces queued behind it are dropped."""
    gz, _ = layer(3)
    growth = GatedGrowth()
    growth.fail = OSError(28, "No space left on device")
    parts = pieces(gz, 4)

    async def go() -> None:
        with ThreadPoolExecutor(1) as pool:
            sink = converter._InflateSink(pool, str(tmp_path / "l.tar"), None, len(gz), None, growth,
                                          ahead=len(gz))
            await sink.restart()
            await sink.write(parts[0])
            await sink.write(parts[1])
            growth.gate.set()
            with pytest.raises(OSError, match="No space left"):
                for p in parts[2:]:
                    await sink.write(p)
                await sink.settle()
            assert not sink._queue
            await sink.close()

    asyncio.run(go())
