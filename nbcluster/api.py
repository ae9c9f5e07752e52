"""The driver API: Ray Core's functions with Ray's names and semantics."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from nbcluster import context
from nbcluster.client import current
from nbcluster.client.core import CoreClient
from nbcluster.client.launcher import LocalCluster
from nbcluster.client.objects import PENDING
from nbcluster.exceptions import ConfigurationError
from nbcluster.generators import ObjectRefGenerator
from nbcluster.kernel import attach_kernel
from nbcluster.protocol.security import read_token_file, token_from_environment
from nbcluster.refs import ObjectRef
from nbcluster.runtime_env.spec import parse as parse_runtime_env
from nbcluster.runtime_env.upload import set_job_env

ADDRESS_ENV = "NBCLUSTER_ADDRESS"

log = logging.getLogger(__name__)

# Serialises init() and shutdown(); what they set up is the one session (client.current).
_init_lock = threading.Lock()


@dataclass(frozen=True)
class ClusterInfo:
    """What ``init()`` returns: where the cluster is and who we are in it."""

    address: str
    job_id: str
    node_id: str
    local: bool
    session_dir: str | None = None

    def __getitem__(self, key: str) -> Any:  # Ray's init() result is dict-like
        return getattr(self, key)

    def _repr_html_(self) -> str:
        kind = "local cluster" if self.local else "cluster"
        return (
            f"<b>nbcluster</b> {kind} at <code>{self.address}</code> "
            f"(job <code>{self.job_id}</code>)"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """In a notebook: a live view of the cluster (see :func:`nbcluster.dashboard`)."""
        from nbcluster.widgets import dashboard_bundle

        return dashboard_bundle(self._repr_html_(), **kwargs)


def init(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    token_file: str | os.PathLike[str] | None = None,
    log_to_driver: bool = True,
    namespace: str | None = None,
    object_store_memory: int | None = None,
    object_spill_limit: int | None = None,
    ignore_reinit_error: bool = True,  # accepted for Ray compatibility: re-init is never an error
    **ray_compat: Any,
) -> ClusterInfo:
    """Connect to a cluster, starting a local one when no address is given.

    Parameters
    ----------
    address
        ``"HOST:PORT"`` of a running head (``nbcluster head``). ``None`` uses
        ``$NBCLUSTER_ADDRESS`` if set, else starts a head and one node agent for this machine as
        child processes, stopped by :func:`shutdown` or when this process exits.
    num_cpus, num_gpus, resources
        Logical resources of the local node (defaults: detected from the machine). Ignored when
        connecting to an existing cluster.
    token_file
        File holding the cluster secret when connecting to an existing head (else
        ``$NBCLUSTER_TOKEN_FILE`` / ``$NBCLUSTER_TOKEN``).
    log_to_driver
        Print the tasks' stdout/stderr here.
    object_store_memory
        Bytes of shared memory for the local node's object store (default: 30% of the machine's
        memory, at most what ``/dev/shm`` has free).
    object_spill_limit
        Most bytes the local store may spill to disk (default: the disk's free space).
    namespace
        Where this job's named actors live (``get_actor`` looks there by default). Without it,
        each job has a namespace of its own.
    runtime_env
        Ray's ``runtime_env`` for every task and actor of this job (``working_dir``,
        ``py_modules``, ``excludes``, ``env_vars``; see ``docs/user-guide.md``). Its directories
        are packed and uploaded now; a task's or actor's own ``runtime_env`` is merged over it.

    Returns
    -------
    ClusterInfo
        Calling ``init`` again returns the same information (re-running a notebook cell is safe).
    """
    unknown = set(ray_compat) - {
        "include_dashboard",
        "configure_logging",
        "logging_level",
        "runtime_env",
        "_temp_dir",
        "local_mode",
    }
    if unknown:
        raise TypeError(f"init() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    runtime_env = parse_runtime_env(ray_compat.get("runtime_env"))  # bad keys fail before a start
    with _init_lock:
        existing = current.session()
        connected = existing is not None and existing.info is not None
        info = _init(
            address,
            num_cpus,
            num_gpus,
            resources,
            token_file,
            log_to_driver,
            namespace,
            object_store_memory,
            object_spill_limit,
        )
        if runtime_env is not None:
            client = current.require()
            try:
                set_job_env(client, runtime_env)  # packed and uploaded now, as in Ray
            except BaseException:
                if not connected:  # this call connected: leave nothing behind
                    shutdown()
                raise
        return info


def _init(
    address: str | None,
    num_cpus: float | None,
    num_gpus: float | None,
    resources: dict[str, float] | None,
    token_file: str | os.PathLike[str] | None,
    log_to_driver: bool,
    namespace: str | None,
    object_store_memory: int | None,
    object_spill_limit: int | None,
) -> ClusterInfo:
    session = current.session()
    if session is not None and session.info is not None:
        info = session.info
        wanted = (address or "").removeprefix("nbcluster://").removeprefix("tcp://")
        if wanted and wanted != "auto" and wanted != info.address:
            raise RuntimeError(
                f"already connected to {info.address}; call nbcluster.shutdown() before "
                f"connecting to {wanted}"
            )
        return info
    if context.in_worker():
        client = current.require()
        info = ClusterInfo(client.head_address, client.job_id, client.node_id, False)
        session = current.session()
        if session is not None:
            session.info = info
        return info
    address = address or os.environ.get(ADDRESS_ENV) or None
    if address in ("auto",):
        address = os.environ.get(ADDRESS_ENV)
        if not address:
            raise ConfigurationError("address='auto' needs $NBCLUSTER_ADDRESS")
    if address:
        address = address.removeprefix("nbcluster://").removeprefix("tcp://")
        token = (
            read_token_file(Path(token_file).expanduser())
            if token_file
            else token_from_environment()
        )
        if not token:
            raise ConfigurationError(
                f"connecting to {address} needs the cluster secret: pass token_file= or set "
                "NBCLUSTER_TOKEN_FILE"
            )
        client = CoreClient(address, token, log_to_driver=log_to_driver, namespace=namespace)
        client.connect()
        node = _local_node(client)
        client.node_id = str(node.get("node_id", ""))
        if node.get("store_address"):
            client.attach_store(node["store_address"], node["store_id"])
        info = ClusterInfo(address, client.job_id, client.node_id, False)
        current.set_session(current.Session(client, info))
    else:
        cluster = LocalCluster(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources,
            object_store_memory=object_store_memory,
            object_spill_limit=object_spill_limit,
        )
        cluster.start()
        try:
            client = CoreClient(
                cluster.address,
                cluster.token,
                node_id=cluster.node_id,
                log_to_driver=log_to_driver,
                namespace=namespace,
            )
            client.connect()
            client.attach_store(cluster.store_address, cluster.store_id)
        except BaseException:
            cluster.stop()
            raise
        info = ClusterInfo(
            cluster.address, client.job_id, cluster.node_id, True, str(cluster.session_dir)
        )
        current.set_session(current.Session(client, info, local=cluster))
    attach_kernel(client)  # in a notebook: remote prints go under the submitting cell
    return info


def _local_node(client: CoreClient) -> dict[str, Any]:
    """The node whose agent runs on this host (its store is ours to use), if any."""
    try:
        nodes = client.query("nodes")
    except Exception:
        return {}
    host = socket.gethostname()
    alive = [n for n in nodes if n.get("alive")]
    for n in alive:
        if n.get("name") == host:
            return dict(n)
    # Agents may carry other names (--node-name): match one listening on this machine.
    mine = {"127.0.0.1", "localhost", "::1"}
    for addrs in psutil.net_if_addrs().values():
        mine.update(a.address for a in addrs)
    for n in alive:
        if n.get("address") in mine:
            return dict(n)
    return {}


def is_initialized() -> bool:
    """Whether this process is connected to a cluster."""
    return current.get() is not None


def shutdown() -> None:
    """Disconnect; when ``init()`` started a local cluster, stop all of its processes."""
    with _init_lock:
        session = current.session()
        current.set_session(None)
        client = session.client if session is not None else None
        local = session.local if session is not None else None
        if client is not None:
            client.close(shutdown_cluster=local is not None)
        if local is not None:
            local.stop()


_exiting = False


def _shutdown_at_exit() -> None:
    global _exiting
    _exiting = True  # what runs later in the exit (other handlers, finalizers) starts nothing
    shutdown()


atexit.register(_shutdown_at_exit)


def _auto_init() -> CoreClient:
    """Ray's automatic start: the first use of the API without ``init()`` calls ``init()``.

    It joins ``$NBCLUSTER_ADDRESS`` when set (a kernel of a Jupyter server that hosts a head),
    else starts a local cluster, and says which in one line. Threads racing here get one cluster:
    the check and the start run under ``init()``'s lock.
    """
    if context.in_worker():  # a worker's tasks connect through the worker's own connector
        raise RuntimeError("nbcluster is not initialized: call nbcluster.init() first")
    if _exiting or sys.is_finalizing():
        raise RuntimeError("nbcluster is shut down: the interpreter is exiting")
    with _init_lock:  # check and start as one step: one cluster, one line
        session = current.session()
        if session is None:
            info = _init(None, None, None, None, None, True, None, None, None)
            if info.local:
                _announce(f"Started a local nbcluster instance at {info.address}.")
            else:
                _announce(f"Connected to nbcluster cluster at {info.address}.")
            session = current.session()
            if session is None:  # _init() sets it or raises
                raise RuntimeError("nbcluster: the automatic start left no session")
    return session.client


def _announce(message: str) -> None:
    """Log ``message`` at INFO; where logging would not show it, write it to stderr as Ray does
    (in a notebook that is the cell's output)."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message)
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} INFO nbcluster -- {message}", file=sys.stderr, flush=True)


current.set_driver_connector(_auto_init)


def _client() -> CoreClient:
    return current.require()


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the cluster; returns a ref to pass to tasks or ``get``."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself")
    return _client().put(value)


class InvalidRefsError(ValueError, TypeError):
    """``get()`` of something that is neither an ``ObjectRef`` nor a list of them.

    A ``ValueError``, as Ray raises; also a ``TypeError``, as nbcluster raised before.
    """


def get(
    refs: ObjectRef | Sequence[ObjectRef],
    *,
    timeout: float | None = None,
    progress: bool = False,
) -> Any:
    """Wait for and return the value(s) of ``refs``.

    ``progress=True`` shows a progress bar while waiting (a widget in a notebook, else a line on
    stderr). Interrupting the wait (Ctrl-C, or the notebook's stop button) cancels the tasks
    still pending among ``refs`` and re-raises ``KeyboardInterrupt``.

    Raises
    ------
    GetTimeoutError
        If the values are not ready within ``timeout`` seconds.
    ValueError
        If ``refs`` is neither a ref nor a list of refs (Ray's error; also a ``TypeError``).
    TypeError
        If the list holds something that is not a ref (Ray's error and words).
    TaskError
        (also an instance of the original exception type) if the task raised.
    """
    client = _client()
    single = isinstance(refs, ObjectRef)
    if single:
        refs = [refs]  # type: ignore[list-item]
    if not isinstance(refs, list | tuple):
        raise InvalidRefsError(
            f"Invalid type of object refs, {type(refs)}, is given. 'object_refs' must either be "
            f"an ObjectRef or a list of ObjectRefs. (get() got {type(refs).__name__})"
        )
    for r in refs:
        if not isinstance(r, ObjectRef):
            # Ray's type and words, so code that matches on them keeps working.
            raise TypeError(
                f"Attempting to call `get` on the value {r!s:.200}, which is not an ray.ObjectRef."
            )
        if r.is_nil():
            raise ValueError("get() of a nil ObjectRef (ObjectRef.nil() refers to no object)")
    bar = None
    if progress:
        from nbcluster.progress import progress as show_progress

        bar = show_progress(list(refs))
    try:
        values = client.get(list(refs), timeout)
    except KeyboardInterrupt:
        _cancel_pending(client, refs)
        raise
    finally:
        if bar is not None:
            bar.close()
    return values[0] if single else values


def _cancel_pending(client: CoreClient, refs: Sequence[ObjectRef]) -> None:
    """Cancel the tasks (and actor calls) we own that would produce ``refs`` and are not done."""
    for r in refs:
        e = client.objects.get(r.oid)
        if e is not None and e.owned and e.state == PENDING:
            with contextlib.suppress(Exception):
                client.cancel(r, False)


def wait(
    refs: Sequence[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Return ``(ready, not_ready)``: as soon as ``num_returns`` refs are ready, or at ``timeout``.

    Both lists keep the order of ``refs``.
    """
    if isinstance(refs, ObjectRef):
        raise TypeError("wait() expected a list of ObjectRefs, got a single ObjectRef")
    if not isinstance(refs, list | tuple):
        raise TypeError(f"wait() expected a list of ObjectRefs, got {type(refs).__name__}")
    if any(isinstance(r, ObjectRefGenerator) for r in refs):
        return _wait_generators(list(refs), num_returns, timeout)
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(
                f"wait() expected a list of ObjectRefs, got a list containing {type(r).__name__}"
            )
        if r.is_nil():
            raise ValueError("wait() of a nil ObjectRef (ObjectRef.nil() refers to no object)")
    if len(set(refs)) != len(refs):
        raise ValueError("wait() expects a list of unique ObjectRefs")
    if num_returns < 0 or num_returns > len(refs):
        raise ValueError(f"num_returns must be between 0 and {len(refs)}, got {num_returns}")
    client = _client()
    try:
        return client.wait(list(refs), num_returns, timeout)
    except KeyboardInterrupt:
        _cancel_pending(client, refs)
        raise


def _wait_generators(
    items: list[Any], num_returns: int, timeout: float | None
) -> tuple[list[Any], list[Any]]:
    """``wait`` of a list holding ``ObjectRefGenerator``s: one is ready when its next ref is
    (Ray's rule). Polls every few milliseconds (a generator has no single object to wait on)."""
    if num_returns < 0 or num_returns > len(items):
        raise ValueError(f"num_returns must be between 0 and {len(items)}, got {num_returns}")
    for r in items:
        if not isinstance(r, ObjectRef | ObjectRefGenerator):
            raise TypeError(
                "wait() expected a list of ObjectRefs and ObjectRefGenerators, got a list "
                f"containing {type(r).__name__}"
            )
    client = _client()
    deadline = None if timeout is None else time.monotonic() + timeout

    def is_ready(r: Any) -> bool:
        if isinstance(r, ObjectRefGenerator):
            return r.next_ready()
        e = client.objects.get(r.oid)
        return e is None or e.state != PENDING

    while True:
        flags = [is_ready(r) for r in items]
        if sum(flags) >= num_returns or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(0.002)
    ready: list[Any] = []
    not_ready: list[Any] = []
    for r, ok in zip(items, flags, strict=True):
        (ready if ok and len(ready) < num_returns else not_ready).append(r)
    return ready, not_ready


def cancel(
    ref: ObjectRef | ObjectRefGenerator, *, force: bool = False, recursive: bool = True
) -> None:
    """Cancel the task producing ``ref``; ``get`` of it then raises ``TaskCancelledError``.

    A queued task is dropped. A running one gets ``KeyboardInterrupt`` (``force=True`` kills its
    worker instead). Cancelling a finished task does nothing. ``ref`` may be a streaming
    generator (``ObjectRefGenerator``): its task stops, and the ref after the last item it
    yielded raises ``TaskCancelledError``.
    """
    if isinstance(ref, ObjectRefGenerator):
        ref = ref.completed()
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() expected an ObjectRef, got {type(ref).__name__}")
    _client().cancel(ref, force)


def nodes() -> list[dict[str, Any]]:
    """Every node of the cluster (Ray's keys ``NodeID``, ``Alive``, ``Resources`` included).

    Each is a :class:`nbcluster.views.NodeView` as a dict (the Jupyter panel's node), plus the
    keys Ray's ``ray.nodes()`` has.
    """
    result = []
    for n in _client().query("nodes"):
        n = dict(n)
        n.setdefault("NodeID", n["node_id"])
        n.setdefault("Alive", n["alive"])
        n.setdefault("NodeManagerAddress", n["address"])
        n.setdefault("NodeName", n["name"])
        n.setdefault("Resources", n["resources_total"])
        result.append(n)
    return result


def timeline(filename: str | os.PathLike[str] | None = None) -> list[dict[str, Any]] | None:
    """The cluster's recent tasks and actor calls as Chrome trace events (Ray's
    ``ray.timeline``).

    One complete event (``ph: "X"``) per task or call, named after its function, on its worker's
    lane (``pid``: its node, ``tid``: the worker's pid), ``ts`` and ``dur`` in microseconds, with
    its phases nested (``task:deserialize_arguments``, ``task:execute``,
    ``task:store_outputs``) and its task id, state, error flag, notebook cell and queueing time
    in ``args``. The head keeps the last 100,000 spans of all jobs.

    Parameters
    ----------
    filename
        Where to write the trace as JSON (``{"traceEvents": [...]}``, which ``chrome://tracing``
        and https://ui.perfetto.dev open); ``None`` returns the events instead.

    Returns
    -------
    list of dict or None
        The events when ``filename`` is ``None``.
    """
    import json

    from nbcluster.views.trace import chrome_trace

    client = _client()
    spans: list[dict[str, Any]] = []
    since = 0
    while True:  # a page at a time: the head answers others in between
        page = client.query_args("timeline", timeout=60.0, since=since)
        if not page:
            break
        fields, notebooks = page["fields"], page["notebooks"]
        for row in page["rows"]:
            s = dict(zip(fields, row, strict=True))
            s["notebook"] = notebooks.get(s["job_id"])
            spans.append(s)
        if not page["more"] or page["last"] <= since:
            break
        since = page["last"]
    names = {n["node_id"]: n["name"] for n in client.query("nodes")}
    events = chrome_trace(spans, names)
    if filename is None:
        return events
    with open(filename, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return None


def _sum(key: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for n in _client().query("nodes"):
        if n["alive"]:
            for k, v in n[key].items():
                total[k] = total.get(k, 0.0) + v
    return total


def cluster_resources() -> dict[str, float]:
    """Total resources of the alive nodes."""
    return _sum("resources_total")


def available_resources() -> dict[str, float]:
    """Resources not held by running tasks right now."""
    return {k: v for k, v in _sum("resources_available").items() if v > 0}


class RuntimeContext:
    """Where the calling code runs: job, task, node, actor, namespace, assigned resources.

    Ray's methods (``get_job_id()``...) and properties (``job_id``, ``node_id``, ``task_id``,
    ``actor_id``, ``namespace``, ``current_actor``...) give ids as strings.
    """

    def get_job_id(self) -> str:
        task = context.current_task.get()
        return task.job_id if task is not None else _client().job_id

    @property
    def job_id(self) -> str:
        return self.get_job_id()

    def get_task_id(self) -> str | None:
        """The running task's id (``None`` in a driver)."""
        task = context.current_task.get()
        return task.task_id if task is not None else None

    def get_node_id(self) -> str:
        task = context.current_task.get()
        if task is not None:
            return task.node_id
        return _client().node_id

    def get_actor_id(self) -> str | None:
        """The id of the actor whose method runs here (``None`` outside actors)."""
        task = context.current_task.get()
        return task.actor_id if task is not None else None

    def get_worker_id(self) -> str | None:
        task = context.current_task.get()
        return task.worker_id if task is not None else None

    def get_assigned_resources(self) -> dict[str, float]:
        """Resources held by the running task (empty in a driver)."""
        task = context.current_task.get()
        if task is None:
            return {}
        return {k: v for k, v in task.assigned.items() if isinstance(v, int | float)}

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        task = context.current_task.get()
        ids = task.assigned.get("GPU_IDS", []) if task is not None else []
        return {"GPU": [str(i) for i in ids]} if isinstance(ids, list) else {"GPU": []}

    @property
    def node_id(self) -> str:
        """The node this code runs on (Ray's deprecated property; ``get_node_id()``)."""
        return self.get_node_id()

    @property
    def task_id(self) -> str | None:
        """The running task's id (``None`` in a driver)."""
        return self.get_task_id()

    @property
    def actor_id(self) -> str | None:
        """The current actor's id (``None`` outside actors)."""
        return self.get_actor_id()

    @property
    def namespace(self) -> str:
        """The namespace named actors are created and looked up in by default."""
        ident = context.worker_identity
        if ident is not None:
            return ident.namespace or f"job-{self.get_job_id()}"
        client = _client()
        return client.namespace or f"job-{client.job_id}"

    @property
    def gcs_address(self) -> str:
        """The head's address (Ray's GCS address)."""
        return str(_client().head_address)

    def _actor_view(self) -> dict[str, Any] | None:
        aid = self.get_actor_id()
        if aid is None:
            return None
        for a in _client().query("actors"):
            if a["actor_id"] == aid:
                return dict(a)
        return None

    def get_actor_name(self) -> str | None:
        """The current actor's name (``None`` if unnamed or outside actors)."""
        view = self._actor_view()
        return view.get("name") if view is not None else None

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """Whether the current actor was restarted (after a crash) at least once."""
        view = self._actor_view()
        return bool(view is not None and view.get("restarts"))

    def get_placement_group_id(self) -> str | None:
        """The id of the placement group this task or actor runs in (``None`` in a driver and
        outside groups)."""
        task = context.current_task.get()
        return task.placement_group if task is not None else None

    @property
    def current_placement_group_id(self) -> str | None:
        return self.get_placement_group_id()

    @property
    def should_capture_child_tasks_in_placement_group(self) -> bool:
        """Whether tasks and actors created here run in this task's placement group (``True``
        in a driver, as in Ray, where there is no group to run in)."""
        task = context.current_task.get()
        return task is None or task.capture

    @property
    def current_actor(self) -> Any:
        """A handle to the current actor (from its methods or ``__init__``).

        Raises
        ------
        RuntimeError
            Outside an actor.
        """
        from nbcluster.actor import ActorHandle, method_table

        aid = self.get_actor_id()
        cls = context.actor_class
        if aid is None or cls is None:
            raise RuntimeError("current_actor is only available inside an actor")
        methods, _ = method_table(cls)
        return ActorHandle(aid, cls.__name__, methods, _client())

    def get(self) -> dict[str, Any]:
        """The context as a dict: ``job_id``, ``node_id``, ``namespace``, and ``task_id`` in a
        task, ``actor_id`` in an actor (Ray's keys)."""
        out: dict[str, Any] = {
            "job_id": self.get_job_id(),
            "node_id": self.get_node_id(),
            "namespace": self.namespace,
        }
        if (tid := self.get_task_id()) is not None:
            out["task_id"] = tid
        if (aid := self.get_actor_id()) is not None:
            out["actor_id"] = aid
        return out


def get_runtime_context() -> RuntimeContext:
    """Information about the calling driver or task (in a driver: starts a cluster if needed)."""
    if not context.in_worker():
        _client()  # Ray's automatic start
    return RuntimeContext()


def actors() -> list[dict[str, Any]]:
    """Every actor the head knows: id, class, name, state, node, resources, owning job.

    Each is a :class:`nbcluster.views.ActorView` as a dict, its ``state`` in upper case as Ray
    writes it (``PENDING``, ``ALIVE``, ``RESTARTING``, ``DEAD``).
    """
    return [{**a, "state": str(a["state"]).upper()} for a in _client().query("actors")]


def get_gpu_ids() -> list[int]:
    """GPU ids assigned to the running task (Ray's ``get_gpu_ids``)."""
    task = context.current_task.get()
    return list(task.assigned.get("GPU_IDS", [])) if task is not None else []  # type: ignore[call-overload]
