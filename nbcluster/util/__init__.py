"""Ray-compatible module paths (``ray.util.scheduling_strategies``)."""

from nbcluster.util import scheduling_strategies

__all__ = ["scheduling_strategies"]
