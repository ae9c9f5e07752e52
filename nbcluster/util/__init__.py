"""Ray-compatible ``ray.util``: ``ActorPool``, ``queue`` and ``scheduling_strategies``."""

from nbcluster.util import queue, scheduling_strategies
from nbcluster.util.actor_pool import ActorPool

__all__ = ["ActorPool", "queue", "scheduling_strategies"]
