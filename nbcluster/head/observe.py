"""What the head shows the outside world: node metrics history, a task table, change events.

Pure bookkeeping, no sockets: :class:`HeadService` feeds it (agents' metrics, drivers' task
events, actor and node changes). It is the one place where the views of
:mod:`nbcluster.views` are built from the head's state: the Jupyter extension reads them from it
and subscribes to its change events (:attr:`Observer.subscribers`), and the head answers
drivers' ``query`` with them.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from nbcluster.head.actors import ActorDirectory, ActorInfo
from nbcluster.head.model import NodeInfo, amounts_of
from nbcluster.head.state import ClusterState
from nbcluster.head.timeline import Timeline
from nbcluster.protocol.messages import ALIVE, DEAD, PENDING, RESTARTING
from nbcluster.protocol.schema import Query
from nbcluster.views import (
    ActorEvent,
    ActorState,
    ActorView,
    BundleView,
    ChangeEvent,
    ClusterView,
    GpuInfoView,
    GpuProcessView,
    HeadView,
    MetricsEvent,
    MetricsView,
    NodeEvent,
    NodeState,
    NodeUpdateView,
    NodeView,
    ObjectStoreView,
    OwnerView,
    PlacementGroupView,
    TaskCountView,
    TaskEvent,
    TaskState,
    TaskView,
    TimelineBody,
    TotalsView,
)

log = logging.getLogger(__name__)

#: Metrics kept per node: 10 minutes at one sample a second.
METRICS_HISTORY = 600
#: Ended tasks kept for the panel.
ENDED_TASKS = 200

QUEUED: TaskState = "queued"
RUNNING: TaskState = "running"
INFEASIBLE: TaskState = "infeasible"
FINISHED: TaskState = "finished"
FAILED: TaskState = "failed"
CANCELLED: TaskState = "cancelled"
_ENDED: dict[str, TaskState] = {"f": FINISHED, "x": FAILED, "c": CANCELLED}
_CALL_CODES = frozenset("FXC")  # an actor call ended
_SPAN_CODES = frozenset("fxc") | _CALL_CODES
_ACTOR_STATES: dict[str, ActorState] = {
    PENDING: "pending",
    ALIVE: "alive",
    RESTARTING: "restarting",
    DEAD: "dead",
}

#: Upper bounds (seconds) of the lease wait histogram's buckets (``nbcluster_lease_wait_seconds``).
LEASE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)

#: Receives every change (see docs/jupyter-api.md).
Subscriber = Callable[[ChangeEvent], None]


@dataclass
class TaskRecord:
    """One task, as the drivers' task events told it (:meth:`Observer.task_view` shows it)."""

    task_id: str
    name: str
    job_id: str
    client: bytes  # the submitting connection, which can cancel it
    resources: dict[str, float]
    submitted_at: float
    state: TaskState = QUEUED
    node_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    worker_id: str | None = None
    cell_id: str | None = None  # the notebook cell that submitted it (its metadata.cellId)
    cell_count: int | None = None  # that cell's In [n]


@dataclass
class TaskCount:
    """Unfinished tasks a driver counted instead of reporting them one by one (see
    :mod:`nbcluster.client.events`): one function, resource shape and node."""

    name: str
    job_id: str
    resources: dict[str, float]
    node_id: str  # "" for queued ones
    queued: int = 0
    running: int = 0


@dataclass
class JobOwner:
    """Who a job belongs to: a notebook kernel, or a plain script."""

    job_id: str
    kernel_id: str | None = None
    notebook: str | None = None
    pid: int = 0


@dataclass
class WaitHistogram:
    """Lease waits so far: a count per bucket of :data:`LEASE_WAIT_BUCKETS` (not cumulative;
    the last one is ``+Inf``), their sum and their number."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LEASE_WAIT_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LEASE_WAIT_BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1


@dataclass
class Observer:
    """Views of the cluster for the Jupyter panel, the REST API and drivers' queries."""

    state: ClusterState
    actors: ActorDirectory
    address: str = ""
    started_at: float = field(default_factory=time.time)
    version: str = ""
    notebook_root: str = ""  # notebooks are shown relative to it (the Jupyter root dir)
    subscribers: list[Subscriber] = field(default_factory=list)
    metrics: dict[str, deque[MetricsView]] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    #: (driver, name, resources, node) -> its counted tasks (bounded: one per function and node).
    counts: dict[tuple[Any, ...], TaskCount] = field(default_factory=dict)
    ended: deque[TaskRecord] = field(default_factory=lambda: deque(maxlen=ENDED_TASKS))
    jobs: dict[str, JobOwner] = field(default_factory=dict)
    idle_since: dict[str, float] = field(default_factory=dict)  # node id -> monotonic time
    on_worker: dict[str, str] = field(default_factory=dict)  # worker id -> its running task
    # Totals since the head started, for the Prometheus export (nbcluster.head.export).
    # (final state -> function -> count: no tuple key to build per task)
    ended_counts: dict[TaskState, dict[str, int]] = field(
        default_factory=lambda: {FINISHED: {}, FAILED: {}, CANCELLED: {}}
    )
    lease_waits: WaitHistogram = field(default_factory=WaitHistogram)
    timeline: Timeline = field(default_factory=Timeline)

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
        for key in [k for k, c in self.counts.items() if c.job_id == job_id]:
            del self.counts[key]

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
        pending = self.state.demand() + self.state.groups.demand()  # groups waiting too
        return {"pending": pending, "idle": self.track_idle()}

    def on_metrics(self, node_id: str, m: Any) -> None:
        """A node's agent sent a sample (a malformed one is logged and dropped)."""
        self._mark_idle(node_id, time.monotonic())  # a node's idle clock, about every second
        try:
            sample = msgspec.convert(m, MetricsView)
        except msgspec.ValidationError as exc:
            log.warning("node %s sent malformed metrics: %s", node_id, exc)
            return
        hist = self.metrics.get(node_id)
        if hist is None:
            hist = self.metrics[node_id] = deque(maxlen=METRICS_HISTORY)
        elif hist[-1].time == sample.time:
            return  # the same sample again: pings and samples are not in lockstep
        for gpu in sample.gpus:
            for proc in gpu.processes:
                self._name_gpu_user(proc)
        hist.append(sample)

    def _name_gpu_user(self, p: GpuProcessView) -> None:
        """Fill in what a GPU process runs: the actor its worker hosts, else its running task."""
        if p.worker_id is None:
            return
        p.kind = "worker"
        for a in self.actors.actors.values():
            if a.worker_id == p.worker_id and a.state != DEAD:
                p.kind, p.name, p.id, p.job_id = "actor", a.name or a.cls_name, a.aid, a.job_id
                break
        else:
            rec = self.tasks.get(self.on_worker.get(p.worker_id, ""))
            if rec is not None:
                p.kind, p.name, p.id, p.job_id = "task", rec.name, rec.task_id, rec.job_id
        if p.job_id is not None:
            p.notebook = self.owner(p.job_id).notebook

    def on_task_events(self, client: bytes, job_id: str, events: list[Any]) -> None:
        """A batch from a driver (see :mod:`nbcluster.client.events` for the codes)."""
        changed: dict[str, TaskRecord] = {}
        for ev in events:
            try:
                code, tid, t = ev[0], str(ev[1]), float(ev[2])
                if len(ev) > 3 and code in _SPAN_CODES:  # it ran: its span for the timeline
                    self.timeline.add(job_id, code, tid, t, ev[3], self._node_of)
                    if code in _CALL_CODES:
                        continue  # actor calls are only in the timeline
                if code == "n":
                    self._on_count(client, job_id, ev)
                    continue
                if code == "s":
                    rec = TaskRecord(tid, str(ev[3]), job_id, client, dict(ev[4]), t)
                    if len(ev) > 6 and ev[5]:
                        rec.cell_id = str(ev[5])
                        rec.cell_count = int(ev[6]) if ev[6] is not None else None
                    self.tasks[tid] = rec
                    changed[tid] = rec
                    continue
                rec_or_none = self.tasks.get(tid)
                if rec_or_none is None:
                    continue
                rec = rec_or_none
                if code == "r":
                    rec.state, rec.node_id, rec.started_at = RUNNING, ev[3] or None, t
                    if len(ev) > 4 and ev[4]:  # which worker: who uses a GPU (metrics)
                        rec.worker_id = str(ev[4])
                        self.on_worker[rec.worker_id] = tid
                elif code == "q":  # retried, or its worker died before it ran
                    rec.state, rec.node_id, rec.started_at = QUEUED, None, None
                    self._off_worker(rec)
                elif code in _ENDED:
                    self._end(rec, _ENDED[code], t, notify=False)
                else:
                    continue
                changed[tid] = rec
            except (IndexError, TypeError, ValueError):
                log.warning("malformed task event %r", ev)
        if self.subscribers:  # views cost something: build them only for a listener
            for rec in changed.values():
                self.emit(TaskEvent(task=self.task_view(rec)))

    def find_task(self, task_id: str) -> TaskRecord | None:
        """A task of the table: unfinished, or among the last ended ones."""
        rec = self.tasks.get(task_id)
        if rec is None:
            rec = next((t for t in reversed(self.ended) if t.task_id == task_id), None)
        return rec

    def _off_worker(self, rec: TaskRecord) -> None:
        if rec.worker_id is not None and self.on_worker.get(rec.worker_id) == rec.task_id:
            del self.on_worker[rec.worker_id]

    def lease_waited(self, seconds: float | None) -> None:
        """A lease was granted ``seconds`` after it was asked for (``None``: unknown)."""
        if seconds is not None:
            self.lease_waits.add(max(0.0, seconds))

    def _node_of(self, worker_id: str) -> str | None:
        w = self.state.workers.get(worker_id)
        return w.node_id if w is not None else None

    def _on_count(self, client: bytes, job_id: str, ev: Any) -> None:
        """``("n", name, time, resources, node_id, queued, running)``: a driver's count."""
        name, resources, node_id = str(ev[1]), dict(ev[3]), str(ev[4])
        queued, running = int(ev[5]), int(ev[6])
        key = (client, name, tuple(sorted(resources.items())), node_id)
        if queued <= 0 and running <= 0:
            self.counts.pop(key, None)
            return
        c = self.counts.get(key)
        if c is None:
            c = self.counts[key] = TaskCount(name, job_id, resources, node_id)
        c.queued, c.running = max(0, queued), max(0, running)

    def _end(self, rec: TaskRecord, state: TaskState, t: float, notify: bool = True) -> None:
        counts = self.ended_counts[state]
        counts[rec.name] = counts.get(rec.name, 0) + 1
        rec.state, rec.ended_at = state, t
        self._off_worker(rec)
        self.tasks.pop(rec.task_id, None)
        self.ended.append(rec)
        if notify and self.subscribers:
            self.emit(TaskEvent(task=self.task_view(rec)))

    def node_changed(self, node_id: str) -> None:
        node = self.state.nodes.get(node_id)
        if node is not None and self.subscribers:
            self.emit(NodeEvent(node=self.node_view(node)))

    def actor_changed(self, a: ActorInfo) -> None:
        if self.subscribers:
            self.emit(ActorEvent(actor=self.actor_view(a)))

    def emit(self, event: ChangeEvent) -> None:
        for sub in list(self.subscribers):
            try:
                sub(event)
            except Exception:  # a broken subscriber must not break the head
                log.exception("subscriber failed")

    # --------------------------------------------------------------------------- views
    def owner(self, job_id: str) -> OwnerView:
        """The job ``job_id`` (its notebook relative to :attr:`notebook_root`)."""
        o = self.jobs.get(job_id)
        if o is None:
            return OwnerView(job_id=job_id, kernel_id=None, notebook=None)
        nb, root = o.notebook, self.notebook_root.rstrip("/") + "/"
        if nb and root != "/" and nb.startswith(root):
            nb = nb[len(root) :]
        return OwnerView(job_id=job_id, kernel_id=o.kernel_id, notebook=nb)

    def task_view(self, t: TaskRecord) -> TaskView:
        state: TaskState = t.state
        missing = None
        if state == QUEUED:
            lack = self.state.missing_resources(t.resources)
            if lack:
                state, missing = INFEASIBLE, ", ".join(sorted(lack))
        return TaskView(
            task_id=t.task_id,
            name=t.name,
            state=state,
            node_id=t.node_id,
            resources=dict(t.resources),
            missing=missing,
            owner=self.owner(t.job_id),
            submitted_at=t.submitted_at,
            started_at=t.started_at,
            ended_at=t.ended_at,
            cell_id=t.cell_id,
            cell_count=t.cell_count,
        )

    def task_views(self) -> list[TaskView]:
        """Queued, running and infeasible tasks, then the last ended ones (oldest first)."""
        return [self.task_view(t) for t in (*self.tasks.values(), *self.ended)]

    def task_count_views(self) -> list[TaskCountView]:
        """The unfinished tasks counted, not listed (by job, function, shape, node, state)."""
        out: list[TaskCountView] = []
        for c in self.counts.values():
            owner = self.owner(c.job_id)
            if c.queued:
                state: TaskState = QUEUED
                if self.state.missing_resources(c.resources):
                    state = INFEASIBLE
                out.append(
                    TaskCountView(
                        name=c.name,
                        state=state,
                        count=c.queued,
                        node_id=None,
                        resources=dict(c.resources),
                        owner=owner,
                    )
                )
            if c.running:
                out.append(
                    TaskCountView(
                        name=c.name,
                        state=RUNNING,
                        count=c.running,
                        node_id=c.node_id or None,
                        resources=dict(c.resources),
                        owner=owner,
                    )
                )
        return out

    def actor_view(self, a: ActorInfo) -> ActorView:
        return ActorView(
            actor_id=a.aid,
            class_name=a.cls_name,
            name=a.name,
            namespace=a.namespace,
            state=_ACTOR_STATES[a.state],
            job_id=a.job_id,
            node_id=a.node_id,
            pid=a.pid or None,
            resources=dict(a.shape),
            detached=a.detached,
            restarts=a.restarts,
            death_reason=a.death_reason or None,
            created_at=a.created_at,
            owner=self.owner(a.job_id),
        )

    def actor_views(self) -> list[ActorView]:
        return [self.actor_view(a) for a in self.actors.actors.values()]

    def node_views(self) -> list[NodeView]:
        """Every node, dead ones included, in the order they joined."""
        running: dict[str, int] = {}
        for t in self.tasks.values():
            if t.state == RUNNING and t.node_id is not None:
                running[t.node_id] = running.get(t.node_id, 0) + 1
        for c in self.counts.values():
            if c.running and c.node_id:
                running[c.node_id] = running.get(c.node_id, 0) + c.running
        actors: dict[str, int] = {}
        for a in self.actors.actors.values():
            if a.state == ALIVE and a.node_id is not None:
                actors[a.node_id] = actors.get(a.node_id, 0) + 1
        return [
            self._node_view(n, running.get(n.node_id, 0), actors.get(n.node_id, 0))
            for n in self.state.nodes.values()
        ]

    def node_view(self, n: NodeInfo) -> NodeView:
        """One node (counting its tasks and actors: use :meth:`node_views` for all of them)."""
        running = sum(
            1 for t in self.tasks.values() if t.state == RUNNING and t.node_id == n.node_id
        ) + sum(c.running for c in self.counts.values() if c.node_id == n.node_id)
        actors = sum(
            1 for a in self.actors.actors.values() if a.node_id == n.node_id and a.state == ALIVE
        )
        return self._node_view(n, running, actors)

    def _node_view(self, n: NodeInfo, running: int, actors: int) -> NodeView:
        hist = self.metrics.get(n.node_id)
        state: NodeState = "alive" if n.alive else "dead"
        if n.alive and n.info.get("state") == "draining":
            state = "draining"
        return NodeView(
            node_id=n.node_id,
            name=n.name,
            address=n.address,
            alive=n.alive,
            state=state,
            pid=n.pid,
            resources_total=n.total,
            resources_available={k: max(0.0, round(v, 6)) for k, v in n.available.items()},
            gpus=self._agent_info(n, "gpus", list[GpuInfoView], []),
            gpus_free={str(g): f for g, f in sorted(n.gpus.items())},
            workers=len(n.workers),
            leases=sum(1 for w in n.workers.values() if w.lease_id is not None),
            store_address=str(n.info.get("store_address") or ""),
            store_id=n.store_id,
            object_store=self._agent_info(n, "object_store", ObjectStoreView | None, None),
            metrics=hist[-1] if hist else None,
            tasks_running=running,
            actors=actors,
            labels=self._agent_info(n, "labels", dict[str, str], {}),
        )

    def _agent_info(self, n: NodeInfo, key: str, tp: Any, default: Any) -> Any:
        """``n.info[key]`` (what the agent reported) as ``tp``; ``default`` if malformed."""
        value = n.info.get(key)
        if value is None:
            return default
        try:
            return msgspec.convert(value, tp)
        except msgspec.ValidationError as exc:
            log.warning("node %s reported a malformed %s: %s", n.node_id, key, exc)
            n.info.pop(key, None)  # warned once; the next report may be right
            return default

    def totals(self) -> TotalsView:
        alive = [n for n in self.state.nodes.values() if n.alive]
        used: dict[str, tuple[float, float]] = {}
        for key in ("CPU", "GPU"):
            total = sum(n.total.get(key, 0.0) for n in alive)
            free = sum(max(0.0, n.available.get(key, 0.0)) for n in alive)
            used[key] = (total, round(total - free, 6))
        return TotalsView(
            nodes=len(alive),
            cpu=used["CPU"][0],
            cpu_used=used["CPU"][1],
            gpu=used["GPU"][0],
            gpu_used=used["GPU"][1],
        )

    def head_view(self) -> HeadView:
        return HeadView(address=self.address, started_at=self.started_at, version=self.version)

    def cluster(self) -> ClusterView:
        """The body of ``GET /nbcluster/api/cluster``."""
        return ClusterView(
            head=self.head_view(),
            nodes=self.node_views(),
            totals=self.totals(),
            placement_groups=self.placement_group_views(),
        )

    def placement_group_views(self) -> list[PlacementGroupView]:
        """Every placement group the head knows (removed ones included), oldest first."""
        return [
            PlacementGroupView(
                placement_group_id=g.pg_id,
                name=g.name,
                namespace=g.namespace,
                job_id=g.job_id,
                strategy=g.strategy,  # type: ignore[arg-type]  # checked at creation
                state=g.state,  # type: ignore[arg-type]  # one of placement's states
                detached=g.detached,
                infeasible=g.infeasible_reported,
                bundles=[
                    BundleView(
                        index=b.index,
                        resources=dict(b.shape),
                        node_id=b.node_id
                        or b.home,  # (home: its node, not back yet after a restart)
                        available=amounts_of(b.avail_u),
                    )
                    for b in g.bundles
                ],
            )
            for g in self.state.groups.groups.values()
        ]

    def metrics_message(self) -> MetricsEvent:
        """The websocket's once-a-second ``metrics`` message."""
        return MetricsEvent(
            time=time.time(),
            nodes=[NodeUpdateView.of(n) for n in self.node_views()],
            totals=self.totals(),
            placement_groups=[g for g in self.placement_group_views() if g.state != "REMOVED"],
        )

    def history(self, node_id: str) -> list[MetricsView] | None:
        """Metrics of one node, oldest first; ``None`` for an unknown node."""
        if node_id not in self.state.nodes:
            return None
        return list(self.metrics.get(node_id, ()))

    def query(self, q: Query) -> Any:
        """The answer to a driver's ``QUERY``: the views of :mod:`nbcluster.views`
        (docs/jupyter-api.md) in their wire form (msgspec builtins); ``None`` for what is
        unknown."""
        what = q.what
        if what == "nodes":
            return msgspec.to_builtins(self.node_views())
        if what in ("actors", "actor_views"):  # "actor_views": its old name
            return msgspec.to_builtins(self.actor_views())
        if what == "actor":
            a = self.actors.lookup(str(q.name), q.ns or "")
            if a is None:
                return None
            return {
                **msgspec.to_builtins(self.actor_view(a)),
                "methods": a.methods,
                "max_task_retries": a.max_task_retries,
                "is_async": bool(a.spec.get("is_async")),
            }
        if what == "head":
            return {"address": self.address, "pid": os.getpid(), "started_at": self.started_at}
        if what == "cluster":  # the Jupyter panel's views, for widgets and `nbcluster status` too
            return msgspec.to_builtins(self.cluster())
        if what == "tasks":
            return msgspec.to_builtins(self.task_views())
        if what == "task_counts":
            return msgspec.to_builtins(self.task_count_views())
        if what == "metrics":
            return msgspec.to_builtins(self.history(str(q.node_id)))
        if what == "placement_groups":  # nbcluster.util.placement_group
            return msgspec.to_builtins(self.placement_group_views())
        if what == "demand":  # what pools grow from (nbcluster.deploy)
            return self.demand()
        if what == "timeline":  # nbcluster.timeline(): the spans after `since`, a page at a time
            return self.timeline.page(q.since or 0, lambda job: self.owner(job).notebook)
        return None

    def timeline_body(self, since: int, limit: int | None = None) -> TimelineBody:
        """The spans after ``since`` (the newest ``limit``), for the panel and ``timeline()``."""
        tl = self.timeline
        notebooks: dict[str, str | None] = {}

        def notebook_of(job: str) -> str | None:
            if job not in notebooks:
                notebooks[job] = self.owner(job).notebook
            return notebooks[job]

        return tl.body(tl.since(since, limit), notebook_of)

    def cell_tasks(self, job_id: str, cell_id: str) -> list[str]:
        """The unfinished tasks a notebook cell submitted (what "cancel the cell" cancels)."""
        return [
            t.task_id for t in self.tasks.values() if t.job_id == job_id and t.cell_id == cell_id
        ]

    def running_task(self, task_id: str) -> TaskRecord | None:
        """An unfinished task (what the panel can cancel)."""
        return self.tasks.get(task_id)
