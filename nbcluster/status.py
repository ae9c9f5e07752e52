"""Plain-text views of a running cluster: what ``nbcluster status`` prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nbcluster.client import current


def cluster_nodes() -> list[dict[str, Any]]:
    """Every node with its latest ``metrics`` and counts of running tasks and actors.

    The head's panel view (the same data as ``GET /nbcluster/api/cluster``); from a head without
    it, the plain node list (no metrics: the views show n/a).
    """
    client = current.require()
    data = client.query("cluster")
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return list(data["nodes"])
    return [dict(n) for n in client.query("nodes")]


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned columns under a header and a rule."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [list(header), *cells]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def used(node: dict[str, Any], key: str) -> str:
    """``used/total`` of one resource of a node view, ``-`` when it has none."""
    total = float(node.get("resources_total", {}).get(key, 0.0))
    if not total:
        return "-"
    free = float(node.get("resources_available", {}).get(key, 0.0))
    return f"{total - free:g}/{total:g}"


def other_resources(node: dict[str, Any]) -> str:
    """A node view's custom resources as ``name used/total`` (``-`` when it has none)."""
    names = sorted(k for k in node.get("resources_total", {}) if k not in _BUILTIN)
    return ", ".join(f"{k} {used(node, k)}" for k in names) or "-"


def _owner(o: dict[str, Any] | None) -> str:
    o = o or {}
    return str(o.get("notebook") or o.get("kernel_id") or o.get("job_id") or "-")


def _short(node_id: object, names: dict[str, str]) -> str:
    return names.get(str(node_id), str(node_id or "-"))


def status_report(
    cluster: dict[str, Any], tasks: list[dict[str, Any]], actors: list[dict[str, Any]]
) -> str:
    """Nodes with their resources, then running/queued tasks and live actors."""
    nodes = cluster.get("nodes", [])
    names = {str(n["node_id"]): str(n.get("name") or n["node_id"]) for n in nodes}
    node_rows = []
    for n in nodes:
        node_rows.append(
            [
                n.get("name", ""),
                n["node_id"],
                n.get("address", ""),
                n.get("state") or ("alive" if n.get("alive") else "dead"),
                used(n, "CPU"),
                used(n, "GPU"),
                other_resources(n),
                n.get("tasks_running", "-"),
                n.get("actors", "-"),
            ]
        )
    out = [
        f"head {cluster.get('head', {}).get('address', '?')}: {len(nodes)} node(s)",
        table(
            node_rows,
            ["NODE", "ID", "ADDRESS", "STATE", "CPU", "GPU", "OTHER", "TASKS", "ACTORS"],
        ),
    ]
    active = [t for t in tasks if t.get("state") in ("running", "queued", "infeasible")]
    out.append(f"\n{len(active)} task(s) running or waiting")
    if active:
        out.append(
            table(
                [
                    [
                        t.get("name", ""),
                        t.get("state", "")
                        + (f" (needs {t['missing']})" if t.get("missing") else ""),
                        _short(t.get("node_id"), names),
                        _owner(t.get("owner")),
                    ]
                    for t in active
                ],
                ["TASK", "STATE", "NODE", "OWNER"],
            )
        )
    live = [a for a in actors if str(a.get("state", "")).lower() != "dead"]
    out.append(f"\n{len(live)} actor(s)")
    if live:
        out.append(
            table(
                [
                    [
                        a.get("class_name", ""),
                        a.get("name") or "-",
                        str(a.get("state", "")).lower(),
                        _short(a.get("node_id"), names),
                        a.get("pid") or "-",
                        _owner(a.get("owner")),
                    ]
                    for a in live
                ],
                ["ACTOR", "NAME", "STATE", "NODE", "PID", "OWNER"],
            )
        )
    return "\n".join(out)
