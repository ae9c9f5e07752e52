"""The live cluster dashboard: one row per node with CPU, memory, GPU bars, resources, work."""

from __future__ import annotations

import contextlib
import html
import threading
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as w

from nbcluster.client import current
from nbcluster.status import cluster_nodes

#: Dashboards that keep updating at once; making another freezes the oldest (a re-run cell's
#: old output is never closed by the frontend, so its thread would otherwise run forever).
MAX_LIVE = 4
_live: list[Dashboard] = []
_live_lock = threading.Lock()

SKIP_RESOURCES = ("memory", "object_store_memory")


@dataclass
class GpuView:
    """One GPU of a node, from the node agent's metrics."""

    index: int
    name: str
    utilization: float | None
    memory_used: float | None
    memory_total: float | None


@dataclass
class NodeView:
    """What a dashboard row shows for one node (metrics are ``None`` when not reported)."""

    node_id: str
    name: str
    alive: bool
    cpu_percent: float | None
    memory_used: float | None
    memory_total: float | None
    gpus: list[GpuView]
    resources: dict[str, tuple[float, float]]  # name -> (used, total)
    tasks: int
    actors: int
    actor_names: list[str] = field(default_factory=list)

    def short_actor_names(self) -> list[str]:
        names = self.actor_names[:5]
        more = len(self.actor_names) - len(names)
        return names + ([f"+{more} more"] if more else [])


def snapshot() -> list[NodeView]:
    """The cluster as the dashboard shows it (see :func:`nbcluster.status.cluster_nodes`)."""
    actors_by_node: dict[str, list[str]] = {}
    for a in current.require().query("actors"):
        if a.get("state") == "ALIVE" and a.get("node_id"):
            label = a.get("name") or a.get("class_name") or "actor"
            actors_by_node.setdefault(str(a["node_id"]), []).append(str(label))
    views = []
    for n in cluster_nodes():
        m = n.get("metrics") or {}
        total = n.get("resources_total") or {}
        free = n.get("resources_available") or {}
        resources = {
            k: (max(0.0, v - free.get(k, 0.0)), v)
            for k, v in sorted(total.items())
            if k not in SKIP_RESOURCES
        }
        gpus = [
            GpuView(
                int(g.get("index", i)),
                str(g.get("name", "")),
                _num(g.get("utilization")),
                _num(g.get("memory_used")),
                _num(g.get("memory_total")),
            )
            for i, g in enumerate(m.get("gpus") or [])
        ]
        actors = actors_by_node.get(str(n["node_id"]), [])
        # "tasks_running" comes from the head's task table; "leases" (busy workers) otherwise.
        tasks = n.get("tasks_running", n.get("leases", 0))
        views.append(
            NodeView(
                node_id=str(n["node_id"]),
                name=str(n.get("name", "")),
                alive=bool(n.get("alive")),
                cpu_percent=_num(m.get("cpu_percent")),
                memory_used=_num(m.get("memory_used")),
                memory_total=_num(m.get("memory_total")),
                gpus=gpus,
                resources=resources,
                tasks=max(0, int(tasks or 0)),
                actors=len(actors),
                actor_names=actors,
            )
        )
    return views


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _pct(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return 100.0 * used / total


def resources_text(view: NodeView) -> str:
    return " · ".join(f"{k} {u:g}/{t:g}" for k, (u, t) in view.resources.items())


def snapshot_text(views: list[NodeView]) -> str:
    """The dashboard as plain text (its repr outside a notebook)."""
    lines = []
    for v in views:
        cpu = "?" if v.cpu_percent is None else f"{v.cpu_percent:.0f}%"
        mem = f"{_gib(v.memory_used)}/{_gib(v.memory_total)}"
        lines.append(
            f"{v.name} ({'alive' if v.alive else 'dead'}): CPU {cpu}, memory {mem}, "
            f"{resources_text(v)}, {v.tasks} tasks, {v.actors} actors"
        )
        for g in v.gpus:
            util = "?" if g.utilization is None else f"{g.utilization:.0f}%"
            lines.append(
                f"  GPU {g.index} {g.name}: {util}, {_gib(g.memory_used)}/{_gib(g.memory_total)}"
            )
    return "\n".join(lines)


class _Bar:
    """A labelled bar: ``CPU [#####     ] 42%``."""

    def __init__(self, label: str) -> None:
        self.label = w.Label(label, layout=w.Layout(width="95px"))
        self.bar = w.FloatProgress(min=0.0, max=100.0, layout=w.Layout(width="160px"))
        self.text = w.Label(layout=w.Layout(width="170px"))
        self.box = w.HBox([self.label, self.bar, self.text])

    def set(self, percent: float | None, text: str) -> None:
        self.bar.value = 0.0 if percent is None else min(100.0, max(0.0, percent))
        self.bar.bar_style = "danger" if (percent or 0) > 90 else "info"
        self.text.value = "n/a" if percent is None and not text else text


class _NodeRow:
    """The widgets of one node's row (kept and updated, so the view does not flicker)."""

    def __init__(self) -> None:
        self.title = w.HTML(layout=w.Layout(width="200px"))
        self.cpu = _Bar("CPU")
        self.mem = _Bar("memory")
        self.gpus: list[tuple[_Bar, _Bar]] = []
        self.bars = w.VBox([self.cpu.box, self.mem.box])
        self.info = w.HTML(layout=w.Layout(width="300px"))
        self.box = w.HBox([self.title, self.bars, self.info])

    def update(self, v: NodeView) -> None:
        state = "" if v.alive else ' <span style="color:#c00">(dead)</span>'
        self.title.value = f"<b>{html.escape(v.name)}</b>{state}<br><small>{v.node_id}</small>"
        cpu = v.cpu_percent
        self.cpu.set(cpu, "" if cpu is None else f"{cpu:.0f}%")
        mem = _pct(v.memory_used, v.memory_total)
        self.mem.set(mem, "" if mem is None else f"{_gib(v.memory_used)}/{_gib(v.memory_total)}")
        if len(self.gpus) != len(v.gpus):
            self.gpus = [(_Bar(f"GPU{g.index}"), _Bar(f"GPU{g.index} mem")) for g in v.gpus]
            children = [self.cpu.box, self.mem.box]
            for util, gmem in self.gpus:
                children += [util.box, gmem.box]
            self.bars.children = children
        for (util, gmem), g in zip(self.gpus, v.gpus, strict=True):
            util.set(g.utilization, "" if g.utilization is None else f"{g.utilization:.0f}%")
            pct = _pct(g.memory_used, g.memory_total)
            gmem.set(pct, "" if pct is None else f"{_gib(g.memory_used)}/{_gib(g.memory_total)}")
        actors = ", ".join(html.escape(a) for a in v.short_actor_names())
        self.info.value = (
            f"{html.escape(resources_text(v))}<br>"
            f"<b>{v.tasks}</b> running tasks · <b>{v.actors}</b> actors"
            + (f"<br><small>{actors}</small>" if actors else "")
        )


class Dashboard(w.VBox):  # type: ignore[misc]
    """The live cluster view made by :func:`nbcluster.dashboard`.

    A thread owned by the widget refreshes it every ``interval`` seconds; it stops when the
    widget is closed, when nbcluster shuts down, or when :data:`MAX_LIVE` newer dashboards run.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self.updates = 0  # refreshes done (tests and curious users)
        self._header = w.HTML()
        self._rows: dict[str, _NodeRow] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="nbcluster-dashboard", daemon=True)
        self._thread.start()
        with _live_lock:
            _live.append(self)
            while len(_live) > MAX_LIVE:
                _live.pop(0).stop()

    def refresh(self) -> None:
        """Fetch the cluster's state once and update the view."""
        views = snapshot()
        with self._lock:
            for v in views:
                row = self._rows.get(v.node_id)
                if row is None:
                    row = self._rows[v.node_id] = _NodeRow()
                row.update(v)
            alive = sum(v.alive for v in views)
            self._header.value = (
                f"<b>nbcluster</b> · {alive} node{'s' if alive != 1 else ''} alive · "
                f"{sum(v.tasks for v in views)} running tasks · "
                f"{sum(v.actors for v in views)} actors"
            )
            children = [self._header, *(self._rows[v.node_id].box for v in views)]
            if list(self.children) != children:  # type: ignore[has-type]
                self.children = children
            self.updates += 1
            self.summary_text = snapshot_text(views)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:
                if current.get() is None:
                    break  # disconnected: nothing more to show
        with _live_lock, contextlib.suppress(ValueError):
            _live.remove(self)

    @property
    def running(self) -> bool:
        """Whether the view still updates."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop updating; the view keeps its last state."""
        self._stop.set()

    def close(self) -> None:
        """Stop updating and remove the widget."""
        self.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        super().close()

    def __repr__(self) -> str:
        return f"nbcluster dashboard\n{getattr(self, 'summary_text', '')}"
