"""Tasks from submission until their results are in: dependencies, results, cancel.

Part of :class:`~nbcluster.client.state.ClientState` (pure: it only returns instructions).
:class:`Tasks` holds every task not finished yet and resolves its argument refs; ready tasks go
to :class:`~nbcluster.client.leasing.Leasing` (plain tasks) or
:class:`~nbcluster.client.actors.ActorCalls` (actor method calls), which hand results back here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nbcluster.client.inputs import StreamItemArrived, TaskOutput, TaskResult
from nbcluster.client.instructions import (
    CancelOnWorker,
    FreeStored,
    Instruction,
    ShowOutput,
    ToWorker,
)
from nbcluster.client.lineage import LOST, USE, WAIT
from nbcluster.client.objects import FAILED, PENDING, READY, Entry, ObjectTable
from nbcluster.client.streams import DYNAMIC
from nbcluster.client.tasks import EMPTY, TaskRecord
from nbcluster.exceptions import TaskCancelledError
from nbcluster.protocol.messages import Kind
from nbcluster.refs import serialized_refs
from nbcluster.serialization import dumps

if TYPE_CHECKING:
    from nbcluster.client.actors import ActorCalls
    from nbcluster.client.events import TaskEvents
    from nbcluster.client.leasing import Leasing
    from nbcluster.client.lineage import Lineage
    from nbcluster.client.ownership import Ownership
    from nbcluster.refs import ObjectRef


class Tasks:
    """Every task (and actor call) of this client not finished yet.

    Parameters
    ----------
    objects
        The object table (results are completed there).
    events
        Task events for the dashboards.
    emit
        Where instructions go.
    node_id
        The node this client runs on ('' for a driver).
    """

    # Collaborators, set once by ClientState.
    leasing: Leasing
    actors: ActorCalls
    lineage: Lineage
    ownership: Ownership

    def __init__(
        self,
        objects: ObjectTable,
        events: TaskEvents,
        emit: Callable[[Instruction], None],
        node_id: str,
    ) -> None:
        self.objects = objects
        self.events = events
        self._emit = emit
        self.node_id = node_id
        self.by_tid: dict[str, TaskRecord] = {}
        self.producer: dict[str, TaskRecord] = {}  # return object id -> pending task

    # ------------------------------------------------------------------ submission
    def submit(self, rec: TaskRecord) -> None:
        """Take a new task (or one run again): wait for its arguments, then queue it."""
        self.by_tid[rec.tid] = rec
        # (Again for a re-run: its span is the new run's.)
        rec.submitted_at, rec.sent_to, rec.ph = self.events.now, None, None
        if rec.actor_id is None:
            self.events.submitted(rec)
        for oid in rec.return_ids:
            self.producer[oid] = rec
        rec.dep_frames = [[] for _ in rec.deps] if rec.deps else EMPTY
        waits: list[tuple[int, Entry]] = []
        for i, dep in enumerate(rec.deps):
            entry = self.resolve(dep)
            if entry.state == FAILED:
                self.fail(rec, entry.frames)
                return
            status = self.lineage.dep_status(entry) if entry.state == READY else -1
            if status == LOST:
                self.fail(rec, self.lineage.lost_dep_error(rec, entry))
                return
            if status == USE:
                rec.dep_frames[i] = entry.frames
            else:
                waits.append((i, entry))
        rec.waiting_deps = len(waits)
        if not waits:
            self.enqueue(rec)
        for i, entry in waits:
            if rec.tid not in self.by_tid:
                return  # failed meanwhile
            self._wait_for(entry, self.dep_callback(rec, i))

    def _wait_for(self, entry: Entry, done: Callable[[Entry], None]) -> None:
        """Call ``done`` once ``entry`` is no longer pending (at once if it is not any more:
        a rebuild can fail before it started, e.g. when its own argument failed)."""
        if not self.objects.on_ready(entry.oid, done):
            done(entry)

    def dep_callback(self, rec: TaskRecord, i: int) -> Callable[[Entry], None]:
        """A callback for when argument ``i`` of ``rec`` is no longer pending."""

        def done(entry: Entry) -> None:
            # Runs on the I/O thread (objects complete there).
            if rec.cancelled or rec.tid not in self.by_tid:
                return
            if entry.state == FAILED:
                self.fail(rec, entry.frames)
                return
            status = self.lineage.dep_status(entry)
            if status == WAIT:
                self._wait_for(entry, done)  # lost with its node: wait for it again
                return
            if status == LOST:
                self.fail(rec, self.lineage.lost_dep_error(rec, entry))
                return
            rec.dep_frames[i] = entry.frames
            rec.waiting_deps -= 1
            if rec.waiting_deps == 0:
                self.enqueue(rec)

        return done

    def resolve(self, ref: ObjectRef) -> Entry:
        """The local entry of ``ref``, starting a fetch from its owner if we do not own it."""
        entry = self.objects.get(ref.oid)
        if entry is None:
            entry = self.objects.create(ref.oid, owned=False)
        if entry.state == PENDING and not entry.owned:
            self.ownership.fetch(entry, ref.owner_address)
        return entry

    def enqueue(self, rec: TaskRecord) -> None:
        """Its arguments are here: send it when a worker (or its actor) is free."""
        # rec.deps keeps the argument refs alive until the task is done: a stored value must not
        # be freed before the worker has read it.
        if rec.actor_id is not None:
            self.actors.call_ready(rec)
        else:
            self.leasing.enqueue(rec)

    # ------------------------------------------------------------------ results
    def on_result(self, ev: TaskResult) -> None:
        """A worker's ``RESULT``."""
        rec = self.by_tid.get(ev.tid)
        if rec is None or (rec.lease is not None and rec.lease.conn is not ev.conn):
            return  # late news from a worker we gave up on (its node was declared dead)
        rec.ph = ev.ph
        self.ownership.note_kept(rec, ev.kept, ev.returned)
        if rec.actor_id is not None:
            self.actors.on_result(rec, ev)
        else:
            self.leasing.on_result(rec, ev)

    # ------------------------------------------------------------------ generator tasks
    def on_stream_item(self, ev: StreamItemArrived) -> None:
        """A worker's ``STREAM_ITEM``: complete the item's object and hand it to the stream.

        A re-run task (its worker died) yields again from the start: items already here are
        skipped (as Ray does; the generator must be deterministic for the values to match).
        """
        rec = self.by_tid.get(ev.tid)
        if rec is None or rec.stream is None or self._conn_of(rec) is not ev.conn:
            return
        buf = rec.stream
        if ev.index != len(buf.items):
            if ev.index < len(buf.items):  # a re-run's repeat: let its worker go on
                self._ack(rec, buf.taken if buf.mode != DYNAMIC else 2**62)
            return
        oid = buf.item_id(ev.index)
        owner = self.ownership.owner_address
        self.objects.add_ref(oid, owned=True, owner=owner)  # the buffer's hold
        if ev.returned:
            self.objects.set_contained(oid, self.ownership.result_refs(ev.returned))
        self.objects.complete(oid, READY, ev.payload)
        if not buf.push(oid):
            self.objects.remove_ref(oid)  # the consumer is gone

    def stream_consumed(self, tid: str, consumed: int) -> None:
        """The consumer took ``consumed`` items: tell the worker (it may be paused)."""
        rec = self.by_tid.get(tid)
        if rec is not None and rec.stream is not None:
            self._ack(rec, consumed)

    def _conn_of(self, rec: TaskRecord) -> Any:
        if rec.actor_id is not None:
            ar = self.actors.actors.get(rec.actor_id)
            return ar.conn if ar is not None else None
        return rec.lease.conn if rec.lease is not None else None

    def _ack(self, rec: TaskRecord, consumed: int) -> None:
        conn = self._conn_of(rec)
        if conn is not None and not conn.closed:
            self._emit(ToWorker(conn, {"k": Kind.STREAM_ACK, "tid": rec.tid, "consumed": consumed}))

    def _end_stream(self, rec: TaskRecord, state: int, parts: Sequence[list[Any]]) -> Any:
        """A generator task ended: a dynamic one's value becomes its refs' generator."""
        buf = rec.stream
        if buf.mode != DYNAMIC:
            return parts
        held = buf.close()
        if state == READY:
            from nbcluster.generators import DynamicObjectRefGenerator

            owner = self.ownership.owner_address
            refs = [self.ownership.make_ref(oid, owner) for oid in held]
            with serialized_refs():  # (not escaped: the value holds them, see contained)
                parts = [dumps(DynamicObjectRefGenerator(refs))]
            rec.contained = [*rec.contained, *refs]
        for oid in held:
            self.objects.remove_ref(oid)
        return parts

    def fail(self, rec: TaskRecord, frames: list[Any]) -> None:
        """Fail every return value of ``rec`` with the error ``frames``."""
        self.finish(rec, FAILED, [frames] * len(rec.return_ids))

    def finish(self, rec: TaskRecord, state: int, parts: Sequence[list[Any]]) -> None:
        """Complete ``rec``'s return values with ``parts`` (values, or the error)."""
        if rec.stream is not None and rec.tid in self.by_tid:
            parts = self._end_stream(rec, state, parts)
        self.by_tid.pop(rec.tid, None)
        if rec.actor_id is None:
            self.events.ended(rec, state == READY)
        else:
            self.events.call_ended(rec, state == READY)
            self.actors.finished(rec)
        rec.dep_frames = EMPTY
        # A stored result may have to be rebuilt if its node dies: keep what the task needs.
        # (Not a generator task's: its end is a small count, its items are not rebuilt.)
        if not (state == READY and rec.stream is None and self.lineage.keep(rec, parts)):
            rec.deps = EMPTY
            rec.nested = EMPTY
        if rec.args_oid is not None:
            self._emit(FreeStored([rec.args_oid]))
            rec.args_oid = None
        contained, rec.contained = rec.contained, EMPTY
        for oid, frames in zip(rec.return_ids, parts, strict=False):
            self.producer.pop(oid, None)
            if contained:
                self.objects.set_contained(oid, contained)
            self.objects.complete(oid, state, frames)
        if rec.stream is not None:
            rec.stream.finish()
        # A task with num_returns=0 still completes its (hidden) first id.
        for oid in rec.return_ids[len(parts) :]:
            self.producer.pop(oid, None)
            self.objects.complete(
                oid, state, [dumps(None)] if state == READY else parts[0] if parts else []
            )

    def output(self, ev: TaskOutput) -> None:
        """A task's output lines: shown with the task's name and process."""
        conn = ev.conn
        node = ""
        if (
            conn is not None
            and conn.node_name
            and self.leasing.multi_node(conn.node_id, self.node_id)
        ):
            node = f", node={conn.node_name}"
        prefix = f"({ev.name} pid={ev.pid}{node}) "
        text = "".join(f"{prefix}{line}\n" for line in ev.lines)
        rec = self.by_tid.get(ev.tid)
        self._emit(ShowOutput(ev.stream, text, rec.tag if rec is not None else None))

    # ------------------------------------------------------------------ cancel
    def cancel(self, oid: str, force: bool) -> None:
        """Cancel the task producing ``oid`` (queued: at once; running: ask its worker)."""
        rec = self.producer.get(oid)
        if rec is None:
            return
        rec.cancelled = True
        err = dumps(TaskCancelledError(rec.tid))
        if rec.actor_id is not None:
            self.actors.cancel(rec, err)
            return
        if rec.lease is None:
            self.leasing.unqueue(rec)
            self.fail(rec, err)
            return
        rec.force_cancel = force
        conn = rec.lease.conn
        if not conn.closed:  # (closed: its LEASE_LOST is on the way, and fails it as cancelled)
            self._emit(
                CancelOnWorker(conn, {"k": Kind.CANCEL, "tid": rec.tid, "force": bool(force)})
            )

    def fail_all(self, err: list[Any]) -> None:
        """Fail every unfinished task with ``err`` (the client closed)."""
        for tid in list(self.by_tid):
            # A completion callback may already have removed a later entry.
            rec = self.by_tid.pop(tid, None)
            if rec is None:
                continue
            for oid in rec.return_ids:
                self.objects.complete(oid, FAILED, err)
            if rec.stream is not None:
                rec.stream.finish()  # its consumer gets the error, then the end
