"""The declared schema of every message kind: its header fields, their types, its payload frames.

One :class:`msgspec.Struct` per :class:`~nbcluster.protocol.messages.Kind`, tagged by the header's
``"k"``. A field without a default is required; ``X | None`` fields may also be sent as nil.
Fields a schema does not declare are ignored (no handler reads them). :func:`validate` (in
:mod:`nbcluster.protocol.validation`) checks a decoded header against its kind's schema and the
payload frames against :meth:`Message.frames`; ``python -m nbcluster.protocol.doc`` writes the
field tables of ``docs/protocol.md`` from these classes, so the two cannot drift apart.

The head, the agent and the worker decode received headers straight into these classes
(:func:`~nbcluster.protocol.validation.receive_message`) and dispatch on their type
(:class:`~nbcluster.transport.serve.Dispatcher`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from nbcluster.protocol.base import Count, Shape, _args_frames
from nbcluster.protocol.base import Message as Message  # (re-exported: m.Message)
from nbcluster.protocol.messages import Kind

# The store's and transfers' kinds (re-exported: m.StoreSeal, ...; collected below).
from nbcluster.protocol.store_schema import BorrowDel as BorrowDel
from nbcluster.protocol.store_schema import Escape as Escape
from nbcluster.protocol.store_schema import GetObject as GetObject
from nbcluster.protocol.store_schema import JobEnded as JobEnded
from nbcluster.protocol.store_schema import Object as Object
from nbcluster.protocol.store_schema import StoreBulk as StoreBulk
from nbcluster.protocol.store_schema import StoreChunk as StoreChunk
from nbcluster.protocol.store_schema import StoreCredit as StoreCredit
from nbcluster.protocol.store_schema import StoreFree as StoreFree
from nbcluster.protocol.store_schema import StoreLocate as StoreLocate
from nbcluster.protocol.store_schema import StorePin as StorePin
from nbcluster.protocol.store_schema import StorePull as StorePull
from nbcluster.protocol.store_schema import StoreRead as StoreRead
from nbcluster.protocol.store_schema import StoreReply as StoreReply
from nbcluster.protocol.store_schema import StoreReserve as StoreReserve
from nbcluster.protocol.store_schema import StoreSeal as StoreSeal
from nbcluster.protocol.store_schema import StoreStats as StoreStats
from nbcluster.protocol.store_schema import StoreUnpin as StoreUnpin


# --- strategies (the wire form of nbcluster.scheduling) -------------------------------------
class SpreadStrategy(msgspec.Struct, tag_field="t", tag="spread"):
    """``{"t": "spread"}``: spread over nodes."""


class NodeStrategy(msgspec.Struct, tag_field="t", tag="node"):
    """``{"t": "node", node, soft, spill}``: node affinity."""

    node: str
    soft: bool = False
    spill: bool = False


class PgStrategy(msgspec.Struct, tag_field="t", tag="pg"):
    """``{"t": "pg", pg, bundle, capture}``: in a placement group's bundle (-1: any)."""

    pg: str
    bundle: int = -1
    capture: bool = False


Strategy = SpreadStrategy | NodeStrategy | PgStrategy


# --- runtime_env (the wire form of nbcluster.runtime_env.upload) ----------------------------
class EnvPackage(msgspec.Struct):
    """A packed directory: its content hash and the object (id, owner) holding its zip."""

    hash: str
    oid: str
    owner: str
    size: Count = 0


class RuntimeEnv(msgspec.Struct):
    """``renv``: ``key`` (a hash of the rest), ``wd`` (working_dir), ``mods`` (py_modules),
    ``vars`` (env_vars)."""

    key: str
    wd: EnvPackage | None = None
    mods: list[EnvPackage] = []
    vars: dict[str, str] = {}


class HeldLease(msgspec.Struct):
    """A lease a rejoining client still holds (in ``HELLO.leases``)."""

    lease_id: str
    worker_id: str
    shape: Shape
    gpus: list[int] = []
    env: str = ""  # the runtime_env key its worker serves
    pg: str = ""  # the placement group it was leased in ("": none)
    bundle: int = -1  # the bundle index asked for (-1: any)


class RunningWorker(msgspec.Struct):
    """A worker a re-registering agent still runs (in ``REGISTER_NODE.workers``)."""

    worker_id: str
    addr: str
    control_addr: str
    pid: int


# --- any peer <-> head -----------------------------------------------------------------------
class Hello(Message, tag=Kind.HELLO.value):
    expects_reply = True
    summary = "client -> head: join (a driver, or a worker acting as a client)"
    v: int
    pid: int = 0
    role: str = "driver"
    job_id: str | None = None
    worker_id: str | None = None
    started: float | None = None
    owns_job: bool = False
    rejoin: bool = False
    leases: list[HeldLease] = []
    actors: list[str] = []
    notebook: str | None = None
    kernel_id: str | None = None


class Welcome(Message, tag=Kind.WELCOME.value):
    summary = "head -> client: accepted"
    job_id: str
    head_pid: int = 0
    head_id: str = ""


class Error(Message, tag=Kind.ERROR.value):
    summary = "either way: a request failed (``rid`` names it when it had one)"
    msg: str
    code: str = ""
    rid: int | None = None


class Ping(Message, tag=Kind.PING.value):
    expects_reply = True
    summary = (
        "client/agent -> head: liveness; an agent's carries its store figures and metrics, and "
        "``want``: false when it needs no PONG unless its ping interval changes"
    )
    store: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    want: bool = True


class Pong(Message, tag=Kind.PONG.value):
    summary = "head -> client/agent (``every``: to an agent, seconds until its next ping)"
    every: float = 0.0


class Goodbye(Message, tag=Kind.GOODBYE.value):
    summary = "client/agent -> head: disconnecting cleanly (``drain``: an agent draining)"
    drain: bool = False


class Warning_(Message, tag=Kind.WARNING.value):
    summary = "head -> driver: something the user should know, logged by the driver"
    msg: str
    code: str = ""


# --- leases (driver <-> head) -----------------------------------------------------------------
class LeaseRequest(Message, tag=Kind.LEASE_REQUEST.value):
    expects_reply = True
    summary = "driver -> head: a worker for this shape (``locality``: store id -> stored bytes)"
    rid: int
    shape: Shape
    name: str = ""
    strategy: Strategy | None = None
    locality: dict[str, int] | None = None
    env: str = ""  # runtime_env key: a worker serves one environment


class LeaseGranted(Message, tag=Kind.LEASE_GRANTED.value):
    summary = "head -> driver"
    rid: int
    lease_id: str
    worker_id: str
    worker_addr: str
    control_addr: str
    pid: int
    node_id: str
    shape: Shape
    node_name: str = ""
    gpus: list[int] = []


class LeaseInfeasible(Message, tag=Kind.LEASE_INFEASIBLE.value):
    summary = "head -> driver: no node has that much in total (the request stays queued)"
    rid: int
    missing: Shape
    shape: Shape


class LeaseFailed(Message, tag=Kind.LEASE_FAILED.value):
    summary = "head -> driver: it can never be placed (hard affinity, malformed shape)"
    rid: int
    msg: str = ""


class LeaseCancel(Message, tag=Kind.LEASE_CANCEL.value):
    summary = "driver -> head: withdraw a request"
    rid: int


class LeaseReturn(Message, tag=Kind.LEASE_RETURN.value):
    summary = "driver -> head: done with a worker (``retire``: its max_calls are used up)"
    lease_id: str
    retire: bool = False


class LeaseLost(Message, tag=Kind.LEASE_LOST.value):
    summary = "head -> driver: the worker is gone (``drain``: retry without counting)"
    lease_id: str
    reason: str = ""
    drain: bool = False


class NodeDied(Message, tag=Kind.NODE_DIED.value):
    summary = "head -> clients: objects stored on that node are lost"
    node_id: str
    store_id: str = ""


class WorkerBlocked(Message, tag=Kind.WORKER_BLOCKED.value):
    summary = "worker-as-client -> head: blocked in get(); its CPU may be lent"
    worker_id: str


class WorkerUnblocked(Message, tag=Kind.WORKER_UNBLOCKED.value):
    summary = "worker-as-client -> head: running again"
    worker_id: str


# --- queries ------------------------------------------------------------------------------------
class Query(Message, tag=Kind.QUERY.value):
    expects_reply = True
    summary = "client -> head: ``what`` is nodes, actors, actor, head, cluster, tasks, ..."
    rid: int
    what: str
    name: str | None = None
    ns: str | None = None
    node_id: str | None = None
    limit: Count | None = None
    since: Count | None = None  # "timeline": the spans after this sequence number


class QueryReply(Message, tag=Kind.QUERY_REPLY.value):
    summary = "head -> client"
    rid: int
    result: Any


class PgCreate(Message, tag=Kind.PG_CREATE.value):
    expects_reply = True
    summary = "client -> head: reserve a placement group (answered ``QUERY_REPLY {error}``)"
    rid: int
    pg_id: str
    bundles: list[Shape]
    strategy: str = "PACK"
    name: str = ""
    ns: str = ""
    detached: bool = False


class PgRemove(Message, tag=Kind.PG_REMOVE.value):
    expects_reply = True
    summary = "client -> head: remove a placement group (answered ``QUERY_REPLY {removed}``)"
    rid: int
    pg_id: str


class PgWait(Message, tag=Kind.PG_WAIT.value):
    expects_reply = True
    summary = (
        "client -> head: answered ``QUERY_REPLY {ready}`` once the group is placed (``ready`` "
        "false after ``timeout`` seconds; none: no limit), ``{error}`` if it is removed or unknown"
    )
    rid: int
    pg_id: str
    timeout: Annotated[float, msgspec.Meta(ge=0)] | None = None


class LogRead(Message, tag=Kind.LOG_READ.value):
    expects_reply = True
    summary = (
        "client -> head: part of the log of an actor (by name), a task or a worker, answered "
        "``QUERY_REPLY {text, offset, alive, worker_id, node_id}`` or ``{error}``"
    )
    rid: int
    actor: str | None = None
    ns: str | None = None
    task: str | None = None
    worker: str | None = None
    offset: int = -1  # -1: the last ``limit`` bytes; else where the previous read ended
    limit: Annotated[int, msgspec.Meta(gt=0)] = 1 << 20


class ShutdownCluster(Message, tag=Kind.SHUTDOWN_CLUSTER.value):
    summary = "owner driver -> head: stop the head and every agent"


# --- observability --------------------------------------------------------------------------------
class TaskEvents(Message, tag=Kind.TASK_EVENTS.value):
    summary = (
        "driver -> head: ``[[code, tid, time, ...]]``, ended tasks' and actor calls' timeline "
        "spans included (see nbcluster/client/events.py)"
    )
    events: list[list[Any]]


class TaskCancel(Message, tag=Kind.TASK_CANCEL.value):
    summary = "head -> driver: cancel a task you submitted (from the Jupyter panel)"
    tid: str
    force: bool = False


# --- node agent <-> head ------------------------------------------------------------------------
class RegisterNode(Message, tag=Kind.REGISTER_NODE.value):
    expects_reply = True
    summary = "agent -> head: join; again with ``node_id`` and ``workers`` after a head restart"
    v: int
    name: str
    address: str
    resources: Shape
    gpu_ids: list[int] = []
    pid: int = 0
    prestart: Count = 0
    info: dict[str, Any] = {}
    node_id: str | None = None
    workers: list[RunningWorker] = []


class NodeRegistered(Message, tag=Kind.NODE_REGISTERED.value):
    summary = "head -> agent (``fresh``: start over as a new incarnation)"
    node_id: str
    head_id: str = ""
    fresh: bool = False


class StartWorker(Message, tag=Kind.START_WORKER.value):
    summary = "head -> agent"


class WorkerReady(Message, tag=Kind.WORKER_READY.value):
    summary = "agent -> head"
    worker_id: str
    addr: str
    control_addr: str
    pid: int


class WorkerDied(Message, tag=Kind.WORKER_DIED.value):
    summary = "agent -> head (``never_ready``: it failed to start)"
    worker_id: str
    reason: str = "worker died"
    never_ready: bool = False
    requested: bool = False  # the head asked for it: not counted as a worker in trouble


class LogFetch(Message, tag=Kind.LOG_FETCH.value):
    summary = "head -> agent: read a worker's log (``task``: only that task's lines)"
    rid: int
    worker_id: str
    task: str | None = None
    offset: int = -1
    limit: Annotated[int, msgspec.Meta(gt=0)] = 1 << 20


class LogData(Message, tag=Kind.LOG_DATA.value):
    summary = "agent -> head: ``result`` is ``{text, offset, alive}`` or ``{error}``"
    rid: int
    result: dict[str, Any]


class KillWorker(Message, tag=Kind.KILL_WORKER.value):
    summary = "head -> agent"
    worker_id: str


class StopNode(Message, tag=Kind.STOP_NODE.value):
    summary = "head -> agent"


class StoreList(Message, tag=Kind.STORE_LIST.value):
    summary = "head -> agent: the store's ``limit`` largest objects -> STORE_LISTING"
    rid: int
    limit: Count


class StoreListing(Message, tag=Kind.STORE_LISTING.value):
    summary = (
        "agent -> head: ``objects`` (``[oid, size, job, state, pins]`` each, largest first), "
        "``total`` objects in the store and its ``stats``"
    )
    rid: int
    objects: list[list[Any]]
    total: Count
    stats: dict[str, Any] = {}


# --- driver <-> worker ----------------------------------------------------------------------------
class Bind(Message, tag=Kind.BIND.value):
    summary = "driver -> worker: serve this job with this module search path"
    job_id: str | None = None
    namespace: str | None = None
    sys_path: list[str] = []


class Task(Message, tag=Kind.TASK.value):
    frames_doc = "(1 if fnb) + nargs + sum(deps)"
    expects_reply = True
    summary = (
        "driver -> worker: + [function if ``fnb``] + ``nargs`` argument frames + each dependency's"
        " ``deps[i]`` frames"
    )
    tid: str
    fn: str
    nargs: Count
    fnb: int = 0
    name: str = "task"
    nret: Count = 1
    deps: list[Count] = []
    gpus: list[int] | None = None
    assigned: dict[str, Any] | None = None
    renv: RuntimeEnv | None = None
    gen: Annotated[int, msgspec.Meta(ge=0, le=2)] = 0  # 1: streaming generator, 2: dynamic
    bp: Count = 0  # streaming: pause when this many items are unconsumed (0: never)
    retry: bool = False  # the driver would run it again if its worker died (memory monitor)
    pg: str | None = None  # the placement group it runs in
    capture: bool = False  # its child tasks and actors run in ``pg`` too
    mc: Count = 0  # max_calls: the worker retires once it ran function ``fn`` this often

    def frames(self) -> int | None:
        return _args_frames(self.nargs, self.deps, 1 if self.fnb else 0)


class Cancel(Message, tag=Kind.CANCEL.value):
    summary = "driver -> worker (and its control socket)"
    tid: str
    force: bool = False


class Result(Message, tag=Kind.RESULT.value):
    frames_doc = "sum(n)"
    summary = (
        "worker -> driver: + ``n[i]`` frames per return value (the error's when not ``ok``); "
        "``returned``: [oid, owner] of refs inside it"
    )
    tid: str
    ok: bool
    n: list[Count] = []
    err: str | None = None
    kept: list[str] = []
    returned: list[list[str]] = []
    lost: list[Count] = []  # argument indexes lost with their node: the owner may rebuild them
    # Phase timings for the timeline: [start (wall-clock us), argument fetch, run, result
    # store (us each), worker pid]; empty when the call never started.
    ph: list[int] = []
    retire: bool = False  # the task's max_calls are used up: this worker takes no more tasks

    def frames(self) -> int | None:
        return sum(self.n)


class Log(Message, tag=Kind.LOG.value):
    summary = "worker -> driver: printed lines (an actor's __init__: via the head to its creator)"
    tid: str | None = None
    stream: str = "stdout"
    lines: list[str] = []
    name: str = "task"
    pid: int | None = None


class StreamItem(Message, tag=Kind.STREAM_ITEM.value):
    frames_doc = "n"
    summary = (
        "worker -> driver: + ``n`` frames: item ``i`` (from 0) a generator task yielded, object "
        "``{tid}.{i+1}``; ``returned`` as in RESULT"
    )
    tid: str
    i: Count
    n: Count
    returned: list[list[str]] = []

    def frames(self) -> int | None:
        return self.n


class StreamAck(Message, tag=Kind.STREAM_ACK.value):
    summary = "driver -> worker: the first ``consumed`` items of stream ``tid`` were taken"
    tid: str
    consumed: Count


class Steal(Message, tag=Kind.STEAL.value):
    summary = (
        "driver -> worker (control socket): take these tasks out of your queue if they have "
        "not started (work stealing)"
    )
    tids: list[str]


class Stolen(Message, tag=Kind.STOLEN.value):
    summary = "worker -> driver: these tasks were taken out of the queue and will not run here"
    tids: list[str]


#: Most messages one BATCH carries.
MAX_BATCH = 1024


class Batch(Message, tag=Kind.BATCH.value):
    frames_doc = "sum(n)"
    summary = (
        "driver <-> worker (task socket): whole messages sent as one, ``n[i]`` frames each "
        "(its header first), handled in order; never a BATCH inside a BATCH"
    )
    n: Annotated[list[Annotated[int, msgspec.Meta(ge=1)]], msgspec.Meta(max_length=MAX_BATCH)]

    def frames(self) -> int | None:
        return sum(self.n)


# --- actors -------------------------------------------------------------------------------------
class ActorCreate(Message, tag=Kind.ACTOR_CREATE.value):
    frames_doc = "1 + nargs + sum(deps)"
    expects_reply = True
    summary = "driver -> head: + [class, ``nargs`` argument frames, dependency frames]"
    rid: int
    aid: str
    cls_name: str
    nargs: Count
    name: str | None = None
    ns: str = ""
    get_if_exists: bool = False
    detached: bool = False
    shape: Shape = {}
    place_shape: Shape = {}
    max_restarts: int = 0
    max_task_retries: int = 0
    max_concurrency: int = 1
    is_async: bool = False
    methods: dict[str, Any] = {}
    sys_path: list[str] = []
    strategy: Strategy | None = None
    deps: list[Count] = []
    renv: RuntimeEnv | None = None
    #: name -> that group's own concurrency limit (``@remote(concurrency_groups=...)``)
    concurrency_groups: dict[str, Annotated[int, msgspec.Meta(ge=1)]] = {}

    def frames(self) -> int | None:
        return _args_frames(self.nargs, self.deps, 1)


class ActorCreated(Message, tag=Kind.ACTOR_CREATED.value):
    summary = "head -> driver (``existing``: get_if_exists found it)"
    rid: int
    aid: str
    existing: bool = False
    methods: dict[str, Any] = {}
    cls_name: str = ""
    max_task_retries: int = 0
    is_async: bool = False


class ActorResolve(Message, tag=Kind.ACTOR_RESOLVE.value):
    expects_reply = True
    summary = "client -> head: subscribe to its state"
    aid: str


class ActorState(Message, tag=Kind.ACTOR_STATE.value):
    frame_count = None
    summary = "head -> client: + [init error] when ``init_error``"
    aid: str
    state: str
    addr: str | None = None
    control_addr: str | None = None
    worker_id: str | None = None
    reason: str | None = None
    cls_name: str | None = None
    init_error: bool = False
    infeasible: str | None = None


class ActorKill(Message, tag=Kind.ACTOR_KILL.value):
    summary = "client -> head"
    aid: str
    no_restart: bool = True


class ActorRelease(Message, tag=Kind.ACTOR_RELEASE.value):
    summary = "creator -> head: every handle is gone"
    aid: str


class ActorInit(Message, tag=Kind.ACTOR_INIT.value):
    frames_doc = "1 + nargs + sum(deps)"
    summary = "head -> worker: + [class, ``nargs`` argument frames, dependency frames]"
    aid: str
    job_id: str
    nargs: Count
    gpus: list[int] = []
    cls_name: str = "Actor"
    assigned: dict[str, Any] = {}
    deps: list[Count] = []
    max_concurrency: int = 1
    is_async: bool = False
    sys_path: list[str] = []
    renv: RuntimeEnv | None = None
    concurrency_groups: dict[str, Annotated[int, msgspec.Meta(ge=1)]] = {}
    pg: str | None = None  # the placement group it runs in
    capture: bool = False  # the tasks and actors it creates run in ``pg`` too

    def frames(self) -> int | None:
        return _args_frames(self.nargs, self.deps, 1)


class ActorReady(Message, tag=Kind.ACTOR_READY.value):
    summary = "worker -> head"
    aid: str


class ActorFailed(Message, tag=Kind.ACTOR_FAILED.value):
    frame_count = None
    summary = "worker -> head: + [error]"
    aid: str


class ActorExit(Message, tag=Kind.ACTOR_EXIT.value):
    summary = "worker -> head: exit_actor() or sys.exit() was called (``why``: which)"
    aid: str
    why: str = ""


class ActorAttach(Message, tag=Kind.ACTOR_ATTACH.value):
    summary = "head -> worker: a restarted head now watches this actor"
    aid: str


class ActorCall(Message, tag=Kind.ACTOR_CALL.value):
    frames_doc = "nargs + sum(deps)"
    expects_reply = True
    summary = "driver -> worker: + ``nargs`` argument frames + dependency frames"
    tid: str
    method: str
    name: str
    nargs: Count
    nret: Count = 1
    deps: list[Count] = []
    group: str = ""  # .options(concurrency_group=...); "": the method's own group
    gen: Annotated[int, msgspec.Meta(ge=0, le=2)] = 0  # as TASK's
    bp: Count = 0

    def frames(self) -> int | None:
        return _args_frames(self.nargs, self.deps)


def _collect() -> dict[str, type[Message]]:
    out: dict[str, type[Message]] = {}
    for cls in Message.__subclasses__():
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str)
        out[tag] = cls
    return out


#: Kind value -> its schema.
SCHEMAS: dict[str, type[Message]] = _collect()
