"""What the head's pure components ask the service to do, and who asks for leases.

:class:`~nbcluster.head.state.ClusterState`, :class:`~nbcluster.head.actors.ActorDirectory` and
:class:`~nbcluster.head.restart.Recovery` take events and return a list of these instructions;
:class:`~nbcluster.head.service.HeadService` carries them out in order (a ``match`` on the
type). They hold references to live state objects (a lease, a worker, an actor): the service
reads them when it carries the instruction out, right after the call that returned it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbcluster.head.actors import ActorInfo
    from nbcluster.head.model import Lease, WorkerInfo


@dataclass(frozen=True, slots=True)
class ActorRequester:
    """An actor asking for (and then holding) the lease of the worker that hosts it."""

    aid: str


#: Who asks for and holds a lease: a client (its identity on the head socket: a driver, or a
#: worker submitting tasks) or an actor.
Requester = bytes | ActorRequester


# ------------------------------------------------------------------------------ scheduling
@dataclass(frozen=True, slots=True)
class Grant:
    """``worker`` is leased to ``requester`` for its request ``rid``."""

    requester: Requester
    rid: int
    lease: Lease
    worker: WorkerInfo
    requested: float = 0.0  # when it was asked for (time.monotonic(); 0: unknown)


@dataclass(frozen=True, slots=True)
class StartWorker:
    """Ask the node's agent for one more worker."""

    node_id: str


@dataclass(frozen=True, slots=True)
class KillWorker:
    """Ask the node's agent to kill a worker (it reports the exit)."""

    node_id: str
    worker_id: str


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """The lease is gone (its worker died, its node was drained, the head restarted, ...)."""

    requester: Requester
    lease_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Infeasible:
    """No alive node has enough in total for the request: it waits, and ``missing`` says why."""

    requester: Requester
    rid: int
    missing: dict[str, float]
    shape: dict[str, float]


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """The request can never be placed (bad input, hard affinity to a dead node): it failed."""

    requester: Requester
    rid: int
    reason: str


@dataclass(frozen=True, slots=True)
class Warn:
    """Tell a client something its user should know (a placement group that cannot fit)."""

    client: bytes
    msg: str
    code: str


@dataclass(frozen=True, slots=True)
class GroupPlaced:
    """A placement group's bundles are all reserved: answer whoever waits for it."""

    pg_id: str


# ------------------------------------------------------------------------------ actors
@dataclass(frozen=True, slots=True)
class ActorInit:
    """Ask the worker leased for an actor to create the instance."""

    actor: ActorInfo
    worker: WorkerInfo
    gpus: list[int]


@dataclass(frozen=True, slots=True)
class ActorChanged:
    """The actor's state changed: tell its subscribers (and save the snapshot soon)."""

    actor: ActorInfo


# ------------------------------------------------------------------------------ head restart
@dataclass(frozen=True, slots=True)
class AttachActor:
    """Reconnect to an actor's worker that outlived the old head, so its notices reach us."""

    actor: ActorInfo
    worker: WorkerInfo


@dataclass(frozen=True, slots=True)
class PublishActorTo:
    """Tell one client the actor's current state."""

    client: bytes
    actor: ActorInfo


@dataclass(frozen=True, slots=True)
class ActorUnknown:
    """Tell a client that an actor it names is dead: the head has no record of it."""

    client: bytes
    aid: str
    reason: str


@dataclass(frozen=True, slots=True)
class JobEnded:
    """Tell every alive node that the job ended (its stored objects are freed)."""

    job_id: str


Instruction = (
    Grant
    | StartWorker
    | KillWorker
    | LeaseLost
    | Infeasible
    | Unschedulable
    | Warn
    | GroupPlaced
    | ActorInit
    | ActorChanged
    | AttachActor
    | PublishActorTo
    | ActorUnknown
    | JobEnded
)
