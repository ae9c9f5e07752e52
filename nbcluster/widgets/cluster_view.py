"""The live cluster dashboard: one row per node with CPU, memory, GPU bars, resources, work."""

from __future__ import annotations

import contextlib
import html
import threading
from dataclasses import dataclass, field

import ipywidgets as w

from nbcluster.client import current
from nbcluster.status import actor_views, cluster_nodes, gib
from nbcluster.views import NodeView

#: Dashboards that keep updating at once; making another freezes the oldest (a re-run cell's
#: old output is never closed by the frontend, so its thread would otherwise run forever).
MAX_LIVE = 4
_live: list[Dashboard] = []
_live_lock = threading.Lock()

SKIP_RESOURCES = ("memory", "object_store_memory")


@dataclass
class Snapshot:
    """What the dashboard shows: every node, and the names of the alive actors on each."""

    nodes: list[NodeView]
    actor_names: dict[str, list[str]] = field(default_factory=dict)

    def actors_on(self, node_id: str) -> list[str]:
        """Up to five actor names of a node, and how many more there are."""
        names = self.actor_names.get(node_id, [])
        more = len(names) - 5
        return names[:5] + ([f"+{more} more"] if more > 0 else [])


def snapshot() -> Snapshot:
    """The cluster as the dashboard shows it (the views of :mod:`nbcluster.status`)."""
    actor_names: dict[str, list[str]] = {}
    for a in actor_views():
        if a.state == "alive" and a.node_id:
            actor_names.setdefault(a.node_id, []).append(a.name or a.class_name or "actor")
    return Snapshot(cluster_nodes(), actor_names)


def resources(node: NodeView) -> dict[str, tuple[float, float]]:
    """A node's resources as ``name -> (used, total)``, memory ones left out (they have bars)."""
    free = node.resources_available
    return {
        k: (max(0.0, v - free.get(k, 0.0)), v)
        for k, v in sorted(node.resources_total.items())
        if k not in SKIP_RESOURCES
    }


def _pct(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return 100.0 * used / total


def resources_text(node: NodeView) -> str:
    return " · ".join(f"{k} {u:g}/{t:g}" for k, (u, t) in resources(node).items())


def snapshot_text(snap: Snapshot) -> str:
    """The dashboard as plain text (its repr outside a notebook)."""
    lines = []
    for n in snap.nodes:
        m = n.metrics
        cpu = "?" if m is None else f"{m.cpu_percent:.0f}%"
        mem = "?" if m is None else f"{gib(m.memory_used, ' GiB')}/{gib(m.memory_total, ' GiB')}"
        lines.append(
            f"{n.name} ({n.state}): CPU {cpu}, memory {mem}, "
            f"{resources_text(n)}, {n.tasks_running} tasks, {n.actors} actors"
        )
        for g in m.gpus if m is not None else []:
            lines.append(
                f"  GPU {g.index} {g.name}: {g.utilization:.0f}%, "
                f"{gib(g.memory_used, ' GiB')}/{gib(g.memory_total, ' GiB')}"
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

    def update(self, n: NodeView, actor_names: list[str]) -> None:
        state = "" if n.alive else ' <span style="color:#c00">(dead)</span>'
        self.title.value = f"<b>{html.escape(n.name)}</b>{state}<br><small>{n.node_id}</small>"
        m = n.metrics
        if m is None:
            self.cpu.set(None, "")
            self.mem.set(None, "")
        else:
            self.cpu.set(m.cpu_percent, f"{m.cpu_percent:.0f}%")
            mem = _pct(m.memory_used, m.memory_total)
            text = f"{gib(m.memory_used, ' GiB')}/{gib(m.memory_total, ' GiB')}"
            self.mem.set(mem, "" if mem is None else text)
        gpus = m.gpus if m is not None else []
        if len(self.gpus) != len(gpus):
            self.gpus = [(_Bar(f"GPU{g.index}"), _Bar(f"GPU{g.index} mem")) for g in gpus]
            children = [self.cpu.box, self.mem.box]
            for util, gmem in self.gpus:
                children += [util.box, gmem.box]
            self.bars.children = children
        for (util, gmem), g in zip(self.gpus, gpus, strict=True):
            util.set(g.utilization, f"{g.utilization:.0f}%")
            pct = _pct(g.memory_used, g.memory_total)
            text = f"{gib(g.memory_used, ' GiB')}/{gib(g.memory_total, ' GiB')}"
            gmem.set(pct, "" if pct is None else text)
        actors = ", ".join(html.escape(a) for a in actor_names)
        self.info.value = (
            f"{html.escape(resources_text(n))}<br>"
            f"<b>{n.tasks_running}</b> running tasks · <b>{n.actors}</b> actors"
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
        snap = snapshot()
        with self._lock:
            for n in snap.nodes:
                row = self._rows.get(n.node_id)
                if row is None:
                    row = self._rows[n.node_id] = _NodeRow()
                row.update(n, snap.actors_on(n.node_id))
            alive = sum(n.alive for n in snap.nodes)
            self._header.value = (
                f"<b>nbcluster</b> · {alive} node{'s' if alive != 1 else ''} alive · "
                f"{sum(n.tasks_running for n in snap.nodes)} running tasks · "
                f"{sum(n.actors for n in snap.nodes)} actors"
            )
            children = [self._header, *(self._rows[n.node_id].box for n in snap.nodes)]
            if list(self.children) != children:  # type: ignore[has-type]
                self.children = children
            self.updates += 1
            self.summary_text = snapshot_text(snap)

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
