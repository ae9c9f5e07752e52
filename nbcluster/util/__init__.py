"""Ray-compatible ``ray.util``: ``ActorPool``, ``queue``, ``multiprocessing``, ``joblib``..."""

from nbcluster.util import joblib, multiprocessing, queue, scheduling_strategies, state
from nbcluster.util.actor_pool import ActorPool

__all__ = ["ActorPool", "joblib", "multiprocessing", "queue", "scheduling_strategies", "state"]
