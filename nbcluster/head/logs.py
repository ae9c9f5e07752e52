"""Workers' logs read through the head: which worker an actor, a task or a worker id means, and
the round trip to that worker's node agent, which keeps the logs (:mod:`nbcluster.agent.logs`).

The head keeps no log text. A read names an actor (by name and namespace), a task (by id: the
drivers' task events say which worker ran it) or a worker; the head asks that worker's agent
(``LOG_FETCH``) and answers the reader with the agent's ``LOG_DATA``. Readers are drivers and the
``nbcluster logs`` command (``LOG_READ``), and the Jupyter extension, which hosts the head.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nbcluster.head.actors import ActorDirectory
from nbcluster.head.observe import Observer
from nbcluster.head.peers import Peer
from nbcluster.head.state import ClusterState
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import LogData, LogRead

#: What a read that names no target (or several) is told.
NO_TARGET = "name one of an actor, a task or a worker"
#: How long an agent has to answer a read.
FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LogTarget:
    """A worker whose log is read, and the task whose lines only are wanted (if any)."""

    node_id: str
    worker_id: str
    task: str | None = None


class LogRelay:
    """Finds whose log a reader means and fetches it from that node's agent."""

    def __init__(
        self,
        state: ClusterState,
        actors: ActorDirectory,
        observe: Observer,
        send: Callable[[bytes, dict[str, Any]], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self.state = state
        self.actors = actors
        self.observe = observe
        self._send = send
        self._spawn = spawn  # runs a coroutine beside the head's receive loop
        self._rids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}

    def locate(
        self,
        actor: str | None = None,
        ns: str | None = None,
        task: str | None = None,
        worker: str | None = None,
    ) -> LogTarget | str:
        """The worker meant, or why there is none (a message for the reader)."""
        if sum(x is not None for x in (actor, task, worker)) != 1:
            return NO_TARGET
        if actor is not None:  # a name (in ``ns``, else any namespace, the newest) or an id
            aid = self.actors.names.get((ns, actor)) if ns is not None else None
            a = self.actors.actors.get(aid or actor)
            if a is None and ns is None:
                named = [x for x in self.actors.actors.values() if x.name == actor]
                a = max(named, key=lambda x: x.created_at) if named else None
            if a is None:
                return f"no actor named {actor!r}"
            if a.last_worker is None:
                return f"actor {actor!r} has not started on a worker yet"
            return LogTarget(*a.last_worker)
        if task is not None:
            rec = self.observe.find_task(task)
            if rec is None:
                return f"task {task} is not known to the head (too old, or another id)"
            if rec.worker_id is None or rec.node_id is None:
                return f"task {task} has not run on a worker yet"
            return LogTarget(rec.node_id, rec.worker_id, task)
        assert worker is not None
        w = self.state.workers.get(worker)
        node_id = w.node_id if w is not None else worker.rpartition("-w")[0]
        if node_id not in self.state.nodes:
            return f"no worker {worker}"
        return LogTarget(node_id, worker)

    async def read(self, target: LogTarget | str, offset: int = -1, limit: int = 1 << 20) -> Any:
        """``{text, offset, alive, worker_id, node_id}`` from the worker's agent, or ``{error}``."""
        if isinstance(target, str):
            return {"error": target}
        node = self.state.nodes.get(target.node_id)
        if node is None or not node.alive:
            return {"error": f"node {target.node_id} of worker {target.worker_id} is gone"}
        rid = next(self._rids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (target.node_id, fut)
        fetch = {
            "k": Kind.LOG_FETCH,
            "rid": rid,
            "worker_id": target.worker_id,
            "task": target.task,
            "offset": offset,
            "limit": limit,
        }
        try:
            await self._send(node.client, fetch)
            result = await asyncio.wait_for(fut, FETCH_TIMEOUT_S)
        except TimeoutError:
            return {"error": f"node {target.node_id} did not answer within {FETCH_TIMEOUT_S:g} s"}
        finally:
            self._pending.pop(rid, None)
        return {**result, "worker_id": target.worker_id, "node_id": target.node_id}

    async def on_read(self, peer: Peer, msg: LogRead, payload: list[Any]) -> None:
        """A client's ``LOG_READ``: answered once the agent has (not inline)."""
        self._spawn(self.answer(peer.ident, msg), "head-log-read")

    async def answer(self, ident: bytes, msg: LogRead) -> None:
        """Answer a client's ``LOG_READ`` (``QUERY_REPLY``)."""
        target = self.locate(msg.actor, msg.ns, msg.task, msg.worker)
        result = await self.read(target, msg.offset, msg.limit)
        await self._send(ident, {"k": Kind.QUERY_REPLY, "rid": msg.rid, "result": result})

    async def on_data(self, peer: Peer, msg: LogData, payload: list[Any]) -> None:
        """An agent's ``LOG_DATA`` (only the asked node's is taken)."""
        entry = self._pending.get(msg.rid)
        if entry is not None and entry[0] == peer.node_id and not entry[1].done():
            entry[1].set_result(msg.result)
