"""``ray.util.state``: list the cluster's tasks, actors, nodes, objects, with Ray's field names.

Tasks, actors and nodes come from the head's views (:mod:`nbcluster.views`, the same the
JupyterLab panel shows); objects from what this process knows (small values, pending ones) and
from what the nodes' stores hold (the head asks the agents: ``nbcluster memory``'s listing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nbcluster.api import _client
from nbcluster.client.objects import FAILED, PENDING, READY
from nbcluster.refs import hex_id
from nbcluster.util.logs import get_log

__all__ = [
    "StateRecord",
    "get_log",
    "list_actors",
    "list_nodes",
    "list_objects",
    "list_placement_groups",
    "list_tasks",
    "summarize_tasks",
]

#: Ray's default ``limit``.
DEFAULT_LIMIT = 100

# Our task states -> Ray's (an infeasible task waits for a node, as in Ray's listing).
_TASK_STATES = {
    "queued": "PENDING_NODE_ASSIGNMENT",
    "infeasible": "PENDING_NODE_ASSIGNMENT",
    "running": "RUNNING",
    "finished": "FINISHED",
    "failed": "FAILED",
    "cancelled": "FAILED",
}
_ACTOR_STATES = {
    "pending": "PENDING_CREATION",
    "alive": "ALIVE",
    "restarting": "RESTARTING",
    "dead": "DEAD",
}
_OBJECT_STATES = {PENDING: "PENDING", READY: "FINISHED", FAILED: "FAILED"}

Filter = tuple[str, str, Any]


class StateRecord(dict[str, Any]):
    """One listed entity: a dict with Ray's keys, also readable as attributes (``t.state``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _ms(t: float | None) -> int | None:
    return None if t is None else int(t * 1000)


def _task(t: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_id": t["task_id"],
        "name": t["name"],
        "state": _TASK_STATES.get(t["state"], str(t["state"]).upper()),
        "job_id": t["owner"]["job_id"],
        "node_id": t["node_id"],
        "actor_id": None,
        "type": "NORMAL_TASK",
        "func_or_class_name": t["name"],
        "required_resources": dict(t["resources"]),
        "error_type": "TASK_CANCELLED" if t["state"] == "cancelled" else None,
        "creation_time_ms": _ms(t["submitted_at"]),
        "start_time_ms": _ms(t["started_at"]),
        "end_time_ms": _ms(t["ended_at"]),
        "placement_group_id": None,
        "attempt_number": 0,
        "language": "PYTHON",
        "infeasible_resources": t["missing"],  # nbcluster's: what no node has enough of
    }


def _actor(a: dict[str, Any]) -> dict[str, Any]:
    return {
        "actor_id": a["actor_id"],
        "class_name": a["class_name"],
        "state": _ACTOR_STATES.get(a["state"], str(a["state"]).upper()),
        "job_id": a["job_id"],
        "name": a["name"] or "",
        "node_id": a["node_id"],
        "pid": a["pid"],
        "ray_namespace": a["namespace"],
        "required_resources": dict(a["resources"]),
        "is_detached": a["detached"],
        "num_restarts": a["restarts"],
        "death_cause": a["death_reason"],
        "placement_group_id": None,
        "repr_name": "",
    }


def _node(n: dict[str, Any]) -> dict[str, Any]:
    host = str(n["address"]).rsplit(":", 1)[0].removeprefix("tcp://")
    return {
        "node_id": n["node_id"],
        "node_ip": host,
        "node_name": n["name"],
        "state": "ALIVE" if n["alive"] else "DEAD",
        "is_head_node": False,  # the head runs no tasks here: it is not a node
        "resources_total": dict(n["resources_total"]),
        "labels": dict(n.get("labels") or {}),
    }


def _group(g: dict[str, Any]) -> dict[str, Any]:
    return {
        "placement_group_id": g["placement_group_id"],
        "name": g["name"],
        "creator_job_id": g["job_id"],
        "state": g["state"],
        "is_detached": g["detached"],
        "bundles": [
            {"bundle_id": b["index"], "node_id": b["node_id"], "unit_resources": b["resources"]}
            for b in g["bundles"]
        ],
        "stats": {"scheduling_state": "INFEASIBLE" if g["infeasible"] else g["state"]},
    }


def _size(frames: Sequence[Any]) -> int | None:
    total = 0
    for f in frames:
        n = getattr(f, "nbytes", None)
        if n is None:
            try:
                n = len(f)
            except TypeError:
                return None
        total += int(n)
    return total


def _objects(limit: int) -> list[dict[str, Any]]:
    """This process's objects, then the other stored objects of the cluster (the ``limit``
    largest of each node); a stored object also gets its ``node_id`` and ``store_state``."""
    from nbcluster.status import memory_view
    from nbcluster.views import MEMORY_LIMIT_MAX

    stored = {o.object_id: o for o in memory_view(max(1, min(limit, MEMORY_LIMIT_MAX))).objects}
    rows = _own_objects()
    for row in rows:
        o = stored.pop(row["object_id"], None)
        row["node_id"] = o.node_id if o is not None else None
        row["store_state"] = o.state if o is not None else None
    return rows + [
        {
            "object_id": o.object_id,
            "object_size": o.size,
            "task_status": "FINISHED" if o.state != "writing" else "PENDING",
            "reference_type": "LOCAL_REFERENCE",  # (held by its owner, another process)
            "owned": False,
            "owner_address": "",
            "type": "DRIVER" if o.owner.job_id else "",
            "ip": "",
            "pid": None,
            "call_site": "disabled",
            "node_id": o.node_id,
            "store_state": o.state,
        }
        for o in stored.values()
    ]


def _own_objects() -> list[dict[str, Any]]:
    client = _client()
    table = client.objects
    # The client's object table has no public snapshot of every entry yet.
    with table.lock:
        entries = list(table._entries.values())
    return [
        {
            "object_id": hex_id(e.oid),  # as ref.hex()
            "object_size": _size(e.frames) if e.state != PENDING else None,
            "task_status": _OBJECT_STATES.get(e.state, "UNKNOWN"),
            "reference_type": "LOCAL_REFERENCE" if e.refs > 0 else "USED_BY_PENDING_TASK",
            "owned": e.owned,
            "owner_address": client.owner_address if e.owned else e.owner,
            "type": "DRIVER",
            "ip": "",
            "pid": None,
            "call_site": "disabled",
        }
        for e in entries
    ]


def _check_filters(filters: Iterable[Filter] | None, columns: Iterable[str]) -> list[Filter]:
    valid = set(columns)
    checked = []
    for f in filters or ():
        if not isinstance(f, tuple | list) or len(f) != 3:
            raise ValueError(f"a filter is (key, predicate, value), got {f!r}")
        key, op, value = f
        if key not in valid:
            raise ValueError(
                f"Given filter column {key} is not supported. "
                f"Supported filter columns: {sorted(valid)}"
            )
        if op not in ("=", "!="):
            raise ValueError(f"Unsupported filter predicate {op!r}: use '=' or '!='")
        checked.append((str(key), str(op), value))
    return checked


def _matches(row: dict[str, Any], filters: list[Filter]) -> bool:
    for key, op, value in filters:
        have = row.get(key)
        # Values compare as strings, states without regard to case (Ray's filters are strings).
        a, b = str(have), str(value)
        if key == "state":
            a, b = a.upper(), b.upper()
        if (a == b) != (op == "="):
            return False
    return True


_BRIEF = {
    "task": ("task_id", "name", "state", "job_id", "node_id", "actor_id", "type",
             "func_or_class_name", "error_type", "attempt_number"),
    "actor": ("actor_id", "class_name", "state", "job_id", "name", "node_id", "pid",
              "ray_namespace"),
    "node": ("node_id", "node_ip", "node_name", "state", "is_head_node", "resources_total",
             "labels"),
    "object": ("object_id", "object_size", "task_status", "reference_type", "owned", "type",
               "ip", "pid", "call_site"),
    "placement_group": ("placement_group_id", "name", "creator_job_id", "state"),
}  # fmt: skip


def _list(
    kind: str,
    rows: Callable[[], list[dict[str, Any]]],
    columns: Sequence[str],
    filters: Iterable[Filter] | None,
    limit: int,
    detail: bool,
) -> list[StateRecord]:
    checked = _check_filters(filters, columns)
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    out: list[StateRecord] = []
    for row in rows():
        if not _matches(row, checked):
            continue
        if len(out) >= limit:
            break
        keep = row if detail else {k: row[k] for k in _BRIEF[kind]}
        out.append(StateRecord(keep))
    return out


_TASK_COLUMNS = tuple(_task({"task_id": "", "name": "", "state": "queued", "owner": {"job_id": ""},
                             "node_id": None, "resources": {}, "submitted_at": 0.0,
                             "started_at": None, "ended_at": None, "missing": None}))  # fmt: skip
_ACTOR_COLUMNS = tuple(_actor({"actor_id": "", "class_name": "", "state": "alive", "job_id": "",
                               "name": None, "node_id": None, "pid": None, "namespace": "",
                               "resources": {}, "detached": False, "restarts": 0,
                               "death_reason": None}))  # fmt: skip
_NODE_COLUMNS = tuple(_node({"node_id": "", "address": "", "name": "", "alive": True,
                             "resources_total": {}}))  # fmt: skip
_OBJECT_COLUMNS = _BRIEF["object"] + ("owner_address", "node_id", "store_state")
_GROUP_COLUMNS = _BRIEF["placement_group"] + ("is_detached",)


def list_tasks(
    address: str | None = None,
    filters: list[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = 30,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    exclude_driver: bool = True,
) -> list[StateRecord]:
    """Tasks the head knows: the active ones, then the recently ended ones.

    Parameters
    ----------
    filters
        ``[(key, "=" | "!=", value)]``, e.g. ``[("state", "=", "RUNNING")]``; every filter must
        hold. States use Ray's names (``PENDING_NODE_ASSIGNMENT``, ``RUNNING``, ``FINISHED``,
        ``FAILED``).
    limit
        At most this many records.
    detail
        Every field (else Ray's default columns).
    address, timeout, raise_on_missing_output, exclude_driver
        Accepted for Ray compatibility (the current cluster is asked; actor calls are not
        listed: the head does not see them).

    Raises
    ------
    ValueError
        For an unknown filter column or predicate.
    """
    return _list(
        "task",
        lambda: [_task(t) for t in _client().query("tasks")],
        _TASK_COLUMNS,
        filters,
        limit,
        detail,
    )


def list_actors(
    address: str | None = None,
    filters: list[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = 30,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[StateRecord]:
    """Every actor the head knows (dead ones too); arguments as :func:`list_tasks`.

    States: ``PENDING_CREATION``, ``ALIVE``, ``RESTARTING``, ``DEAD``.
    """
    return _list(
        "actor",
        lambda: [_actor(a) for a in _client().query("actors")],
        _ACTOR_COLUMNS,
        filters,
        limit,
        detail,
    )


def list_nodes(
    address: str | None = None,
    filters: list[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = 30,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[StateRecord]:
    """Every node (``ALIVE`` or ``DEAD``); arguments as :func:`list_tasks`."""
    return _list(
        "node",
        lambda: [_node(n) for n in _client().query("nodes")],
        _NODE_COLUMNS,
        filters,
        limit,
        detail,
    )


def list_objects(
    address: str | None = None,
    filters: list[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = 30,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[StateRecord]:
    """The objects this process knows (owned or borrowed), then every other object the nodes'
    stores hold (the ``limit`` largest of each node).

    The head keeps no table of objects: each is known by its owner, and a stored one by its
    node's store too, whose agent the head asks (as ``nbcluster memory`` does). Small values
    of other processes (sent inline, never stored) are not listed. ``task_status`` is
    ``PENDING``, ``FINISHED`` or ``FAILED``; ``object_size`` is in bytes (``None`` while
    pending); with ``detail``, a stored object has its ``node_id`` and ``store_state``
    (``in_memory``, ``spilled``, ``writing``). Arguments as :func:`list_tasks`.
    """
    return _list("object", lambda: _objects(limit), _OBJECT_COLUMNS, filters, limit, detail)


def list_placement_groups(
    address: str | None = None,
    filters: list[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = 30,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[StateRecord]:
    """Placement groups (:mod:`nbcluster.util.placement_group`), the newest removed ones
    included; ``state`` is ``PENDING``, ``CREATED``, ``RESCHEDULING`` or ``REMOVED``. With
    ``detail``: ``bundles`` (``bundle_id``, ``node_id``, ``unit_resources``), ``is_detached``,
    ``stats``. Arguments as :func:`list_tasks`."""
    return _list(
        "placement_group",
        lambda: [_group(g) for g in _client().query("placement_groups") or []],
        _GROUP_COLUMNS,
        filters,
        limit,
        detail,
    )


def summarize_tasks(
    address: str | None = None,
    timeout: int = 30,
    raise_on_missing_output: bool = True,
) -> dict[str, Any]:
    """Tasks counted by function name and state, in Ray's shape.

    Returns
    -------
    dict
        ``{"cluster": {"summary": {name: {"func_or_class_name", "type", "state_counts"}},
        "total_tasks", "total_actor_tasks", "total_actor_scheduled", "summary_by"}}``.
    """
    summary: dict[str, dict[str, Any]] = {}
    tasks = list_tasks(limit=10**9)
    for t in tasks:
        entry = summary.setdefault(
            t["func_or_class_name"],
            {"func_or_class_name": t["func_or_class_name"], "type": t["type"], "state_counts": {}},
        )
        counts = entry["state_counts"]
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return {
        "cluster": {
            "summary": summary,
            "total_tasks": len(tasks),
            "total_actor_tasks": 0,
            "total_actor_scheduled": 0,
            "summary_by": "func_name",
        }
    }
