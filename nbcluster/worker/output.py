"""Capture of ``print``/``sys.stderr`` inside tasks, sent to the submitting driver line by line."""

from __future__ import annotations

import contextvars
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OutputTarget:
    """Where output of the code running in this context goes: a driver and one of its tasks."""

    ident: bytes
    tid: str
    name: str
    partial: dict[str, str] = field(default_factory=dict)  # stream -> unfinished line


Emit = Callable[[OutputTarget, str, list[str]], None]

#: Set around each task or actor call (per thread, per asyncio task).
current_output: contextvars.ContextVar[OutputTarget | None] = contextvars.ContextVar(
    "nbcluster_output", default=None
)


class LineForwarder(io.TextIOBase):
    """A text stream that forwards complete lines of the current task to its driver.

    Only whole lines are forwarded, so lines never split or interleave at the driver. Threads that
    user code starts have no context of their own: their output goes to ``default`` (the task the
    main thread runs), and outside any task to the process's original stream.
    """

    def __init__(self, stream: str, fallback: Any, emit: Emit) -> None:
        super().__init__()
        self.stream = stream
        self._fallback = fallback
        self._emit = emit
        self._lock = threading.Lock()
        self.default: OutputTarget | None = None

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return int(self._fallback.fileno())

    def write(self, s: str) -> int:
        target = current_output.get() or self.default
        if target is None:
            return int(self._fallback.write(s))
        with self._lock:
            buf = target.partial.get(self.stream, "") + s
            if "\n" not in buf:
                target.partial[self.stream] = buf
                return len(s)
            *lines, target.partial[self.stream] = buf.split("\n")
        self._emit(target, self.stream, lines)
        return len(s)

    def flush(self) -> None:
        # Partial lines wait for their newline (or the task's end), so lines never split.
        if current_output.get() is None and self.default is None:
            self._fallback.flush()

    def drain(self, target: OutputTarget) -> None:
        """Forward a trailing partial line of ``target`` (called when its task ends)."""
        with self._lock:
            rest = target.partial.pop(self.stream, "")
        if rest:
            self._emit(target, self.stream, [rest])
