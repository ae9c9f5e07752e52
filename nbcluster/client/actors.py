"""Actor calls from a client: creation, ordered method calls, restarts and death.

Part of :class:`~nbcluster.client.state.ClientState` (pure: it only returns instructions).
Calls to one actor go, in submission order, straight to the worker hosting it; the head only
tells us where the actor lives (and when that changes), through ``ACTOR_STATE`` messages we
subscribe to.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbcluster.client.inputs import ActorStateChanged
from nbcluster.client.inputs import TaskResult as TaskResultEvent
from nbcluster.client.instructions import AwaitReply, CancelOnWorker, Instruction, ToHead, ToWorker
from nbcluster.client.objects import FAILED, READY, Entry, ObjectTable
from nbcluster.client.tasks import TaskRecord
from nbcluster.client.wire import split_parts
from nbcluster.client.workers import WorkerConn, WorkerConns
from nbcluster.exceptions import ActorDiedError, NbclusterError
from nbcluster.protocol.messages import ALIVE, DEAD, RESTARTING, Kind
from nbcluster.serialization import dumps

if TYPE_CHECKING:
    from nbcluster.client.submission import Tasks
    from nbcluster.refs import ObjectRef

log = logging.getLogger("nbcluster")

UNKNOWN = "UNKNOWN"  # the driver's own: not heard of from the head yet


@dataclass
class ActorRecord:
    """What this client knows about one actor and the calls it has sent to it."""

    aid: str
    cls_name: str
    max_task_retries: int = 0
    state: str = UNKNOWN
    conn: WorkerConn | None = None
    pending: deque[TaskRecord] = field(default_factory=deque)  # submission order
    inflight: dict[str, TaskRecord] = field(default_factory=dict)
    death: list[Any] | None = None  # serialized error every call fails with once dead
    subscribed: bool = False
    handles: int = 0  # live ActorHandle objects here
    owned: bool = False  # created by this client: we release it when our handles are gone
    escaped: bool = False  # a handle was sent elsewhere: keep it alive
    release_when_idle: bool = False
    killed: bool = False  # this client called kill(no_restart=True): dead here whatever comes
    announced: bool = True  # False while our ACTOR_CREATE waits for its arguments


class ActorCalls:
    """The actors this client knows, and the calls it sends them.

    Parameters
    ----------
    objects
        The object table.
    conns
        Our connections to workers (an actor's worker is one).
    next_rid
        Gives request ids (``ACTOR_CREATE`` is answered by id).
    emit
        Where instructions go.
    """

    # Collaborator, set once by ClientState.
    tasks: Tasks

    def __init__(
        self,
        objects: ObjectTable,
        conns: WorkerConns,
        next_rid: Callable[[], int],
        emit: Callable[[Instruction], None],
    ) -> None:
        self.objects = objects
        self.conns = conns
        self._next_rid = next_rid
        self._emit = emit
        self.actors: dict[str, ActorRecord] = {}

    def _record(self, aid: str, cls_name: str = "") -> ActorRecord:
        ar = self.actors.get(aid)
        if ar is None:
            ar = self.actors[aid] = ActorRecord(aid, cls_name)
        elif cls_name and not ar.cls_name:
            ar.cls_name = cls_name
        return ar

    def create(
        self,
        header: dict[str, Any],
        payload: list[Any],
        deps: list[ObjectRef],
        fut: concurrent.futures.Future[dict[str, Any]],
    ) -> None:
        """Send an ``ACTOR_CREATE`` once its argument refs are ready (constructor errors and
        the head's answer go to ``fut``)."""
        ar = self._record(header["aid"], header["cls_name"])
        ar.owned = True
        ar.announced = False
        ar.subscribed = True  # the head subscribes the creator
        ar.max_task_retries = int(header.get("max_task_retries", 0))
        # The actor reads its constructor's arguments again on every restart: keep them.
        for d in deps:
            self.objects.mark_escaped(d.oid)
        entries = [self.tasks.resolve(d) for d in deps]
        waiting = [e for e in entries if e.state not in (READY, FAILED)]

        def send() -> None:
            if ar.killed:  # kill() came first (its ACTOR_KILL found nothing at the head)
                ar.announced = True
                if not fut.done():
                    fut.set_exception(ActorDiedError(f"the actor {header['cls_name']} was killed"))
                return
            dep_frames: list[Any] = []
            counts = []
            for e in entries:
                if e.state == FAILED:
                    fut.set_exception(
                        NbclusterError(
                            f"an argument of {header['cls_name']}() failed; "
                            "the actor was not created"
                        )
                    )
                    self._actor_dead(ar, e.frames)
                    return
                dep_frames.extend(e.frames)
                counts.append(len(e.frames))
            rid = self._next_rid()
            ar.announced = True
            self._emit(AwaitReply(rid, fut))
            self._emit(ToHead({**header, "rid": rid, "deps": counts}, [*payload, *dep_frames]))

        if not waiting:
            send()
            return
        left = [len(waiting)]

        def one(_e: Entry) -> None:
            left[0] -= 1
            if left[0] == 0:
                send()

        for e in waiting:
            if not self.objects.on_ready(e.oid, one):
                one(e)

    def count_handle(self, aid: str, cls_name: str, owned: bool, delta: int) -> None:
        """A handle appeared or went away; the last one of an actor we own releases it."""
        ar = self._record(aid, cls_name)
        if owned:
            ar.owned = True
        ar.handles += delta
        if ar.handles <= 0 and ar.owned and not ar.escaped and ar.state != DEAD:
            ar.release_when_idle = True
            self._maybe_release(ar)

    def escaped(self, aid: str) -> None:
        """A handle went to another process: the actor is not ours to release any more."""
        self._record(aid).escaped = True

    def kill(
        self, aid: str, no_restart: bool, done: concurrent.futures.Future[None] | None = None
    ) -> None:
        """Ask the head to kill ``aid``; with ``no_restart`` it is dead here at once."""
        try:
            self._emit(ToHead({"k": Kind.ACTOR_KILL, "aid": aid, "no_restart": bool(no_restart)}))
            if no_restart:
                ar = self._record(aid)
                ar.killed = True
                if ar.state != DEAD:
                    name = ar.cls_name or "actor"
                    why = f"the actor {name} ({aid}) is dead: killed by nbcluster.kill()"
                    self._actor_dead(ar, dumps(ActorDiedError(why)))
        finally:
            if done is not None and not done.done():
                done.set_result(None)

    def claims(self) -> list[str]:
        """The actors a rejoining ``HELLO`` names (not the ones whose creation was not sent
        yet: the head would call them unknown)."""
        return [aid for aid, ar in self.actors.items() if ar.announced]

    def _maybe_release(self, ar: ActorRecord) -> None:
        if ar.release_when_idle and not ar.pending and not ar.inflight:
            ar.release_when_idle = False
            self._emit(ToHead({"k": Kind.ACTOR_RELEASE, "aid": ar.aid}))

    def call(self, rec: TaskRecord, cls_name: str) -> None:
        """Queue a method call: it is sent once its arguments are ready and the actor alive."""
        assert rec.actor_id is not None
        ar = self._record(rec.actor_id, cls_name)
        if not ar.subscribed:
            ar.subscribed = True
            self._emit(ToHead({"k": Kind.ACTOR_RESOLVE, "aid": ar.aid}))
        ar.pending.append(rec)
        self.tasks.submit(rec)  # resolves dependencies, then call_ready

    def call_ready(self, rec: TaskRecord) -> None:
        """A call's arguments are here: send what can leave, in order."""
        assert rec.actor_id is not None
        self._pump_actor(self.actors[rec.actor_id])

    def finished(self, rec: TaskRecord) -> None:
        """A call finished: if it was first in line (failed before it was sent: cancelled, or
        an argument failed), the calls behind it may leave now."""
        assert rec.actor_id is not None
        ar = self.actors.get(rec.actor_id)
        if ar is not None and ar.state == ALIVE and ar.pending and ar.pending[0] is rec:
            self._pump_actor(ar)

    def _pump_actor(self, ar: ActorRecord) -> None:
        if ar.state == DEAD:
            self._fail_calls(ar, list(ar.pending))
            ar.pending.clear()
            return
        if ar.state != ALIVE or ar.conn is None or ar.conn.closed:
            return
        # Calls leave in submission order: a call waiting for its arguments holds up later ones.
        while ar.pending:
            rec = ar.pending[0]
            if (
                rec.cancelled or rec.tid not in self.tasks.by_tid
            ):  # cancelled, or an argument failed
                ar.pending.popleft()
                continue
            if rec.waiting_deps > 0:
                break
            ar.pending.popleft()
            self._send_call(ar, rec)
        self._maybe_release(ar)

    def _send_call(self, ar: ActorRecord, rec: TaskRecord) -> None:
        assert ar.conn is not None
        ar.inflight[rec.tid] = rec
        rec.sent_to, rec.sent_at = ar.conn, self.tasks.events.now
        header: dict[str, Any] = {
            "k": Kind.ACTOR_CALL,
            "tid": rec.tid,
            "method": rec.method,
            "name": ar.cls_name,
            "nargs": len(rec.args),
            "nret": rec.nret,
        }
        if rec.group:
            header["group"] = rec.group
        if rec.gen:
            header["gen"], header["bp"] = rec.gen, rec.bp
        payload: list[Any] = list(rec.args)
        if rec.dep_frames:
            header["deps"] = [len(f) for f in rec.dep_frames]
            for f in rec.dep_frames:
                payload.extend(f)
        self._emit(ToWorker(ar.conn, header, payload))

    def on_result(self, rec: TaskRecord, ev: TaskResultEvent) -> None:
        """The result of a method call."""
        assert rec.actor_id is not None
        ar = self.actors.get(rec.actor_id)
        if ar is not None:
            ar.inflight.pop(rec.tid, None)
        if ev.ok:
            self.tasks.finish(rec, READY, split_parts(ev.counts, ev.payload))
        else:
            self.tasks.fail(rec, ev.payload)
        if ar is not None:
            self._maybe_release(ar)

    def cancel(self, rec: TaskRecord, err: list[Any]) -> None:
        """Cancel a call: one not sent yet fails at once; a running one is asked to stop."""
        assert rec.actor_id is not None
        ar = self.actors.get(rec.actor_id)
        if ar is None:
            return
        if rec.tid in ar.inflight:
            if ar.conn is not None and not ar.conn.closed:
                self._emit(
                    CancelOnWorker(ar.conn, {"k": Kind.CANCEL, "tid": rec.tid, "force": False})
                )
            return
        self.tasks.fail(rec, err)  # not sent yet: _pump_actor skips it

    # ------------------------------------------------------------------ state from the head
    def on_state(self, ev: ActorStateChanged) -> None:
        """``ACTOR_STATE``: follow the actor to its (new) worker, or fail its calls."""
        ar = self._record(ev.aid, ev.cls_name)
        if ev.infeasible is not None:
            log.warning(
                "actor %s needs resources no node has in total (missing %s); it stays pending "
                "until a node that can host it joins",
                ar.cls_name,
                ev.infeasible,
            )
            return
        state = ev.state
        if ar.killed and state != DEAD:
            return  # news sent before the head heard of our kill()
        if state == ALIVE:
            addr, worker_id = ev.addr, ev.worker_id
            moved = ar.conn is not None and (
                ar.conn.addr != addr or (worker_id and ar.conn.worker_id != worker_id)
            )
            if ar.state != ALIVE or ar.conn is None or moved:
                if ar.conn is not None and ar.inflight:
                    # A new instance elsewhere (we missed the restart, e.g. across a head
                    # restart): what the old worker had will never be answered.
                    self._retry_or_fail_inflight(ar, "it was restarted in another worker")
                ctrl = ev.control_addr or addr
                ar.conn = self.conns.conn(addr, ctrl, worker_id) if addr else None
            ar.state = ALIVE
            self._pump_actor(ar)
        elif state == RESTARTING:
            ar.state = RESTARTING
            ar.conn = None
            self._retry_or_fail_inflight(ar, ev.reason or "its worker died")
        elif state == DEAD:
            if ev.init_error:
                death = ev.payload
            else:
                death = dumps(
                    ActorDiedError(
                        f"the actor {ar.cls_name} ({ar.aid}) is dead: {ev.reason or 'unknown'}"
                    )
                )
            self._actor_dead(ar, death)
        else:  # PENDING: not placed (again) yet; calls wait for ALIVE
            if ar.conn is not None:
                ar.conn = None
                self._retry_or_fail_inflight(ar, "it is being placed again")
            ar.state = state

    def _retry_or_fail_inflight(self, ar: ActorRecord, reason: str) -> None:
        retry: list[TaskRecord] = []
        for rec in ar.inflight.values():
            if ar.max_task_retries == -1 or rec.attempts < ar.max_task_retries:
                rec.attempts += 1
                retry.append(rec)
            else:
                err = ActorDiedError(
                    f"the actor {ar.cls_name} died while running {ar.cls_name}.{rec.method} "
                    f"({reason}); it is restarting, but the call is not retried "
                    f"(max_task_retries={ar.max_task_retries})"
                )
                self.tasks.fail(rec, dumps(err))
        ar.inflight.clear()
        ar.pending.extendleft(reversed(retry))

    def _actor_dead(self, ar: ActorRecord, death: list[Any]) -> None:
        ar.state = DEAD
        ar.death = death
        ar.conn = None
        calls = [*ar.inflight.values(), *ar.pending]
        ar.inflight.clear()
        ar.pending.clear()
        self._fail_calls(ar, calls)

    def _fail_calls(self, ar: ActorRecord, calls: list[TaskRecord]) -> None:
        death = ar.death or dumps(ActorDiedError(f"the actor {ar.cls_name} is dead"))
        for rec in calls:
            if rec.tid in self.tasks.by_tid:
                self.tasks.fail(rec, death)
