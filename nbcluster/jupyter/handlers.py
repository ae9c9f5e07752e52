"""REST and websocket handlers of the server extension (contract: ``docs/jupyter-api.md``).

Thin: each reads a view from the head's :class:`~nbcluster.head.observe.Observer` (same process,
same event loop) or asks the head to act. Every handler (the Prometheus endpoint
``nbcluster/metrics`` too) requires the server's own authentication; POSTs made with cookie
authentication also need the XSRF token (jupyter-server checks it before our code runs). Every
handler is also authorized by the server's
``Authorizer`` (JupyterHub roles, read-only collaborators) on the resource ``"nbcluster"``:
reading views (and the events websocket, before its upgrade) needs action ``"read"``; cancelling
a task or killing an actor needs ``"execute"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from tornado.ioloop import PeriodicCallback
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from nbcluster.exceptions import NbclusterError
from nbcluster.head.logs import NO_TARGET
from nbcluster.head.timeline import PAGE
from nbcluster.views import (
    ActorsBody,
    CancelledBody,
    ChangeEvent,
    ErrorBody,
    HistoriesBody,
    LogBody,
    NodeHistoryBody,
    OkBody,
    PoolActionBody,
    PoolsBody,
    PoolView,
    ServerMessage,
    SnapshotEvent,
    TaskEvent,
    TasksBody,
    View,
)

if TYPE_CHECKING:
    from nbcluster.head.observe import Observer
    from nbcluster.head.service import HeadService
    from nbcluster.jupyter.app import NbclusterApp

#: The websocket's metrics message period.
METRICS_PERIOD_MS = 1000
#: What an ``Authorizer`` is asked about (``is_authorized(handler, user, action, resource)``).
AUTH_RESOURCE = "nbcluster"
#: Action needed to read the cluster, its tasks, actors and metrics (and the events stream).
READ = "read"
#: Action needed to cancel a task or kill an actor.
EXECUTE = "execute"

_F = TypeVar("_F", bound=Callable[..., Any])


def _authorized(action: str) -> Callable[[_F], _F]:
    """jupyter-server's ``@authorized(action)`` (on the handler's ``auth_resource``), typed."""
    return cast("Callable[[_F], _F]", authorized(action))


class _HeadMixin:
    settings: dict[str, Any]
    auth_resource = AUTH_RESOURCE

    @property
    def nbcluster_head(self) -> HeadService:
        app: NbclusterApp | None = self.settings.get("nbcluster")
        if app is None or app.head is None or app.head.address == "":
            raise web.HTTPError(503, "the nbcluster head is not running")
        return app.head

    @property
    def observer(self) -> Observer:
        return self.nbcluster_head.observe


class _Api(_HeadMixin, ExtensionHandlerMixin, APIHandler):
    def write_json(self, body: View, status: int = 200) -> None:
        """Send a view of :mod:`nbcluster.views` as the JSON body."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(msgspec.json.encode(body))


class ClusterHandler(_Api):
    """``GET nbcluster/api/cluster``: the head, every node with its metrics, and totals."""

    @web.authenticated
    @_authorized(READ)
    def get(self) -> None:
        self.write_json(self.observer.cluster())


class MetricsHandler(_Api):
    """``GET nbcluster/api/metrics[?node_id=ID]``: the last 10 minutes of metrics."""

    @web.authenticated
    @_authorized(READ)
    def get(self) -> None:
        obs = self.observer
        node_id = self.get_query_argument("node_id", None)
        if node_id is None:
            nodes = {nid: obs.history(nid) or [] for nid in obs.state.nodes}
            self.write_json(HistoriesBody(nodes=nodes))
            return
        history = obs.history(node_id)
        if history is None:
            self.write_json(ErrorBody(error=f"no node {node_id!r} in this cluster"), 404)
            return
        self.write_json(NodeHistoryBody(node_id=node_id, history=history))


class TasksHandler(_Api):
    """``GET nbcluster/api/tasks``: queued, running and infeasible tasks, and recent ended ones."""

    @web.authenticated
    @_authorized(READ)
    def get(self) -> None:
        obs = self.observer
        self.write_json(TasksBody(tasks=obs.task_views(), counts=obs.task_count_views()))


class TimelineHandler(_Api):
    """``GET nbcluster/api/timeline[?since=SEQ&limit=N]``: tasks and actor calls as they ran."""

    @web.authenticated
    @_authorized(READ)
    def get(self) -> None:
        try:
            since = int(self.get_query_argument("since", "0"))
            limit = int(self.get_query_argument("limit", str(PAGE)))
        except ValueError:
            self.write_json(ErrorBody(error="since and limit must be integers"), 400)
            return
        if since < 0 or not 1 <= limit <= PAGE:
            self.write_json(
                ErrorBody(error=f"since must be >= 0 and limit between 1 and {PAGE}"), 400
            )
            return
        self.write_json(self.observer.timeline_body(since, limit))


class ActorsHandler(_Api):
    """``GET nbcluster/api/actors``: every actor the head knows, with its owner."""

    @web.authenticated
    @_authorized(READ)
    def get(self) -> None:
        self.write_json(ActorsBody(actors=self.observer.actor_views()))


class MemoryHandler(_Api):
    """``GET nbcluster/api/memory[?limit=N]``: every alive node's largest stored objects (the
    head asks the agents: :mod:`nbcluster.head.memory`)."""

    @web.authenticated
    @_authorized(READ)
    async def get(self) -> None:
        head = self.nbcluster_head
        raw = self.get_query_argument("limit", None)
        try:
            limit = None if raw is None else int(raw)
            body = await head.memory.collect(head.observe, limit)
        except ValueError as exc:
            self.write_json(ErrorBody(error=f"bad limit {raw!r}: {exc}"), 400)
            return
        self.write_json(body)


class PrometheusHandler(_HeadMixin, ExtensionHandlerMixin, APIHandler):
    """``GET nbcluster/metrics``: the cluster's metrics in the Prometheus text format
    (:mod:`nbcluster.head.export`); a scraper authenticates as any client of the server
    (``Authorization: token ...``)."""

    @web.authenticated
    @_authorized(READ)
    def get(self) -> None:
        from nbcluster.head.export import CONTENT_TYPE, exposition

        body = exposition(self.observer)
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(body)


class CancelTaskHandler(_Api):
    """``POST nbcluster/api/tasks/{task_id}/cancel``: the owning driver cancels it."""

    @web.authenticated
    @_authorized(EXECUTE)
    async def post(self, task_id: str) -> None:
        force = self.get_query_argument("force", "false").lower() in ("1", "true", "yes")
        if await self.nbcluster_head.cancel_task(task_id, force):
            self.write_json(OkBody())
        else:
            self.write_json(ErrorBody(error=f"no queued or running task {task_id!r}"), 404)


class CancelCellHandler(_Api):
    """``POST nbcluster/api/jobs/{job_id}/cells/{cell_id}/cancel``: cancel every unfinished task
    that notebook cell submitted (answers how many were asked to stop)."""

    @web.authenticated
    @_authorized(EXECUTE)
    async def post(self, job_id: str, cell_id: str) -> None:
        force = self.get_query_argument("force", "false").lower() in ("1", "true", "yes")
        head = self.nbcluster_head
        tids = head.observe.cell_tasks(job_id, cell_id)
        if not tids:
            self.write_json(ErrorBody(error=f"no queued or running task of cell {cell_id}"), 404)
            return
        n = sum([await head.cancel_task(tid, force) for tid in tids])
        self.write_json(CancelledBody(cancelled=n))


class KillActorHandler(_Api):
    """``POST nbcluster/api/actors/{actor_id}/kill``: kill it for good (no restart)."""

    @web.authenticated
    @_authorized(EXECUTE)
    async def post(self, actor_id: str) -> None:
        if await self.nbcluster_head.kill_actor(actor_id):
            self.write_json(OkBody())
        else:
            self.write_json(ErrorBody(error=f"no live actor {actor_id!r}"), 404)


class PoolsHandler(_Api):
    """``GET nbcluster/api/pools``: the server's pools (``c.NbclusterApp.pools``) and jobs."""

    @web.authenticated
    @_authorized(READ)
    def get(self) -> None:
        from nbcluster.deploy.registry import KINDS

        app: NbclusterApp | None = self.settings.get("nbcluster")
        registry = app.pool_registry if app is not None else None
        pools = registry.as_list() if registry is not None else []
        self.write_json(msgspec.convert({"pools": pools, "kinds": list(KINDS)}, PoolsBody))


class _PoolAction(_Api):
    action = ""

    @web.authenticated
    @_authorized(EXECUTE)
    async def post(self, name: str) -> None:
        import asyncio

        app: NbclusterApp | None = self.settings.get("nbcluster")
        registry = app.pool_registry if app is not None else None
        if registry is None:
            raise web.HTTPError(503, "the nbcluster head is not running")
        try:
            body = json.loads(self.request.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            pool = registry.find(name)
            if pool is None and not body.get("kind"):
                self.write_json(ErrorBody(error=f"no pool {name!r} (a new one needs a kind)"), 404)
                return
            kind = pool.kind if pool is not None else str(body.get("kind") or "")
            options = {**(body.get("options") or {}), "name": name}
            if self.action == "scale":
                n = body.get("n")
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"n must be a whole number >= 0, got {n!r}")
                await asyncio.to_thread(registry.scale, kind, n, options)
            else:
                await asyncio.to_thread(
                    registry.adapt,
                    kind,
                    int(body.get("minimum", 0)),
                    int(body.get("maximum", 8)),
                    body.get("idle_timeout", "5min"),
                    options,
                )
        except (ValueError, TypeError, NbclusterError) as exc:
            self.write_json(ErrorBody(error=str(exc)), 400)
            return
        found = registry.find(name)
        view = msgspec.convert(found.as_dict(), PoolView) if found is not None else None
        self.write_json(PoolActionBody(pool=view))


class PoolScaleHandler(_PoolAction):
    """``POST nbcluster/api/pools/{name}/scale`` ``{"n": 4}``: that many jobs (``0`` ends the
    pool); a pool not made yet also needs ``"kind"`` and its ``"options"``."""

    action = "scale"


class PoolAdaptHandler(_PoolAction):
    """``POST nbcluster/api/pools/{name}/adapt`` ``{"minimum", "maximum", "idle_timeout"}``."""

    action = "adapt"


class EventsHandler(
    _HeadMixin, ExtensionHandlerMixin, WebSocketMixin, WebSocketHandler, JupyterHandler
):
    """``WS nbcluster/api/events``: a snapshot, then metrics once a second and changes."""

    _periodic: PeriodicCallback | None = None
    _observer: Observer | None = None
    _tasks: dict[str, TaskEvent] | None = None  # task changes held until the next tick

    @ws_authenticated
    @_authorized(READ)  # before the upgrade: a refused client gets 403, not a stream
    async def get(self, *args: Any, **kwargs: Any) -> None:
        self.nbcluster_head  # noqa: B018 - 503 before upgrading when there is no head
        res = super().get(*args, **kwargs)
        if res is not None:
            await res

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        obs = self._observer = self.observer
        self._send(
            SnapshotEvent(
                cluster=obs.cluster(),
                tasks=obs.task_views(),
                actors=obs.actor_views(),
                task_counts=obs.task_count_views(),
            )
        )
        self._tasks = {}
        obs.subscribers.append(self._on_change)
        self._periodic = PeriodicCallback(self._tick, METRICS_PERIOD_MS)
        self._periodic.start()

    def _on_change(self, msg: ChangeEvent) -> None:
        # Thousands of tasks may change state every second: send each task once per tick, in
        # its latest state, rather than every step it took.
        if isinstance(msg, TaskEvent) and self._tasks is not None:
            self._tasks[msg.task.task_id] = msg
        else:
            self._send(msg)

    def _tick(self) -> None:
        if self._tasks:
            pending, self._tasks = self._tasks, {}
            for msg in pending.values():
                self._send(msg)
        if self._observer is not None:
            self._send(self._observer.metrics_message())

    def _send(self, msg: ServerMessage) -> None:
        try:
            # A text frame (JSON is UTF-8): write_message sends bytes as text unless binary=True.
            self.write_message(msgspec.json.encode(msg))
        except WebSocketClosedError:
            self._unsubscribe()

    def _unsubscribe(self) -> None:
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None
        obs, self._observer = self._observer, None
        self._tasks = None
        if obs is not None and self._on_change in obs.subscribers:
            obs.subscribers.remove(self._on_change)

    def on_message(self, message: str | bytes) -> None:
        pass  # the stream is one-way

    def on_close(self) -> None:
        self._unsubscribe()
        super().on_close()


class LogsHandler(_Api):
    """``GET nbcluster/api/logs?actor=ID|task=ID|worker=ID[&offset=N]``: a worker's log, from
    its node (the last MiB on a first read; from ``offset`` on to follow it)."""

    @web.authenticated
    @_authorized(READ)
    async def get(self) -> None:
        arg = self.get_query_argument
        head = self.nbcluster_head
        target = head.logs.locate(arg("actor", None), None, arg("task", None), arg("worker", None))
        if target == NO_TARGET:
            raise web.HTTPError(400, target)
        try:
            offset = int(arg("offset", "-1"))
        except ValueError:
            raise web.HTTPError(400, "offset must be an integer") from None
        r = await head.logs.read(target, offset)
        if "error" in r:
            self.write_json(ErrorBody(error=str(r["error"])), 404)
        else:
            self.write_json(msgspec.convert(r, LogBody))


_ID = r"([^/]+)"
#: Every route of the extension (under the server's base_url); the auth test walks this list.
ROUTES: list[tuple[str, type[Any]]] = [
    (r"/nbcluster/api/cluster", ClusterHandler),
    (r"/nbcluster/api/metrics", MetricsHandler),
    (r"/nbcluster/api/tasks", TasksHandler),
    (r"/nbcluster/api/actors", ActorsHandler),
    (r"/nbcluster/api/memory", MemoryHandler),
    (r"/nbcluster/metrics", PrometheusHandler),
    (r"/nbcluster/api/timeline", TimelineHandler),
    (rf"/nbcluster/api/tasks/{_ID}/cancel", CancelTaskHandler),
    (rf"/nbcluster/api/actors/{_ID}/kill", KillActorHandler),
    (rf"/nbcluster/api/jobs/{_ID}/cells/{_ID}/cancel", CancelCellHandler),
    (r"/nbcluster/api/pools", PoolsHandler),
    (rf"/nbcluster/api/pools/{_ID}/scale", PoolScaleHandler),
    (rf"/nbcluster/api/pools/{_ID}/adapt", PoolAdaptHandler),
    (r"/nbcluster/api/logs", LogsHandler),
    (r"/nbcluster/api/events", EventsHandler),
]
