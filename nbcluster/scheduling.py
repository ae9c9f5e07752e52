"""Scheduling strategies: where a task or actor may run (Ray's ``scheduling_strategy``).

``options(scheduling_strategy=...)`` accepts:

- ``None`` or ``"DEFAULT"``: any node with free resources; among them a node holding most bytes of
  the task's stored arguments (locality), else one with an idle worker, else the least loaded.
- ``"SPREAD"``: spread over the nodes that can run it, least loaded first.
- :class:`NodeAffinitySchedulingStrategy`: one given node (``soft=False``: only there, failing
  when it is dead, unknown or too small; ``soft=True``: there if it can, elsewhere otherwise).
- :class:`PlacementGroupSchedulingStrategy`: in a bundle of a placement group
  (:mod:`nbcluster.util.placement_group`), out of the resources the bundle reserved.

On the wire a strategy travels as a small dict (:func:`strategy_spec`); the head interprets it in
:mod:`nbcluster.head.state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: Wire form of a strategy: ``{"t": "spread"}``, ``{"t": "node", "node": id, "soft": bool,
#: "spill": bool}`` or ``{"t": "pg", "pg": id, "bundle": index, "capture": bool}``; ``None``
#: stands for DEFAULT.
StrategySpec = dict[str, Any]


@dataclass(frozen=True)
class NodeAffinitySchedulingStrategy:
    """Run on one node, named by its id (``get_runtime_context().get_node_id()``, ``nodes()``).

    Parameters
    ----------
    node_id
        The node's id.
    soft
        ``False`` (default): run only there; the task fails with
        :class:`~nbcluster.exceptions.TaskUnschedulableError` (an actor dies: its calls raise
        :class:`~nbcluster.exceptions.ActorDiedError` saying why) if the node is dead, unknown,
        or has less than the task needs in total. ``True``: prefer the node, and run elsewhere when
        it is dead, unknown or too small.
    _spill_on_unavailable
        With ``soft=True``: also run elsewhere when the node is merely busy right now (by
        default a busy node is waited for, as in Ray).
    """

    node_id: str
    soft: bool = False
    _spill_on_unavailable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(
                f"NodeAffinitySchedulingStrategy needs a node id string, got {self.node_id!r}"
            )
        if not isinstance(self.soft, bool):
            raise ValueError(f"soft must be True or False, got {self.soft!r}")


@dataclass(frozen=True)
class PlacementGroupSchedulingStrategy:
    """Run in a placement group, out of the resources one of its bundles reserved (Ray's).

    Parameters
    ----------
    placement_group
        The :class:`~nbcluster.util.placement_group.PlacementGroup` (``None``: no group, the
        default strategy).
    placement_group_bundle_index
        The bundle to run in; ``-1`` (default): any bundle of the group with room.
    placement_group_capture_child_tasks
        ``True``: the tasks and actors this task or actor creates without a
        ``scheduling_strategy`` of their own run in the same group (any bundle), and
        :func:`~nbcluster.util.placement_group.get_current_placement_group` in them returns it.
    """

    placement_group: Any
    placement_group_bundle_index: int = -1
    placement_group_capture_child_tasks: bool | None = None

    def __post_init__(self) -> None:
        index = self.placement_group_bundle_index
        if isinstance(index, bool) or not isinstance(index, int) or index < -1:
            raise ValueError(f"placement_group_bundle_index must be an int >= -1, got {index!r}")
        pg = self.placement_group
        if pg is None:
            return
        if not hasattr(pg, "id") or not hasattr(pg, "bundle_count"):
            raise ValueError(f"placement_group must be a PlacementGroup, got {pg!r}")
        if index >= pg.bundle_count > 0:
            raise ValueError(
                f"placement_group_bundle_index {index} is out of range: the placement group has "
                f"{pg.bundle_count} bundle(s)"
            )


def strategy_spec(strategy: Any) -> StrategySpec | None:
    """Validate ``strategy`` and return its wire form (``None`` for DEFAULT).

    Raises
    ------
    ValueError
        For anything that is not a supported strategy, naming what is.
    """
    if strategy is None:
        return None
    if isinstance(strategy, str):
        if strategy == "DEFAULT":
            return None
        if strategy == "SPREAD":
            return {"t": "spread"}
        raise ValueError(
            f"unknown scheduling_strategy {strategy!r}: use 'DEFAULT', 'SPREAD' or "
            "NodeAffinitySchedulingStrategy(node_id, soft=False)"
        )
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return {
            "t": "node",
            "node": strategy.node_id,
            "soft": strategy.soft,
            "spill": bool(strategy._spill_on_unavailable),
        }
    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        if strategy.placement_group is None:
            return None
        return {
            "t": "pg",
            "pg": str(strategy.placement_group.id),
            "bundle": strategy.placement_group_bundle_index,
            "capture": bool(strategy.placement_group_capture_child_tasks),
        }
    raise ValueError(
        f"unsupported scheduling_strategy {type(strategy).__name__}: nbcluster supports "
        "'DEFAULT', 'SPREAD', NodeAffinitySchedulingStrategy and "
        "PlacementGroupSchedulingStrategy (placement groups)"
    )


def submitted_strategy(strategy: Any) -> StrategySpec | None:
    """The wire form of the strategy a task or actor is submitted with, here and now.

    A task or actor created with no ``scheduling_strategy`` of its own (``None``: not even
    ``"DEFAULT"``) inside a task or actor that runs in a placement group with
    ``placement_group_capture_child_tasks=True`` runs in that group too, in any bundle, and
    captures its own children in turn (Ray's rule).
    """
    if strategy is None:
        from nbcluster import context

        task = context.current_task.get()
        if task is not None and task.capture and task.placement_group:
            return {"t": "pg", "pg": task.placement_group, "bundle": -1, "capture": True}
    return strategy_spec(strategy)


def placement_fields(spec: StrategySpec | None) -> dict[str, Any]:
    """``TASK``/``ACTOR_INIT`` fields telling a worker the placement group its call runs in."""
    if spec is None or spec.get("t") != "pg":
        return {}
    return {"pg": str(spec["pg"]), "capture": bool(spec.get("capture"))}


def strategy_key(spec: StrategySpec | None) -> tuple[Any, ...]:
    """A hashable form of a strategy spec (part of a client's scheduling-class key)."""
    if spec is None:
        return ()
    return tuple(sorted(spec.items()))


def stored_bytes(frame_lists: Iterable[Sequence[Any]]) -> dict[str, int]:
    """Bytes per node store of the stored objects among serialized values.

    Each item is one value's frames; a stored value is a single marker frame naming the store
    that holds it and its size. Inline values count for nothing (they travel with the task).
    """
    out: dict[str, int] = {}
    for frames in frame_lists:
        meta = _stored_meta(frames)
        if meta is None:
            continue
        store = str(meta.get("store") or "")
        if store:
            out[store] = out.get(store, 0) + int(meta.get("size") or 0)
    return out


def _stored_meta(frames: Sequence[Any]) -> dict[str, Any] | None:
    import msgpack

    from nbcluster.store.client import MARKER, is_stored

    if not is_stored(frames):
        return None
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    try:
        meta = msgpack.unpackb(raw[len(MARKER) :])
    except Exception:  # not ours to judge here: the reader reports a broken marker
        return None
    return meta if isinstance(meta, dict) else None


def preferred_store(sizes: dict[str, int]) -> str | None:
    """The store holding most bytes (ties broken by name, so the choice is stable)."""
    if not sizes:
        return None
    return max(sorted(sizes), key=lambda s: sizes[s])


__all__ = [
    "NodeAffinitySchedulingStrategy",
    "PlacementGroupSchedulingStrategy",
    "placement_fields",
    "preferred_store",
    "stored_bytes",
    "strategy_key",
    "strategy_spec",
    "submitted_strategy",
]
