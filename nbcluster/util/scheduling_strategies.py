"""``ray.util.scheduling_strategies``, for code written against Ray."""

from nbcluster.scheduling import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

__all__ = ["NodeAffinitySchedulingStrategy", "PlacementGroupSchedulingStrategy"]
