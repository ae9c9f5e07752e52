"""Task records and per-resource-shape scheduling classes kept by a submitting client."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbcluster.client.workers import WorkerConn

#: The list of a record that has nothing there (no arguments refs, no refs inside them, ...):
#: shared by all such records, so a queued task costs no empty lists. Never changed in place:
#: a record's lists are replaced, never appended to.
EMPTY: list[Any] = []


def _empty() -> list[Any]:
    return EMPTY


@dataclass(slots=True)
class TaskRecord:
    """A submitted task, from ``.remote()`` until its results are in.

    A driver may hold a million of them at once (queued at once): slots, and the empty lists
    shared (:data:`EMPTY`).
    """

    tid: str
    name: str
    fn_id: str
    fn_blob: bytes
    args: list[Any]
    deps: list[Any]  # ObjectRefs, kept alive until dispatch
    return_ids: list[str]
    shape: dict[str, float]
    shape_key: tuple[Any, ...]  # its scheduling class: shape, strategy, preferred store
    max_retries: int
    retry_exceptions: bool | tuple[type[BaseException], ...]
    nret: int = 1
    dep_frames: list[list[Any]] = field(default_factory=_empty)
    waiting_deps: int = 0
    lease: Lease | None = None  # the lease it was last sent on, while it runs
    started: bool = False  # first on its worker: reported as running (the others wait there)
    stealing: bool = False  # sent, not started (perhaps), and its worker was asked to give it back
    cancelled: bool = False
    force_cancel: bool = False
    attempts: int = 0
    rebuilds: int = 0  # times re-run because its stored result was lost with a node
    nested: list[Any] = field(default_factory=_empty)  # refs inside the arguments, kept until done
    contained: list[Any] = field(default_factory=_empty)  # refs inside the result
    args_oid: str | None = None  # the arguments, when large enough to go into the store
    actor_id: str | None = None  # set for actor method calls
    method: str = ""
    group: str = ""  # an actor call's concurrency group chosen at the call ("": the method's)
    strategy: dict[str, Any] | None = None  # scheduling strategy (wire form); None = DEFAULT
    renv: dict[str, Any] | None = None  # runtime_env (wire form); None = none
    max_calls: int = 0  # its worker retires after running its function this often (0: never)
    tag: Any = None  # where its output goes (the notebook cell that submitted it), if known
    gen: int = 0  # a generator task: streams.STREAMING or streams.DYNAMIC
    bp: int = 0  # streaming: the worker pauses when this many items are unconsumed
    stream: Any = None  # its StreamBuffer, when a generator task
    # For the timeline: when it was submitted and last sent, to which worker, and the phase
    # timings its worker sent back (RESULT.ph).
    submitted_at: float = 0.0
    sent_at: float = 0.0
    sent_to: WorkerConn | None = None
    ph: list[int] | None = None
    shown: int = 0  # how the head's task table knows it (events.SHOWN, COUNTED_QUEUED, ...)
    shown_on: str = ""  # counted as running: on this node


@dataclass
class Lease:
    """A worker this client may push tasks to."""

    lease_id: str
    worker_id: str
    worker_addr: str
    control_addr: str
    pid: int
    node_id: str
    node_name: str
    gpus: list[int]
    shape: dict[str, float]  # the resources it holds (told to a restarted head)
    shape_key: tuple[Any, ...]  # its scheduling class: also strategy and preferred store
    conn: WorkerConn
    # Sent to its worker, in order: the first runs, the others wait there (pipelined).
    inflight: deque[TaskRecord] = field(default_factory=deque)
    linger_token: int = 0  # bumped when dropped: an older linger timer is void
    idle_since: float = 0.0  # when it last became idle
    linger_armed: bool = False  # a linger timer is pending (at most one per lease)


@dataclass
class SchedClass:
    """Tasks waiting for a worker of one resource shape, and the leases holding such workers."""

    shape: dict[str, float]
    key: tuple[Any, ...] = ()
    strategy: dict[str, Any] | None = None  # sent with its lease requests
    locality: dict[str, int] = field(default_factory=dict)  # store id -> bytes of arguments
    renv: dict[str, Any] | None = None  # runtime_env (wire form): its key goes with the requests
    queue: deque[TaskRecord] = field(default_factory=deque)
    leases: list[Lease] = field(default_factory=list)
    requests: set[int] = field(default_factory=set)  # outstanding lease request ids
    infeasible_warned: bool = False
