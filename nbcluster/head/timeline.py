"""The head's timeline: the last tasks and actor calls as they ran, in a bounded ring.

Drivers send each finished task's or actor call's *span* with their batched task events
(:mod:`nbcluster.client.events`); :class:`Timeline` keeps the last :data:`CAPACITY` of them,
whatever the flood: a ring of slotted records whose repeated strings (function names, node and
worker ids) are shared. The panel reads it incrementally by sequence number
(``GET nbcluster/api/timeline?since=N``), drivers all of it (``QUERY timeline``, which
``nbcluster.timeline()`` turns into a Chrome trace).
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nbcluster.views import SpanView, TaskState, TimelineBody

log = logging.getLogger(__name__)

#: Spans kept (all jobs together): about 45 MB at most (measured: ~430 bytes a span).
CAPACITY = 100_000
#: Spans one ``GET nbcluster/api/timeline`` answers at most (the newest).
PAGE = 20_000

_STATES: dict[str, TaskState] = {
    "f": "finished",
    "x": "failed",
    "c": "cancelled",
    "F": "finished",
    "X": "failed",
    "C": "cancelled",
}


#: A span's fields in a :meth:`Timeline.page` row (``SpanView``'s, without ``notebook``).
ROW_FIELDS = (
    "seq",
    "task_id",
    "name",
    "state",
    "job_id",
    "node_id",
    "worker_id",
    "pid",
    "actor_id",
    "cell",
    "submitted_at",
    "sent_at",
    "started_at",
    "fetch",
    "run",
    "store",
    "ended_at",
)
_row = operator.attrgetter(*ROW_FIELDS)


@dataclass(slots=True)
class Span:
    """One span as kept (see :class:`~nbcluster.views.SpanView` for the fields)."""

    seq: int
    task_id: str
    name: str
    state: TaskState
    job_id: str
    node_id: str
    worker_id: str
    pid: int
    actor_id: str | None
    cell: str | None
    submitted_at: float
    sent_at: float
    started_at: float | None
    fetch: float
    run: float
    store: float
    ended_at: float


class Timeline:
    """The last ``capacity`` spans, oldest first.

    Parameters
    ----------
    capacity
        Spans kept; older ones are dropped first.
    """

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"timeline capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self.spans: deque[Span] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self.last_seq = 0
        # Repeated strings shared between spans (bounded: cleared when it grows past capacity).
        self._strings: dict[str, str] = {}

    def _share(self, s: Any) -> str:
        shared = self._strings.get(s)
        if shared is None:
            if not isinstance(s, str):
                raise TypeError(f"expected a string, got {type(s).__name__}")
            if len(self._strings) > self.capacity:
                self._strings.clear()
            shared = self._strings[s] = s
        return shared

    def add(
        self,
        job_id: str,
        code: str,
        tid: str,
        ended: float,
        span: list[Any],
        node_of: Callable[[str], str | None] | None = None,
    ) -> Span | None:
        """Keep the span of an ended event ``(code, tid, ended, span)`` of job ``job_id``.

        ``node_of`` names a worker's node when the driver did not know it (actor calls).
        A malformed span is logged and dropped.
        """
        share = self._share
        try:
            name, submitted, sent, node_id, worker_id, ph, cell, actor_id = span
            state = _STATES[code]
            worker = share(worker_id)
            node = node_id or (node_of(worker) if node_of is not None else None) or ""
            started: float | None = None
            fetch = run = store = 0.0
            pid = 0
            if ph:
                start_us, fetch_us, run_us, store_us, pid = ph  # integers (RESULT.ph)
                started = start_us / 1e6
                fetch, run, store = fetch_us / 1e6, run_us / 1e6, store_us / 1e6
                if not isinstance(pid, int):
                    raise TypeError(f"pid {pid!r} is not an integer")
            # (positional: the field order of Span)
            rec = Span(
                0,
                str(tid),
                share(name),
                state,
                share(job_id),
                share(node),
                worker,
                pid,
                str(actor_id) if actor_id else None,
                share(cell) if cell else None,
                float(submitted),
                float(sent),
                started,
                fetch,
                run,
                store,
                float(ended),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed timeline span %r: %s", span, exc)
            return None
        rec.seq = self.last_seq = next(self._seq)
        self.spans.append(rec)
        return rec

    @property
    def dropped(self) -> int:
        """Spans received but no longer held."""
        return self.last_seq - len(self.spans)

    def since(self, seq: int, limit: int | None = None) -> list[Span]:
        """Spans numbered after ``seq``, oldest first (the newest ``limit`` of them)."""
        spans = self.spans
        if not spans or spans[-1].seq <= seq:
            return []
        first = spans[0].seq
        start = max(0, seq - first + 1)  # seq numbers are consecutive within the ring
        n = len(spans) - start
        if limit is not None and n > limit:
            start = len(spans) - limit
        return list(itertools.islice(spans, start, None))

    def page(self, seq: int, notebook_of: Callable[[str], str | None]) -> dict[str, Any]:
        """The oldest :data:`PAGE` spans after ``seq`` as compact rows (``QUERY timeline``:
        cheap to build and send however many there are; the asker pages with ``since=last``).

        ``{"fields": ROW_FIELDS, "rows": [...], "notebooks": {job: path}, "last": seq of the
        last row (or ``seq``), "more": whether spans follow}``.
        """
        spans = self.since(seq)
        more = len(spans) > PAGE
        spans = spans[:PAGE]
        jobs = {s.job_id for s in spans}
        return {
            "fields": ROW_FIELDS,
            "rows": [_row(s) for s in spans],
            "notebooks": {j: nb for j in jobs if (nb := notebook_of(j))},
            "last": spans[-1].seq if spans else seq,
            "more": more,
        }

    def body(self, spans: Iterable[Span], notebook_of: Callable[[str], str | None]) -> TimelineBody:
        """The REST body of ``spans`` (``notebook_of``: a job's notebook)."""
        return TimelineBody(
            spans=[view(s, notebook_of) for s in spans],
            next=self.last_seq,
            capacity=self.capacity,
            dropped=self.dropped,
        )


def view(s: Span, notebook_of: Callable[[str], str | None]) -> SpanView:
    """The outside's view of one span."""
    return SpanView(
        seq=s.seq,
        task_id=s.task_id,
        name=s.name,
        state=s.state,
        job_id=s.job_id,
        node_id=s.node_id,
        worker_id=s.worker_id,
        pid=s.pid,
        actor_id=s.actor_id,
        notebook=notebook_of(s.job_id),
        cell=s.cell,
        submitted_at=s.submitted_at,
        sent_at=s.sent_at,
        started_at=s.started_at,
        fetch=s.fetch,
        run=s.run,
        store=s.store,
        ended_at=s.ended_at,
    )
