"""Ray-compatible module paths (``ray.util.scheduling_strategies``)."""
