"""The head's records of nodes, workers, lease requests and leases.

Resource amounts are kept as integers of 1/10000 (:data:`UNIT`, as Ray does): two
``num_gpus=0.5`` leases fill a GPU exactly, and a thousand grants and returns of ``0.1`` CPU
leave the node with exactly what it had. :class:`~nbcluster.head.state.ClusterState` keeps
them consistent.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbcluster.head.instructions import Requester

#: Resource amounts are counted in units of 1/UNIT (a GPU is UNIT units).
UNIT = 10_000


def to_units(amount: float) -> int:
    """An amount (CPUs, GPUs, bytes, ...) in integer units of 1/:data:`UNIT`."""
    return round(float(amount) * UNIT)


def units_of(shape: dict[str, float]) -> dict[str, int]:
    """A resource shape in integer units, zero amounts left out."""
    out = {str(k): to_units(v) for k, v in shape.items()}
    return {k: v for k, v in out.items() if v != 0}


def amounts_of(units: dict[str, int]) -> dict[str, float]:
    """Integer units back to amounts."""
    return {k: v / UNIT for k, v in units.items()}


class WorkerState(enum.Enum):
    """Where a worker known to the head stands (one not ready yet is only counted, in
    :attr:`NodeInfo.starting`; a dead one is forgotten)."""

    IDLE = "idle"  # in its node's pool: leased to its job next (to any job while it has none)
    LEASED = "leased"  # holds a lease (an actor's worker holds its actor's lease)
    ADOPTED = "adopted"  # outlived the old head: only its holder's claim may lease it
    RETIRED = "retired"  # its actor is gone, or it idled in an unwanted runtime_env: killed


@dataclass
class WorkerInfo:
    """A worker process known to the head."""

    worker_id: str
    node_id: str
    address: str
    control_address: str
    pid: int
    job_id: str | None = None  # a worker serves one job for its whole life
    env: str = ""  # ... and one runtime_env (its key; "" = none), set with the job
    lease_id: str | None = None  # set exactly while LEASED
    state: WorkerState = WorkerState.IDLE
    blocked: bool = False
    # GPU ids of its first GPU lease: CUDA reads CUDA_VISIBLE_DEVICES once per process, so a
    # worker only ever gets leases for those same GPUs afterwards.
    gpus: tuple[int, ...] | None = None
    actor_id: str | None = None  # hosts this actor for its whole life
    detached: bool = False  # hosts a detached actor: outlives its job's driver


@dataclass
class NodeInfo:
    """A node (one agent) and its resources (kept in integer units; see :data:`UNIT`)."""

    node_id: str
    name: str
    address: str
    client: bytes  # the agent's identity on the head socket
    total_u: dict[str, int]
    avail_u: dict[str, int]
    gpu_free_u: dict[int, int]  # GPU id -> free units (UNIT = the whole GPU)
    pid: int = 0
    alive: bool = True
    starting: int = 0  # workers asked for and not ready yet
    prestart: int = 0
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> dict[str, float]:
        """Declared resources (a copy, as amounts)."""
        return amounts_of(self.total_u)

    @property
    def available(self) -> dict[str, float]:
        """Free resources (a copy, as amounts; CPU may be negative while blocked workers
        that lent their CPUs run again)."""
        return amounts_of(self.avail_u)

    @property
    def gpus(self) -> dict[int, float]:
        """GPU id -> free fraction (a copy)."""
        return {g: u / UNIT for g, u in self.gpu_free_u.items()}

    @property
    def key(self) -> str:
        """Its key in a scheduling pass's reservations (bundles have their own)."""
        return self.node_id

    @property
    def store_id(self) -> str:
        return str(self.info.get("store_id") or "")


@dataclass
class LeaseRequest:
    """A requester's wish for a worker holding ``shape``, placed according to ``strategy``."""

    rid: int
    requester: Requester
    job_id: str
    shape: dict[str, float]
    name: str
    units: dict[str, int] = field(default_factory=dict)
    strategy: dict[str, Any] | None = None  # nbcluster.scheduling wire form; None = DEFAULT
    locality: dict[str, int] = field(default_factory=dict)  # store id -> bytes of arguments
    env: str = ""  # the runtime_env key: only a fresh worker or one of this env will do
    infeasible_reported: bool = False
    could_fit: bool = False  # some alive node has enough in total (judged again if one dies)
    # The node a worker is being started on for it: tried first in later passes, so that a
    # waiting request does not hop between equally good nodes (and SPREAD counts it there).
    waiting_on: str | None = None
    created: float = field(default_factory=time.monotonic)  # for the lease wait metric


@dataclass
class Lease:
    """A worker leased to a requester (a client or an actor) with the resources it holds.

    ``shape`` and ``gpus`` (GPU id -> fraction) are the amounts as the client sees them; the
    accounting uses their exact integer forms ``units`` and ``gpu_units``.
    """

    lease_id: str
    requester: Requester
    job_id: str
    worker_id: str
    node_id: str
    shape: dict[str, float]
    gpus: dict[int, float]
    units: dict[str, int] = field(default_factory=dict)
    gpu_units: dict[int, int] = field(default_factory=dict)
    bundle: tuple[str, int] | None = None  # (group id, index) it was carved from

    def __post_init__(self) -> None:
        if not self.units:
            self.units = units_of(self.shape)
        if not self.gpu_units:
            self.gpu_units = {g: to_units(f) for g, f in self.gpus.items()}
