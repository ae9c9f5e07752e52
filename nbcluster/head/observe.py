"""What the head shows the outside world: node metrics history, a task table, change events.

Pure bookkeeping, no sockets: :class:`HeadService` feeds it (agents' metrics, drivers' task
events, actor and node changes) and the Jupyter extension reads views from it and subscribes to
its change events (:attr:`Observer.subscribers`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nbcluster.head.actors import ActorDirectory, ActorInfo
from nbcluster.head.model import NodeInfo
from nbcluster.head.state import ClusterState

log = logging.getLogger(__name__)

#: Metrics kept per node: 10 minutes at one sample a second.
METRICS_HISTORY = 600
#: Ended tasks kept for the panel.
ENDED_TASKS = 200

QUEUED, RUNNING, INFEASIBLE = "queued", "running", "infeasible"
FINISHED, FAILED, CANCELLED = "finished", "failed", "cancelled"
_ENDED = {"f": FINISHED, "x": FAILED, "c": CANCELLED}

#: A change event: ``{"type": "node" | "task" | "actor", ...}``; see docs/jupyter-api.md.
Subscriber = Callable[[dict[str, Any]], None]


@dataclass
class TaskView:
    """One task as the panel sees it."""

    task_id: str
    name: str
    job_id: str
    client: bytes  # the submitting connection, which can cancel it
    resources: dict[str, float]
    submitted_at: float
    state: str = QUEUED
    node_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None


@dataclass
class JobOwner:
    """Who a job belongs to: a notebook kernel, or a plain script."""

    job_id: str
    kernel_id: str | None = None
    notebook: str | None = None
    pid: int = 0

    def view(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kernel_id": self.kernel_id, "notebook": self.notebook}


@dataclass
class Observer:
    """Views of the cluster for the Jupyter panel and the REST API."""

    state: ClusterState
    actors: ActorDirectory
    address: str = ""
    started_at: float = field(default_factory=time.time)
    version: str = ""
    notebook_root: str = ""  # notebooks are shown relative to it (the Jupyter root dir)
    subscribers: list[Subscriber] = field(default_factory=list)
    metrics: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    tasks: dict[str, TaskView] = field(default_factory=dict)
    ended: deque[TaskView] = field(default_factory=lambda: deque(maxlen=ENDED_TASKS))
    jobs: dict[str, JobOwner] = field(default_factory=dict)
    idle_since: dict[str, float] = field(default_factory=dict)  # node id -> monotonic time

    # --------------------------------------------------------------------------- events in
    def job_started(self, job_id: str, h: dict[str, Any]) -> None:
        """A driver said hello; ``h`` may name its kernel and notebook."""
        kernel_id = h.get("kernel_id") or None
        notebook = h.get("notebook") or None
        self.jobs[job_id] = JobOwner(
            job_id,
            str(kernel_id) if kernel_id else None,
            str(notebook) if notebook else None,
            int(h.get("pid", 0)),
        )

    def job_gone(self, job_id: str) -> None:
        """The job's driver left: its unfinished tasks are over."""
        now = time.time()
        for t in [t for t in self.tasks.values() if t.job_id == job_id]:
            self._end(t, CANCELLED, now)

    def track_idle(self, now: float | None = None) -> dict[str, float]:
        """Seconds each alive node has had nothing running (no task, no actor).

        Called on every agent ping and by :meth:`demand`, so the figures are at most about a
        second late.
        """
        now = time.monotonic() if now is None else now
        out: dict[str, float] = {}
        for node_id in self.state.nodes:
            idle = self._mark_idle(node_id, now)
            if idle is not None:
                out[node_id] = idle
        for gone in set(self.idle_since) - set(self.state.nodes):
            del self.idle_since[gone]
        return out

    def _mark_idle(self, node_id: str, now: float) -> float | None:
        n = self.state.nodes.get(node_id)
        if n is None or not n.alive or self.state.node_busy(node_id):
            self.idle_since.pop(node_id, None)
            return None
        return round(now - self.idle_since.setdefault(node_id, now), 3)

    def demand(self) -> dict[str, Any]:
        """The ``demand`` query: unmet requests by shape, and each idle node's idle seconds."""
        return {"pending": self.state.demand(), "idle": self.track_idle()}

    def on_metrics(self, node_id: str, m: dict[str, Any]) -> None:
        self._mark_idle(node_id, time.monotonic())  # a node's idle clock, about every second
        hist = self.metrics.get(node_id)
        if hist is None:
            hist = self.metrics[node_id] = deque(maxlen=METRICS_HISTORY)
        elif hist[-1].get("time") == m.get("time"):
            return  # the same sample again: pings and samples are not in lockstep
        hist.append(m)

    def on_task_events(self, client: bytes, job_id: str, events: list[Any]) -> None:
        """A batch from a driver (see :mod:`nbcluster.client.events` for the codes)."""
        changed: dict[str, TaskView] = {}
        for ev in events:
            try:
                code, tid, t = ev[0], str(ev[1]), float(ev[2])
                if code == "s":
                    view = TaskView(tid, str(ev[3]), job_id, client, dict(ev[4]), t)
                    self.tasks[tid] = view
                    changed[tid] = view
                    continue
                view_or_none = self.tasks.get(tid)
                if view_or_none is None:
                    continue
                view = view_or_none
                if code == "r":
                    view.state, view.node_id, view.started_at = RUNNING, ev[3] or None, t
                elif code == "q":  # retried, or its worker died before it ran
                    view.state, view.node_id, view.started_at = QUEUED, None, None
                elif code in _ENDED:
                    self._end(view, _ENDED[code], t, notify=False)
                else:
                    continue
                changed[tid] = view
            except (IndexError, TypeError, ValueError):
                log.warning("malformed task event %r", ev)
        if self.subscribers:  # views cost something: build them only for a listener
            for view in changed.values():
                self.emit({"type": "task", "task": self.task_view(view)})

    def _end(self, view: TaskView, state: str, t: float, notify: bool = True) -> None:
        view.state, view.ended_at = state, t
        self.tasks.pop(view.task_id, None)
        self.ended.append(view)
        if notify and self.subscribers:
            self.emit({"type": "task", "task": self.task_view(view)})

    def node_changed(self, node_id: str) -> None:
        node = self.state.nodes.get(node_id)
        if node is not None:
            self.emit({"type": "node", "node": self.node_view(node)})

    def actor_changed(self, a: ActorInfo) -> None:
        self.emit({"type": "actor", "actor": self.actor_view(a)})

    def emit(self, event: dict[str, Any]) -> None:
        for sub in list(self.subscribers):
            try:
                sub(event)
            except Exception:  # a broken subscriber must not break the head
                log.exception("subscriber failed")

    # --------------------------------------------------------------------------- views
    def owner(self, job_id: str) -> dict[str, Any]:
        o = self.jobs.get(job_id)
        view = o.view() if o is not None else JobOwner(job_id).view()
        root = self.notebook_root.rstrip("/") + "/"
        nb = view["notebook"]
        if nb and root != "/" and nb.startswith(root):
            view["notebook"] = nb[len(root) :]
        return view

    def task_view(self, t: TaskView) -> dict[str, Any]:
        state, missing = t.state, None
        if state == QUEUED:
            lack = self.state.missing_resources(t.resources)
            if lack:
                state, missing = INFEASIBLE, ", ".join(sorted(lack))
        return {
            "task_id": t.task_id,
            "name": t.name,
            "state": state,
            "node_id": t.node_id,
            "resources": dict(t.resources),
            "missing": missing,
            "owner": self.owner(t.job_id),
            "submitted_at": t.submitted_at,
            "started_at": t.started_at,
            "ended_at": t.ended_at,
        }

    def task_views(self) -> list[dict[str, Any]]:
        """Queued, running and infeasible tasks, then the last ended ones (oldest first)."""
        return [self.task_view(t) for t in (*self.tasks.values(), *self.ended)]

    def actor_view(self, a: ActorInfo) -> dict[str, Any]:
        return {
            "actor_id": a.aid,
            "class_name": a.cls_name,
            "name": a.name,
            "namespace": a.namespace,
            "state": a.state.lower(),
            "node_id": a.node_id,
            "pid": a.pid or None,
            "resources": dict(a.shape),
            "detached": a.detached,
            "restarts": a.restarts,
            "death_reason": a.death_reason or None,
            "owner": self.owner(a.job_id),
        }

    def actor_views(self) -> list[dict[str, Any]]:
        return [self.actor_view(a) for a in self.actors.actors.values()]

    def node_view(self, n: NodeInfo) -> dict[str, Any]:
        hist = self.metrics.get(n.node_id)
        running = sum(
            1 for t in self.tasks.values() if t.state == RUNNING and t.node_id == n.node_id
        )
        actors = sum(
            1 for a in self.actors.actors.values() if a.node_id == n.node_id and a.state == "ALIVE"
        )
        return {
            "node_id": n.node_id,
            "name": n.name,
            "address": n.address,
            "alive": n.alive,
            "state": str(n.info.get("state") or ("alive" if n.alive else "dead")),
            "resources_total": dict(n.total),
            "resources_available": {k: max(0.0, round(v, 6)) for k, v in n.available.items()},
            "metrics": hist[-1] if hist else None,
            "object_store": n.info.get("object_store"),
            "tasks_running": running,
            "actors": actors,
        }

    def totals(self) -> dict[str, Any]:
        alive = [n for n in self.state.nodes.values() if n.alive]
        out: dict[str, Any] = {"nodes": len(alive)}
        for key in ("CPU", "GPU"):
            total = sum(n.total.get(key, 0.0) for n in alive)
            free = sum(max(0.0, n.available.get(key, 0.0)) for n in alive)
            out[key] = total
            out[f"{key}_used"] = round(total - free, 6)
        return out

    def cluster(self) -> dict[str, Any]:
        """The body of ``GET /nbcluster/api/cluster``."""
        return {
            "head": {
                "address": self.address,
                "started_at": self.started_at,
                "version": self.version,
            },
            "nodes": [self.node_view(n) for n in self.state.nodes.values()],
            "totals": self.totals(),
        }

    def metrics_message(self) -> dict[str, Any]:
        """The websocket's once-a-second ``metrics`` message."""
        keep = ("node_id", "alive", "state", "metrics", "resources_available", "object_store")
        nodes = []
        for n in self.state.nodes.values():
            v = self.node_view(n)
            nodes.append({k: v[k] for k in (*keep, "tasks_running", "actors")})
        return {"type": "metrics", "time": time.time(), "nodes": nodes, "totals": self.totals()}

    def history(self, node_id: str) -> list[dict[str, Any]] | None:
        """Metrics of one node, oldest first; ``None`` for an unknown node."""
        if node_id not in self.state.nodes:
            return None
        return list(self.metrics.get(node_id, ()))

    def find_task(self, task_id: str) -> TaskView | None:
        return self.tasks.get(task_id)
