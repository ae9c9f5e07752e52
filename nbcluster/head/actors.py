"""The head's actor directory: creation, placement, restarts, names and death.

Actors are placed through the same lease machinery as tasks: the directory asks
:class:`ClusterState` for a lease on behalf of an :class:`ActorRequester`, and the worker it gets
hosts the actor for its whole life. Like ``ClusterState`` this is pure state: methods
return instructions for the service to carry out.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from nbcluster.head.instructions import (
    ActorChanged,
    ActorInit,
    ActorRequester,
    ActorUnknown,
    Instruction,
    KillWorker,
    PublishActorTo,
)
from nbcluster.head.model import Lease, WorkerInfo
from nbcluster.head.state import ClusterState
from nbcluster.protocol.messages import ALIVE, DEAD, PENDING, RESTARTING

#: How long a lookup of an actor the head does not know waits for the actor's creation: a handle
#: can reach another process, and its lookup the head, before the creator's ``ACTOR_CREATE``
#: does (they travel on different connections).
RESOLVE_WAIT_S = 5.0
NO_SUCH_ACTOR = "no such actor (it never existed here, or the head restarted)"


@dataclass
class ActorInfo:
    """Everything the head knows about one actor."""

    aid: str
    cls_name: str
    name: str | None
    namespace: str
    job_id: str
    owner: bytes
    detached: bool
    shape: dict[str, float]  # held while alive
    place_shape: dict[str, float]  # needed to be placed
    max_restarts: int
    max_task_retries: int
    methods: dict[str, int]
    spec: dict[str, Any]  # header fields the worker needs to (re)create the actor
    payload: list[bytes]  # pickled class and constructor arguments, never unpickled here
    state: str = PENDING
    restarts: int = 0
    rid: int = 0
    lease_id: str | None = None
    worker_id: str | None = None
    node_id: str | None = None
    address: str | None = None
    control_address: str | None = None
    pid: int = 0
    no_restart: bool = False
    death_reason: str = ""
    init_error: list[bytes] | None = None
    subscribers: set[bytes] = field(default_factory=set)
    created_at: float = field(default_factory=time.time)
    strategy: dict[str, Any] | None = None  # scheduling strategy (wire form); None = DEFAULT
    last_worker: tuple[str, str] | None = None  # (node, worker) it last ran on: whose log is its
    parent: str | None = None  # the actor whose methods created this one (fate sharing)


class ActorDirectory:
    """All actors of the cluster, keyed by id, with the named ones indexed by (namespace, name)."""

    def __init__(self, cluster: ClusterState) -> None:
        self.cluster = cluster
        self.actors: dict[str, ActorInfo] = {}
        self.names: dict[tuple[str, str], str] = {}
        self._rids = itertools.count(1)
        self.unresolved: dict[str, set[bytes]] = {}  # aid not known yet -> clients looking

    # ------------------------------------------------------------------------ creation
    def create(
        self,
        owner: bytes,
        job_id: str,
        h: dict[str, Any],
        payload: list[bytes],
        creator_worker: str | None = None,
    ) -> tuple[dict[str, Any], list[Instruction]]:
        """Register and place a new actor, or return the existing one of that name.

        ``creator_worker`` is the worker whose code asked (``None``: a driver); when that worker
        hosts an actor, the new one shares its fate unless detached, as in Ray.
        Returns the reply for the creator and the instructions to carry out.
        """
        name = h.get("name") or None
        ns = str(h.get("ns") or "")
        if name is not None:
            existing = self.names.get((ns, name))
            if existing is not None and self.actors[existing].state != DEAD:
                a = self.actors[existing]
                if h.get("get_if_exists"):
                    return self._created_reply(a, existing=True), []
                return {
                    "error": f"an actor named {name!r} already exists in namespace {ns!r}; use "
                    "options(get_if_exists=True) or another name"
                }, []
        a = ActorInfo(
            aid=h["aid"],
            cls_name=h["cls_name"],
            name=name,
            namespace=ns,
            job_id=job_id,
            owner=owner,
            detached=bool(h.get("detached")),
            shape=dict(h.get("shape") or {}),
            place_shape=dict(h.get("place_shape") or {}),
            max_restarts=int(h.get("max_restarts", 0)),
            max_task_retries=int(h.get("max_task_retries", 0)),
            methods=dict(h.get("methods") or {}),
            spec={
                k: h[k]
                for k in (
                    "nargs",
                    "deps",
                    "max_concurrency",
                    "is_async",
                    "sys_path",
                    "renv",
                    "concurrency_groups",
                )
                if k in h
            },
            payload=list(payload),
            strategy=h.get("strategy") or None,
        )
        creator = self.cluster.workers.get(creator_worker) if creator_worker else None
        if creator is not None and creator.actor_id is not None and not a.detached:
            a.parent = creator.actor_id
        a.subscribers.add(owner)
        self.actors[a.aid] = a
        if name is not None:
            self.names[(ns, name)] = a.aid
        waiting = self.unresolved.pop(a.aid, set())  # (looked up before it was created)
        a.subscribers |= waiting
        told: list[Instruction] = [PublishActorTo(client, a) for client in waiting]
        return self._created_reply(a, existing=False), [*told, *self._place(a)]

    def resolve(self, aid: str, client: bytes) -> list[Instruction] | None:
        """``client`` looks ``aid`` up: it is subscribed and told its state; ``None``: not known
        (yet), the client waits for its creation until :meth:`resolve_expired`."""
        a = self.actors.get(aid)
        if a is None:
            self.unresolved.setdefault(aid, set()).add(client)
            return None
        a.subscribers.add(client)
        return [PublishActorTo(client, a)]

    def resolve_expired(self, aid: str, client: bytes) -> list[Instruction]:
        """:data:`RESOLVE_WAIT_S` after a lookup of an unknown ``aid``: still unknown, dead."""
        waiting = self.unresolved.get(aid)
        if waiting is None or client not in waiting:
            return []
        waiting.discard(client)
        if not waiting:
            del self.unresolved[aid]
        return [ActorUnknown(client, aid, NO_SUCH_ACTOR)]

    def _created_reply(self, a: ActorInfo, existing: bool) -> dict[str, Any]:
        return {
            "aid": a.aid,
            "existing": existing,
            "methods": a.methods,
            "cls_name": a.cls_name,
            "max_task_retries": a.max_task_retries,
            "is_async": bool(a.spec.get("is_async")),
        }

    def place(self, a: ActorInfo) -> list[Instruction]:
        """Ask for a worker for ``a`` (again)."""
        return self._place(a)

    def _place(self, a: ActorInfo) -> list[Instruction]:
        a.rid = next(self._rids)
        renv = a.spec.get("renv")
        return self.cluster.request_lease(
            ActorRequester(a.aid),
            a.job_id,
            a.rid,
            a.place_shape,
            a.cls_name,
            strategy=a.strategy,
            env=renv.get("key", "") if isinstance(renv, dict) else "",
        )

    def on_grant(self, aid: str, lease: Lease, worker: WorkerInfo) -> list[Instruction]:
        """A worker was leased for the actor: ask it to create the instance."""
        a = self.actors.get(aid)
        if a is None or a.state == DEAD:  # killed while it waited for a worker
            out = self.cluster.return_lease(ActorRequester(aid), lease.lease_id)
            return [KillWorker(worker.node_id, worker.worker_id), *out]
        a.lease_id = lease.lease_id
        a.worker_id = worker.worker_id
        a.node_id = worker.node_id
        a.last_worker = (worker.node_id, worker.worker_id)
        a.pid = worker.pid
        worker.actor_id = aid
        worker.detached = a.detached
        return [ActorInit(a, worker, sorted(lease.gpus))]

    def on_ready(self, aid: str) -> list[Instruction]:
        a = self.actors.get(aid)
        if a is None or a.state == DEAD or a.worker_id is None:
            return []
        a.state = ALIVE
        w = self.cluster.workers.get(a.worker_id)
        a.address = w.address if w is not None else None
        a.control_address = w.control_address if w is not None else None
        out: list[Instruction] = []
        if a.lease_id is not None and a.shape != a.place_shape:
            out += self.cluster.resize_lease(a.lease_id, a.shape)
        return [ActorChanged(a), *out]

    def on_failed(self, aid: str, error: list[bytes]) -> list[Instruction]:
        """``__init__`` raised: the actor is dead, and every call fails with that error."""
        a = self.actors.get(aid)
        if a is None:
            return []
        a.init_error = error
        a.no_restart = True
        return self._die(a, "the actor's __init__ raised an exception")

    def on_lost(self, aid: str, reason: str) -> list[Instruction]:
        """The actor's worker died: restart it if allowed, else it is dead."""
        a = self.actors.get(aid)
        if a is None or a.state == DEAD:
            return []
        a.lease_id = a.worker_id = a.address = a.control_address = None
        a.pid = 0
        can_restart = not a.no_restart and (a.max_restarts == -1 or a.restarts < a.max_restarts)
        if not can_restart:
            return self._die(a, a.death_reason or reason)
        a.restarts += 1
        a.state = RESTARTING
        a.death_reason = reason
        # The instance that made its children is gone: they go too (a restart makes new ones).
        return [ActorChanged(a), *self._children_die(a), *self._place(a)]

    def on_unschedulable(self, aid: str, reason: str) -> list[Instruction]:
        """The actor can never be placed (hard affinity to a dead node): it is dead."""
        a = self.actors.get(aid)
        if a is None or a.state == DEAD:
            return []
        a.no_restart = True
        return self._die(a, reason)

    # ------------------------------------------------------------------------ death
    def kill(self, aid: str, no_restart: bool, reason: str) -> list[Instruction]:
        a = self.actors.get(aid)
        if a is None or a.state == DEAD:
            return []
        if no_restart:
            a.no_restart = True
        a.death_reason = reason
        if a.no_restart:
            # Dead now, as in Ray: nobody who looks it up from here on reaches its worker, which
            # may run a little longer while its agent stops it (on_lost then finds it dead).
            return self.cluster.cancel_request(ActorRequester(aid), a.rid) + self._die(a, reason)
        if a.worker_id is not None and a.node_id is not None:
            # The agent reports the exit; on_lost then restarts it.
            return [KillWorker(a.node_id, a.worker_id)]
        return []  # not placed yet: no process to kill, and it may still be placed

    def release(self, aid: str) -> list[Instruction]:
        """The creator dropped its last handle: anonymous, non-detached actors go away."""
        a = self.actors.get(aid)
        if a is None or a.name is not None or a.detached:
            return []
        return self.kill(aid, True, "all handles to the actor went out of scope")

    def exited(self, aid: str, why: str = "") -> list[Instruction]:
        """The actor ended itself (``why``: "called exit_actor()" or "called sys.exit(...)")."""
        return self.kill(aid, True, f"the actor {why or 'called exit_actor()'}")

    def job_gone(self, job_id: str) -> list[Instruction]:
        """A job's driver left: its non-detached actors die with it."""
        out: list[Instruction] = []
        for a in list(self.actors.values()):
            if a.job_id == job_id and not a.detached and a.state != DEAD:
                out += self.kill(a.aid, True, "the driver that owns the actor exited")
        return out

    def _die(self, a: ActorInfo, reason: str) -> list[Instruction]:
        a.state = DEAD
        a.death_reason = reason
        out: list[Instruction] = [ActorChanged(a)]
        if a.worker_id is not None and a.node_id is not None:
            out.append(KillWorker(a.node_id, a.worker_id))
        if a.name is not None and self.names.get((a.namespace, a.name)) == a.aid:
            del self.names[(a.namespace, a.name)]
        return out + self._children_die(a)

    def _children_die(self, a: ActorInfo) -> list[Instruction]:
        """Fate sharing: the (non-detached) actors ``a`` created die with it, and theirs too."""
        out: list[Instruction] = []
        why = f"the actor that created it ({a.cls_name} {a.aid}) died"
        for child in list(self.actors.values()):
            if child.parent == a.aid and child.state != DEAD:
                out += self.kill(child.aid, True, why)
        return out

    # ------------------------------------------------------------------------ queries
    def lookup(self, name: str, namespace: str) -> ActorInfo | None:
        aid = self.names.get((namespace, name))
        return self.actors.get(aid) if aid is not None else None
