"""Task submission: dependency resolution, worker leases, dispatch, results, retries.

A mixin of :class:`nbcluster.client.core.CoreClient`; every method here runs on the client's I/O
thread except ``submit``, ``put`` and ``cancel``, which user threads call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from nbcluster.client.commands import CancelTask, Command, SubmitTask, TellOwner
from nbcluster.client.events import TaskEvents
from nbcluster.client.lineage import LOST, USE, WAIT
from nbcluster.client.objects import FAILED, PENDING, READY, Entry, ObjectTable
from nbcluster.client.tasks import Lease, SchedClass, TaskRecord
from nbcluster.client.wire import WorkerConn, is_ref, send_nowait, split_parts
from nbcluster.exceptions import (
    NbclusterError,
    ProtocolError,
    SerializationError,
    TaskCancelledError,
    TaskUnschedulableError,
    WorkerCrashedError,
)
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.validation import RateLimitedLog, receive
from nbcluster.refs import ObjectRef, serialized_refs
from nbcluster.scheduling import preferred_store, stored_bytes, strategy_key
from nbcluster.serialization import copy_frames, dumps, dumps_args, loads
from nbcluster.store.client import is_stored
from nbcluster.transport.sockets import check_frame_sizes

if TYPE_CHECKING:
    import asyncio

    from nbcluster.store.client import StoreClient
    from nbcluster.transport import Transport

log = logging.getLogger("nbcluster")
_malformed_worker = RateLimitedLog(log, "dropping a malformed message from a worker")

MAX_LEASE_REQUESTS = 16  # outstanding lease requests per resource shape
LEASE_LINGER_S = 0.5  # an idle lease is kept this long for the next task of its shape


class TaskSubmission:
    """Submitting tasks to leased workers (mixed into ``CoreClient``)."""

    # Provided by CoreClient.
    objects: ObjectTable
    owner_address: str
    job_id: str
    namespace: str
    log_to_driver: bool
    on_output: Callable[[str, str, Any], None] | None
    output_tag: Callable[[], Any] | None
    _closing: bool
    _head: Any
    _transport: Transport | None
    _loop: asyncio.AbstractEventLoop | None
    _rid: Any
    _classes: dict[tuple[tuple[str, float], ...], SchedClass]
    _rid_class: dict[int, SchedClass]
    _leases: dict[str, Lease]
    _conns: dict[str, WorkerConn]
    _by_tid: dict[str, TaskRecord]
    _producer: dict[str, TaskRecord]
    _seen_nodes: set[str]
    node_id: str
    store: StoreClient | None
    _tev: TaskEvents | None = None  # made on first use, on the I/O thread

    if TYPE_CHECKING:  # implemented by CoreClient and ActorCalls

        async def _send_to_owner(self, owner: str, header: dict[str, Any]) -> None: ...

        def _actor_call_ready(self, rec: TaskRecord) -> None: ...
        def _on_actor_result(
            self, rec: TaskRecord, h: dict[str, Any], payload: list[Any]
        ) -> None: ...
        def _cancel_actor_call(self, rec: TaskRecord, force: bool, err: list[Any]) -> None: ...

        def _post(self, command: Command) -> None: ...
        def _spawn(self, coro: Any) -> asyncio.Task[Any]: ...
        def new_id(self) -> str: ...
        async def _fetch(self, oid: str, owner: str) -> None: ...

        # Lineage (nbcluster.client.lineage)
        def _keep_lineage(self, rec: TaskRecord, parts: Any) -> bool: ...
        def _dep_status(self, entry: Entry) -> int: ...
        def _held_back(self, rec: TaskRecord) -> bool: ...
        def _lost_dep_error(self, rec: TaskRecord, entry: Entry) -> list[Any]: ...
        def _arg_lost(self, rec: TaskRecord, indexes: Any, error: list[Any]) -> bool: ...

    # ================================================================== submission (user thread)
    def submit(
        self,
        name: str,
        fn_id: str,
        fn_blob: bytes,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        shape: dict[str, float],
        num_returns: int,
        max_retries: int,
        retry_exceptions: bool | tuple[type[BaseException], ...],
        strategy: dict[str, Any] | None = None,
    ) -> list[ObjectRef]:
        """Queue a task; returns one ref per return value.

        ``strategy`` is a scheduling strategy in wire form (:func:`nbcluster.scheduling.
        strategy_spec`); tasks of one shape and strategy share leases.
        """
        rec, refs = self._new_record(name, args, kwargs, num_returns)
        check_frame_sizes([fn_blob], f"function {name} (pickled)")
        rec.fn_id, rec.fn_blob = fn_id, fn_blob
        rec.shape, rec.shape_key = shape, tuple(sorted(shape.items()))
        if strategy is not None:
            rec.strategy = strategy
            rec.shape_key += (("@strategy", strategy_key(strategy)),)
        rec.max_retries, rec.retry_exceptions = max_retries, retry_exceptions
        self._post(SubmitTask(rec))
        return refs if num_returns != 0 else []

    def _new_record(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], num_returns: int
    ) -> tuple[TaskRecord, list[ObjectRef]]:
        """Serialize a call's arguments and make the refs of its return values."""
        with serialized_refs() as nested:
            frames, deps = dumps_args(name, args, kwargs, is_ref, copy=False)
        tid = self.new_id()
        # Large arguments go into the node's store (copied once, read zero-copy by the worker);
        # small ones travel in the message.
        store = self.store
        args_oid = None
        if store is not None:
            frames = store.put_frames(f"{tid}.a", frames, self.job_id)
            if is_stored(frames):
                args_oid = f"{tid}.a"
        else:
            check_frame_sizes(frames, f"an argument of {name}")  # inline: no store here
            frames = copy_frames(frames)
        return_ids = [f"{tid}.{i}" for i in range(max(num_returns, 1))]
        refs = [ObjectRef(oid, self.owner_address, self) for oid in return_ids]
        rec = TaskRecord(
            tid=tid,
            name=name,
            fn_id="",
            fn_blob=b"",
            args=frames,
            deps=deps,
            return_ids=return_ids,
            shape={},
            shape_key=(),
            max_retries=0,
            retry_exceptions=False,
            nret=num_returns,
            nested=nested,
            args_oid=args_oid,
        )
        tag = self.output_tag
        if tag is not None:  # e.g. the notebook cell submitting it (see nbcluster.magics)
            rec.tag = tag()
        return rec, refs

    def put(self, value: Any) -> ObjectRef:
        """Store ``value`` as an object owned by this client."""
        oid = f"{self.new_id()}.p"
        try:
            with serialized_refs() as inner:
                frames = self._serialize_value(oid, value)
        except NbclusterError:
            raise  # the store is full: its message says why
        except Exception as exc:
            raise SerializationError(
                f"could not serialize the value passed to put(): {type(exc).__name__}: {exc}"
            ) from exc
        ref = ObjectRef(oid, self.owner_address, self)
        if inner:
            # Refs inside the value live as long as it does; ones we only borrowed, their
            # owners must keep (we cannot follow where the value goes).
            self.objects.set_contained(oid, inner)
            for r in inner:
                if r.owner_address != self.owner_address:
                    self._post(TellOwner(r.owner_address, {"k": Kind.ESCAPE, "oid": r.hex()}))
        self.objects.complete(oid, READY, frames)
        return ref

    def _serialize_value(self, oid: str, value: Any) -> list[Any]:
        store = self.store
        if store is not None:
            return store.put(oid, value, self.job_id)
        frames = dumps(value)
        check_frame_sizes(frames, "the value passed to put()")  # inline: no store here
        return frames

    def cancel(self, ref: ObjectRef, force: bool) -> None:
        self._post(CancelTask(ref.hex(), force))

    # ================================================================== loop: submission
    def _events(self) -> TaskEvents:
        ev = self._tev
        if ev is None:
            assert self._loop is not None
            ev = self._tev = TaskEvents(self._loop, self._head)
        return ev

    def _do_submit(self, rec: TaskRecord) -> None:
        self._by_tid[rec.tid] = rec
        if rec.actor_id is None:
            self._events().submitted(rec)
        for oid in rec.return_ids:
            self._producer[oid] = rec
        rec.dep_frames = [[] for _ in rec.deps]
        waiting = 0
        for i, dep in enumerate(rec.deps):
            entry = self._resolve(dep)
            if entry is not None and entry.state == FAILED:
                self._finish(rec, FAILED, [entry.frames] * len(rec.return_ids))
                return
            status = self._dep_status(entry) if entry is not None and entry.state == READY else -1
            if status == LOST:
                assert entry is not None
                self._finish(rec, FAILED, [self._lost_dep_error(rec, entry)] * len(rec.return_ids))
                return
            if status == USE:
                assert entry is not None
                rec.dep_frames[i] = entry.frames
            else:
                waiting += 1
                self.objects.on_ready(dep.hex(), self._dep_callback(rec, i))
        rec.waiting_deps = waiting
        if waiting == 0:
            self._enqueue(rec)

    def _dep_callback(self, rec: TaskRecord, i: int) -> Callable[[Entry], None]:
        def done(entry: Entry) -> None:
            # Runs on the loop thread (objects complete there).
            if rec.cancelled or rec.tid not in self._by_tid:
                return
            if entry.state == FAILED:
                self._finish(rec, FAILED, [entry.frames] * len(rec.return_ids))
                return
            status = self._dep_status(entry)
            if status == WAIT:
                self.objects.on_ready(entry.oid, done)  # lost with its node: wait for it again
                return
            if status == LOST:
                self._finish(rec, FAILED, [self._lost_dep_error(rec, entry)] * len(rec.return_ids))
                return
            rec.dep_frames[i] = entry.frames
            rec.waiting_deps -= 1
            if rec.waiting_deps == 0:
                self._enqueue(rec)

        return done

    def _resolve(self, ref: ObjectRef) -> Entry | None:
        """The local entry of ``ref``, starting a fetch from its owner if we do not own it."""
        entry = self.objects.get(ref.hex())
        if entry is None:
            entry = self.objects.create(ref.hex(), owned=False)
        if entry.state == PENDING and not entry.owned and not entry.fetching:
            entry.fetching = True
            self._spawn(self._fetch(ref.hex(), ref.owner_address))
        return entry

    def _enqueue(self, rec: TaskRecord) -> None:
        # rec.deps keeps the argument refs alive until the task is done: a stored value must not
        # be freed before the worker has read it.
        if rec.actor_id is not None:
            self._actor_call_ready(rec)
            return
        locality: dict[str, int] = {}
        # Sent again (a retry, a rebuild, an argument got back): its preferred store may differ.
        rec.shape_key = tuple(kv for kv in rec.shape_key if kv[0] != "@store")
        if rec.strategy is None:
            # Locality: prefer the node whose store holds most bytes of the arguments; tasks
            # preferring different nodes need leases on different nodes.
            locality = stored_bytes([rec.args, *rec.dep_frames])
            best = preferred_store(locality)
            if best is not None:
                rec.shape_key += (("@store", best),)
        sc = self._classes.get(rec.shape_key)
        if sc is None:
            sc = SchedClass(rec.shape, rec.shape_key, rec.strategy, locality)
            self._classes[rec.shape_key] = sc
        sc.queue.append(rec)
        self._pump(sc)

    def _pump(self, sc: SchedClass) -> None:
        # One task at a time per leased worker. (Queueing several on one worker doubles the
        # throughput of tiny tasks, but a long task would then hold up the ones queued behind
        # it while other workers idle; that needs work stealing first.)
        idle = [lease for lease in sc.leases if not lease.inflight]
        while sc.queue and idle:
            rec = sc.queue.popleft()
            if self._held_back(rec):
                idle = [lease for lease in idle if not lease.inflight]  # it may have re-pumped
                continue
            self._dispatch(rec, idle.pop())
        want = min(len(sc.queue), MAX_LEASE_REQUESTS) - len(sc.requests)
        for _ in range(want):
            rid = next(self._rid)
            sc.requests.add(rid)
            self._rid_class[rid] = sc
            name = sc.queue[0].name if sc.queue else ""
            req = {"k": Kind.LEASE_REQUEST, "rid": rid, "shape": sc.shape, "name": name}
            if sc.strategy is not None:
                req["strategy"] = sc.strategy
            if sc.locality:
                req["locality"] = sc.locality
            send_nowait(self._head, encode(req))
        if not sc.queue and sc.requests:
            for rid in sc.requests:
                self._rid_class.pop(rid, None)
                send_nowait(self._head, encode({"k": Kind.LEASE_CANCEL, "rid": rid}))
            sc.requests.clear()

    def _dispatch(self, rec: TaskRecord, lease: Lease) -> None:
        if lease.linger is not None:
            lease.linger.cancel()
            lease.linger = None
        conn = lease.conn
        rec.lease = lease
        lease.inflight.append(rec)
        self._events().started(rec, lease.node_id)
        header: dict[str, Any] = {
            "k": Kind.TASK,
            "tid": rec.tid,
            "fn": rec.fn_id,
            "name": rec.name,
            "nargs": len(rec.args),
            "nret": rec.nret,
        }
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
        assigned = dict(rec.shape)
        if lease.gpus:
            assigned["GPU_IDS"] = lease.gpus  # type: ignore[assignment]
        header["assigned"] = assigned
        send_nowait(conn.sock, encode(header, payload))

    def _on_grant(self, h: dict[str, Any]) -> None:
        sc = self._rid_class.pop(h["rid"], None)
        if sc is not None:
            sc.requests.discard(h["rid"])
        if sc is None or self._closing:
            sc = self._classes.get(tuple(sorted(h["shape"].items())))
            if sc is None or not sc.queue:
                send_nowait(self._head, encode({"k": Kind.LEASE_RETURN, "lease_id": h["lease_id"]}))
                return
        conn = self._conn(h["worker_addr"], h["control_addr"], h["worker_id"])
        lease = Lease(
            lease_id=h["lease_id"],
            worker_id=h["worker_id"],
            worker_addr=h["worker_addr"],
            control_addr=h["control_addr"],
            pid=h["pid"],
            node_id=h["node_id"],
            node_name=h.get("node_name", ""),
            gpus=list(h.get("gpus") or []),
            shape=dict(sc.shape),
            shape_key=sc.key or tuple(sorted(h["shape"].items())),
            conn=conn,
        )
        conn.lease = lease
        conn.node_id, conn.node_name = lease.node_id, lease.node_name
        self._seen_nodes.add(lease.node_id)
        self._leases[lease.lease_id] = lease
        sc.leases.append(lease)
        self._pump(sc)
        if not lease.inflight:
            self._linger(lease)

    def _on_lease_failed(self, rid: int, msg: str) -> None:
        """The head can never place this request (e.g. hard affinity to a dead node): every
        task waiting in its class fails with ``TaskUnschedulableError``."""
        sc = self._rid_class.pop(rid, None)
        if sc is None:
            return
        sc.requests.discard(rid)
        while sc.queue:
            rec = sc.queue.popleft()
            err = TaskUnschedulableError(f"{rec.name} cannot be scheduled: {msg}")
            self._finish(rec, FAILED, [dumps(err)] * len(rec.return_ids))
        self._pump(sc)  # withdraws the class's other requests

    def _conn(self, addr: str, control_addr: str, worker_id: str = "") -> WorkerConn:
        """The connection to a worker (made once; the first message binds it to our job)."""
        conn = self._conns.get(addr)
        if conn is not None and worker_id and conn.worker_id and conn.worker_id != worker_id:
            # Another worker process listens at this address now (the old one died and its
            # port was reused): it was never bound to our job nor sent our functions.
            self._close_conn(conn)
            conn = None
        if conn is None:
            assert self._transport is not None
            sock = self._transport.client(zmq.DEALER, addr)
            ctrl = self._transport.client(zmq.DEALER, control_addr)
            conn = WorkerConn(addr, control_addr, sock, ctrl, worker_id)
            self._conns[addr] = conn
            bind = {
                "k": Kind.BIND,
                "job_id": self.job_id,
                "namespace": self.namespace,
                "sys_path": [os.path.abspath(p) if p in ("", ".") else p for p in sys.path],
            }
            send_nowait(sock, encode(bind))
            conn.reader = self._spawn(self._read_worker(conn))
        return conn

    def _close_conn(self, conn: WorkerConn) -> None:
        if self._conns.get(conn.addr) is conn:
            del self._conns[conn.addr]
        conn.close()

    def _linger(self, lease: Lease) -> None:
        assert self._loop is not None
        if lease.linger is not None:
            lease.linger.cancel()
        lease.linger = self._loop.call_later(LEASE_LINGER_S, self._return_if_idle, lease)

    def _return_if_idle(self, lease: Lease) -> None:
        lease.linger = None
        if lease.inflight or lease.lease_id not in self._leases:
            return
        self._drop_lease(lease)
        send_nowait(self._head, encode({"k": Kind.LEASE_RETURN, "lease_id": lease.lease_id}))

    def _drop_lease(self, lease: Lease) -> None:
        self._leases.pop(lease.lease_id, None)
        sc = self._classes.get(lease.shape_key)
        if sc is not None and lease in sc.leases:
            sc.leases.remove(lease)
        if lease.conn.lease is lease:
            lease.conn.lease = None
        if lease.linger is not None:
            lease.linger.cancel()
            lease.linger = None

    def _on_lease_lost(self, lease_id: str, reason: str, free_retry: bool = False) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        self._drop_lease(lease)
        conn = self._conns.get(lease.worker_addr)
        if conn is not None and conn is lease.conn:  # not a later worker's
            self._close_conn(conn)
        inflight = list(lease.inflight)
        lease.inflight.clear()
        sc = self._classes.get(lease.shape_key)
        requeue: list[TaskRecord] = []
        for i, rec in enumerate(inflight):
            rec.lease = None
            if i > 0:  # never started: the worker runs its tasks in order
                requeue.append(rec)
                continue
            if rec.force_cancel or rec.cancelled:
                self._finish(
                    rec, FAILED, [dumps(TaskCancelledError(rec.tid))] * len(rec.return_ids)
                )
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
                err = WorkerCrashedError(
                    f"the worker running {rec.name} died: {reason} "
                    f"(node {lease.node_name or lease.node_id}); "
                    f"{rec.attempts} retr{'y' if rec.attempts == 1 else 'ies'} used of "
                    f"max_retries={rec.max_retries}"
                )
                self._finish(rec, FAILED, [dumps(err)] * len(rec.return_ids))
        if sc is not None:
            ev = self._events()
            for rec in requeue:
                ev.requeued(rec)
            sc.queue.extendleft(reversed(requeue))
            self._pump(sc)

    # ================================================================== loop: worker messages
    async def _read_worker(self, conn: WorkerConn) -> None:
        sock = conn.sock
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                h, payload = receive(frames)
                kind = h["k"]
                if kind == Kind.RESULT:
                    self._on_result(conn, h, payload)
                elif kind == Kind.LOG:
                    self._on_log(h, conn)
            except ProtocolError as exc:
                _malformed_worker(f"{conn.addr}: {exc}")
            except Exception:
                log.exception("nbcluster internal error handling a worker message")

    def _on_result(self, conn: WorkerConn, h: dict[str, Any], payload: list[Any]) -> None:
        rec = self._by_tid.get(h["tid"])
        lease = conn.lease
        if rec is None or (rec.lease is not None and rec.lease.conn is not conn):
            return  # late news from a worker we gave up on (its node was declared dead)
        self._note_kept(rec, h)
        if rec.actor_id is not None:
            self._on_actor_result(rec, h, payload)
            return
        if lease is not None:
            with contextlib.suppress(ValueError):
                lease.inflight.remove(rec)
        rec.lease = None
        if h.get("ok"):
            self._finish(rec, READY, split_parts(h.get("n", []), payload))
        elif h.get("err") == "cancelled":
            self._finish(rec, FAILED, [payload] * len(rec.return_ids))
        elif h.get("lost") and not rec.cancelled and self._arg_lost(rec, h["lost"], payload):
            pass  # an argument was lost with its node: the task waits for it again
        else:
            if self._should_retry_exception(rec, payload):
                rec.attempts += 1
                sc = self._classes[rec.shape_key]
                sc.queue.appendleft(rec)
                self._events().requeued(rec)
            else:
                self._finish(rec, FAILED, [payload] * len(rec.return_ids))
        if lease is not None:
            lease_class = self._classes.get(lease.shape_key)
            if lease_class is not None:
                self._pump(lease_class)
            if not lease.inflight and lease.lease_id in self._leases:
                self._linger(lease)

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

    def _finish(self, rec: TaskRecord, state: int, parts: Sequence[list[Any]]) -> None:
        self._by_tid.pop(rec.tid, None)
        if rec.actor_id is None:
            self._events().ended(rec, state == READY)
        rec.dep_frames = []
        # A stored result may have to be rebuilt if its node dies: keep what the task needs.
        if not (state == READY and self._keep_lineage(rec, parts)):
            rec.deps = []
            rec.nested = []
        if rec.args_oid is not None and self.store is not None:
            self.store.free([rec.args_oid])
            rec.args_oid = None
        contained, rec.contained = rec.contained, []
        for oid, frames in zip(rec.return_ids, parts, strict=False):
            self._producer.pop(oid, None)
            if contained:
                self.objects.set_contained(oid, contained)
            self.objects.complete(oid, state, frames)
        # A task with num_returns=0 still completes its (hidden) first id.
        for oid in rec.return_ids[len(parts) :]:
            self._producer.pop(oid, None)
            self.objects.complete(
                oid, state, [dumps(None)] if state == READY else parts[0] if parts else []
            )

    def _note_kept(self, rec: TaskRecord, h: dict[str, Any]) -> None:
        """Account for refs the callee kept, and for refs inside its result.

        A kept ref we own counts as a borrow until the callee lets go (``BORROW_DEL``); one we
        borrowed ourselves makes its owner keep it for good (``ESCAPE``). Refs inside the result
        stay alive as long as the result does.
        """
        for oid in h.get("kept", ()):
            e = self.objects.get(oid)
            if e is None:
                continue
            if e.owned:
                self.objects.add_borrows(oid, 1)
            elif e.owner:
                self._spawn(self._send_to_owner(e.owner, {"k": Kind.ESCAPE, "oid": oid}))
        returned = h.get("returned")
        if returned:
            refs = []
            for oid, owner in returned:
                mine = owner == self.owner_address
                refs.append(ObjectRef(oid, owner, self, borrowed=not mine))
                if not mine:
                    self._spawn(self._send_to_owner(owner, {"k": Kind.ESCAPE, "oid": oid}))
            rec.contained = refs

    def _on_log(self, h: dict[str, Any], conn: WorkerConn) -> None:
        if not self.log_to_driver:
            return
        node = ""
        if conn.node_name and self._multi_node(conn.node_id):
            node = f", node={conn.node_name}"
        prefix = f"({h.get('name', 'task')} pid={h.get('pid')}{node}) "
        text = "".join(f"{prefix}{line}\n" for line in h.get("lines", []))
        stream = h.get("stream", "stdout")
        if self.on_output is not None:
            rec = self._by_tid.get(h.get("tid", ""))
            self.on_output(stream, text, rec.tag if rec is not None else None)
            return
        out = sys.stderr if stream == "stderr" else sys.stdout
        with contextlib.suppress(Exception):
            out.write(text)
            out.flush()

    def _multi_node(self, node_id: str) -> bool:
        # One machine, one node: the node's name would only be noise.
        return len(self._seen_nodes) > 1 or node_id != self.node_id

    # ================================================================== loop: cancel
    def _do_cancel(self, oid: str, force: bool) -> None:
        rec = self._producer.get(oid)
        if rec is None:
            return
        rec.cancelled = True
        err = [dumps(TaskCancelledError(rec.tid))] * len(rec.return_ids)
        if rec.actor_id is not None:
            self._cancel_actor_call(rec, force, err)
            return
        if rec.lease is None:
            sc = self._classes.get(rec.shape_key)
            if sc is not None and rec in sc.queue:
                sc.queue.remove(rec)
            self._finish(rec, FAILED, err)
            return
        rec.force_cancel = force
        conn = rec.lease.conn
        msg = encode({"k": Kind.CANCEL, "tid": rec.tid, "force": bool(force)})
        send_nowait(conn.sock, list(msg))
        send_nowait(conn.ctrl, list(msg))
