"""Conversion progress: one bar per layer on a terminal, plain log lines anywhere else.

Bars are updated from the event loop and from build threads, so every method takes a lock. On a
terminal the block of active bars is redrawn in place (at most ten times a second); a message
is printed above the block. Without a terminal a bar logs one line when a phase starts and one
when it ends, so CI logs stay short and greppable.
"""

import sys
import threading
import time
from typing import TextIO

BAR_WIDTH = 24
REDRAW_INTERVAL = 0.1


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Bar:
    """Progress of one item (a layer) through named phases (pull, build, push)."""

    def __init__(self, owner: "Progress", label: str) -> None:
        self.owner = owner
        self.label = label
        self.phase_name = ""
        self.total = 0
        self.done = 0
        self.note = ""
        self.finished = False
        self.t0 = time.monotonic()

    def phase(self, name: str, total: int) -> None:
        with self.owner.lock:
            self.phase_name, self.total, self.done, self.t0 = name, max(0, total), 0, time.monotonic()
            if not self.owner.tty:
                self.owner._line(f"{self.label}: {name} {human(total)}")
        self.owner._redraw()

    def advance(self, n: int) -> None:
        with self.owner.lock:
            self.done = max(0, self.done + n)
        self.owner._redraw(throttle=True)

    def finish(self, note: str) -> None:
        """End of a phase: on a terminal the note stays on the bar, else it is a log line."""
        with self.owner.lock:
            self.note = note
            if not self.owner.tty:
                self.owner._line(f"{self.label}: {note}")
        self.owner._redraw()

    def close(self, note: str | None = None) -> None:
        with self.owner.lock:
            if note is not None:
                self.note = note
            self.finished = True
            if self.owner.tty:
                self.owner._emit_above(self.render())
            elif note is not None:
                self.owner._line(f"{self.label}: {note}")
            if self in self.owner.bars:
                self.owner.bars.remove(self)
        self.owner._redraw()

    def render(self) -> str:
        if self.finished or (self.note and self.done >= self.total):
            return f"{self.label}  {self.note}"
        if not self.phase_name:
            return f"{self.label}  waiting"
        frac = min(1.0, self.done / self.total) if self.total else 0.0
        fill = int(frac * BAR_WIDTH)
        elapsed = max(1e-6, time.monotonic() - self.t0)
        rate = self.done / elapsed
        return (f"{self.label}  {self.phase_name:<5} [{'#' * fill}{'.' * (BAR_WIDTH - fill)}] "
                f"{human(self.done)}/{human(self.total)} {human(rate)}/s")


class Progress:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.quiet = quiet
        self.lock = threading.RLock()
        self.bars: list[Bar] = []
        self._drawn = 0
        self._last = 0.0

    def bar(self, label: str) -> Bar:
        b = Bar(self, label)
        with self.lock:
            self.bars.append(b)
        return b

    def log(self, msg: str) -> None:
        with self.lock:
            if self.tty:
                self._emit_above(msg)
                self._draw()
            else:
                self._line(msg)

    # -- output (lock held) --------------------------------------------------------------------
    def _line(self, msg: str) -> None:
        if not self.quiet:
            self.stream.write(f"nydusify-py: {msg}\n")
            self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _emit_above(self, msg: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(msg + "\n")
        self.stream.flush()

    def _draw(self) -> None:
        if self.quiet:
            return
        self._clear()
        for b in self.bars:
            self.stream.write("\x1b[2K" + b.render() + "\n")
        self._drawn = len(self.bars)
        self.stream.flush()
        self._last = time.monotonic()

    def _redraw(self, throttle: bool = False) -> None:
        if not self.tty:
            return
        with self.lock:
            if throttle and time.monotonic() - self._last < REDRAW_INTERVAL:
                return
            self._draw()

    def close(self) -> None:
        with self.lock:
            if self.tty:
                self._clear()
                for b in list(self.bars):
                    self.stream.write(b.render() + "\n")
                self.bars.clear()
                self.stream.flush()
