"""Logging as nydusd does it: stderr or `--log-file` (append, `.log` added when the name has no
extension, rotation at `--log-rotation-size` MiB keeping 10 files), a level that
`PUT /api/v1/daemon` can change at run time, credentials scrubbed from every line, and error lines
kept in the ring buffer `GET /api/v1/daemon/events` serves.
"""

import collections
import logging
import os
import re
import sys
import threading
import time
from typing import Any

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR, "off": logging.CRITICAL + 10}
FORMAT = "[%(asctime)s] %(levelname)s [%(name)s] %(message)s"

_SECRET_PATTERNS = [
    # JSON-ish "key": "value" for credential keys
    (re.compile(r'("(?:auth|registry_token|registry_auth|access_key_id|access_key_secret|password|encryption_key)"'
                r'\s*:\s*)"[^"]*"'), r'\1"<redacted>"'),
    (re.compile(r"((?:auth|registry_token|registry_auth|access_key_secret|password)=)[^\s&,;]+"), r"\1<redacted>"),
    (re.compile(r"(Authorization:\s*(?:Basic|Bearer)\s+)\S+", re.I), r"\1<redacted>"),
    (re.compile(r"((?:Basic|Bearer)\s+)[A-Za-z0-9+/=._~-]{8,}"), r"\1<redacted>"),
]


def scrub(text: str) -> str:
    """`text` with credential values replaced by <redacted>."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


class EventRing(logging.Handler):
    """nydusd's error event ring: at most 500 entries and 51200 bytes, oldest dropped first."""

    MAX_ERRORS = 500
    MAX_SIZE = 51200

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._events: collections.deque[str] = collections.deque()
        self._size = 0
        self.total_errors = 0
        self.total_size = 0
        self._ring_lock = threading.Lock()
        self.addFilter(RedactFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{http_date(record.created)} - {scrub(record.getMessage())}"
        except Exception:
            return
        n = len(line)
        with self._ring_lock:
            self._events.append(line)
            self._size += n
            self.total_errors += 1
            self.total_size += n
            while self._events and (len(self._events) > self.MAX_ERRORS or self._size > self.MAX_SIZE):
                self._size -= len(self._events.popleft())

    def json(self) -> dict[str, Any]:
        with self._ring_lock:
            return {"max_errors": self.MAX_ERRORS, "total_errors": self.total_errors, "max_size": self.MAX_SIZE,
                    "total_size": self.total_size, "errors": list(self._events)}


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(ts: float) -> str:
    """`email.utils.formatdate(ts, usegmt=True)` (RFC 2822, English names whatever the locale)
    without importing the email package."""
    t = time.gmtime(ts)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def log_file_name(path: str) -> str:
    """nydusd appends `.log` to a `--log-file` without an extension."""
    return path if os.path.splitext(path)[1] else path + ".log"


def setup_logging(level: str, log_file: str | None = None, rotation_mib: int = 0) -> EventRing:
    """Configure the root logger; returns the event ring attached to it."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if log_file:
        path = log_file_name(log_file)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if rotation_mib > 0:
            from logging.handlers import RotatingFileHandler  # (here: it pulls in email, ~1.8 MiB of RSS)

            handler = RotatingFileHandler(path, maxBytes=rotation_mib << 20, backupCount=10)
        else:
            handler = logging.FileHandler(path, mode="a")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactFilter())
    root.addHandler(handler)
    ring = EventRing()
    root.addHandler(ring)
    set_level(level)
    return ring


def set_level(level: str) -> None:
    """Change the log level at run time; ValueError for an unknown name."""
    name = level.lower() if isinstance(level, str) else ""
    if name not in LEVELS:
        raise ValueError(f"invalid log level {level!r} (trace, debug, info, warn, error, off)")
    logging.getLogger().setLevel(LEVELS[name])
