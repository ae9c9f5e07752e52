"""Holding Ctrl-C back while the main thread changes the client's state.

A task or an actor call submitted on the main thread is handled there, under the client's lock
(:meth:`nbcluster.client.shell.IoShell.post`). A ``KeyboardInterrupt`` raised in the middle of
that would leave the state half changed: a task recorded but never sent, a lease counting a task
its worker never got. Python runs signal handlers on the main thread between bytecodes, so for
the length of that section (microseconds) our handler only notes a ``SIGINT``, and the
interrupt happens once the section is over.

Where ``SIGINT`` has Python's default handler (``default_int_handler``: scripts, a worker, an
ipykernel cell), ours takes its place for good and does what it does outside a section (raise
``KeyboardInterrupt``), so that a section costs no system call: ipykernel puts the default
back around each cell, and ours goes back on the next submit. A handler of the program's own is
replaced only for the section and gets the held signal afterwards.
"""

from __future__ import annotations

import signal
import threading

try:  # (signal.getsignal turns handlers into enums where it can: 3 µs a call, ~30x the C one)
    from _signal import getsignal as _getsignal
except ImportError:  # pragma: no cover - not CPython
    _getsignal = signal.getsignal
from types import FrameType
from typing import Any


class InterruptGuard:
    """Defers ``SIGINT`` on the main thread between :meth:`enter` and :meth:`leave`.

    Python runs a pending signal's handler after any call returns (and inside
    ``signal.signal``, before it replaces the handler): every step below keeps the guard's own
    state whole at those points, so a ``SIGINT`` anywhere is held, or handled as it would have
    been, never lost.
    """

    def __init__(self) -> None:
        self._main = threading.main_thread()
        self._handler = self._on_sigint  # (one bound method: compared by identity)
        self._depth = 0  # sections entered and not left (a finalizer may post inside one)
        self._next: Any = None  # what ours does outside a section (None: what the default does)
        self._temporary = False  # ours replaced the program's own handler for this section
        self._pending: tuple[int, FrameType | None] | None = None

    def enter(self) -> bool:
        """Hold ``SIGINT`` back if this is the main thread; returns whether it is held."""
        if threading.current_thread() is not self._main:
            return False
        self._depth += 1
        try:
            current = _getsignal(signal.SIGINT)
            if current is not self._handler:
                if current is None:  # (set outside Python: we could not put it back)
                    self._depth -= 1
                    return False
                if current is not signal.default_int_handler:
                    self._next, self._temporary = current, True
                signal.signal(signal.SIGINT, self._handler)
        except (ValueError, OSError):  # (not the main interpreter, or no signals here)
            self._depth -= 1
            self._next, self._temporary = None, False
            return False
        except BaseException:  # a Ctrl-C before ours was in place: as if before the call
            self._depth -= 1
            self._next, self._temporary = None, False
            raise
        return True

    def leave(self) -> None:
        """End the section; a ``SIGINT`` that came meanwhile is handled now (may raise)."""
        if self._depth > 1:
            self._depth -= 1
            return
        pending, self._pending = self._pending, None
        self._depth = 0  # (from here ours passes a SIGINT on to _next)
        raised: BaseException | None = None
        while self._temporary:  # put the program's handler back (inline: no call boundary)
            try:
                signal.signal(signal.SIGINT, self._next)
                self._temporary = False
            except BaseException as exc:  # (a pending SIGINT, passed on to it, raised)
                raised = exc
        handler, self._next = self._next, None  # (ours, if ever put back, is the default's)
        if raised is not None:
            raise raised
        if pending is not None:
            self._deliver(handler, *pending)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._depth:
            self._pending = (signum, frame)
            return
        self._deliver(self._next, signum, frame)

    @staticmethod
    def _deliver(handler: Any, signum: int, frame: FrameType | None) -> None:
        if handler is None:
            raise KeyboardInterrupt  # (what default_int_handler does)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # the default action (the process ends), as it would
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
        # (SIG_IGN: nothing)
