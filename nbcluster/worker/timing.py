"""A call's phase timings for the timeline (``RESULT.ph``), measured by the worker.

Phases are measured with the monotonic clock and shown on the wall clock's, in microseconds:
cheap enough for every call (three clock readings and a tuple).
"""

from __future__ import annotations

import time

#: Seconds to add to ``time.perf_counter()`` for the wall clock.
_WALL = time.time() - time.perf_counter()


def timing(t0: float, t1: float, t2: float) -> tuple[int, int, int]:
    """A call's ``(start, fetch, run)`` in microseconds from ``perf_counter`` readings: it
    started at ``t0``, had its function and arguments at ``t1``, returned at ``t2``."""
    return int((t0 + _WALL) * 1e6), int((t1 - t0) * 1e6), int((t2 - t1) * 1e6)
