"""Actor calls from a client: creation, ordered method calls, restarts and death.

A mixin of :class:`nbcluster.client.core.CoreClient`. Calls to one actor go, in submission order,
straight to the worker hosting it; the head only tells us where the actor lives (and when that
changes), through ``ACTOR_STATE`` messages we subscribe to.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbcluster.client.commands import (
    ActorEscaped,
    CallActor,
    Command,
    CountActorHandle,
    CreateActor,
    KillActor,
)
from nbcluster.client.objects import FAILED, READY, Entry, ObjectTable
from nbcluster.client.tasks import TaskRecord
from nbcluster.client.wire import WorkerConn, is_ref, send_nowait, split_parts
from nbcluster.exceptions import ActorDiedError, NbclusterError, TaskCancelledError
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import ALIVE, DEAD, RESTARTING, Kind
from nbcluster.refs import ObjectRef
from nbcluster.serialization import dumps, dumps_args
from nbcluster.transport.sockets import check_frame_sizes

if TYPE_CHECKING:
    import asyncio

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
    """Client-side actor machinery (mixed into ``CoreClient``)."""

    objects: ObjectTable
    owner_address: str
    job_id: str
    namespace: str
    _head: Any
    _by_tid: dict[str, TaskRecord]
    _producer: dict[str, TaskRecord]
    _actors: dict[str, ActorRecord]
    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None
    _replies: dict[int, asyncio.Future[Any]]
    _rid: Any

    if TYPE_CHECKING:  # implemented by CoreClient / TaskSubmission

        def _post(self, command: Command) -> None: ...
        def new_id(self) -> str: ...
        def _do_submit(self, rec: TaskRecord) -> None: ...
        def _new_record(
            self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], num_returns: int
        ) -> tuple[TaskRecord, list[ObjectRef]]: ...
        def _finish(self, rec: TaskRecord, state: int, parts: Any) -> None: ...
        def _conn(self, addr: str, control_addr: str, worker_id: str = "") -> WorkerConn: ...
        def _call(self, coro: Any, timeout: float = 30.0) -> Any: ...
        def _resolve(self, ref: ObjectRef) -> Entry | None: ...

    # ================================================================== user thread
    def create_actor(
        self,
        cls_name: str,
        cls_blob: bytes,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        spec: dict[str, Any],
    ) -> dict[str, Any]:
        """Create an actor; returns the head's answer (``aid``, ``methods``, ``existing``...).

        Named actors wait for the head's answer (a taken name is an error, or with
        ``get_if_exists`` the existing actor is returned); anonymous ones return at once.
        """
        frames, deps = dumps_args(f"{cls_name}.__init__", args, kwargs, is_ref)
        # Constructor arguments travel inline, through the head.
        check_frame_sizes([cls_blob, *frames], f"the class or an argument of {cls_name}")
        aid = self.new_id()
        header = {
            "k": Kind.ACTOR_CREATE,
            "aid": aid,
            "cls_name": cls_name,
            **spec,
            "nargs": len(frames),
        }
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._post(CreateActor(header, [cls_blob, *frames], deps, fut))
        if spec.get("name"):
            return fut.result(60)
        return {
            "aid": aid,
            "existing": False,
            "methods": spec.get("methods", {}),
            "cls_name": cls_name,
            "max_task_retries": spec.get("max_task_retries", 0),
        }

    def submit_actor_call(
        self,
        aid: str,
        cls_name: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        num_returns: int,
    ) -> list[ObjectRef]:
        rec, refs = self._new_record(f"{cls_name}.{method}", args, kwargs, num_returns)
        rec.name, rec.actor_id, rec.method = cls_name, aid, method
        self._post(CallActor(rec, cls_name))
        return refs if num_returns != 0 else []

    def actor_handle_added(self, aid: str, cls_name: str, owned: bool) -> None:
        self._post(CountActorHandle(aid, cls_name, owned, 1))

    def actor_handle_removed(self, aid: str) -> None:
        try:
            self._post(CountActorHandle(aid, "", False, -1))
        except Exception:  # the client is closed
            pass

    def actor_escaped(self, aid: str) -> None:
        self._post(ActorEscaped(aid))

    def kill_actor(self, aid: str, no_restart: bool) -> None:
        """Ask the head to kill ``aid``; with ``no_restart`` it is dead here when this returns.

        The worker hosting the actor may run a while before the head's kill reaches it: the
        actor is marked dead on this side first, so that no call made after ``kill()`` (nor one
        still in flight) can be answered with a result.
        """
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._post(KillActor(aid, no_restart, done))
        if threading.current_thread() is not self._thread:
            done.result(30)

    # ================================================================== loop
    def _record(self, aid: str, cls_name: str = "") -> ActorRecord:
        ar = self._actors.get(aid)
        if ar is None:
            ar = self._actors[aid] = ActorRecord(aid, cls_name)
        elif cls_name and not ar.cls_name:
            ar.cls_name = cls_name
        return ar

    def _do_acreate(
        self,
        header: dict[str, Any],
        payload: list[Any],
        deps: list[ObjectRef],
        fut: concurrent.futures.Future[dict[str, Any]],
    ) -> None:
        ar = self._record(header["aid"], header["cls_name"])
        ar.owned = True
        ar.announced = False
        ar.subscribed = True  # the head subscribes the creator
        ar.max_task_retries = int(header.get("max_task_retries", 0))
        # The actor reads its constructor's arguments again on every restart: keep them.
        for d in deps:
            self.objects.mark_escaped(d.hex())
        entries = [self._resolve(d) for d in deps]
        waiting = [e for e in entries if e is not None and e.state not in (READY, FAILED)]

        def send() -> None:
            dep_frames: list[Any] = []
            counts = []
            for e in entries:
                assert e is not None
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
            rid = next(self._rid)
            ar.announced = True
            assert self._loop is not None
            reply = self._loop.create_future()
            self._replies[rid] = reply
            reply.add_done_callback(lambda f: _settle(fut, f))
            send_nowait(
                self._head, encode({**header, "rid": rid, "deps": counts}, [*payload, *dep_frames])
            )

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

    def _do_ahandle(self, aid: str, cls_name: str, owned: bool, delta: int) -> None:
        ar = self._record(aid, cls_name)
        if owned:
            ar.owned = True
        ar.handles += delta
        if ar.handles <= 0 and ar.owned and not ar.escaped and ar.state != DEAD:
            ar.release_when_idle = True
            self._maybe_release(ar)

    def _do_aescaped(self, aid: str) -> None:
        self._record(aid).escaped = True

    def _do_akill(
        self, aid: str, no_restart: bool, done: concurrent.futures.Future[None] | None = None
    ) -> None:
        try:
            send_nowait(
                self._head,
                encode({"k": Kind.ACTOR_KILL, "aid": aid, "no_restart": bool(no_restart)}),
            )
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

    def _maybe_release(self, ar: ActorRecord) -> None:
        if ar.release_when_idle and not ar.pending and not ar.inflight:
            ar.release_when_idle = False
            send_nowait(self._head, encode({"k": Kind.ACTOR_RELEASE, "aid": ar.aid}))

    def _do_acall(self, rec: TaskRecord, cls_name: str) -> None:
        assert rec.actor_id is not None
        ar = self._record(rec.actor_id, cls_name)
        if not ar.subscribed:
            ar.subscribed = True
            send_nowait(self._head, encode({"k": Kind.ACTOR_RESOLVE, "aid": ar.aid}))
        ar.pending.append(rec)
        self._do_submit(rec)  # resolves dependencies, then _actor_call_ready

    def _actor_call_ready(self, rec: TaskRecord) -> None:
        assert rec.actor_id is not None
        self._pump_actor(self._actors[rec.actor_id])

    def _pump_actor(self, ar: ActorRecord) -> None:
        if ar.state == DEAD:
            self._fail_calls(ar, list(ar.pending))
            ar.pending.clear()
            return
        if ar.state != ALIVE or ar.conn is None:
            return
        # Calls leave in submission order: a call waiting for its arguments holds up later ones.
        while ar.pending:
            rec = ar.pending[0]
            if rec.cancelled or rec.tid not in self._by_tid:  # cancelled, or an argument failed
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
        header: dict[str, Any] = {
            "k": Kind.ACTOR_CALL,
            "tid": rec.tid,
            "method": rec.method,
            "name": ar.cls_name,
            "nargs": len(rec.args),
            "nret": rec.nret,
        }
        payload: list[Any] = list(rec.args)
        if rec.dep_frames:
            header["deps"] = [len(f) for f in rec.dep_frames]
            for f in rec.dep_frames:
                payload.extend(f)
        send_nowait(ar.conn.sock, encode(header, payload))

    def _on_actor_result(self, rec: TaskRecord, h: dict[str, Any], payload: list[Any]) -> None:
        assert rec.actor_id is not None
        ar = self._actors.get(rec.actor_id)
        if ar is not None:
            ar.inflight.pop(rec.tid, None)
        if h.get("ok"):
            self._finish(rec, READY, split_parts(h.get("n", []), payload))
        else:
            self._finish(rec, FAILED, [payload] * len(rec.return_ids))
        if ar is not None:
            self._maybe_release(ar)

    def _cancel_actor_call(self, rec: TaskRecord, force: bool, err: list[Any]) -> None:
        assert rec.actor_id is not None
        ar = self._actors.get(rec.actor_id)
        if ar is None:
            return
        if rec.tid in ar.inflight:
            if ar.conn is not None:
                msg = encode({"k": Kind.CANCEL, "tid": rec.tid, "force": False})
                send_nowait(ar.conn.sock, list(msg))
                send_nowait(ar.conn.ctrl, list(msg))
            return
        self._finish(rec, FAILED, err)  # not sent yet: _pump_actor skips it

    # ================================================================== state from the head
    def _on_actor_state(self, h: dict[str, Any], payload: list[Any]) -> None:
        ar = self._record(h["aid"], h.get("cls_name", ""))
        if "infeasible" in h:
            log.warning(
                "actor %s needs resources no node has in total (missing %s); it stays pending "
                "until a node that can host it joins",
                ar.cls_name,
                h["infeasible"],
            )
            return
        state = h["state"]
        if ar.killed and state != DEAD:
            return  # news sent before the head heard of our kill()
        if state == ALIVE:
            addr, worker_id = h.get("addr"), h.get("worker_id") or ""
            moved = ar.conn is not None and (
                ar.conn.addr != addr or (worker_id and ar.conn.worker_id != worker_id)
            )
            if ar.state != ALIVE or ar.conn is None or moved:
                if ar.conn is not None and ar.inflight:
                    # A new instance elsewhere (we missed the restart, e.g. across a head
                    # restart): what the old worker had will never be answered.
                    self._retry_or_fail_inflight(ar, "it was restarted in another worker")
                ctrl = str(h.get("control_addr") or addr)
                ar.conn = self._conn(addr, ctrl, worker_id) if addr else None
            ar.state = ALIVE
            self._pump_actor(ar)
        elif state == RESTARTING:
            ar.state = RESTARTING
            ar.conn = None
            self._retry_or_fail_inflight(ar, h.get("reason", "its worker died"))
        elif state == DEAD:
            if h.get("init_error"):
                death = payload
            else:
                death = dumps(
                    ActorDiedError(
                        f"the actor {ar.cls_name} ({ar.aid}) is dead: "
                        f"{h.get('reason') or 'unknown'}"
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
                self._finish(rec, FAILED, [dumps(err)] * len(rec.return_ids))
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
            if rec.tid in self._by_tid:
                self._finish(rec, FAILED, [death] * len(rec.return_ids))


def _settle(fut: concurrent.futures.Future[dict[str, Any]], reply: Any) -> None:
    if fut.done():
        return
    if reply.cancelled():
        fut.set_exception(TaskCancelledError(None, "actor creation was cancelled"))
    elif reply.exception() is not None:
        fut.set_exception(reply.exception())
    else:
        fut.set_result(reply.result())
