"""``ClientState``: everything a client decides, as events in and instructions out.

No sockets, no threads, no clocks: the I/O shell (:mod:`nbcluster.client.shell`) turns each
message it receives, each timer that fires and each command a user thread posts into an event,
calls :meth:`ClientState.handle` under its lock (on its I/O thread, or on a user thread that
submits a task), and carries out the instructions it gets back
(:mod:`nbcluster.client.instructions`). The state is composed of plain objects, one
responsibility each:

- :class:`~nbcluster.client.submission.Tasks`: unfinished tasks, their arguments and results;
- :class:`~nbcluster.client.leasing.Leasing`: scheduling classes, leases, dispatch, retries;
- :class:`~nbcluster.client.actors.ActorCalls`: actors and their ordered calls;
- :class:`~nbcluster.client.lineage.Lineage`: rebuilding results lost with their node;
- :class:`~nbcluster.client.ownership.Ownership`: serving, fetching and releasing objects;
- :class:`~nbcluster.client.objects.ObjectTable`: the objects (shared with user threads, which
  wait on it; only the I/O thread completes them, through this state).

:meth:`ClientState.validate_state` checks the invariants between them.
"""

from __future__ import annotations

import itertools
from typing import Any

from nbcluster.client.actors import ActorCalls
from nbcluster.client.commands import (
    ActorEscaped,
    CallActor,
    CancelTask,
    CountActorHandle,
    CreateActor,
    FetchObject,
    KillActor,
    Rebuild,
    SetBlocked,
    StreamConsumed,
    SubmitTask,
    TellOwner,
)
from nbcluster.client.events import COUNTED_QUEUED, COUNTED_RUNNING, SHOWN, TaskEvents
from nbcluster.client.inputs import (
    ActorStateChanged,
    BorrowReleased,
    Event,
    FlushTaskEvents,
    LeaseFailed,
    LeaseGranted,
    LeaseInfeasible,
    LeaseLost,
    LingerExpired,
    NodeDied,
    ObjectArrived,
    ObjectEscaped,
    ObjectRequested,
    ParkExpired,
    Rejoined,
    Released,
    StreamItemArrived,
    TaskOutput,
    TaskResult,
    TasksStolen,
)
from nbcluster.client.instructions import Instruction, ToHead
from nbcluster.client.leasing import Leasing, request_cap
from nbcluster.client.lineage import Lineage
from nbcluster.client.objects import PENDING, ObjectTable
from nbcluster.client.ownership import Ownership
from nbcluster.client.submission import Tasks
from nbcluster.client.workers import WorkerConns
from nbcluster.exceptions import NbclusterError
from nbcluster.protocol.messages import ALIVE, DEAD, Kind
from nbcluster.serialization import dumps


class ClientState:
    """The pure state of one client (used under its I/O shell's lock).

    Parameters
    ----------
    objects
        The object table (shared with user threads).
    owner_address
        Our owner socket's address.
    ref_client
        What ``ObjectRef`` instances made here count themselves with (the ``CoreClient``).
    worker_id
        Set when this client lives in a worker (``WORKER_BLOCKED`` names it).
    node_id
        The node this client runs on, if known.
    """

    def __init__(
        self,
        objects: ObjectTable,
        owner_address: str,
        ref_client: Any,
        *,
        worker_id: str | None = None,
        node_id: str = "",
    ) -> None:
        self._out: list[Instruction] = []
        emit = self._out.append
        self.objects = objects
        self.worker_id = worker_id
        self._rids = itertools.count(1)
        self.events = TaskEvents(emit)
        self.conns = WorkerConns(emit)
        self.tasks = Tasks(objects, self.events, emit, node_id)
        self.leasing = Leasing(self.events, self.conns, self.next_rid, emit)
        self.actors = ActorCalls(objects, self.conns, self.next_rid, emit)
        self.lineage = Lineage(objects, self.events, emit)
        self.ownership = Ownership(objects, owner_address, ref_client, emit)
        # Who calls whom (each set once, here).
        self.tasks.leasing, self.tasks.actors = self.leasing, self.actors
        self.tasks.lineage, self.tasks.ownership = self.lineage, self.ownership
        self.leasing.tasks, self.leasing.lineage = self.tasks, self.lineage
        self.actors.tasks = self.tasks
        self.lineage.tasks, self.lineage.leasing = self.tasks, self.leasing
        self.lineage.ownership = self.ownership
        self.ownership.lineage = self.lineage
        objects.on_drop = self.ownership.dropped

    def next_rid(self) -> int:
        """A request id, unique within this client (lease requests, creations, queries)."""
        return next(self._rids)

    def take(self) -> list[Instruction]:
        """The instructions emitted since the last call (outside :meth:`handle`: e.g. by a
        user thread's ``put`` completing an object)."""
        out = self._out
        n = len(out)
        taken = out[:n]
        del out[:n]  # (not clear(): what another thread appended meanwhile stays)
        return taken

    def handle(self, event: Event, now: float) -> list[Instruction]:
        """Handle one event at wall-clock time ``now``; returns what to do, in order."""
        self.events.now = now
        match event:
            case TaskResult():
                self.tasks.on_result(event)
            case StreamItemArrived():
                self.tasks.on_stream_item(event)
            case TasksStolen():
                self.leasing.on_stolen(event)
            case StreamConsumed(tid, consumed):
                self.tasks.stream_consumed(tid, consumed)
            case SubmitTask(rec):
                self.tasks.submit(rec)
            case LeaseGranted():
                self.leasing.on_grant(event)
            case LingerExpired():
                self.leasing.on_linger_expired(event)
            case Released(oids):
                for oid in oids:
                    self.objects.remove_ref(oid)
            case CallActor(rec, cls_name):
                self.actors.call(rec, cls_name)
            case TaskOutput():
                self.tasks.output(event)
            case FlushTaskEvents():
                self.events.flush()
            case ObjectArrived():
                self.ownership.arrived(event)
            case ObjectRequested(ident, oid):
                self.ownership.requested(ident, oid)
            case BorrowReleased(oid, n):
                self.objects.add_borrows(oid, -n)
            case ObjectEscaped(oid):
                self.objects.mark_escaped(oid)
            case FetchObject(oid, owner):
                entry = self.objects.get(oid)
                if entry is not None:
                    self.ownership.fetch(entry, owner)
            case TellOwner(owner, header):
                self.ownership.tell_owner(owner, header)
            case LeaseLost():
                self.leasing.on_lease_lost(event)
            case LeaseFailed(rid, msg):
                self.leasing.on_lease_failed(rid, msg)
            case LeaseInfeasible():
                self.leasing.on_infeasible(event)
            case ActorStateChanged():
                self.actors.on_state(event)
            case NodeDied(node_id, store_id):
                self.lineage.node_died(node_id, store_id)
            case ParkExpired():
                self.lineage.park_expired(event)
            case CancelTask(oid, force):
                self.tasks.cancel(oid, force)
            case SetBlocked(blocked):
                kind = Kind.WORKER_BLOCKED if blocked else Kind.WORKER_UNBLOCKED
                self._out.append(ToHead({"k": kind, "worker_id": self.worker_id}))
            case Rebuild(oid, rebuilt):
                self.lineage.reconstruct(oid)
                if not self.objects.on_ready(oid, lambda _e: rebuilt.set()):
                    rebuilt.set()
            case CreateActor(header, payload, deps, reply):
                self.actors.create(header, payload, deps, reply)
            case CountActorHandle(aid, cls_name, owned, delta):
                self.actors.count_handle(aid, cls_name, owned, delta)
            case ActorEscaped(aid):
                self.actors.escaped(aid)
            case KillActor(aid, no_restart, done):
                self.actors.kill(aid, no_restart, done)
            case Rejoined():
                self.leasing.rejoined()
        return self.take()

    # ------------------------------------------------------------------ whole-client views
    def rejoin_claims(self) -> dict[str, Any]:
        """What a rejoining ``HELLO`` says we hold: leases and actors."""
        return {"leases": self.leasing.claims(), "actors": self.actors.claims()}

    def fail_all(self, why: str) -> None:
        """Fail every unfinished task (the client closed)."""
        self.tasks.fail_all(dumps(NbclusterError(why)))
        self._out.clear()  # nobody carries these out any more

    def task_rows(self) -> list[list[str]]:
        """One row per unfinished task: id, name, state, where (``%nbcluster tasks``)."""
        rows = []
        for rec in list(self.tasks.by_tid.values()):
            if rec.actor_id is not None:
                state, where = "actor call", rec.actor_id
            elif rec.lease is not None:
                # Pipelined behind another task on its worker: sent, not started.
                state = "running" if rec.started else "queued on worker"
                where = rec.lease.node_name or rec.lease.node_id
            else:
                state, where = "waiting", "-"
            rows.append([rec.tid, rec.name, state, where])
        return rows

    # ------------------------------------------------------------------ invariants
    def _validate_stream(self, rec: Any) -> None:
        """An unfinished generator task: its items in order, each held until taken."""
        buf = rec.stream
        assert buf is not None and buf.mode == rec.gen, f"generator {rec.tid} has no stream"
        assert not buf.done, f"stream {rec.tid} ended before its task"
        assert buf.taken <= len(buf.items), f"stream {rec.tid} gave out more than it got"
        for i, oid in enumerate(buf.items):
            assert oid == buf.item_id(i), f"item {i} of {rec.tid} is {oid}"
        if not buf.closed:
            for oid in buf.items[buf.taken :]:
                e = self.objects.get(oid)
                assert e is not None and e.state != PENDING and e.refs > 0, (
                    f"untaken item {oid} is not held"
                )

    def _validate_task_events(self) -> None:
        """The head is told of each unfinished task once: one by one, or in a count."""
        shown, counted = 0, dict[tuple[Any, ...], list[int]]()
        for rec in self.tasks.by_tid.values():
            if rec.shown == SHOWN:
                shown += 1
            elif rec.shown in (COUNTED_QUEUED, COUNTED_RUNNING):
                key = (rec.name, rec.shape_key[: len(rec.shape)], rec.shown_on)
                c = counted.setdefault(key, [0, 0])
                c[rec.shown - COUNTED_QUEUED] += 1
        assert shown == self.events.shown, f"{shown} tasks shown, {self.events.shown} counted"
        for key, c in self.events.counts.items():
            assert counted.pop(key, [0, 0]) == c[:2], f"count of {key} is {c[:2]}"
        assert not counted, f"tasks counted nowhere: {counted}"

    def validate_state(self) -> None:
        """Check the invariants between the parts; raises ``AssertionError`` naming the first
        one broken."""
        tasks, leasing = self.tasks, self.leasing
        for tid, rec in tasks.by_tid.items():
            assert rec.tid == tid, f"task {tid} filed under another id"
            for oid in rec.return_ids:
                assert tasks.producer.get(oid) is rec, f"{oid} lost its producer {tid}"
            if rec.gen or rec.stream is not None:
                self._validate_stream(rec)
        for oid, rec in tasks.producer.items():
            assert rec.tid in tasks.by_tid, f"{oid}'s producer {rec.tid} is finished"
            e = self.objects.get(oid)
            assert e is None or e.state == PENDING, f"{oid} is done but {rec.tid} is not"
        for lease_id, lease in leasing.leases.items():
            assert lease.lease_id == lease_id
            sc = leasing.classes.get(lease.shape_key)
            assert sc is not None and any(ls is lease for ls in sc.leases), (
                f"lease {lease_id} is in no scheduling class"
            )
            assert len(lease.inflight) <= leasing.depth, f"lease {lease_id} has too many tasks"
            for i, rec in enumerate(lease.inflight):
                assert rec.lease is lease, f"{rec.tid} on lease {lease_id} thinks otherwise"
                assert rec.started == (i == 0), f"{rec.tid} is #{i} on {lease_id}: started?"
                assert rec.tid in tasks.by_tid, f"{rec.tid} finished but still on {lease_id}"
        for key, sc in leasing.classes.items():
            assert sc.key == key, f"class {key} filed under another key"
            for ls in sc.leases:
                assert leasing.leases.get(ls.lease_id) is ls, f"{ls.lease_id} dropped, in {key}"
            for rec in sc.queue:
                assert rec.tid in tasks.by_tid, f"{rec.tid} finished but queued"
                assert rec.lease is None, f"{rec.tid} queued and running"
                assert rec.waiting_deps == 0, f"{rec.tid} queued before its arguments"
            assert len(sc.requests) <= request_cap(sc.strategy), f"class {key} asks too much"
            for rid in sc.requests:
                assert leasing.rid_class.get(rid) is sc, f"request {rid} of {key} is unfiled"
            if not sc.queue and all(len(ls.inflight) <= 1 for ls in sc.leases):
                assert not sc.requests, f"class {key} asks for leases it does not need"
        self._validate_task_events()
        for rid, sc in leasing.rid_class.items():
            assert rid in sc.requests, f"request {rid} is filed but not outstanding"
        for aid, ar in self.actors.actors.items():
            assert ar.aid == aid
            if ar.state == DEAD:
                assert not ar.inflight, f"dead actor {aid} has calls in flight"
                for rec in ar.pending:  # failed as soon as their arguments are here
                    assert rec.tid not in tasks.by_tid or rec.waiting_deps > 0, (
                        f"dead actor {aid} holds {rec.tid}"
                    )
            if ar.state != ALIVE:
                assert not ar.inflight or ar.conn is not None, f"{aid} lost calls in flight"
            for rec in [*ar.inflight.values(), *ar.pending]:
                assert rec.actor_id == aid, f"{rec.tid} queued on the wrong actor"
        for tid, p in self.lineage.parked.items():
            assert p.rec.tid == tid
        for oid, rec in self.lineage.records.items():
            assert oid in rec.return_ids, f"lineage of {oid} names the wrong task"
