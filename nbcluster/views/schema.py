"""The view of each entity of the cluster, as everything outside the head sees it.

One :class:`msgspec.Struct` per entity (node, GPU, metrics sample, object store, task, actor,
job, cluster summary) and per message of the events websocket. The head builds them in one
place (:class:`nbcluster.head.observe.Observer`); the REST API and the websocket send them as
JSON, drivers receive them from the head's ``query`` (``nbcluster status``, ``%nbcluster
status``, the dashboard widget, ``nb.nodes()`` and ``nb.actors()``) and decode them back into
these classes, and the JupyterLab panel's types (``labextension/src/views.gen.ts``) are
generated from them by ``python -m nbcluster.views``.

Field names are the JSON keys (``docs/jupyter-api.md``). Every field is always sent; ``X | None``
ones may be ``null``. To add an entity (a pool, say): a Struct here named ``...View``, a line in
:data:`TS_EXPORTS` if nothing listed there refers to it, a builder in the Observer, and
``python -m nbcluster.views`` to regenerate the panel's types.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

#: Resource name -> amount (CPU, GPU, memory in bytes, custom resources). Annotated so that the
#: TypeScript names it (a plain ``dict[str, float]`` there is not a resource set).
Resources = Annotated[dict[str, float], "Resources"]
#: ``draining``: leaving, taking no new work.
NodeState = Literal["alive", "draining", "dead"]
TaskState = Literal["queued", "running", "infeasible", "finished", "failed", "cancelled"]
#: The protocol's actor states (:mod:`nbcluster.protocol.messages`), lower case.
ActorState = Literal["pending", "alive", "restarting", "dead"]

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
PlacementGroupState = Literal["PENDING", "CREATED", "RESCHEDULING", "REMOVED"]

#: Task states of work not yet over.
ACTIVE_TASK_STATES: tuple[TaskState, ...] = ("queued", "running", "infeasible")


class View(msgspec.Struct, kw_only=True):
    """Base of every view: keyword construction, compared by value."""


# --- nodes -------------------------------------------------------------------------------------
class GpuInfoView(View):
    """One GPU of a node as its agent found it at start (NVML index, name, memory in bytes)."""

    index: int
    name: str
    memory_total: int


class GpuProcessView(View):
    """A process using a GPU (NVML's compute processes) and, when it is one of our workers, the
    task or actor it ran at that sample.

    ``kind`` is ``"task"``, ``"actor"``, ``"worker"`` (one of ours, idle or between tasks) or
    ``None`` (not a worker of this node: another program). ``utilization`` is its SM percent
    where the driver keeps per-process samples.
    """

    pid: int
    memory_used: int
    utilization: float | None = None
    worker_id: str | None = None
    kind: Literal["task", "actor", "worker"] | None = None
    name: str | None = None
    id: str | None = None
    job_id: str | None = None
    notebook: str | None = None


class GpuMetricsView(View):
    """One GPU in a metrics sample: utilisation (percent), memory (bytes), who uses it."""

    index: int
    name: str
    utilization: float
    memory_used: int
    memory_total: int
    processes: list[GpuProcessView] = []


class MetricsView(View):
    """One metrics sample of a node (its agent takes one a second)."""

    time: float
    cpu_percent: float
    memory_used: int
    memory_total: int
    gpus: list[GpuMetricsView] = []


class ObjectStoreView(View):
    """A node's shared-memory object store: bytes in memory and spilled, objects, transfers."""

    capacity: int
    used: int
    spilled: int
    objects: int
    streams_served: int = 0
    bytes_out: int = 0
    pulls: int = 0
    bytes_in: int = 0


class NodeView(View):
    """A node (one agent): where it is, its resources, its latest metrics and its work.

    Dead nodes stay listed. ``resources_available`` is never negative; ``gpus_free`` is the
    free fraction of each GPU by id; ``workers`` counts its worker processes and ``leases`` the
    busy ones; ``tasks_running`` comes from the task table and ``actors`` counts alive actors.
    ``labels`` are the agent's ``--label KEY=VALUE`` (a pool's job is ``nbcluster.pool`` and
    ``nbcluster.job``).
    """

    node_id: str
    name: str
    address: str
    alive: bool
    state: NodeState
    pid: int
    resources_total: Resources
    resources_available: Resources
    gpus: list[GpuInfoView]
    gpus_free: dict[str, float]
    workers: int
    leases: int
    store_address: str
    store_id: str
    object_store: ObjectStoreView | None
    metrics: MetricsView | None
    tasks_running: int
    actors: int
    labels: dict[str, str] = {}


class NodeUpdateView(View):
    """What changes of a node every second (in the websocket's ``metrics`` message)."""

    node_id: str
    alive: bool
    state: NodeState
    metrics: MetricsView | None
    resources_available: Resources
    object_store: ObjectStoreView | None
    tasks_running: int
    actors: int

    @classmethod
    def of(cls, node: NodeView) -> NodeUpdateView:
        """The changing part of ``node``."""
        return cls(
            node_id=node.node_id,
            alive=node.alive,
            state=node.state,
            metrics=node.metrics,
            resources_available=node.resources_available,
            object_store=node.object_store,
            tasks_running=node.tasks_running,
            actors=node.actors,
        )


# --- the cluster -------------------------------------------------------------------------------
class HeadView(View):
    """The head: its address (``host:port``), start time and nbcluster version."""

    address: str
    started_at: float
    version: str


class TotalsView(View):
    """Sums over the alive nodes; ``*_used`` is total minus available."""

    nodes: int
    cpu: float = msgspec.field(name="CPU")
    cpu_used: float = msgspec.field(name="CPU_used")
    gpu: float = msgspec.field(name="GPU")
    gpu_used: float = msgspec.field(name="GPU_used")


class BundleView(View):
    """One bundle of a placement group: what it reserves, where, and what is free in it."""

    index: int
    resources: Resources
    node_id: str | None  # null while not placed
    available: Resources


class PlacementGroupView(View):
    """A placement group (``nbcluster.util.placement_group``): Ray's states, upper case."""

    placement_group_id: str
    name: str
    namespace: str
    job_id: str
    strategy: PlacementStrategy
    state: PlacementGroupState
    detached: bool
    infeasible: bool  # no set of alive nodes could ever hold it (it waits for nodes)
    bundles: list[BundleView]


class ClusterView(View):
    """The cluster: its head, every node, the totals, the placement groups (``GET
    nbcluster/api/cluster``)."""

    head: HeadView
    nodes: list[NodeView]
    totals: TotalsView
    placement_groups: list[PlacementGroupView] = []


# --- work --------------------------------------------------------------------------------------
class OwnerView(View):
    """The job a task or actor belongs to, with its kernel and notebook when it is one."""

    job_id: str
    kernel_id: str | None
    notebook: str | None


class TaskView(View):
    """A task: what it needs, where it runs, whose it is, when it changed.

    ``missing`` names the resources no alive node has enough of (``infeasible`` tasks only).
    ``cell_id`` and ``cell_count`` are the notebook cell that submitted it (its
    ``metadata.cellId`` and ``In [n]``), when a notebook kernel did.
    """

    task_id: str
    name: str
    state: TaskState
    node_id: str | None
    resources: Resources
    missing: str | None
    owner: OwnerView
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    cell_id: str | None = None
    cell_count: int | None = None


class TaskCountView(View):
    """Unfinished tasks of one job, function, resource shape and state, beyond those listed one
    by one: a driver reports at most 10,000 of its unfinished tasks individually and counts the
    others (a million queued at once would otherwise cost the head a record each).

    ``node_id`` is set for running ones; ``state`` is ``infeasible`` for queued ones no alive
    node has the resources for.
    """

    name: str
    state: TaskState
    count: int
    node_id: str | None
    resources: Resources
    owner: OwnerView


class ActorView(View):
    """An actor: its class and name, where it lives, its restarts, whose it is."""

    actor_id: str
    class_name: str
    name: str | None
    namespace: str
    state: ActorState
    job_id: str
    node_id: str | None
    pid: int | None
    resources: Resources
    detached: bool
    restarts: int
    death_reason: str | None
    created_at: float
    owner: OwnerView


class SpanView(View):
    """A task or actor call as it ran, for the timeline.

    Times are seconds since the epoch: ``submitted_at``, ``sent_at`` (to its worker) and
    ``ended_at`` (its result in) on the submitting driver's clock, ``started_at`` on the worker's
    (``None`` when its worker never answered: it died, or the call was cancelled). ``fetch``
    (its function and arguments loaded), ``run`` and ``store`` (its result serialized, large
    values written to the node's store) are durations in seconds, one after the other from
    ``started_at``. ``seq`` numbers spans as the head received them.
    """

    seq: int
    task_id: str
    name: str
    state: TaskState
    job_id: str
    node_id: str
    worker_id: str
    pid: int
    actor_id: str | None
    notebook: str | None
    cell: str | None
    submitted_at: float
    sent_at: float
    started_at: float | None
    fetch: float
    run: float
    store: float
    ended_at: float


# --- REST bodies -------------------------------------------------------------------------------
class TimelineBody(View):
    """``GET nbcluster/api/timeline[?since=SEQ&limit=N]``: the spans after ``since``, oldest
    first (at most ``limit``, the newest ones); ask again with ``since=next``. ``dropped``: how
    many older spans the head no longer holds (it keeps the last ``capacity``)."""

    spans: list[SpanView]
    next: int
    capacity: int
    dropped: int


class TasksBody(View):
    """``GET nbcluster/api/tasks``: active tasks, then the recently ended ones; ``counts``: the
    active tasks not listed one by one."""

    tasks: list[TaskView]
    counts: list[TaskCountView] = []


class ActorsBody(View):
    """``GET nbcluster/api/actors``."""

    actors: list[ActorView]


class NodeHistoryBody(View):
    """``GET nbcluster/api/metrics?node_id=ID``: that node's samples, oldest first."""

    node_id: str
    history: list[MetricsView]


class HistoriesBody(View):
    """``GET nbcluster/api/metrics``: every node's samples, oldest first."""

    nodes: dict[str, list[MetricsView]]


class LogBody(View):
    """``GET nbcluster/api/logs?actor=ID|task=ID|worker=ID[&offset=N]``: part of a worker's log.

    ``offset`` is where the next read goes on from (pass it back to follow the log); ``alive``
    whether the worker still runs.
    """

    text: str
    offset: int
    alive: bool
    worker_id: str
    node_id: str


class ErrorBody(View):
    """What a failed request gets (with a 4xx or 5xx status)."""

    error: str


class CancelledBody(View):
    """What cancelling a cell's tasks gets: how many tasks were asked to stop."""

    cancelled: int


class OkBody(View):
    """What a successful action (cancel, kill) gets."""

    ok: bool = True


# --- memory (``nbcluster memory``) -------------------------------------------------------------
ObjectState = Literal["in_memory", "spilled", "writing"]
#: The most objects a memory listing may ask for per node (one agent's answer stays small).
MEMORY_LIMIT_MAX = 10_000


class MemoryObjectView(View):
    """One object in a node's store.

    ``object_id`` is ``ObjectRef.hex()``; ``owner`` is the job that stored it (its notebook when
    a kernel did; ``job_id`` is ``""`` for an object without a recorded job); ``pins`` counts
    the processes on that node that have it mapped now (a pinned object is not spilled).
    """

    object_id: str
    size: int
    node_id: str
    node_name: str
    state: ObjectState
    pins: int
    owner: OwnerView


class MemoryNodeView(View):
    """One node's store in a memory listing: ``objects`` counts all of them, ``listed`` those
    shown; ``error`` says why a node did not answer (its objects are then missing)."""

    node_id: str
    name: str
    capacity: int
    used: int
    spilled: int
    objects: int
    listed: int
    error: str | None = None


class MemoryBody(View):
    """``GET nbcluster/api/memory[?limit=N]``: every alive node's largest objects (at most
    ``limit`` per node), all of them largest first."""

    nodes: list[MemoryNodeView]
    objects: list[MemoryObjectView]
    limit: int


# --- pools (nbcluster.deploy) -------------------------------------------------------------------
#: Where a pool's job stands (:class:`nbcluster.deploy.pool.JobState`).
PoolJobState = Literal["pending", "running", "draining", "gone"]


class PoolJobView(View):
    """One job of a pool: the scheduler's id, its state, its node once joined; for one that
    failed, the scheduler's reason and the last lines of its output."""

    job_id: str
    state: PoolJobState
    node_id: str | None
    host: str
    reason: str
    log_tail: str
    submitted_at: float
    joined_at: float | None
    ended_at: float | None


class PoolAdaptiveView(View):
    """The bounds of an adaptive pool (``idle``: seconds before an idle node is released)."""

    minimum: int
    maximum: int
    idle: float


class PoolView(View):
    """A pool of the server (``c.NbclusterApp.pools``): what each job asks for, its jobs."""

    name: str
    pool_id: str
    kind: str
    describe: str
    lifetime: str
    adaptive: PoolAdaptiveView | None
    closed: bool
    counts: dict[str, int]
    jobs: list[PoolJobView]


class PoolsBody(View):
    """``GET nbcluster/api/pools``: the server's pools, and the pool kinds it knows."""

    pools: list[PoolView]
    kinds: list[str]


class PoolActionBody(View):
    """What a successful scale or adapt gets: the pool as it is now (``None``: ended)."""

    pool: PoolView | None
    ok: bool = True


# --- the events websocket ----------------------------------------------------------------------
class Event(View, tag_field="type"):
    """Base of the websocket's messages, tagged by ``type``."""


class SnapshotEvent(Event, tag="snapshot"):
    """Sent once, on connect: the cluster, its tasks and its actors."""

    cluster: ClusterView
    tasks: list[TaskView]
    actors: list[ActorView]
    task_counts: list[TaskCountView] = []


class MetricsEvent(Event, tag="metrics"):
    """Sent every second: what changed of each node, the totals, the placement groups that
    are not removed."""

    time: float
    nodes: list[NodeUpdateView]
    totals: TotalsView
    placement_groups: list[PlacementGroupView] = []


class NodeEvent(Event, tag="node"):
    """A node joined or left."""

    node: NodeView


class TaskEvent(Event, tag="task"):
    """A task was submitted or changed state."""

    task: TaskView


class ActorEvent(Event, tag="actor"):
    """An actor was created or changed state."""

    actor: ActorView


#: Any message of the events websocket.
ServerMessage = SnapshotEvent | MetricsEvent | NodeEvent | TaskEvent | ActorEvent
#: A change the head announces to its subscribers (the websocket adds snapshots and metrics).
ChangeEvent = NodeEvent | TaskEvent | ActorEvent

#: What the panel's TypeScript file declares, in order (types these refer to come along).
TS_EXPORTS: tuple[tuple[str, object], ...] = (
    ("Resources", Resources),
    ("NodeState", NodeState),
    ("TaskState", TaskState),
    ("ActorState", ActorState),
    ("PlacementStrategy", PlacementStrategy),
    ("PlacementGroupState", PlacementGroupState),
    ("ClusterView", ClusterView),
    ("NodeUpdateView", NodeUpdateView),
    ("TaskView", TaskView),
    ("TaskCountView", TaskCountView),
    ("ActorView", ActorView),
    ("SpanView", SpanView),
    ("TimelineBody", TimelineBody),
    ("TasksBody", TasksBody),
    ("ActorsBody", ActorsBody),
    ("NodeHistoryBody", NodeHistoryBody),
    ("HistoriesBody", HistoriesBody),
    ("LogBody", LogBody),
    ("ErrorBody", ErrorBody),
    ("OkBody", OkBody),
    ("CancelledBody", CancelledBody),
    ("ObjectState", ObjectState),
    ("MemoryBody", MemoryBody),
    ("PoolJobState", PoolJobState),
    ("PoolsBody", PoolsBody),
    ("PoolActionBody", PoolActionBody),
    ("SnapshotEvent", SnapshotEvent),
    ("MetricsEvent", MetricsEvent),
    ("NodeEvent", NodeEvent),
    ("TaskEvent", TaskEvent),
    ("ActorEvent", ActorEvent),
    ("ServerMessage", ServerMessage),
)
