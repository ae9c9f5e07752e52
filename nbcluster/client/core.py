"""The client runtime of a driver (or of a worker that submits tasks).

User threads call the synchronous methods (``submit``, ``get``, ``wait``, ...). All network I/O
happens on one background thread running an asyncio loop; user threads hand it work through an
inbox and wait on per-object events. Tasks go straight from this client to leased workers and
results come straight back (the head only hands out leases), so a task costs two hops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from nbcluster import context
from nbcluster.client.objects import FAILED, PENDING, READY, Entry, ObjectTable
from nbcluster.client.tasks import Lease, SchedClass, TaskRecord
from nbcluster.exceptions import (
    ConnectionFailedError,
    GetTimeoutError,
    NbclusterError,
    ObjectLostError,
    OwnerDiedError,
    ProtocolError,
    TaskCancelledError,
    TaskError,
    WorkerCrashedError,
)
from nbcluster.protocol.codec import decode, encode
from nbcluster.protocol.messages import PROTOCOL_VERSION, Kind
from nbcluster.protocol.security import derive_keys, token_from_environment
from nbcluster.refs import ObjectRef
from nbcluster.serialization import dumps, dumps_args, loads
from nbcluster.transport import Transport, wait_for_handshake

log = logging.getLogger("nbcluster")

MAX_LEASE_REQUESTS = 16  # outstanding lease requests per resource shape
LEASE_LINGER_S = 0.5  # an idle lease is kept this long for the next task of its shape
HEARTBEAT_S = 1.0


class WorkerConn:
    """A connection to one worker process (kept across leases of the same worker)."""

    def __init__(self, addr: str, control_addr: str, sock: Any, ctrl: Any) -> None:
        self.addr = addr
        self.control_addr = control_addr
        self.sock = sock
        self.ctrl = ctrl
        self.fns_sent: set[str] = set()
        self.reader: asyncio.Task[Any] | None = None
        self.lease: Lease | None = None


def _send_nowait(sock: Any, frames: list[Any]) -> None:
    """Queue a message without awaiting (high-water marks are off, so sending never blocks)."""
    fut = sock.send_multipart(frames, copy=False)
    if not fut.done():
        fut.add_done_callback(_log_send_error)
    elif fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())


def _log_send_error(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())


class CoreClient:
    """A connection to a cluster through which tasks are submitted and objects owned.

    Parameters
    ----------
    head_address
        ``host:port`` of the head.
    token
        The cluster secret.
    job_id, worker_id
        Set when this client lives in a worker: it joins the worker's job.
    """

    def __init__(
        self,
        head_address: str,
        token: str,
        *,
        job_id: str | None = None,
        worker_id: str | None = None,
        node_id: str | None = None,
        bind_host: str | None = None,
        log_to_driver: bool = True,
    ) -> None:
        self.head_address = head_address
        self._token = token
        self.job_id = job_id or ""
        self.worker_id = worker_id
        self.node_id = node_id or ""
        self.bind_host = bind_host or os.environ.get("NBCLUSTER_BIND_HOST", "127.0.0.1")
        self.log_to_driver = log_to_driver
        self.objects = ObjectTable()
        self.owner_address = ""
        self._prefix = os.urandom(5).hex()
        self._ids = itertools.count(1)
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closing = False
        self.closed = threading.Event()
        # loop-thread state
        self._transport: Transport | None = None
        self._head: Any = None
        self._owner_sock: Any = None
        self._rid = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._classes: dict[tuple[tuple[str, float], ...], SchedClass] = {}
        self._rid_class: dict[int, SchedClass] = {}
        self._leases: dict[str, Lease] = {}
        self._conns: dict[str, WorkerConn] = {}
        self._by_tid: dict[str, TaskRecord] = {}
        self._producer: dict[str, TaskRecord] = {}  # return object id -> pending task
        self._owner_conns: dict[str, Any] = {}
        self._fetch_waiters: dict[str, list[tuple[bytes, str]]] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self.on_output: Callable[[str, str], None] | None = None
        self.infeasible_notices: list[tuple[str, dict[str, float]]] = []

    # ================================================================== lifecycle (user thread)
    def connect(self, timeout: float = 30.0) -> None:
        """Start the I/O thread, authenticate with the head and join (or create) a job."""
        self._thread = threading.Thread(target=self._thread_main, name="nbcluster-io", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise ConnectionFailedError(
                f"could not connect to the nbcluster head at {self.head_address} "
                f"within {timeout:.0f} s"
            ) from None
        except BaseException:
            self.close()
            raise

    def close(self, shutdown_cluster: bool = False) -> None:
        """Disconnect (telling the head, so our workers and leases are released)."""
        if self._closing:
            self.closed.wait(10)
            return
        self._closing = True
        loop = self._loop
        if (
            loop is not None
            and loop.is_running()
            and self._ready.done()
            and self._ready.exception() is None
        ):
            with contextlib.suppress(RuntimeError):
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(shutdown_cluster), loop)
                with contextlib.suppress(Exception):
                    fut.result(10)
        elif loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._abort)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self.closed.set()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._main_task = loop.create_task(self._main())
            loop.run_until_complete(self._main_task)
        except BaseException as exc:  # surface start-up failures to connect()
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._fail_all_pending("the connection to the cluster was closed")
            self.closed.set()

    async def _main(self) -> None:
        self._transport = Transport(derive_keys(self._token))
        try:
            self._owner_sock, self.owner_address = self._transport.server(
                zmq.ROUTER, f"tcp://{self.bind_host}:0"
            )
            self._head = self._transport.client(zmq.DEALER, f"tcp://{self.head_address}")
            await wait_for_handshake(self._head, self.head_address, timeout=30.0)
            hello: dict[str, Any] = {
                "k": Kind.HELLO,
                "v": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "role": "worker" if self.worker_id else "driver",
            }
            if self.job_id:
                hello["job_id"] = self.job_id
            if self.worker_id:
                hello["worker_id"] = self.worker_id
            await self._head.send_multipart(encode(hello))
            h, _ = decode(await asyncio.wait_for(self._head.recv_multipart(), 30.0))
            if h["k"] == Kind.ERROR:
                raise ProtocolError(h.get("msg", "the head refused the connection"))
            self.job_id = h["job_id"]
            self._stop = asyncio.Event()
            for coro in (self._read_head(), self._serve_owner(), self._heartbeat()):
                self._spawn(coro)
            self._ready.set_result(None)
            await self._stop.wait()
        finally:
            for t in list(self._bg):
                t.cancel()
            for t in list(self._bg):
                with contextlib.suppress(BaseException):
                    await t
            self._transport.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    async def _shutdown(self, shutdown_cluster: bool) -> None:
        with contextlib.suppress(Exception):
            if shutdown_cluster:
                await self._head.send_multipart(encode({"k": Kind.SHUTDOWN_CLUSTER}))
            else:
                await self._head.send_multipart(encode({"k": Kind.GOODBYE}))
            await asyncio.sleep(0.02)  # let the frame leave before the socket closes
        self._stop.set()

    def _abort(self) -> None:
        """Stop a client whose start-up never finished."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        for t in list(self._bg):
            t.cancel()
        main = getattr(self, "_main_task", None)
        if main is not None:
            main.cancel()

    def _fail_all_pending(self, why: str) -> None:
        err = dumps(NbclusterError(why))
        for tid in list(self._by_tid):
            rec = self._by_tid.pop(tid)
            for oid in rec.return_ids:
                self.objects.complete(oid, FAILED, err)

    # ================================================================== cross-thread plumbing
    def _post(self, *item: Any) -> None:
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            loop = self._loop
            if loop is None or loop.is_closed():
                raise NbclusterError("the connection to the cluster is closed")
            loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._wake_pending = False
        inbox = self._inbox
        while inbox:
            item = inbox.popleft()
            try:
                getattr(self, "_do_" + item[0])(*item[1:])
            except Exception:
                log.exception("nbcluster internal error handling %s", item[0])

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ================================================================== refs (any thread)
    def add_local_ref(self, oid: str, owner: str, borrowed: bool) -> None:
        self.objects.add_ref(oid, owned=not borrowed)

    def remove_local_ref(self, oid: str) -> None:
        self.objects.remove_ref(oid)

    def mark_escaped(self, oid: str) -> None:
        self.objects.mark_escaped(oid)

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

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
    ) -> list[ObjectRef]:
        """Queue a task; returns one ref per return value."""
        frames, deps = dumps_args(name, args, kwargs, _is_ref)
        tid = self.new_id()
        return_ids = [f"{tid}.{i}" for i in range(max(num_returns, 1))]
        refs = [ObjectRef(oid, self.owner_address, self) for oid in return_ids]
        rec = TaskRecord(
            tid=tid,
            name=name,
            fn_id=fn_id,
            fn_blob=fn_blob,
            args=frames,
            deps=deps,
            return_ids=return_ids,
            shape=shape,
            shape_key=tuple(sorted(shape.items())),
            max_retries=max_retries,
            retry_exceptions=retry_exceptions,
            nret=num_returns,
        )
        self._post("submit", rec)
        return refs if num_returns != 0 else []

    def put(self, value: Any) -> ObjectRef:
        """Store ``value`` as an object owned by this client."""
        try:
            frames = dumps(value)
        except Exception as exc:
            from nbcluster.exceptions import SerializationError

            raise SerializationError(
                f"could not serialize the value passed to put(): {type(exc).__name__}: {exc}"
            ) from exc
        oid = f"{self.new_id()}.p"
        ref = ObjectRef(oid, self.owner_address, self)
        self.objects.complete(oid, READY, frames)
        return ref

    def cancel(self, ref: ObjectRef, force: bool) -> None:
        self._post("cancel", ref.hex(), force)

    # ================================================================== loop: submission
    def _do_submit(self, rec: TaskRecord) -> None:
        self._by_tid[rec.tid] = rec
        for oid in rec.return_ids:
            self._producer[oid] = rec
        rec.dep_frames = [[] for _ in rec.deps]
        waiting = 0
        for i, dep in enumerate(rec.deps):
            entry = self._resolve(dep)
            if entry is not None and entry.state == FAILED:
                self._finish(rec, FAILED, [entry.frames] * len(rec.return_ids))
                return
            if entry is not None and entry.state == READY:
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
        rec.deps = []  # values are in dep_frames now; drop the refs
        sc = self._classes.get(rec.shape_key)
        if sc is None:
            sc = self._classes[rec.shape_key] = SchedClass(rec.shape)
        sc.queue.append(rec)
        self._pump(sc)

    def _pump(self, sc: SchedClass) -> None:
        # One task at a time per leased worker. (Queueing several on one worker doubles the
        # throughput of tiny tasks, but a long task would then hold up the ones queued behind
        # it while other workers idle; that needs work stealing first.)
        idle = [lease for lease in sc.leases if not lease.inflight]
        while sc.queue and idle:
            self._dispatch(sc.queue.popleft(), idle.pop())
        want = min(len(sc.queue), MAX_LEASE_REQUESTS) - len(sc.requests)
        for _ in range(want):
            rid = next(self._rid)
            sc.requests.add(rid)
            self._rid_class[rid] = sc
            name = sc.queue[0].name if sc.queue else ""
            _send_nowait(
                self._head,
                encode({"k": Kind.LEASE_REQUEST, "rid": rid, "shape": sc.shape, "name": name}),
            )
        if not sc.queue and sc.requests:
            for rid in sc.requests:
                self._rid_class.pop(rid, None)
                _send_nowait(self._head, encode({"k": Kind.LEASE_CANCEL, "rid": rid}))
            sc.requests.clear()

    def _dispatch(self, rec: TaskRecord, lease: Lease) -> None:
        if lease.linger is not None:
            lease.linger.cancel()
            lease.linger = None
        conn = lease.conn
        rec.lease = lease
        lease.inflight.append(rec)
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
        _send_nowait(conn.sock, encode(header, payload))

    # ================================================================== loop: head messages
    async def _read_head(self) -> None:
        while True:
            frames = await self._head.recv_multipart()
            try:
                h, _ = decode(frames)
                self._on_head(h)
            except ProtocolError as exc:
                log.warning("malformed message from the head: %s", exc)
            except Exception:
                log.exception("nbcluster internal error")

    def _on_head(self, h: dict[str, Any]) -> None:
        kind = h["k"]
        if kind == Kind.LEASE_GRANTED:
            self._on_grant(h)
        elif kind == Kind.LEASE_LOST:
            self._on_lease_lost(h["lease_id"], h.get("reason", "worker died"))
        elif kind == Kind.LEASE_INFEASIBLE:
            sc = self._rid_class.get(h["rid"])
            if sc is not None and not sc.infeasible_warned:
                sc.infeasible_warned = True
                missing = ", ".join(f"{k}: {v:g}" for k, v in h["missing"].items())
                name = sc.queue[0].name if sc.queue else "a task"
                log.warning(
                    "%s needs {%s} but no node in the cluster has that much in total (missing "
                    "%s); it stays pending until a node that can run it joins",
                    name,
                    ", ".join(f"{k}: {v:g}" for k, v in h["shape"].items()),
                    missing,
                )
                self.infeasible_notices.append((name, h["missing"]))
        elif kind == Kind.QUERY_REPLY:
            fut = self._replies.pop(h["rid"], None)
            if fut is not None and not fut.done():
                fut.set_result(h["result"])
        elif kind == Kind.PONG:
            pass
        elif kind == Kind.ERROR:
            log.error("the head reports: %s", h.get("msg"))
        else:
            log.warning("unexpected message %r from the head", kind)

    def _on_grant(self, h: dict[str, Any]) -> None:
        sc = self._rid_class.pop(h["rid"], None)
        if sc is not None:
            sc.requests.discard(h["rid"])
        if sc is None or self._closing:
            sc = self._classes.get(tuple(sorted(h["shape"].items())))
            if sc is None or not sc.queue:
                _send_nowait(
                    self._head, encode({"k": Kind.LEASE_RETURN, "lease_id": h["lease_id"]})
                )
                return
        conn = self._conn(h["worker_addr"], h["control_addr"])
        lease = Lease(
            lease_id=h["lease_id"],
            worker_id=h["worker_id"],
            worker_addr=h["worker_addr"],
            control_addr=h["control_addr"],
            pid=h["pid"],
            node_id=h["node_id"],
            node_name=h.get("node_name", ""),
            gpus=list(h.get("gpus") or []),
            shape_key=tuple(sorted(h["shape"].items())),
            conn=conn,
        )
        conn.lease = lease
        self._leases[lease.lease_id] = lease
        sc.leases.append(lease)
        self._pump(sc)
        if not lease.inflight:
            self._linger(lease)

    def _conn(self, addr: str, control_addr: str) -> WorkerConn:
        conn = self._conns.get(addr)
        if conn is None:
            assert self._transport is not None
            sock = self._transport.client(zmq.DEALER, addr)
            ctrl = self._transport.client(zmq.DEALER, control_addr)
            conn = WorkerConn(addr, control_addr, sock, ctrl)
            self._conns[addr] = conn
            bind = {
                "k": Kind.BIND,
                "job_id": self.job_id,
                "sys_path": [os.path.abspath(p) if p in ("", ".") else p for p in sys.path],
            }
            _send_nowait(sock, encode(bind))
            conn.reader = self._spawn(self._read_worker(conn))
        return conn

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
        _send_nowait(self._head, encode({"k": Kind.LEASE_RETURN, "lease_id": lease.lease_id}))

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

    def _on_lease_lost(self, lease_id: str, reason: str) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        self._drop_lease(lease)
        conn = self._conns.pop(lease.worker_addr, None)
        if conn is not None:
            if conn.reader is not None:
                conn.reader.cancel()
            conn.sock.close(linger=0)
            conn.ctrl.close(linger=0)
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
            sc.queue.extendleft(reversed(requeue))
            self._pump(sc)

    # ================================================================== loop: worker messages
    async def _read_worker(self, conn: WorkerConn) -> None:
        sock = conn.sock
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                h, payload = decode(frames)
                kind = h["k"]
                if kind == Kind.RESULT:
                    self._on_result(conn, h, payload)
                elif kind == Kind.LOG:
                    self._on_log(h, conn)
            except ProtocolError as exc:
                log.warning("malformed message from worker %s: %s", conn.addr, exc)
            except Exception:
                log.exception("nbcluster internal error handling a worker message")

    def _on_result(self, conn: WorkerConn, h: dict[str, Any], payload: list[Any]) -> None:
        rec = self._by_tid.get(h["tid"])
        lease = conn.lease
        if rec is None:
            return
        if lease is not None:
            with contextlib.suppress(ValueError):
                lease.inflight.remove(rec)
        rec.lease = None
        counts = h.get("n", [])
        if h.get("ok"):
            parts, pos = [], 0
            for c in counts:
                parts.append(payload[pos : pos + c])
                pos += c
            self._finish(rec, READY, parts)
        elif h.get("err") == "cancelled":
            self._finish(rec, FAILED, [payload] * len(rec.return_ids))
        else:
            if self._should_retry_exception(rec, payload):
                rec.attempts += 1
                sc = self._classes[rec.shape_key]
                sc.queue.appendleft(rec)
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
        for oid, frames in zip(rec.return_ids, parts, strict=False):
            self._producer.pop(oid, None)
            self.objects.complete(oid, state, frames)
        # A task with num_returns=0 still completes its (hidden) first id.
        for oid in rec.return_ids[len(parts) :]:
            self._producer.pop(oid, None)
            self.objects.complete(
                oid, state, [dumps(None)] if state == READY else parts[0] if parts else []
            )

    def _on_log(self, h: dict[str, Any], conn: WorkerConn) -> None:
        if not self.log_to_driver:
            return
        node = ""
        lease = conn.lease
        if lease is not None and lease.node_name and self._multi_node():
            node = f", node={lease.node_name}"
        prefix = f"({h.get('name', 'task')} pid={h.get('pid')}{node}) "
        text = "".join(f"{prefix}{line}\n" for line in h.get("lines", []))
        stream = h.get("stream", "stdout")
        if self.on_output is not None:
            self.on_output(stream, text)
            return
        out = sys.stderr if stream == "stderr" else sys.stdout
        with contextlib.suppress(Exception):
            out.write(text)
            out.flush()

    def _multi_node(self) -> bool:
        return len({ls.node_id for ls in self._leases.values()}) > 1

    # ================================================================== loop: cancel
    def _do_cancel(self, oid: str, force: bool) -> None:
        rec = self._producer.get(oid)
        if rec is None:
            return
        rec.cancelled = True
        err = [dumps(TaskCancelledError(rec.tid))] * len(rec.return_ids)
        if rec.lease is None:
            sc = self._classes.get(rec.shape_key)
            if sc is not None and rec in sc.queue:
                sc.queue.remove(rec)
            self._finish(rec, FAILED, err)
            return
        rec.force_cancel = force
        conn = rec.lease.conn
        msg = encode({"k": Kind.CANCEL, "tid": rec.tid, "force": force})
        _send_nowait(conn.sock, list(msg))
        _send_nowait(conn.ctrl, list(msg))

    # ================================================================== loop: objects we own
    async def _serve_owner(self) -> None:
        sock = self._owner_sock
        while True:
            frames = await sock.recv_multipart(copy=False)
            ident = frames[0].bytes
            try:
                h, _ = decode(frames[1:])
            except ProtocolError:
                continue
            if h["k"] != Kind.GET_OBJECT:
                continue
            oid = h["oid"]
            entry = self.objects.get(oid)
            if entry is None:
                _send_nowait(
                    sock,
                    [ident, *encode({"k": Kind.OBJECT, "oid": oid, "ok": False, "err": "lost"})],
                )
            elif entry.state == PENDING:
                self.objects.on_ready(oid, functools.partial(self._reply_object, ident))
            else:
                self._reply_object(ident, entry)

    def _reply_object(self, ident: bytes, entry: Entry) -> None:
        h = {"k": Kind.OBJECT, "oid": entry.oid, "ok": entry.state == READY}
        _send_nowait(self._owner_sock, [ident, *encode(h, entry.frames)])

    async def _fetch(self, oid: str, owner: str) -> None:
        """Get a borrowed object's value from its owner."""
        sock = self._owner_conns.get(owner)
        if sock is None:
            assert self._transport is not None
            sock = self._owner_conns[owner] = self._transport.client(zmq.DEALER, owner)
            self._spawn(self._read_owner(sock, owner))
        _send_nowait(sock, encode({"k": Kind.GET_OBJECT, "oid": oid}))

    async def _read_owner(self, sock: Any, owner: str) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                h, payload = decode(frames)
            except ProtocolError:
                continue
            if h.get("err") == "lost":
                err = ObjectLostError(
                    f"object {h['oid']} is no longer held by its owner at {owner} "
                    "(it was freed, or its owner restarted)"
                )
                self.objects.complete(h["oid"], FAILED, dumps(err))
            else:
                self.objects.complete(h["oid"], READY if h["ok"] else FAILED, payload)

    # ================================================================== loop: misc
    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            _send_nowait(self._head, encode({"k": Kind.PING}))

    async def _query(self, what: str, timeout: float = 10.0) -> Any:
        assert self._loop is not None
        rid = next(self._rid)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._replies[rid] = fut
        _send_nowait(self._head, encode({"k": Kind.QUERY, "rid": rid, "what": what}))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(rid, None)

    def query(self, what: str, timeout: float = 10.0) -> Any:
        """Ask the head (``"nodes"``, ``"head"``)."""
        return self._call(self._query(what, timeout), timeout + 1)

    def _do_fetch(self, oid: str, owner: str) -> None:
        entry = self.objects.get(oid)
        if entry is not None and entry.state == PENDING and not entry.fetching:
            entry.fetching = True
            self._spawn(self._fetch(oid, owner))

    def _do_blocked(self, blocked: bool) -> None:
        kind = Kind.WORKER_BLOCKED if blocked else Kind.WORKER_UNBLOCKED
        _send_nowait(self._head, encode({"k": kind, "worker_id": self.worker_id}))

    # ================================================================== get / wait (user thread)
    def _prepare(self, refs: Sequence[ObjectRef]) -> None:
        for ref in refs:
            e = self.objects.get(ref.hex())
            if e is not None and e.state == PENDING and not e.owned and not e.fetching:
                self._post("fetch", ref.hex(), ref.owner_address)

    def get(self, refs: Sequence[ObjectRef], timeout: float | None) -> list[Any]:
        """Values of ``refs`` (errors re-raised), waiting at most ``timeout`` seconds in all."""
        self._prepare(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        blocked = False
        try:
            for ref in refs:
                ev = self.objects.event_for(ref.hex())
                if ev is None:
                    continue
                if not blocked and self.worker_id and not ev.is_set():
                    blocked = True
                    self._post("blocked", True)
                if not _wait_event(ev, deadline):
                    raise GetTimeoutError(f"get() timed out after {timeout} s waiting for {ref!r}")
        finally:
            if blocked:
                self._post("blocked", False)
        return [self._value(ref) for ref in refs]

    def _value(self, ref: ObjectRef) -> Any:
        e = self.objects.get(ref.hex())
        if e is None:
            raise OwnerDiedError(f"{ref!r} is not known here: its value was freed or lost")
        if e.state == READY:
            return loads(e.frames)
        if e.state == FAILED:
            err = loads(e.frames)
            if isinstance(err, TaskError):
                raise err.as_instanceof_cause()
            raise err
        raise NbclusterError(f"{ref!r} is not ready")  # pragma: no cover

    def wait(
        self, refs: Sequence[ObjectRef], num_returns: int, timeout: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        """Ray's ``wait``: the first ``num_returns`` ready refs, in the order given."""
        self._prepare(refs)
        pending = [r for r in refs if self.objects.event_for(r.hex()) is not None]
        need = num_returns - (len(refs) - len(pending))
        if need > 0 and (timeout is None or timeout > 0):
            ev = threading.Event()
            lock = threading.Lock()
            count = [0]

            def one_done(_e: Entry) -> None:
                with lock:
                    count[0] += 1
                    if count[0] >= need:
                        ev.set()

            for r in pending:
                if not self.objects.on_ready(r.hex(), one_done):
                    one_done(None)  # type: ignore[arg-type]
            blocked = bool(self.worker_id)
            if blocked:
                self._post("blocked", True)
            try:
                _wait_event(ev, None if timeout is None else time.monotonic() + timeout)
            finally:
                if blocked:
                    self._post("blocked", False)
        ready: list[ObjectRef] = []
        not_ready: list[ObjectRef] = []
        for r in refs:
            e = self.objects.get(r.hex())
            done = e is None or e.state != PENDING
            (ready if done and len(ready) < num_returns else not_ready).append(r)
        return ready, not_ready

    async def await_ref(self, ref: ObjectRef) -> Any:
        """Await ``ref`` from any asyncio loop."""
        fut = self.ref_future(ref)
        return await asyncio.wrap_future(fut)

    def ref_future(self, ref: ObjectRef) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def resolve(_e: Entry | None = None) -> None:
            try:
                fut.set_result(self._value(ref))
            except BaseException as exc:
                fut.set_exception(exc)

        self._prepare([ref])
        if not self.objects.on_ready(ref.hex(), resolve):
            resolve()
        return fut


def _is_ref(v: Any) -> bool:
    return type(v) is ObjectRef


def _wait_event(ev: threading.Event, deadline: float | None) -> bool:
    """Wait in short slices so that Ctrl-C (KeyboardInterrupt) is noticed promptly."""
    while True:
        if deadline is None:
            if ev.wait(0.25):
                return True
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return ev.is_set()
        if ev.wait(min(left, 0.25)):
            return True


def connect_from_worker() -> CoreClient:
    """The client a worker process uses when its task submits tasks or gets borrowed refs."""
    ident = context.worker_identity
    if ident is None:
        raise RuntimeError("not inside an nbcluster worker")
    token = token_from_environment()
    if not token:
        raise NbclusterError("no cluster secret in this worker's environment")
    client = CoreClient(
        ident.head_address,
        token,
        job_id=ident.job_id,
        worker_id=ident.worker_id,
        node_id=ident.node_id,
    )
    client.connect()
    return client
