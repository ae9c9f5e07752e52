"""``ray.util.scheduling_strategies``, for code written against Ray."""

from nbcluster.scheduling import NodeAffinitySchedulingStrategy

__all__ = ["NodeAffinitySchedulingStrategy"]
