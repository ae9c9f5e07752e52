"""Ray-compatible ``ray.util``: ``ActorPool``, ``queue``, ``multiprocessing``, strategies."""

from nbcluster.util import multiprocessing, queue, scheduling_strategies
from nbcluster.util.actor_pool import ActorPool

__all__ = ["ActorPool", "multiprocessing", "queue", "scheduling_strategies"]
