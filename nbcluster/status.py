"""The cluster's views as a driver gets them, and their plain-text tables.

The head answers ``query("cluster" | "tasks" | "actors")`` with the views of
:mod:`nbcluster.views` (the same as the Jupyter REST API); :func:`cluster_view` and friends decode
them back into those classes. ``nbcluster status`` prints :func:`status_report`,
``%nbcluster status`` prints :func:`nodes_text`, the dashboard widget draws the same views.
``nbcluster memory`` prints :func:`memory_text` of :func:`memory_view` (the head asks each node's
agent what its store holds: :mod:`nbcluster.head.memory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

from nbcluster.client import current
from nbcluster.exceptions import ProtocolError
from nbcluster.views import (
    ACTIVE_TASK_STATES,
    ActorView,
    ClusterView,
    MemoryBody,
    NodeView,
    OwnerView,
    TaskCountView,
    TaskView,
)

_T = TypeVar("_T")


def _ask(what: str, tp: type[_T]) -> _T:
    data = current.require().query(what)
    try:
        return msgspec.convert(data, tp)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"the head's {what!r} view is malformed: {exc}") from None


def cluster_view() -> ClusterView:
    """The head, every node with its latest metrics and work, and the totals."""
    return _ask("cluster", ClusterView)


def cluster_nodes() -> list[NodeView]:
    """Every node (dead ones too) with its latest ``metrics`` and its running tasks and actors."""
    return cluster_view().nodes


def task_views() -> list[TaskView]:
    """Active tasks, then the recently ended ones."""
    return _ask("tasks", list[TaskView])


def task_count_views() -> list[TaskCountView]:
    """Active tasks counted instead of listed (beyond what each driver lists one by one)."""
    return _ask("task_counts", list[TaskCountView])


def actor_views() -> list[ActorView]:
    """Every actor the head knows, dead ones too."""
    return _ask("actors", list[ActorView])


def memory_view(limit: int | None = None, timeout: float = 15.0) -> MemoryBody:
    """Every alive node's largest stored objects (at most ``limit``, default 100), largest
    first, with their owner, node, size and state, and each node's store figures.

    Small values (up to :data:`~nbcluster.store.INLINE_THRESHOLD_BYTES`) travel inside messages
    and are not in any store: they are not listed.
    """
    args = {} if limit is None else {"limit": limit}
    data = current.require().query_args("memory", timeout, **args)
    try:
        return msgspec.convert(data, MemoryBody)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"the head's 'memory' view is malformed: {exc}") from None


def size_text(n: int) -> str:
    """Bytes with a binary unit (``512 B``, ``1.5 MiB``)."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def memory_text(body: MemoryBody) -> str:
    """The ``nbcluster memory`` report: one line per node's store, then its objects."""
    nodes = [
        [
            n.name,
            n.node_id,
            n.objects,
            size_text(n.used),
            size_text(n.capacity),
            size_text(n.spilled),
            n.error or "",
        ]
        for n in body.nodes
    ]
    objects = [
        [o.object_id, size_text(o.size), o.node_name, owner_label(o.owner), o.state, o.pins]
        for o in body.objects
    ]
    shown = f"{len(body.objects)} largest object(s) (--limit {body.limit})"
    return "\n".join(
        [
            table(nodes, ["NODE", "ID", "OBJECTS", "IN MEMORY", "CAPACITY", "SPILLED", "ERROR"]),
            "",
            shown,
            table(objects, ["OBJECT ID", "SIZE", "NODE", "OWNER", "STATE", "PINS"]),
        ]
    )


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned columns under a header and a rule."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [list(header), *cells]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


#: Resources every node has, shown in columns of their own (or not at all).
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def used(node: NodeView, key: str) -> str:
    """``used/total`` of one resource of a node, ``-`` when it has none."""
    total = node.resources_total.get(key, 0.0)
    if not total:
        return "-"
    return f"{total - node.resources_available.get(key, 0.0):g}/{total:g}"


def other_resources(node: NodeView) -> str:
    """A node's custom resources as ``name used/total`` (``-`` when it has none)."""
    names = sorted(k for k in node.resources_total if k not in BUILTIN_RESOURCES)
    return ", ".join(f"{k} {used(node, k)}" for k in names) or "-"


def gib(n: float | None, unit: str = "G") -> str:
    """Bytes as GiB with one decimal (``-`` for unknown)."""
    return "-" if n is None else f"{n / 2**30:.1f}{unit}"


def owner_label(o: OwnerView) -> str:
    """A job as people know it: its notebook, else its kernel, else its id."""
    return o.notebook or o.kernel_id or o.job_id or "-"


def nodes_text(nodes: list[NodeView]) -> str:
    """The ``%nbcluster status`` table: one row per node, then one per GPU with metrics."""
    rows: list[list[Any]] = []
    gpu_rows: list[list[Any]] = []
    for n in nodes:
        m = n.metrics
        rows.append(
            [
                n.name,
                n.state,
                used(n, "CPU"),
                "-" if m is None else f"{m.cpu_percent:.0f}%",
                used(n, "GPU"),
                "-" if m is None else f"{gib(m.memory_used)}/{gib(m.memory_total)}",
                other_resources(n),
            ]
        )
        for g in m.gpus if m is not None else []:
            gpu_rows.append(
                [
                    n.name,
                    g.index,
                    g.name,
                    f"{g.utilization:.0f}%",
                    f"{gib(g.memory_used)}/{gib(g.memory_total)}",
                ]
            )
    text = table(rows, ["node", "state", "CPU used", "CPU %", "GPU used", "memory", "resources"])
    if gpu_rows:
        text += "\n\n" + table(gpu_rows, ["node", "GPU", "name", "util", "memory"])
    return text


def status_report(
    cluster: ClusterView,
    tasks: list[TaskView],
    actors: list[ActorView],
    counts: Sequence[TaskCountView] = (),
) -> str:
    """Nodes with their resources, then running/queued tasks and live actors (``counts``: the
    active tasks counted, not listed, one row per function and state)."""
    names = {n.node_id: n.name or n.node_id for n in cluster.nodes}

    def node_name(node_id: str | None) -> str:
        return names.get(node_id, node_id) if node_id else "-"

    node_rows = [
        [
            n.name,
            n.node_id,
            n.address,
            n.state,
            used(n, "CPU"),
            used(n, "GPU"),
            other_resources(n),
            n.tasks_running,
            n.actors,
        ]
        for n in cluster.nodes
    ]
    out = [
        f"head {cluster.head.address or '?'}: {len(cluster.nodes)} node(s)",
        table(
            node_rows,
            ["NODE", "ID", "ADDRESS", "STATE", "CPU", "GPU", "OTHER", "TASKS", "ACTORS"],
        ),
    ]
    active = [t for t in tasks if t.state in ACTIVE_TASK_STATES]
    counted = sum(c.count for c in counts)
    out.append(f"\n{len(active) + counted} task(s) running or waiting")
    if active or counts:
        out.append(
            table(
                [
                    [
                        t.name,
                        t.state + (f" (needs {t.missing})" if t.missing else ""),
                        node_name(t.node_id),
                        owner_label(t.owner),
                    ]
                    for t in active
                ]
                + [
                    [f"{c.name} (x{c.count})", c.state, node_name(c.node_id), owner_label(c.owner)]
                    for c in counts
                ],
                ["TASK", "STATE", "NODE", "OWNER"],
            )
        )
    live = [a for a in actors if a.state != "dead"]
    out.append(f"\n{len(live)} actor(s)")
    if live:
        out.append(
            table(
                [
                    [
                        a.class_name,
                        a.name or "-",
                        a.state,
                        node_name(a.node_id),
                        a.pid or "-",
                        owner_label(a.owner),
                    ]
                    for a in live
                ],
                ["ACTOR", "NAME", "STATE", "NODE", "PID", "OWNER"],
            )
        )
    return "\n".join(out)
