"""Holding Ctrl-C back while the main thread changes the client's state.

A task or an actor call submitted on the main thread is handled there, under the client's lock
(:meth:`nbcluster.client.shell.IoShell.post`). A ``KeyboardInterrupt`` raised in the middle of
that would leave the state half changed: a task recorded but never sent, a lease counting a task
its worker never got. Python runs signal handlers on the main thread between bytecodes, so for
the length of that section (microseconds) our handler only notes a ``SIGINT``, and hands it to
the handler it stands in front of once the section is over. Outside it, ``SIGINT`` does what
that handler does (``KeyboardInterrupt``, a worker's cancellation, ...).

ipykernel puts ``default_int_handler`` in place around each cell; ours goes back in front of
whatever is there on the next submit (one ``sigaction`` per cell, not per task).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class InterruptGuard:
    """Defers ``SIGINT`` on the main thread between :meth:`enter` and :meth:`leave`."""

    def __init__(self) -> None:
        self._main = threading.main_thread()
        self._handler = self._on_sigint  # (one bound method: compared by identity)
        self._next: Any = None  # the handler we stand in front of
        self._active = False
        self._pending: tuple[int, FrameType | None] | None = None

    def enter(self) -> bool:
        """Hold ``SIGINT`` back if this is the main thread; returns whether it is held."""
        if threading.current_thread() is not self._main:
            return False
        try:
            current = signal.getsignal(signal.SIGINT)
            if current is not self._handler:
                signal.signal(signal.SIGINT, self._handler)
                self._next = current
        except (ValueError, OSError):  # (not the main interpreter, or no signals here)
            return False
        self._active = True
        return True

    def leave(self) -> None:
        """End the section; a ``SIGINT`` that came meanwhile is handled now (may raise)."""
        self._active = False
        pending, self._pending = self._pending, None
        if pending is not None:
            self._deliver(*pending)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._active:
            self._pending = (signum, frame)
            return
        self._deliver(signum, frame)

    def _deliver(self, signum: int, frame: FrameType | None) -> None:
        handler = self._next
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # the default action: end the process, as it would have
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
        # (SIG_IGN, or a handler not set from Python: nothing)
