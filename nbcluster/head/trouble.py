"""Workers that keep dying: restart backoff per node, and the warning drivers are sent.

Worker deaths come in storms (the OOM killer, a crashing native library, an operator's
``kill``). The pool is always refilled, never given up on, but while a node's workers keep dying
new ones start after an exponential backoff capped at :data:`MAX_BACKOFF_S`, so that a storm
does not turn into a fork loop; and the drivers are told why their tasks keep being retried.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

#: Deaths counted for the backoff and the warning are the ones of the last this many seconds.
WINDOW_S = 10.0
#: This many unexpected deaths in the window start nothing slower (a few crashes are normal).
FREE_DEATHS = 3
#: Backoff of the first start past the free deaths; doubles with each further death.
FIRST_BACKOFF_S = 0.1
#: The backoff never grows past this: a node whose workers keep dying still gets new ones.
MAX_BACKOFF_S = 2.0
#: A node's warning is repeated at most this often.
WARN_EVERY_S = 5.0


@dataclass
class _NodeDeaths:
    times: deque[float] = field(default_factory=deque)
    last_reason: str = ""
    warned_at: float = -1e9


class WorkerTrouble:
    """Recent unexpected worker deaths per node (failed starts included)."""

    def __init__(self) -> None:
        self._nodes: dict[str, _NodeDeaths] = {}

    def _recent(self, node_id: str, now: float) -> _NodeDeaths:
        d = self._nodes.setdefault(node_id, _NodeDeaths())
        while d.times and now - d.times[0] > WINDOW_S:
            d.times.popleft()
        return d

    def died(self, node_id: str, reason: str, now: float | None = None) -> None:
        """Count a worker of ``node_id`` that died (or failed to start) for ``reason``."""
        now = time.monotonic() if now is None else now
        d = self._recent(node_id, now)
        d.times.append(now)
        d.last_reason = reason

    def count(self, node_id: str, now: float | None = None) -> int:
        """Unexpected deaths on ``node_id`` in the last :data:`WINDOW_S` seconds."""
        now = time.monotonic() if now is None else now
        return len(self._recent(node_id, now).times)

    def backoff(self, node_id: str, now: float | None = None) -> float:
        """Seconds to wait before starting the next worker on ``node_id`` (0: start now)."""
        extra = self.count(node_id, now) - FREE_DEATHS
        if extra < 0:
            return 0.0
        return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2.0 ** min(extra, 32))

    def warning(self, node_id: str, node_name: str, now: float | None = None) -> str | None:
        """The warning to send the drivers now about ``node_id``, or ``None`` (not due)."""
        now = time.monotonic() if now is None else now
        d = self._recent(node_id, now)
        n = len(d.times)
        if n < FREE_DEATHS or now - d.warned_at < WARN_EVERY_S:
            return None
        d.warned_at = now
        delay = self.backoff(node_id, now)
        then = f"new workers start after a {delay:.1f} s backoff" if delay else "restarting them"
        return (
            f"workers on node {node_name} ({node_id}) keep dying: {n} died in the last "
            f"{WINDOW_S:.0f} s (last: {d.last_reason}); {then}. Tasks they ran are retried "
            "(max_retries); look for the OOM killer (dmesg) or a crashing native library"
        )

    def forget(self, node_id: str) -> None:
        """The node left: drop its history."""
        self._nodes.pop(node_id, None)
