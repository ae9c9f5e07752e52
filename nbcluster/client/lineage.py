"""Lineage: rebuilding task results that were lost with the node that stored them.

A large task result lives in the store of the node that produced it. When that node dies, the
owner (the process that submitted the task) still holds the task's description, so it runs the
task again and the ref becomes ready anew — the user's ``get`` only sees a delay. What cannot
be rebuilt raises :class:`ObjectLostError` at once instead of hanging:

- values made by ``put`` (there is no task to re-run);
- results of tasks whose own large arguments were already freed from the store;
- results rebuilt :data:`MAX_RECONSTRUCTIONS` times already.

The head tells every client which nodes died (``NODE_DIED``); the values stored in that node's
store until then are known lost without trying to read them. A node cut off and back again
rejoins as a new incarnation with the same store (emptied): what is stored there after the
notice is the new incarnation's, and alive.

Tasks that take such a value as an argument get it back too, whenever they were submitted:

- submitted (or still queued) once the node is known dead: the argument is rebuilt first, and
  the task waits for it instead of trying to read it from the dead node;
- already sent to a worker that could not read it (its node refused the connection or went
  away mid-transfer): the worker says which argument was lost (``RESULT`` with ``lost``), and the
  task waits again. If the node is known dead (or the head says so within :data:`PARK_S`), the
  argument is rebuilt; otherwise the node is alive after all and the task is sent again as it
  was, as a retry.

Borrowed arguments are fetched again from their owner, which rebuilds them (once per value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from nbcluster.client.inputs import ParkExpired
from nbcluster.client.instructions import Instruction, StartTimer
from nbcluster.client.objects import READY, Entry, ObjectTable
from nbcluster.client.tasks import TaskRecord
from nbcluster.exceptions import ObjectLostError
from nbcluster.serialization import dumps
from nbcluster.store.client import MARKER, is_stored

if TYPE_CHECKING:
    from nbcluster.client.events import TaskEvents
    from nbcluster.client.leasing import Leasing
    from nbcluster.client.ownership import Ownership
    from nbcluster.client.submission import Tasks
    from nbcluster.refs import ObjectRef

MAX_RECONSTRUCTIONS = 3
#: What :meth:`Lineage.dep_status` says of a ready argument.
USE, WAIT, LOST = 0, 1, 2
#: How long a task whose argument could not be read waits for the head to declare the argument's
#: node dead (it does within 5 s for a node agent that stops answering) before it is sent again.
PARK_S = 15.0


@dataclass
class Parked:
    """A task whose argument could not be read from a node not (yet) known dead."""

    rec: TaskRecord
    indexes: list[int]
    store: str
    error: list[Any]  # the worker's error frames, if it comes to failing
    token: int = 0  # which park timer counts


def stored_in(frames: list[Any]) -> str:
    """The store id a stored value lives in ('' for inline values)."""
    if not is_stored(frames):
        return ""
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    meta = msgpack.unpackb(raw[len(MARKER) :])
    return str(meta.get("store", ""))


def lost_error(ref: ObjectRef, why: str) -> ObjectLostError:
    """The error ``get`` raises for a value that was lost and cannot be (or was not) rebuilt."""
    return ObjectLostError(
        f"{ref!r} was lost: {why}. Results of tasks are rebuilt by running the task again; "
        "values made by put() (and results of tasks whose large arguments were already "
        "freed) cannot be"
    )


class Lineage:
    """Keeps the tasks that made stored results, and replays them when a node dies.

    Parameters
    ----------
    objects
        The object table.
    events
        Task events for the dashboards (a task waiting again counts as requeued).
    emit
        Where instructions go (park timers).
    """

    # Collaborators, set once by ClientState.
    tasks: Tasks
    leasing: Leasing
    ownership: Ownership

    def __init__(
        self, objects: ObjectTable, events: TaskEvents, emit: Callable[[Instruction], None]
    ) -> None:
        self.objects = objects
        self.events = events
        self._emit = emit
        self.records: dict[str, TaskRecord] = {}  # stored result id -> the task that made it
        self.dead_nodes: set[str] = set()  # node incarnations the head said died
        self.parked: dict[str, Parked] = {}  # task id -> waiting for its argument's node's fate
        self.refetched: set[str] = set()  # borrowed values fetched again after their node died
        self._tokens = 0

    def keep(self, rec: TaskRecord, parts: Any) -> bool:
        """Remember ``rec`` for its stored results; ``True`` if it was kept (keep its deps)."""
        if rec.actor_id is not None or rec.args_oid is not None:
            return False
        kept = False
        for oid, frames in zip(rec.return_ids, parts, strict=False):
            if is_stored(frames):
                self.records[oid] = rec
                kept = True
        return kept

    def forget(self, oid: str) -> None:
        """The object is gone from this process: its lineage is no longer needed."""
        self.records.pop(oid, None)
        self.refetched.discard(oid)

    @staticmethod
    def is_lost(entry: Entry) -> bool:
        """Whether a ready value was stored on a node incarnation known to be dead."""
        return entry.state == READY and entry.lost

    def can_rebuild(self, oid: str) -> bool:
        """Whether the task that made ``oid`` is known and may run again."""
        rec = self.records.get(oid)
        return rec is not None and rec.rebuilds < MAX_RECONSTRUCTIONS

    def node_died(self, node_id: str, store_id: str) -> None:
        """``NODE_DIED``: what its store holds is lost; tasks needing it wait for it again."""
        if not store_id or node_id in self.dead_nodes:
            return
        self.dead_nodes.add(node_id)
        # What that store holds now is lost. Not the store id itself: the node may come back as
        # a new incarnation with the same store, and what is stored there then is alive (a
        # dead store id made every later value there "lost", rebuilt until it failed for good).
        for entry in self.objects.ready():
            if stored_in(entry.frames) == store_id:
                entry.lost = True
        # Tasks queued with an argument in that store: get it back before sending them.
        for sc in list(self.leasing.classes.values()):
            waiting = [rec for rec in sc.queue if self._lost_args(rec)]
            for rec in waiting:
                sc.queue.remove(rec)
                self._rewait(rec, self._lost_args(rec), [])
            if waiting:
                self.leasing.pump(sc)  # withdraws lease requests it no longer needs
        # Tasks whose worker could not read an argument from there: now we know why.
        for p in [p for p in self.parked.values() if p.store == store_id]:
            self.parked.pop(p.rec.tid, None)
            self._rewait(p.rec, p.indexes, p.error)

    # ------------------------------------------------------------------ lost arguments
    def _lost_args(self, rec: TaskRecord) -> list[int]:
        """Indexes of ``rec``'s arguments stored on a node known dead (or replaced since
        ``rec`` took them: being rebuilt or fetched again because they were lost)."""
        lost = []
        for i, (dep, frames) in enumerate(zip(rec.deps, rec.dep_frames, strict=False)):
            if not is_stored(frames):
                continue
            entry = self.objects.get(dep.oid)
            if entry is None or entry.frames is not frames or entry.lost:
                lost.append(i)
        return lost

    def held_back(self, rec: TaskRecord) -> bool:
        """About to send ``rec``: if an argument of it was lost meanwhile (its node died while
        the task was queued, or its worker was lost), make it wait for that argument instead."""
        lost = self._lost_args(rec)
        if lost:
            self._rewait(rec, lost, [])
        return bool(lost)

    def arg_lost(self, rec: TaskRecord, indexes: Any, error: list[Any]) -> bool:
        """A worker could not read arguments ``indexes`` of ``rec``.

        Returns ``False`` when that cannot be helped (the task then fails with ``error``).
        """
        if not isinstance(indexes, list) or not indexes or len(rec.dep_frames) != len(rec.deps):
            return False
        if not all(isinstance(i, int) and 0 <= i < len(rec.deps) for i in indexes):
            return False
        self.events.requeued(rec)
        for i in indexes:
            entry = self.objects.get(rec.deps[i].oid)
            if entry is None:
                return False
            unchanged = entry.state == READY and entry.frames is rec.dep_frames[i]
            store = stored_in(entry.frames) if unchanged else ""
            if unchanged and store and not entry.lost:
                # Unreadable, but its node is not known dead (yet): wait for the head's word.
                self._tokens += 1
                self.parked[rec.tid] = Parked(rec, list(indexes), store, error, self._tokens)
                self._emit(StartTimer(PARK_S, ParkExpired(rec.tid, self._tokens)))
                return True
        self._rewait(rec, list(indexes), error)
        return True

    def park_expired(self, ev: ParkExpired) -> None:
        """The argument's node was not declared dead: it lives, so send the task again."""
        p = self.parked.get(ev.tid)
        if p is None or p.token != ev.token:
            return
        del self.parked[ev.tid]
        rec = p.rec
        if rec.cancelled or ev.tid not in self.tasks.by_tid:
            return
        if rec.max_retries != -1 and rec.attempts >= rec.max_retries:
            self.tasks.fail(rec, p.error)
            return
        rec.attempts += 1
        self._rewait(rec, p.indexes, p.error)  # takes the arguments as they are now

    def _rewait(self, rec: TaskRecord, indexes: list[int], error: list[Any]) -> None:
        """Make ``rec`` wait again for its arguments ``indexes``, rebuilding the lost ones."""
        if rec.cancelled or rec.tid not in self.tasks.by_tid:
            return
        rec.lease = None
        rec.started = False
        waits: list[tuple[int, Entry]] = []
        for i in indexes:
            dep = rec.deps[i]
            entry = self.objects.get(dep.oid)
            if entry is None:
                self._fail_lost(rec, error, f"argument {i} is not known here any more")
                return
            waits.append((i, entry))
        rec.waiting_deps = len(waits)
        for i, entry in waits:
            if rec.tid not in self.tasks.by_tid:
                return  # failed meanwhile
            if entry.state == READY and entry.frames is rec.dep_frames[i] and self.is_lost(entry):
                if entry.owned:
                    if not self.can_rebuild(entry.oid):
                        self._fail_lost(rec, error, f"argument {i} was lost with its node")
                        return
                    self.reconstruct(entry.oid)
                elif not self._refetch(entry):
                    self._fail_lost(rec, error, f"argument {i} was lost with its node")
                    return
            done = self.tasks.dep_callback(rec, i)
            if not self.objects.on_ready(entry.oid, done):
                done(entry)

    def _refetch(self, entry: Entry) -> bool:
        """Fetch a borrowed value again from its owner (which rebuilds it); once per value."""
        if entry.oid in self.refetched or not entry.owner:
            return False
        self.refetched.add(entry.oid)
        self.objects.reset(entry.oid)
        entry.fetching = False
        self.ownership.fetch(entry, entry.owner)
        return True

    def _fail_lost(self, rec: TaskRecord, error: list[Any], why: str) -> None:
        if not error:
            error = dumps(ObjectLostError(f"task {rec.name}: {why}; it cannot be rebuilt"))
        self.tasks.fail(rec, error)

    def dep_status(self, entry: Entry) -> int:
        """Whether a ready argument can be sent as it is (:data:`USE`), is being rebuilt or
        fetched again (:data:`WAIT`), or was lost with its node for good (:data:`LOST`)."""
        if not self.is_lost(entry):
            return USE
        if entry.owned:
            if self.can_rebuild(entry.oid):
                self.reconstruct(entry.oid)
                return WAIT
            return LOST
        return WAIT if self._refetch(entry) else LOST

    def lost_dep_error(self, rec: TaskRecord, entry: Entry) -> list[Any]:
        """Error frames for ``rec``, whose argument ``entry`` was lost for good."""
        return dumps(
            ObjectLostError(
                f"task {rec.name} cannot run: its argument (object {entry.oid}) was lost with the "
                "node that stored it, and cannot be rebuilt (a value made by put(), or rebuilt "
                f"{MAX_RECONSTRUCTIONS} times already)"
            )
        )

    def reconstruct(self, oid: str) -> None:
        """Re-run the task that made ``oid``; idempotent while it runs."""
        rec = self.records.get(oid)
        if rec is None:
            return
        if rec.tid in self.tasks.by_tid:
            return  # already being rebuilt
        rec.rebuilds += 1
        for rid in rec.return_ids:
            self.objects.reset(rid)
        rec.lease = None
        rec.started = False
        rec.attempts = 0
        rec.cancelled = rec.force_cancel = False  # (a run cancelled too late to stop it)
        self.tasks.submit(rec)
