"""Worker leases: queues per scheduling class, lease requests, dispatch, retries.

Part of :class:`~nbcluster.client.state.ClientState` (pure: it only returns instructions).
Ready tasks wait in a queue per scheduling class (:class:`~nbcluster.client.tasks.SchedClass`);
for each queued task the head is asked for a lease (at most :data:`MAX_LEASE_REQUESTS` per
class, :data:`SPREAD_LEASE_REQUESTS` for SPREAD). A leased worker is sent up to
:func:`pipeline_depth` tasks at once (it runs them in order: no round trip between them), and a
worker that goes idle while others still have tasks queued *steals* them (``STEAL`` to the busy
worker's control thread, which gives back those not started: ``STOLEN``), so a long task never
holds up the short ones queued behind it while a worker is free. An idle lease is kept
:data:`LEASE_LINGER_S` for the next task of its class, then returned.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nbcluster.client.inputs import (
    LeaseGranted,
    LeaseInfeasible,
    LeaseLost,
    LingerExpired,
    TasksStolen,
)
from nbcluster.client.inputs import TaskResult as TaskResultEvent
from nbcluster.client.instructions import Instruction, StartTimer, ToControl, ToHead, ToWorker
from nbcluster.client.objects import READY
from nbcluster.client.tasks import Lease, SchedClass, TaskRecord
from nbcluster.client.wire import split_parts
from nbcluster.exceptions import (
    OutOfMemoryError,
    TaskCancelledError,
    TaskUnschedulableError,
    WorkerCrashedError,
)
from nbcluster.protocol.messages import OOM_REASON, Kind
from nbcluster.scheduling import placement_fields, preferred_store, stored_bytes
from nbcluster.serialization import dumps, loads

if TYPE_CHECKING:
    from nbcluster.client.events import TaskEvents
    from nbcluster.client.lineage import Lineage
    from nbcluster.client.submission import Tasks
    from nbcluster.client.workers import WorkerConns

log = logging.getLogger("nbcluster")

MAX_LEASE_REQUESTS = 16  # outstanding lease requests per resource shape
#: ... and per SPREAD class: enough to ask every node of a wide cluster at once. With 16, the
#: first 16 leases ran a burst of short tasks before more workers were up: 2,000 tasks on 128
#: nodes ran on ~40 of them, and the workers started meanwhile were never used.
SPREAD_LEASE_REQUESTS = 256


def request_cap(strategy: dict[str, Any] | None) -> int:
    """How many lease requests a class with this scheduling strategy keeps outstanding."""
    if strategy is not None and strategy.get("t") == "spread":
        return SPREAD_LEASE_REQUESTS
    return MAX_LEASE_REQUESTS


LEASE_LINGER_S = 0.5  # an idle lease is kept this long for the next task of its shape

#: Tasks sent to one leased worker at once (1: one at a time, as before pipelining).
PIPELINE_ENV = "NBCLUSTER_TASK_PIPELINE"
DEFAULT_PIPELINE = 32


def pipeline_depth() -> int:
    """How many tasks a leased worker is sent at once (:data:`PIPELINE_ENV`, default 32)."""
    try:
        return max(1, int(os.environ.get(PIPELINE_ENV, DEFAULT_PIPELINE)))
    except ValueError:
        return DEFAULT_PIPELINE


class Leasing:
    """Scheduling classes, the leases we hold and the lease requests we wait on.

    Parameters
    ----------
    events
        Task events for the dashboards.
    conns
        Our connections to workers.
    next_rid
        Gives request ids (shared with the shell's queries: one id space per client).
    emit
        Where instructions go.
    """

    # Collaborators, set once by ClientState.
    tasks: Tasks
    lineage: Lineage

    def __init__(
        self,
        events: TaskEvents,
        conns: WorkerConns,
        next_rid: Callable[[], int],
        emit: Callable[[Instruction], None],
    ) -> None:
        self.events = events
        self.conns = conns
        self._next_rid = next_rid
        self._emit = emit
        self.classes: dict[tuple[Any, ...], SchedClass] = {}
        self.rid_class: dict[int, SchedClass] = {}  # outstanding request id -> its class
        self.leases: dict[str, Lease] = {}
        self.seen_nodes: set[str] = set()  # nodes we were leased workers on
        self.closing = False  # leases granted from now on go back at once
        self.depth = pipeline_depth()

    # ------------------------------------------------------------------ queues
    def enqueue(self, rec: TaskRecord) -> None:
        """Queue a ready task in its scheduling class and ask for leases as needed."""
        locality: dict[str, int] = {}
        # Sent again (a retry, a rebuild, an argument got back): its preferred store may differ.
        if rec.shape_key and rec.shape_key[-1][0] == "@store":  # (always added last)
            rec.shape_key = rec.shape_key[:-1]
        if rec.strategy is None:
            # Locality: prefer the node whose store holds most bytes of the arguments; tasks
            # preferring different nodes need leases on different nodes.
            locality = stored_bytes([rec.args, *rec.dep_frames])
            best = preferred_store(locality)
            if best is not None:
                rec.shape_key += (("@store", best),)
        sc = self.classes.get(rec.shape_key)
        if sc is None:
            sc = SchedClass(rec.shape, rec.shape_key, rec.strategy, locality, renv=rec.renv)
            self.classes[rec.shape_key] = sc
        sc.queue.append(rec)
        self.pump(sc)

    def unqueue(self, rec: TaskRecord) -> None:
        """Take a task that was not sent yet out of its queue (cancelled)."""
        sc = self.classes.get(rec.shape_key)
        if sc is not None and rec in sc.queue:
            sc.queue.remove(rec)
            self.pump(sc)  # withdraws a lease request no longer needed

    def pump(self, sc: SchedClass) -> None:
        """Send queued tasks to leases (idle ones first, then pipelined up to the class's
        depth), steal for idle leases, and ask for (or withdraw) lease requests to match."""
        queue = sc.queue
        if queue and sc.leases:
            # (A lease whose connection was replaced, a new worker at its address, is waiting
            # for its LEASE_LOST: nothing more goes to it.)
            spread = sc.strategy is not None and sc.strategy.get("t") == "spread"
            depth = 1 if spread else self.depth  # (SPREAD: one per worker, many workers)
            room = [ls for ls in sc.leases if len(ls.inflight) < depth and not ls.conn.closed]
            while queue and room:
                # One more task to each of the least busy leases, until they are all full.
                low = min(len(ls.inflight) for ls in room)
                left = []
                for lease in room:
                    n = len(lease.inflight)
                    if n == low and queue:
                        # A worker that retires after max_calls gets no task behind another.
                        if n and (lease.inflight[-1].max_calls or queue[0].max_calls):
                            continue
                        rec = queue.popleft()
                        if not self.lineage.held_back(rec):
                            self._dispatch(rec, lease)
                    if len(lease.inflight) < depth:
                        left.append(lease)
                room = left
        if not queue and sc.leases:
            self._steal(sc)
        self._ask(sc)

    def _ask(self, sc: SchedClass) -> None:
        """Keep one lease request out per task waiting (queued here, or behind another task on
        a worker: a new worker steals it), up to the class's cap."""
        cap = request_cap(sc.strategy)
        demand = len(sc.queue)
        if demand < cap:
            for lease in sc.leases:
                demand += max(0, len(lease.inflight) - 1)
        want = min(demand, cap) - len(sc.requests)
        for _ in range(want):
            rid = self._next_rid()
            sc.requests.add(rid)
            self.rid_class[rid] = sc
            name = sc.queue[0].name if sc.queue else ""
            req = {"k": Kind.LEASE_REQUEST, "rid": rid, "shape": sc.shape, "name": name}
            if sc.strategy is not None:
                req["strategy"] = sc.strategy
            if sc.locality:
                req["locality"] = sc.locality
            if sc.renv is not None:
                req["env"] = sc.renv["key"]  # workers of another environment will not do
            self._emit(ToHead(req))
        if demand == 0 and sc.requests:
            for rid in sc.requests:
                self.rid_class.pop(rid, None)
                self._emit(ToHead({"k": Kind.LEASE_CANCEL, "rid": rid}))
            sc.requests.clear()

    def _steal(self, sc: SchedClass) -> None:
        """Idle leases of ``sc`` take half of the not-started tasks of the busiest ones."""
        for thief in sc.leases:
            if thief.inflight or thief.conn.closed:
                continue
            victim, most = None, 0
            for lease in sc.leases:
                n = sum(1 for rec in itertools.islice(lease.inflight, 1, None) if not rec.stealing)
                if n > most and not lease.conn.closed:
                    victim, most = lease, n
            if victim is None:
                return
            take: list[str] = []
            for rec in reversed(victim.inflight):  # from the back: the last to run there
                if len(take) == (most + 1) // 2 or rec is victim.inflight[0]:
                    break
                if not rec.stealing:
                    rec.stealing = True
                    take.append(rec.tid)
            self._emit(ToControl(victim.conn, {"k": Kind.STEAL, "tids": take}))

    def on_stolen(self, ev: TasksStolen) -> None:
        """``STOLEN``: tasks a worker took out of its queue unstarted go back to their class."""
        lease = ev.conn.lease
        if lease is None:
            return  # the lease was lost meanwhile: its tasks were requeued then
        back = []
        wanted = set(ev.tids)
        for rec in lease.inflight:
            if rec.tid in wanted:
                back.append(rec)
        for rec in back:
            lease.inflight.remove(rec)
            rec.lease = None
            rec.sent_to = None
            rec.stealing = rec.started = False
            self.events.requeued(rec)
        sc = self.classes.get(lease.shape_key)
        if sc is None:
            return
        # (Those asked for and not given back run there: the worker gives back every asked
        # task it has not started, even one that reaches it after the ask.)
        sc.queue.extendleft(reversed(back))  # they were sent before anything still queued
        self._next_started(lease)
        self.pump(sc)
        if not lease.inflight and lease.lease_id in self.leases:
            self._linger(lease)

    def _started(self, rec: TaskRecord, lease: Lease) -> None:
        """``rec`` is first on its worker: it runs now (as far as we know), the views say so.
        (Those pipelined behind it stay "queued" there until it is their turn.)"""
        rec.started = True
        self.events.started(rec, lease.node_id, lease.worker_id)

    def _next_started(self, lease: Lease) -> None:
        """The lease's first task left it: the next one is its worker's now."""
        if lease.inflight and not lease.inflight[0].started:
            self._started(lease.inflight[0], lease)

    def _dispatch(self, rec: TaskRecord, lease: Lease) -> None:
        conn = lease.conn
        rec.lease = lease
        lease.inflight.append(rec)
        rec.sent_to = conn
        rec.sent_at = self.events.now
        if len(lease.inflight) == 1:
            self._started(rec, lease)
        header: dict[str, Any] = {
            "k": Kind.TASK,
            "tid": rec.tid,
            "fn": rec.fn_id,
            "name": rec.name,
            "nargs": len(rec.args),
            "nret": rec.nret,
        }
        if rec.gen:
            header["gen"], header["bp"] = rec.gen, rec.bp
        if rec.max_retries == -1 or rec.attempts < rec.max_retries:
            header["retry"] = True  # the memory monitor kills retriable tasks first
        payload: list[Any] = []
        if rec.fn_id not in conn.fns_sent:
            header["fnb"] = 1
            payload.append(rec.fn_blob)
            conn.fns_sent.add(rec.fn_id)
        payload.extend(rec.args)
        if rec.dep_frames:
            header["deps"] = [len(f) for f in rec.dep_frames]
            for f in rec.dep_frames:
                payload.extend(f)
        if lease.gpus:
            header["gpus"] = lease.gpus
        assigned: dict[str, Any] = dict(rec.shape)
        if lease.gpus:
            assigned["GPU_IDS"] = lease.gpus
        header["assigned"] = assigned
        if rec.renv is not None:
            header["renv"] = rec.renv
        header.update(placement_fields(rec.strategy))
        if rec.max_calls:
            header["mc"] = rec.max_calls
        self._emit(ToWorker(conn, header, payload))

    # ------------------------------------------------------------------ leases
    def on_grant(self, ev: LeaseGranted) -> None:
        """``LEASE_GRANTED``: use the worker for the class that asked (or give it back)."""
        sc = self.rid_class.pop(ev.rid, None)
        if sc is not None:
            sc.requests.discard(ev.rid)
        if sc is None or self.closing:
            sc = self.classes.get(tuple(sorted(ev.shape.items())))
            if sc is None or not sc.queue:
                self._emit(ToHead({"k": Kind.LEASE_RETURN, "lease_id": ev.lease_id}))
                return
        conn = self.conns.conn(ev.worker_addr, ev.control_addr, ev.worker_id)
        lease = Lease(
            lease_id=ev.lease_id,
            worker_id=ev.worker_id,
            worker_addr=ev.worker_addr,
            control_addr=ev.control_addr,
            pid=ev.pid,
            node_id=ev.node_id,
            node_name=ev.node_name,
            gpus=list(ev.gpus),
            shape=dict(sc.shape),
            shape_key=sc.key or tuple(sorted(ev.shape.items())),
            conn=conn,
        )
        conn.lease = lease
        conn.node_id, conn.node_name = lease.node_id, lease.node_name
        self.seen_nodes.add(lease.node_id)
        self.leases[lease.lease_id] = lease
        sc.leases.append(lease)
        self.pump(sc)
        if not lease.inflight:
            self._linger(lease)

    def on_lease_failed(self, rid: int, msg: str) -> None:
        """The head can never place this request (e.g. hard affinity to a dead node): every
        task waiting in its class fails with ``TaskUnschedulableError``."""
        sc = self.rid_class.pop(rid, None)
        if sc is None:
            return
        sc.requests.discard(rid)
        while sc.queue:
            rec = sc.queue.popleft()
            err = TaskUnschedulableError(f"{rec.name} cannot be scheduled: {msg}")
            self.tasks.fail(rec, dumps(err))
        self.pump(sc)  # withdraws the class's other requests

    def on_infeasible(self, ev: LeaseInfeasible) -> None:
        """No node has the resources in total: say so once per class."""
        sc = self.rid_class.get(ev.rid)
        if sc is None or sc.infeasible_warned:
            return
        sc.infeasible_warned = True
        missing = ", ".join(f"{k}: {v:g}" for k, v in ev.missing.items())
        name = sc.queue[0].name if sc.queue else "a task"
        log.warning(
            "%s needs {%s} but no node in the cluster has that much in total (missing "
            "%s); it stays pending until a node that can run it joins",
            name,
            ", ".join(f"{k}: {v:g}" for k, v in ev.shape.items()),
            missing,
        )

    def _linger(self, lease: Lease) -> None:
        """The lease went idle: return it after :data:`LEASE_LINGER_S` unless used again.

        One timer per lease at a time (not one per task): a busy lease goes idle after every
        task, and a timer each time filled the loop's timer heap with thousands of stale ones.
        """
        lease.idle_since = self.events.now
        if not lease.linger_armed:
            lease.linger_armed = True
            self._emit(StartTimer(LEASE_LINGER_S, LingerExpired(lease, lease.linger_token)))

    def on_linger_expired(self, ev: LingerExpired) -> None:
        """Return the lease if it has been idle for :data:`LEASE_LINGER_S`; else look again
        when that will be so."""
        lease = ev.lease
        if ev.token != lease.linger_token:
            return  # dropped meanwhile (its own timer, if any, is another)
        lease.linger_armed = False
        if lease.inflight or lease.lease_id not in self.leases:
            return  # busy: it lingers again when it goes idle
        left = lease.idle_since + LEASE_LINGER_S - self.events.now
        if left > 0.001:
            lease.linger_armed = True
            self._emit(StartTimer(left, LingerExpired(lease, lease.linger_token)))
            return
        self._drop_lease(lease)
        self._emit(ToHead({"k": Kind.LEASE_RETURN, "lease_id": lease.lease_id}))

    def _drop_lease(self, lease: Lease) -> None:
        self.leases.pop(lease.lease_id, None)
        sc = self.classes.get(lease.shape_key)
        if sc is not None and lease in sc.leases:
            sc.leases.remove(lease)
        if lease.conn.lease is lease:
            lease.conn.lease = None
        lease.linger_token += 1

    def on_lease_lost(self, ev: LeaseLost) -> None:
        """The worker died or its node went away: retry (or fail) the task it was running."""
        lease = self.leases.get(ev.lease_id)
        if lease is None:
            return
        reason, free_retry = ev.reason, ev.drain
        self._drop_lease(lease)
        conn = self.conns.by_addr.get(lease.worker_addr)
        if conn is not None and conn is lease.conn:  # not a later worker's
            self.conns.close(conn)
        inflight = list(lease.inflight)
        lease.inflight.clear()
        sc = self.classes.get(lease.shape_key)
        requeue: list[TaskRecord] = []
        for i, rec in enumerate(inflight):
            rec.lease = None
            rec.stealing = rec.started = False
            if i > 0:  # never started: the worker runs its tasks in order
                requeue.append(rec)
                continue
            if rec.force_cancel or rec.cancelled:
                self.tasks.fail(rec, dumps(TaskCancelledError(rec.tid)))
            elif free_retry:
                log.info("%s: %s; running it elsewhere", rec.name, reason)
                requeue.append(rec)
            elif rec.max_retries == -1 or rec.attempts < rec.max_retries:
                rec.attempts += 1
                log.warning(
                    "%s: %s while running %s; retrying (%d/%s)",
                    rec.name,
                    reason,
                    rec.tid,
                    rec.attempts,
                    "inf" if rec.max_retries == -1 else rec.max_retries,
                )
                requeue.append(rec)
            else:
                crashed = OutOfMemoryError if reason.startswith(OOM_REASON) else WorkerCrashedError
                err = crashed(
                    f"the worker running {rec.name} died: {reason} "
                    f"(node {lease.node_name or lease.node_id}); "
                    f"{rec.attempts} retr{'y' if rec.attempts == 1 else 'ies'} used of "
                    f"max_retries={rec.max_retries}"
                )
                self.tasks.fail(rec, dumps(err))
        if sc is not None:
            for rec in requeue:
                self.events.requeued(rec)
            sc.queue.extendleft(reversed(requeue))
            self.pump(sc)

    # ------------------------------------------------------------------ results
    def on_result(self, rec: TaskRecord, ev: TaskResultEvent) -> None:
        """The result of a plain task: complete, retry, or make it wait for a lost argument."""
        lease = ev.conn.lease
        if lease is not None:
            with contextlib.suppress(ValueError):
                lease.inflight.remove(rec)
            if ev.retire:
                self._retire(lease)
        rec.lease = None
        rec.started = False
        if ev.ok:
            self.tasks.finish(rec, READY, split_parts(ev.counts, ev.payload))
        elif ev.err == "cancelled":
            self.tasks.fail(rec, ev.payload)
        elif ev.lost and not rec.cancelled and self.lineage.arg_lost(rec, ev.lost, ev.payload):
            pass  # an argument was lost with its node: the task waits for it again
        elif self._should_retry_exception(rec, ev.payload):
            rec.attempts += 1
            self.classes[rec.shape_key].queue.appendleft(rec)
            self.events.requeued(rec)
        else:
            self.tasks.fail(rec, ev.payload)
        if lease is not None:
            self._next_started(lease)
            lease_class = self.classes.get(lease.shape_key)
            if lease_class is not None:
                self.pump(lease_class)
            if not lease.inflight and lease.lease_id in self.leases:
                self._linger(lease)

    def _retire(self, lease: Lease) -> None:
        """Its worker ran a function ``max_calls`` times: give the lease back for the head to
        end the worker (a planned exit); the next tasks go to other workers."""
        self._drop_lease(lease)
        if self.conns.by_addr.get(lease.worker_addr) is lease.conn:
            self.conns.close(lease.conn)
        self._emit(ToHead({"k": Kind.LEASE_RETURN, "lease_id": lease.lease_id, "retire": True}))

    def _should_retry_exception(self, rec: TaskRecord, payload: list[Any]) -> bool:
        if not rec.retry_exceptions or rec.cancelled:
            return False
        if rec.max_retries != -1 and rec.attempts >= rec.max_retries:
            return False
        if rec.retry_exceptions is True:
            return True
        try:
            err = loads(payload)
        except Exception:
            return False
        cause = getattr(err, "cause", None)
        return isinstance(cause, rec.retry_exceptions)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ head restarts
    def claims(self) -> list[dict[str, Any]]:
        """The leases we hold, as a rejoining ``HELLO`` names them."""
        out = []
        for ls in self.leases.values():
            key = dict(kv for kv in ls.shape_key if len(kv) == 2)
            strategy = dict(key.get("@strategy") or ())
            claim = {
                "lease_id": ls.lease_id,
                "worker_id": ls.worker_id,
                "shape": ls.shape,  # not shape_key: that also names strategy and store
                "gpus": ls.gpus,
                "env": key.get("@env", ""),
            }
            if strategy.get("t") == "pg":  # carved from a placement group's bundle
                claim["pg"], claim["bundle"] = strategy["pg"], strategy.get("bundle", -1)
            out.append(claim)
        return out

    def rejoined(self) -> None:
        """A restarted head took us back: ask again for the leases we wait for."""
        for sc in self.classes.values():
            for rid in sc.requests:
                self.rid_class.pop(rid, None)
            sc.requests.clear()
            self.pump(sc)

    def multi_node(self, node_id: str, own_node: str) -> bool:
        """Whether naming the node in output helps (one machine, one node: it is noise)."""
        return len(self.seen_nodes) > 1 or node_id != own_node
