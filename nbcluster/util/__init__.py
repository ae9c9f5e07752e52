"""Ray-compatible ``ray.util``: ``ActorPool``, ``queue``, ``multiprocessing``, ``joblib``..."""

from nbcluster.util import joblib, multiprocessing, queue, scheduling_strategies, state
from nbcluster.util.actor_pool import ActorPool

__all__ = ["ActorPool", "joblib", "multiprocessing", "queue", "scheduling_strategies", "state"]

# Placement groups, as Ray exposes them at ray.util (the functions shadow the submodule's name;
# ``import nbcluster.util.placement_group`` still gives the module).
from nbcluster.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ += [
    "PlacementGroup",
    "get_current_placement_group",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]
