"""The daemon state machine of nydusd (`service/src/daemon.rs`), with its legal transitions.

    INIT --Mount/Takeover--> READY --Start--> RUNNING --Stop--> READY --Stop/Exit--> STOPPED
    INIT --Stop--> STOPPED

Any other event is an UnexpectedEvent (HTTP 400), and the state does not change.
"""

import enum
import threading
from collections.abc import Callable

from .errors import UnexpectedEvent


class DaemonState(enum.Enum):
    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"
    # Named by nydusd's OpenAPI file but never reported by nydusd (stale); never entered here either.
    UPGRADING = "UPGRADING"
    INTERRUPTED = "INTERRUPTED"


class Event(enum.Enum):
    MOUNT = "Mount"
    TAKEOVER = "Takeover"
    START = "Start"
    STOP = "Stop"
    EXIT = "Exit"


_S, _E = DaemonState, Event
TRANSITIONS: dict[tuple[DaemonState, Event], DaemonState] = {
    (_S.INIT, _E.MOUNT): _S.READY,
    (_S.INIT, _E.TAKEOVER): _S.READY,
    (_S.INIT, _E.STOP): _S.STOPPED,
    (_S.READY, _E.START): _S.RUNNING,
    (_S.READY, _E.STOP): _S.STOPPED,
    (_S.READY, _E.EXIT): _S.STOPPED,
    (_S.RUNNING, _E.STOP): _S.READY,
}


class StateMachine:
    def __init__(self, on_change: Callable[[DaemonState, DaemonState, Event], None] | None = None) -> None:
        self._state = DaemonState.INIT
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.on_change = on_change

    @property
    def state(self) -> DaemonState:
        return self._state

    def peek(self, event: Event) -> DaemonState:
        """The state `event` would lead to; UnexpectedEvent if it is not allowed now."""
        nxt = TRANSITIONS.get((self._state, event))
        if nxt is None:
            raise UnexpectedEvent(f"{event.value} in state {self._state.value}")
        return nxt

    def fire(self, event: Event) -> DaemonState:
        with self._lock:
            old = self._state
            nxt = self.peek(event)
            self._state = nxt
            self._changed.notify_all()
        if self.on_change is not None:
            self.on_change(old, nxt, event)
        return nxt

    def wait_for(self, states: set[DaemonState], timeout: float | None = None) -> bool:
        with self._lock:
            return self._changed.wait_for(lambda: self._state in states, timeout)
