"""Task events for the cluster's dashboards: batched by the driver, sent to the head.

Tasks go from a driver straight to leased workers, so only the driver knows when one is queued,
running or done. It appends a small tuple per change (cheap on the submission path) and its I/O
thread sends them to the head in one message every :data:`FLUSH_S` seconds. Event codes:

``("s", tid, time, name, resources)`` submitted, ``("r", tid, time, node_id)`` running,
``("q", tid, time)`` queued again (retry), ``("f" | "x" | "c", tid, time)`` finished, failed,
cancelled.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from nbcluster.client.wire import send_nowait
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind

if TYPE_CHECKING:
    import asyncio

    from nbcluster.client.tasks import TaskRecord

FLUSH_S = 0.5
#: Set by jupyter-server in the kernels it starts: the notebook's path.
SESSION_NAME_ENV = "JPY_SESSION_NAME"


class TaskEvents:
    """Buffers task events on the client's I/O thread and flushes them to the head.

    Parameters
    ----------
    loop
        The client's I/O loop (every method runs on it).
    head
        The client's socket to the head.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, head: Any) -> None:
        self._loop = loop
        self._head = head
        self._buf: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None

    def _add(self, ev: tuple[Any, ...]) -> None:
        if self._timer is None:
            if self._loop.is_closed():  # failing what was pending after the client closed
                return
            self._timer = self._loop.call_later(FLUSH_S, self.flush)
        self._buf.append(ev)

    def submitted(self, rec: TaskRecord) -> None:
        self._add(("s", rec.tid, time.time(), rec.name, rec.shape))

    def started(self, rec: TaskRecord, node_id: str) -> None:
        self._add(("r", rec.tid, time.time(), node_id))

    def requeued(self, rec: TaskRecord) -> None:
        self._add(("q", rec.tid, time.time()))

    def ended(self, rec: TaskRecord, ok: bool) -> None:
        code = "f" if ok else "c" if rec.cancelled else "x"
        self._add((code, rec.tid, time.time()))

    def flush(self) -> None:
        """Send what is buffered (also called when the client closes)."""
        self._timer = None
        if not self._buf:
            return
        buf, self._buf = self._buf, []
        try:
            send_nowait(self._head, encode({"k": Kind.TASK_EVENTS, "events": buf}))
        except Exception:  # closing: the head ends this job's tasks when we leave
            pass


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
