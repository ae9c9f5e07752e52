"""The events :class:`~nbcluster.client.state.ClientState` handles, besides user commands.

The I/O shell makes one from each message it receives (from the head, a worker, an object's
owner or someone asking us for an object we own) and from each timer that fires. User threads'
commands (:mod:`nbcluster.client.commands`) are events too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbcluster.client.commands import Command

if TYPE_CHECKING:
    from nbcluster.client.tasks import Lease
    from nbcluster.client.workers import WorkerConn


# ---------------------------------------------------------------------------- from the head
@dataclass(slots=True)
class LeaseGranted:
    """``LEASE_GRANTED``: a worker we may push tasks to."""

    rid: int
    lease_id: str
    worker_id: str
    worker_addr: str
    control_addr: str
    pid: int
    node_id: str
    node_name: str
    gpus: list[int]
    shape: dict[str, float]


@dataclass(slots=True)
class LeaseLost:
    """``LEASE_LOST``: the worker died or its node went away (``drain``: retry for free)."""

    lease_id: str
    reason: str
    drain: bool = False


@dataclass(slots=True)
class LeaseFailed:
    """``LEASE_FAILED``: the head can never place request ``rid``."""

    rid: int
    msg: str


@dataclass(slots=True)
class LeaseInfeasible:
    """``LEASE_INFEASIBLE``: no node has ``shape`` in total (yet)."""

    rid: int
    shape: dict[str, float]
    missing: dict[str, float]


@dataclass(slots=True)
class ActorStateChanged:
    """``ACTOR_STATE``: where an actor lives now, or that it restarts or died."""

    aid: str
    state: str = ""
    cls_name: str = ""
    addr: str = ""
    control_addr: str = ""
    worker_id: str = ""
    reason: str = ""
    init_error: bool = False
    infeasible: str | None = None  # what no node has in total: the actor stays pending
    payload: list[Any] = field(default_factory=list)  # the constructor's error, if init_error


@dataclass(slots=True)
class NodeDied:
    """``NODE_DIED``: the values that node incarnation stored are lost."""

    node_id: str
    store_id: str


@dataclass(slots=True)
class Rejoined:
    """``WELCOME``: a restarted head took us back."""


# ---------------------------------------------------------------------------- from workers
@dataclass(slots=True)
class TaskResult:
    """``RESULT`` of a task or actor call, from the worker behind ``conn``."""

    conn: WorkerConn
    tid: str
    ok: bool
    counts: list[int]  # frames per return value
    err: str | None
    lost: Any  # indexes of arguments the worker could not read
    kept: list[str]  # argument refs the callee kept
    returned: list[Any]  # [oid, owner] of refs inside the result
    payload: list[Any]
    ph: list[int] = field(default_factory=list)  # the worker's phase timings (RESULT.ph)
    retire: bool = False  # the worker ran its function max_calls times: it is done


@dataclass(slots=True)
class TasksStolen:
    """``STOLEN``: tasks queued on the worker behind ``conn`` that it gave back unstarted."""

    conn: WorkerConn
    tids: list[str]


@dataclass(slots=True)
class StreamItemArrived:
    """``STREAM_ITEM``: item ``index`` of generator task ``tid`` from the worker of ``conn``."""

    conn: WorkerConn
    tid: str
    index: int
    returned: list[Any]  # [oid, owner] of refs inside the value
    payload: list[Any]


@dataclass(slots=True)
class TaskOutput:
    """``LOG``: output lines of a task (``conn`` ``None``: an actor's ``__init__``, relayed by
    the head)."""

    conn: WorkerConn | None
    tid: str
    name: str
    pid: Any
    stream: str
    lines: list[str]


# ---------------------------------------------------------------------------- about objects
@dataclass(slots=True)
class ObjectRequested:
    """``GET_OBJECT`` on our owner socket: someone wants the value of an object we own."""

    ident: bytes
    oid: str


@dataclass(slots=True)
class BorrowReleased:
    """``BORROW_DEL``: a callee that kept ``n`` refs to an object we own let go."""

    oid: str
    n: int


@dataclass(slots=True)
class ObjectEscaped:
    """``ESCAPE``: a ref to an object we own went where we cannot follow: keep it."""

    oid: str


@dataclass(slots=True)
class ObjectArrived:
    """``OBJECT``: an owner answered our ``GET_OBJECT``."""

    owner: str
    oid: str
    ok: bool
    gone: bool  # the owner no longer has it
    payload: list[Any]


@dataclass(slots=True)
class Released:
    """The last ``ObjectRef`` instances of these objects in this process were collected."""

    oids: list[str]


# ---------------------------------------------------------------------------- timers
@dataclass(slots=True)
class LingerExpired:
    """An idle lease kept for the next task of its shape: return it if still idle."""

    lease: Lease
    token: int


@dataclass(slots=True)
class ParkExpired:
    """A task waited long enough for its argument's node to be declared dead."""

    tid: str
    token: int


@dataclass(slots=True)
class FlushTaskEvents:
    """Time to send the buffered task events to the head."""


Event = (
    Command
    | LeaseGranted
    | LeaseLost
    | LeaseFailed
    | LeaseInfeasible
    | ActorStateChanged
    | NodeDied
    | Rejoined
    | TaskResult
    | StreamItemArrived
    | TasksStolen
    | TaskOutput
    | ObjectRequested
    | BorrowReleased
    | ObjectEscaped
    | ObjectArrived
    | Released
    | LingerExpired
    | ParkExpired
    | FlushTaskEvents
)
