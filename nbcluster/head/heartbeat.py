"""How often node agents ping the head, and when a silent one is dead.

Each ping costs the head a message in and a ``PONG`` out (decoding, CURVE, the node's store
figures and metrics sample). Up to :data:`PINGS_PER_S` agents ping once a second; a larger
cluster is told, in each ``PONG``, to ping less often, so that a quiet cluster costs the head
about the same at 1,000 nodes as at 250 (the panel's metrics history gets coarser instead). An
agent silent for :data:`LIVENESS_PINGS` intervals is dead: 5 s up to 250 nodes, 20 s at 1,000
(Ray's default health check takes 15 s and more).
"""

from __future__ import annotations

#: The agent pings a second the head asks for at most (beyond one per agent per second).
PINGS_PER_S = 250.0
#: The shortest interval (what agents start with).
MIN_PING_S = 1.0
#: An agent that missed this many pings in a row is dead.
LIVENESS_PINGS = 5.0


def ping_interval(agents: int) -> float:
    """Seconds between an agent's pings in a cluster of ``agents`` alive nodes."""
    return max(MIN_PING_S, round(agents / PINGS_PER_S, 1))


def silence_limit(told: float, before: float) -> float:
    """How long an agent may stay silent; ``told`` and ``before``: the last two intervals it
    was given (it may still sleep the older one once)."""
    return LIVENESS_PINGS * max(told, before, MIN_PING_S)
