"""Capture of ``print``/``sys.stderr`` inside tasks, sent to the submitting driver line by line."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

Sink = Callable[[str, list[str]], None]


class LineForwarder(io.TextIOBase):
    """A text stream that forwards complete lines to a sink while a task runs.

    Only whole lines are forwarded, so lines from concurrent tasks never interleave mid-line at the
    driver. Outside a task (no sink) writes go to the process's original stream.
    """

    def __init__(self, stream: str, fallback: Any) -> None:
        super().__init__()
        self.stream = stream
        self._fallback = fallback
        self._buf = ""
        self._lock = threading.Lock()
        self.sink: Sink | None = None

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
        sink = self.sink
        if sink is None:
            return int(self._fallback.write(s))
        with self._lock:
            self._buf += s
            if "\n" not in self._buf:
                return len(s)
            *lines, self._buf = self._buf.split("\n")
        sink(self.stream, lines)
        return len(s)

    def flush(self) -> None:
        # Partial lines wait for their newline (or the task's end), so lines never split.
        if self.sink is None:
            self._fallback.flush()

    def drain(self) -> None:
        """Forward a trailing partial line (called when the task ends)."""
        sink = self.sink
        if sink is None:
            return
        with self._lock:
            rest, self._buf = self._buf, ""
        if rest:
            sink(self.stream, [rest])
