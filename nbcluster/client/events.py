"""Task events for the cluster's dashboards: batched by the driver, sent to the head.

Tasks go from a driver straight to leased workers, so only the driver knows when one is queued,
running or done. It appends a small tuple per change (cheap on the submission path) and its I/O
thread sends them to the head in one message every :data:`FLUSH_S` seconds. Event codes:

``("s", tid, time, name, resources[, cell_id, number])`` submitted (with the notebook cell that
submitted it, when known), ``("r", tid, time, node_id, worker_id)`` running,
``("q", tid, time)`` queued again (retry), ``("f" | "x" | "c", tid, time[, span])`` finished,
failed, cancelled; ``("F" | "X" | "C", tid, time, span)`` an actor call finished, failed,
cancelled (actor calls are not in the task table, only in the timeline).

A *span* (a task or call that was sent to a worker, for the head's timeline) is
``[name, submitted, sent, node_id, worker_id, ph, cell, actor_id]``: times on the driver's
clock in seconds, ``ph`` the worker's ``RESULT.ph`` (``[start_us, fetch_us, run_us, store_us,
pid]``, empty when no result came), ``cell`` the notebook cell that submitted it, if known.

A driver reports at most :data:`SHOWN_TASKS` unfinished tasks one by one; the others (a million
queued at once) it counts, by function, resources and node, and sends the counts that changed:
``("n", name, time, resources, node_id, queued, running)`` (``node_id`` is ``""`` for queued
ones). The head's task table stays bounded, and so does this traffic. A counted task's span
still goes to the timeline (its end event, which the head's table ignores).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nbcluster.client.inputs import FlushTaskEvents
from nbcluster.client.instructions import Instruction, StartTimer, ToHead
from nbcluster.protocol.messages import Kind

if TYPE_CHECKING:
    from nbcluster.client.tasks import TaskRecord

FLUSH_S = 0.5
#: Unfinished tasks a driver reports one by one (the rest are counted).
SHOWN_TASKS = 10_000

# TaskRecord.shown: not reported, reported one by one, counted as queued, counted as running.
NOT_SHOWN, SHOWN, COUNTED_QUEUED, COUNTED_RUNNING = 0, 1, 2, 3
#: Set by jupyter-server in the kernels it starts: the notebook's path.
SESSION_NAME_ENV = "JPY_SESSION_NAME"


class TaskEvents:
    """Buffers task events (part of the client's pure state) and flushes them to the head.

    Parameters
    ----------
    emit
        Where its instructions go: a flush timer when the buffer starts filling, and the
        ``TASK_EVENTS`` message when it fires.
    """

    def __init__(self, emit: Callable[[Instruction], None]) -> None:
        self._emit = emit
        self._buf: list[tuple[Any, ...]] = []
        self._timer = False
        self.shown = 0  # unfinished tasks reported one by one
        #: The others: (name, shape items, node) -> [queued, running, resources].
        self.counts: dict[tuple[Any, ...], list[Any]] = {}
        self._changed: set[tuple[Any, ...]] = set()
        #: The time of the event being handled (set by the state for each one).
        self.now = 0.0

    def _add(self, ev: tuple[Any, ...]) -> None:
        if not self._timer:
            self._timer = True
            self._emit(StartTimer(FLUSH_S, FlushTaskEvents()))
        self._buf.append(ev)

    def _count(self, rec: TaskRecord, node_id: str, queued: int, running: int) -> None:
        key = (rec.name, rec.shape_key[: len(rec.shape)], node_id)  # (the head keys it so)
        c = self.counts.get(key)
        if c is None:
            c = self.counts[key] = [0, 0, rec.shape]
        c[0] += queued
        c[1] += running
        self._changed.add(key)
        if not self._timer:
            self._timer = True
            self._emit(StartTimer(FLUSH_S, FlushTaskEvents()))

    def _uncount(self, rec: TaskRecord) -> None:
        if rec.shown == COUNTED_QUEUED:
            self._count(rec, "", -1, 0)
        elif rec.shown == COUNTED_RUNNING:
            self._count(rec, rec.shown_on, 0, -1)

    def submitted(self, rec: TaskRecord) -> None:
        if rec.shown != SHOWN:  # (submitted again, a rebuild: counted no more)
            self._uncount(rec)
            rec.shown = NOT_SHOWN
        if rec.shown == SHOWN or self.shown < SHOWN_TASKS:
            if rec.shown != SHOWN:
                self.shown += 1
                rec.shown = SHOWN
            cell_id = getattr(rec.tag, "cell_id", None)  # a kernel.CellTag, in a notebook
            if cell_id is None:
                self._add(("s", rec.tid, self.now, rec.name, rec.shape))
            else:
                self._add(("s", rec.tid, self.now, rec.name, rec.shape, cell_id, rec.tag.number))
        else:
            rec.shown = COUNTED_QUEUED
            self._count(rec, "", 1, 0)

    def started(self, rec: TaskRecord, node_id: str, worker_id: str = "") -> None:
        rec.sent_at = self.now
        if rec.shown == SHOWN:
            self._add(("r", rec.tid, self.now, node_id, worker_id))
        elif rec.shown != NOT_SHOWN:
            self._uncount(rec)
            rec.shown, rec.shown_on = COUNTED_RUNNING, node_id
            self._count(rec, node_id, 0, 1)

    def requeued(self, rec: TaskRecord) -> None:
        if rec.shown == SHOWN:
            self._add(("q", rec.tid, self.now))
        elif rec.shown == COUNTED_RUNNING:
            self._uncount(rec)
            rec.shown, rec.shown_on = COUNTED_QUEUED, ""
            self._count(rec, "", 1, 0)

    def ended(self, rec: TaskRecord, ok: bool) -> None:
        code = "f" if ok else "c" if rec.cancelled else "x"
        if rec.shown == SHOWN:
            self.shown -= 1
        else:
            self._uncount(rec)
        if rec.shown == SHOWN or rec.sent_to is not None:
            # (a counted task's end carries only its span: the head's table has no record)
            if rec.sent_to is None:
                self._add((code, rec.tid, self.now))
            else:
                self._add((code, rec.tid, self.now, self._span(rec)))
        rec.shown, rec.shown_on = NOT_SHOWN, ""

    def call_ended(self, rec: TaskRecord, ok: bool) -> None:
        """An actor call ended (only calls that reached their actor's worker are shown)."""
        if rec.sent_to is not None:
            code = "F" if ok else "C" if rec.cancelled else "X"
            self._add((code, rec.tid, self.now, self._span(rec)))

    def _span(self, rec: TaskRecord) -> list[Any]:
        conn = rec.sent_to
        assert conn is not None
        cell = getattr(rec.tag, "cell_id", None)  # a kernel.CellTag, in a notebook
        name = rec.name if rec.actor_id is None else f"{rec.name}.{rec.method}"
        return [
            name,
            rec.submitted_at,
            rec.sent_at,
            conn.node_id,
            conn.worker_id,
            rec.ph or [],
            cell,
            rec.actor_id,
        ]

    def flush(self) -> None:
        """Send what is buffered (when the flush timer fires)."""
        self._timer = False
        for key in self._changed:
            c = self.counts[key]
            self._buf.append(("n", key[0], self.now, c[2], key[2], c[0], c[1]))
            if c[0] == 0 and c[1] == 0:
                del self.counts[key]
        self._changed.clear()
        if not self._buf:
            return
        buf, self._buf = self._buf, []
        self._emit(ToHead({"k": Kind.TASK_EVENTS, "events": buf}))


def owner_identity() -> dict[str, str]:
    """``kernel_id`` and ``notebook`` of this process when it is a Jupyter kernel."""
    out: dict[str, str] = {}
    notebook = os.environ.get(SESSION_NAME_ENV)
    if notebook:
        out["notebook"] = notebook
    kernel_id = _kernel_id()
    if kernel_id:
        out["kernel_id"] = kernel_id
    return out


def _kernel_id() -> str | None:
    if "ipykernel" not in sys.modules:  # not a kernel: do not import ipykernel for nothing
        return None
    try:
        from ipykernel.connect import get_connection_file

        path = get_connection_file()
    except Exception:  # not running inside a kernel app
        return None
    m = re.match(r"kernel-(.+)\.json$", os.path.basename(path))
    return m.group(1) if m else None
