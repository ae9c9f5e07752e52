"""``ray.util.placement_group``: reserve bundles of resources across nodes, all or nothing.

A placement group reserves its bundles (``{"CPU": 1, "GPU": 1}``, ...) atomically on nodes
chosen by its strategy; tasks and actors then run in it with
:class:`~nbcluster.util.scheduling_strategies.PlacementGroupSchedulingStrategy`, out of the
resources a bundle holds, which nothing else can use. The head does the placing
(:mod:`nbcluster.head.placement`); this module is Ray's API over its requests.

Strategies, as in Ray: ``PACK`` (as few nodes as possible, best effort), ``STRICT_PACK`` (one
node), ``SPREAD`` (different nodes, best effort), ``STRICT_SPREAD`` (each bundle on a different
node, or not at all).
"""

from __future__ import annotations

import secrets
from typing import Any

from nbcluster.client import current
from nbcluster.context import current_task
from nbcluster.exceptions import TaskUnschedulableError
from nbcluster.protocol.messages import Kind
from nbcluster.refs import ObjectRef

__all__ = [
    "PlacementGroup",
    "PlacementGroupID",
    "get_current_placement_group",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]

_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementGroupID(str):
    """A placement group's id: a hex string, with Ray's ``hex()``."""

    __slots__ = ()

    def hex(self) -> str:
        """The id as a hex string (Ray's ``PlacementGroupID.hex()``)."""
        return str(self)


class PlacementGroup:
    """A handle to a placement group (picklable: pass it to tasks and actors).

    Parameters
    ----------
    id
        The group's id.
    bundle_specs
        Its bundles (resource name -> amount), as created.
    """

    def __init__(self, id: str, bundle_specs: list[dict[str, float]] | None = None) -> None:
        self._id = PlacementGroupID(id)
        self._bundles = [dict(b) for b in bundle_specs or []]

    @property
    def id(self) -> PlacementGroupID:
        """The group's id."""
        return self._id

    @property
    def bundle_specs(self) -> list[dict[str, float]]:
        """The bundles, as created (a copy)."""
        if not self._bundles:
            self._bundles = _bundles_of(self._table_row())
        return [dict(b) for b in self._bundles]

    @property
    def bundle_count(self) -> int:
        """The number of bundles."""
        return len(self.bundle_specs)

    @property
    def is_empty(self) -> bool:
        return not self._id

    def ready(self) -> ObjectRef:
        """A ref that resolves (to this group) once every bundle is reserved, as in Ray.

        Use it with ``nbcluster.get(pg.ready(), timeout=...)``, ``nbcluster.wait``, ``await``
        or as a task's argument. Its ``get`` raises
        :class:`~nbcluster.exceptions.TaskUnschedulableError` if the group is removed first
        (or the head restarted and forgot it). No worker is involved: the head answers.
        """
        client = current.require()
        pg_id = str(self._id)

        async def placed() -> PlacementGroup:
            reply = await client.io.request({"k": Kind.PG_WAIT, "pg_id": pg_id}, None)
            if not isinstance(reply, dict) or reply.get("error"):
                why = reply.get("error") if isinstance(reply, dict) else "no answer"
                raise TaskUnschedulableError(f"placement group {pg_id} is not ready: {why}")
            return self

        return client.ref_from(placed())

    def wait(self, timeout_seconds: float = 30) -> bool:
        """Wait up to ``timeout_seconds`` for the group to be placed; ``True`` if it is,
        ``False`` when the time is up or the group was removed."""
        if timeout_seconds < 0:
            raise ValueError(f"timeout_seconds must be >= 0, got {timeout_seconds!r}")
        header = {"k": Kind.PG_WAIT, "pg_id": str(self._id), "timeout": float(timeout_seconds)}
        reply = current.require().request(header, float(timeout_seconds) + 10.0)
        return isinstance(reply, dict) and reply.get("ready") is True

    def _table_row(self) -> dict[str, Any]:
        row = _rows().get(str(self._id))
        if row is None:
            raise ValueError(f"placement group {self._id} is unknown to the head")
        return row

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"PlacementGroup(id={self._id!s}, bundles={self._bundles})"


def placement_group(
    bundles: list[dict[str, float]],
    strategy: str = "PACK",
    name: str = "",
    lifetime: str | None = None,
    _max_cpu_fraction_per_node: float = 1.0,
    _soft_target_node_id: str | None = None,
    bundle_label_selector: list[dict[str, str]] | None = None,
) -> PlacementGroup:
    """Reserve ``bundles`` on the cluster, all or nothing; returns at once (see ``ready()``).

    Parameters
    ----------
    bundles
        A list of resource mappings (``[{"CPU": 1, "GPU": 1}] * 4``); each is reserved on one
        node. ``num_cpus``-style keys are not used here: ``CPU``, ``GPU``, ``memory`` and custom
        resources.
    strategy
        ``PACK`` (default), ``SPREAD``, ``STRICT_PACK`` or ``STRICT_SPREAD``.
    name
        A name to find it by (:func:`get_placement_group`), unique in the job's namespace.
    lifetime
        ``None``: removed when the job that created it ends; ``"detached"``: lives until
        removed.
    _max_cpu_fraction_per_node, _soft_target_node_id, bundle_label_selector
        Accepted for Ray's code and not used.

    Raises
    ------
    ValueError
        For an invalid bundle, strategy or lifetime, or a name already taken (the head's
        message).
    """
    if not isinstance(bundles, list | tuple) or not bundles:
        raise ValueError(f"bundles must be a non-empty list of dicts, got {bundles!r}")
    for b in bundles:
        if not isinstance(b, dict) or not b:
            raise ValueError(
                f"each bundle must be a non-empty dict of resources, got {b!r} in {bundles!r}"
            )
    if strategy not in _STRATEGIES:
        raise ValueError(
            f"invalid placement group strategy {strategy!r}: use one of {', '.join(_STRATEGIES)}"
        )
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    client = current.require()
    pg_id = secrets.token_hex(18)  # Ray's 18-byte ids; chosen here so a resend creates one
    specs = [{str(k): float(v) for k, v in b.items()} for b in bundles]
    reply = client.request(
        {
            "k": Kind.PG_CREATE,
            "pg_id": pg_id,
            "bundles": specs,
            "strategy": strategy,
            "name": name,
            "ns": client.namespace,
            "detached": lifetime == "detached",
        }
    )
    error = reply.get("error") if isinstance(reply, dict) else "no answer from the head"
    if error:
        raise ValueError(f"cannot create the placement group: {error}")
    return PlacementGroup(pg_id, specs)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Remove a group: its actors die (``ActorDiedError``), its tasks' workers are killed,
    tasks still waiting for it fail, and its resources are freed. Removing it twice is fine."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"expected a PlacementGroup, got {placement_group!r}")
    current.require().request({"k": Kind.PG_REMOVE, "pg_id": str(placement_group.id)})


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live group named so in this job's namespace.

    Raises
    ------
    ValueError
        If there is none.
    """
    ns = current.require().namespace
    for row in _rows().values():
        if (
            row["name"] == placement_group_name
            and row["namespace"] == ns
            and row["state"] != "REMOVED"
        ):
            return PlacementGroup(row["placement_group_id"], _bundles_of(row))
    raise ValueError(f"Failed to look up placement group with name: {placement_group_name}")


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict[str, Any]:
    """Ray's table: one group's record, or every group's by id.

    A record has ``placement_group_id``, ``name``, ``bundles`` (index -> resources),
    ``bundles_to_node_id`` (index -> node id, placed bundles only), ``strategy``, ``state``
    (``PENDING``, ``CREATED``, ``RESCHEDULING``, ``REMOVED``) and ``stats``.
    """
    rows = _rows()
    if placement_group is not None:
        row = rows.get(str(placement_group.id))
        return _ray_row(row) if row is not None else {}
    return {pg_id: _ray_row(row) for pg_id, row in rows.items()}


def get_current_placement_group() -> PlacementGroup | None:
    """The group the calling task or actor runs in (``None`` in a driver or outside groups)."""
    task = current_task.get()  # the call's TASK (or the actor's ACTOR_INIT) named its group
    if task is None or task.placement_group is None:
        return None
    return PlacementGroup(task.placement_group)


def _rows() -> dict[str, dict[str, Any]]:
    views = current.require().query("placement_groups") or []
    return {str(v["placement_group_id"]): v for v in views}


def _bundles_of(row: dict[str, Any]) -> list[dict[str, float]]:
    return [dict(b["resources"]) for b in row["bundles"]]


def _ray_row(row: dict[str, Any]) -> dict[str, Any]:
    bundles = row["bundles"]
    return {
        "placement_group_id": row["placement_group_id"],
        "name": row["name"],
        "bundles": {b["index"]: dict(b["resources"]) for b in bundles},
        "bundles_to_node_id": {b["index"]: b["node_id"] for b in bundles if b["node_id"]},
        "strategy": row["strategy"],
        "state": row["state"],
        "stats": {"scheduling_state": "INFEASIBLE" if row["infeasible"] else row["state"]},
    }
