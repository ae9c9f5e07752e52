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
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import zmq

from nbcluster.client.actors import ActorCalls, ActorRecord
from nbcluster.client.commands import (
    ActorEscaped,
    CallActor,
    CancelTask,
    Command,
    CountActorHandle,
    CreateActor,
    FetchObject,
    KillActor,
    Rebuild,
    SetBlocked,
    SubmitTask,
    TellOwner,
)
from nbcluster.client.events import owner_identity
from nbcluster.client.lineage import MAX_RECONSTRUCTIONS, Lineage
from nbcluster.client.objects import FAILED, PENDING, READY, Entry, ObjectTable
from nbcluster.client.submission import TaskSubmission
from nbcluster.client.tasks import Lease, SchedClass, TaskRecord
from nbcluster.client.wire import WorkerConn, probe_listening, send_nowait
from nbcluster.exceptions import (
    ConnectionFailedError,
    GetTimeoutError,
    NbclusterError,
    ObjectLostError,
    OwnerDiedError,
    ProtocolError,
    TaskError,
)
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import PROTOCOL_VERSION, REJOIN_AGAIN_S, Kind
from nbcluster.protocol.security import derive_keys
from nbcluster.protocol.validation import (
    MalformedMessage,
    RateLimitedLog,
    error_reply,
    receive,
    should_answer,
)
from nbcluster.refs import ObjectRef
from nbcluster.serialization import dumps, loads
from nbcluster.store.client import StoreClient, is_stored
from nbcluster.store.errors import ObjectStoreError
from nbcluster.store.fetch import fetch_stored
from nbcluster.transport import Transport

log = logging.getLogger("nbcluster")
_malformed_head = RateLimitedLog(log, "dropping a malformed message from the head")
_malformed_peer = RateLimitedLog(log, "dropping a malformed message about an object")

HEARTBEAT_S = 1.0


class CoreClient(TaskSubmission, ActorCalls, Lineage):
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
        namespace: str | None = None,
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
        self._inbox: deque[Command] = deque()
        self._released: deque[str] = deque()  # ObjectRefs gone, not yet counted
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
        self._queries: dict[int, list[Any]] = {}  # unanswered queries, sent again on rejoin
        self._classes: dict[tuple[tuple[str, float], ...], SchedClass] = {}
        self._rid_class: dict[int, SchedClass] = {}
        self._leases: dict[str, Lease] = {}
        self._conns: dict[str, WorkerConn] = {}
        self._by_tid: dict[str, TaskRecord] = {}
        self._producer: dict[str, TaskRecord] = {}  # return object id -> pending task
        self._owner_conns: dict[str, Any] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        # Output routing hooks (set in a notebook kernel by nbcluster.magics): ``output_tag`` is
        # called when a task is submitted, ``on_output(stream, text, tag)`` gets its output lines.
        self.on_output: Callable[[str, str, Any], None] | None = None
        self.output_tag: Callable[[], Any] | None = None
        self._actors: dict[str, ActorRecord] = {}
        self._init_lineage()
        self._seen_nodes: set[str] = set()
        self._hello: dict[str, Any] = {}  # what we said to the head, said again after it restarts
        self._rejoining = False
        self._rejoin_sent = 0.0  # when; a rejoin unanswered for REJOIN_AGAIN_S is sent again
        self.store: StoreClient | None = None
        self.objects.on_drop = self._entry_dropped
        self.namespace = namespace or ""

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
            await probe_listening(self.head_address)
            self._head = await self._transport.connect_verified(
                zmq.DEALER, f"tcp://{self.head_address}", timeout=30.0
            )
            hello: dict[str, Any] = {
                "k": Kind.HELLO,
                "v": PROTOCOL_VERSION,
                "pid": os.getpid(),
                # With the pid, lets a head on this machine watch our process (see its reaper).
                "started": psutil.Process().create_time(),
                "role": "worker" if self.worker_id else "driver",
            }
            if self.job_id:
                hello["job_id"] = self.job_id
            if self.worker_id:
                hello["worker_id"] = self.worker_id
            else:
                hello.update(owner_identity())  # the kernel and notebook, in Jupyter
            self._hello = dict(hello)
            await self._head.send_multipart(encode(hello))
            h, _ = receive(await asyncio.wait_for(self._head.recv_multipart(), 30.0))
            if h["k"] == Kind.ERROR:
                raise ProtocolError(h.get("msg", "the head refused the connection"))
            self.job_id = h["job_id"]
            self._hello["job_id"] = self.job_id
            if not self.worker_id and "job_id" not in hello:
                self._hello["owns_job"] = True  # said again if the head restarts
            self._stop = asyncio.Event()
            for coro in (
                self._read_head(),
                self._serve_owner(),
                self._heartbeat(),
                self._release_loop(),
            ):
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
            # A completion callback may already have removed a later entry.
            rec = self._by_tid.pop(tid, None)
            if rec is None:
                continue
            for oid in rec.return_ids:
                self.objects.complete(oid, FAILED, err)

    def attach_store(self, address: str, store_id: str) -> None:
        """Use the node agent's shared-memory store at ``address`` for large values."""
        assert self._transport is not None
        self.store = StoreClient(self._transport, address, store_id)

    def _entry_dropped(self, entry: Entry) -> None:
        """The last local use of an object is gone (any thread)."""
        self._forget_lineage(entry.oid)
        if entry.owned:
            store = self.store
            if store is not None and entry.frames and is_stored(entry.frames):
                store.free([entry.oid])
        elif entry.reported and entry.owner:
            # We told callers we kept it: now tell its owner we let go.
            try:
                self._post(
                    TellOwner(
                        entry.owner, {"k": Kind.BORROW_DEL, "oid": entry.oid, "n": entry.reported}
                    )
                )
            except NbclusterError:
                pass  # closed: the owner frees everything when our job ends

    # ================================================================== cross-thread plumbing
    def _post(self, command: Command) -> None:
        """Hand ``command`` to the I/O thread (any thread)."""
        self._inbox.append(command)
        if not self._wake_pending:
            self._wake_pending = True
            loop = self._loop
            if loop is None or loop.is_closed():
                raise NbclusterError("the connection to the cluster is closed")
            loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._wake_pending = False
        if self._released:
            self._do_release()
        inbox = self._inbox
        while inbox:
            command = inbox.popleft()
            try:
                self._run_command(command)
            except Exception:
                log.exception("nbcluster internal error handling %s", type(command).__name__)

    def _run_command(self, command: Command) -> None:
        """Carry out a user thread's command (I/O thread)."""
        match command:
            case SubmitTask(rec):
                self._do_submit(rec)
            case CallActor(rec, cls_name):
                self._do_acall(rec, cls_name)
            case CancelTask(oid, force):
                self._do_cancel(oid, force)
            case FetchObject(oid, owner):
                self._do_fetch(oid, owner)
            case TellOwner(owner, header):
                self._spawn(self._send_to_owner(owner, header))
            case SetBlocked(blocked):
                self._do_blocked(blocked)
            case Rebuild(oid, done):
                self._do_reconstruct_then(oid, done)
            case CreateActor(header, payload, deps, reply):
                self._do_acreate(header, payload, deps, reply)
            case CountActorHandle(aid, cls_name, owned, delta):
                self._do_ahandle(aid, cls_name, owned, delta)
            case ActorEscaped(aid):
                self._do_aescaped(aid)
            case KillActor(aid, no_restart, done):
                self._do_akill(aid, no_restart, done)

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ================================================================== refs (any thread)
    def add_local_ref(self, oid: str, owner: str, borrowed: bool) -> None:
        self.objects.add_ref(oid, owned=not borrowed, owner=owner)

    def remove_local_ref(self, oid: str) -> None:
        # Called from ObjectRef.__del__, which the garbage collector may run at any allocation,
        # even inside a section holding the object table's lock: never take a lock here. The
        # I/O thread does the bookkeeping, whenever it wakes and at least every 0.1 s.
        self._released.append(oid)

    def _do_release(self) -> None:
        released = self._released
        while released:
            self.objects.remove_ref(released.popleft())
        if self.store is not None:
            self.store.flush()

    def mark_escaped(self, oid: str) -> None:
        self.objects.mark_escaped(oid)

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    # ================================================================== loop: head messages
    async def _read_head(self) -> None:
        while True:
            frames = await self._head.recv_multipart()
            try:
                h, payload = receive(frames)
                self._on_head(h, payload)
            except ProtocolError as exc:
                _malformed_head(exc)
                rid = exc.rid if isinstance(exc, MalformedMessage) else None
                fut = self._replies.pop(rid, None) if rid is not None else None
                if fut is not None and not fut.done():  # its request must not wait forever
                    fut.set_exception(exc)
            except Exception:
                log.exception("nbcluster internal error")

    def _on_head(self, h: dict[str, Any], payload: list[Any]) -> None:
        kind = h["k"]
        if kind == Kind.ACTOR_STATE:
            self._on_actor_state(h, payload)
        elif kind == Kind.LEASE_GRANTED:
            self._on_grant(h)
        elif kind == Kind.LEASE_LOST:
            self._on_lease_lost(
                h["lease_id"], h.get("reason", "worker died"), free_retry=bool(h.get("drain"))
            )
        elif kind == Kind.LEASE_FAILED:
            self._on_lease_failed(h["rid"], str(h.get("msg") or "no node can run it"))
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
        elif kind in (Kind.QUERY_REPLY, Kind.ACTOR_CREATED):
            fut = self._replies.pop(h["rid"], None)
            if fut is not None and not fut.done():
                fut.set_result(h["result"] if kind == Kind.QUERY_REPLY else h)
        elif kind == Kind.PONG:
            pass
        elif kind == Kind.WARNING:  # e.g. workers that keep dying, with the reason
            log.warning("nbcluster: %s", h.get("msg"))
        elif kind == Kind.WELCOME:
            self._rejoined()
        elif kind == Kind.NODE_DIED:
            self._do_node_died(str(h["node_id"]), str(h.get("store_id") or ""))
        elif kind == Kind.ERROR and h.get("code") == "nohello":
            self._rejoin()
        elif kind == Kind.TASK_CANCEL:  # from the Jupyter panel, through the head
            self._do_cancel(f"{h['tid']}.0", bool(h.get("force")))
        elif kind == Kind.ERROR:
            fut = self._replies.pop(h.get("rid", -1), None)
            if fut is not None and not fut.done():
                fut.set_exception(ValueError(h.get("msg", "the head refused the request")))
            else:
                log.error("the head reports: %s", h.get("msg"))
        else:
            log.warning("unexpected message %r from the head", kind)

    def _rejoin(self) -> None:
        """The head does not know us: it restarted. Say hello again with what we hold."""
        if self._closing:
            return
        if self._rejoining and time.monotonic() - self._rejoin_sent < REJOIN_AGAIN_S:
            return
        # (Sent again when unanswered: the head that got it may have died before answering.)
        self._rejoining = True
        self._rejoin_sent = time.monotonic()
        log.warning("the nbcluster head restarted: reconnecting")
        hello = {
            **self._hello,
            "rejoin": True,
            "leases": [
                {
                    "lease_id": ls.lease_id,
                    "worker_id": ls.worker_id,
                    "shape": ls.shape,  # not shape_key: that also names strategy and store
                    "gpus": ls.gpus,
                }
                for ls in self._leases.values()
            ],
            # Not the ones whose creation was not sent yet: the head would call them unknown.
            "actors": [aid for aid, ar in self._actors.items() if ar.announced],
        }
        send_nowait(self._head, encode(hello))

    def _rejoined(self) -> None:
        """The restarted head took us back: ask again for the leases and answers we wait for."""
        self._rejoining = False
        for frames in self._queries.values():  # sent to the old head, or before our hello
            send_nowait(self._head, list(frames))
        for sc in self._classes.values():
            for rid in sc.requests:
                self._rid_class.pop(rid, None)
            sc.requests.clear()
            self._pump(sc)

    # ================================================================== loop: objects we own
    async def _serve_owner(self) -> None:
        sock = self._owner_sock
        while True:
            frames = await sock.recv_multipart(copy=False)
            ident = frames[0].bytes
            try:
                h, _ = receive(frames[1:])
            except ProtocolError as exc:
                _malformed_peer(exc)
                if should_answer(exc):
                    send_nowait(sock, [ident, *encode(error_reply(exc))])
                continue
            try:
                self._on_owner_request(ident, h)
            except Exception:  # a bug: keep serving the objects we own
                log.exception("nbcluster internal error serving %s", h["k"])

    def _on_owner_request(self, ident: bytes, h: dict[str, Any]) -> None:
        kind = h["k"]
        if kind == Kind.BORROW_DEL:
            self.objects.add_borrows(h["oid"], -int(h.get("n", 1)))
            return
        if kind == Kind.ESCAPE:
            self.objects.mark_escaped(h["oid"])
            return
        if kind != Kind.GET_OBJECT:
            return
        oid = h["oid"]
        entry = self.objects.get(oid)
        if entry is None:
            send_nowait(
                self._owner_sock,
                [ident, *encode({"k": Kind.OBJECT, "oid": oid, "ok": False, "err": "lost"})],
            )
        elif entry.state == PENDING or (self._is_lost(entry) and self._can_rebuild(oid)):
            if entry.state != PENDING:
                self._do_reconstruct(oid)  # lost with its node: run its task again
            self.objects.on_ready(oid, functools.partial(self._reply_object, ident))
        else:
            self._reply_object(ident, entry)

    def _reply_object(self, ident: bytes, entry: Entry) -> None:
        h = {"k": Kind.OBJECT, "oid": entry.oid, "ok": entry.state == READY}
        send_nowait(self._owner_sock, [ident, *encode(h, entry.frames)])

    async def _fetch(self, oid: str, owner: str) -> None:
        """Get a borrowed object's value from its owner."""
        await self._send_to_owner(owner, {"k": Kind.GET_OBJECT, "oid": oid})

    async def _send_to_owner(self, owner: str, header: dict[str, Any]) -> None:
        """Send on our (one, ordered) connection to an object's owner."""
        sock = self._owner_conns.get(owner)
        if sock is None:
            assert self._transport is not None
            sock = self._owner_conns[owner] = self._transport.client(zmq.DEALER, owner)
            self._spawn(self._read_owner(sock, owner))
        send_nowait(sock, encode(header))

    async def _read_owner(self, sock: Any, owner: str) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                h, payload = receive(frames)
            except ProtocolError as exc:
                _malformed_peer(f"from {owner}: {exc}")
                continue
            if h["k"] != Kind.OBJECT:  # e.g. an ERROR answering a request it found malformed
                _malformed_peer(f"from {owner}: {h['k']}: {h.get('msg')}")
                continue
            try:
                self._on_object(owner, h, payload)
            except Exception:  # a bug: keep reading this owner's answers
                log.exception("nbcluster internal error handling an object from %s", owner)

    def _on_object(self, owner: str, h: dict[str, Any], payload: list[Any]) -> None:
        if h.get("err") == "lost":
            err = ObjectLostError(
                f"object {h['oid']} is no longer held by its owner at {owner} "
                "(it was freed, or its owner restarted)"
            )
            self.objects.complete(h["oid"], FAILED, dumps(err))
        else:
            self.objects.complete(h["oid"], READY if h["ok"] else FAILED, payload)

    # ================================================================== loop: misc
    async def _release_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self._released:
                self._do_release()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            send_nowait(self._head, encode({"k": Kind.PING}))

    async def _query(self, what: str, timeout: float = 10.0, **args: Any) -> Any:
        assert self._loop is not None
        rid = next(self._rid)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._replies[rid] = fut
        frames = encode({"k": Kind.QUERY, "rid": rid, "what": what, **args})
        # Queries are idempotent: one the head lost (it restarted) is asked again once we are
        # back (see _rejoined), so a question asked while reconnecting waits for the reconnect.
        self._queries[rid] = list(frames)
        send_nowait(self._head, frames)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            why = (
                "it restarted and this client could not reconnect yet"
                if self._rejoining
                else "it is unreachable, stopped or overloaded"
            )
            raise ConnectionFailedError(
                f"the nbcluster head at {self.head_address} did not answer the {what!r} query "
                f"within {timeout:g} s ({why})"
            ) from None
        finally:
            self._replies.pop(rid, None)
            self._queries.pop(rid, None)

    def query(self, what: str, timeout: float = 10.0) -> Any:
        """Ask the head (``"nodes"``, ``"actors"``, ``"head"``).

        Raises
        ------
        ConnectionFailedError
            If the head did not answer within ``timeout`` seconds (a restarting head is waited
            for within that time).
        """
        return self._ask(self._query(what, timeout), what, timeout)

    def query_args(self, what: str, timeout: float = 10.0, **args: Any) -> Any:
        """Ask the head a question with arguments (``"actor"``, name=..., ns=...)."""
        return self._ask(self._query(what, timeout, **args), what, timeout)

    def _ask(self, coro: Any, what: str, timeout: float) -> Any:
        try:
            return self._call(coro, timeout + 5)
        except concurrent.futures.TimeoutError:
            raise ConnectionFailedError(
                f"no answer to the {what!r} query from the nbcluster head at "
                f"{self.head_address}: this client's I/O thread is stuck"
            ) from None

    def _do_fetch(self, oid: str, owner: str) -> None:
        entry = self.objects.get(oid)
        if entry is not None and entry.state == PENDING and not entry.fetching:
            entry.fetching = True
            self._spawn(self._fetch(oid, owner))

    def _do_blocked(self, blocked: bool) -> None:
        kind = Kind.WORKER_BLOCKED if blocked else Kind.WORKER_UNBLOCKED
        send_nowait(self._head, encode({"k": kind, "worker_id": self.worker_id}))

    # ================================================================== get / wait (user thread)
    def _prepare(self, refs: Sequence[ObjectRef]) -> None:
        for ref in refs:
            e = self.objects.get(ref.hex())
            if e is not None and e.state == PENDING and not e.owned and not e.fetching:
                self._post(FetchObject(ref.hex(), ref.owner_address))

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
                    self._post(SetBlocked(True))
                if not _wait_event(ev, deadline):
                    raise GetTimeoutError(f"get() timed out after {timeout} s waiting for {ref!r}")
        finally:
            if blocked:
                self._post(SetBlocked(False))
        out = []
        for ref in refs:
            for _ in range(MAX_RECONSTRUCTIONS + 1):
                try:
                    out.append(self._value(ref))
                    break
                except (ObjectLostError, ObjectStoreError) as exc:
                    e = self.objects.get(ref.hex())
                    if e is None or not e.owned or e.state != READY or not is_stored(e.frames):
                        raise
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    self._recover(ref, str(exc), left)
            else:
                raise self._lost_error(ref, "it was lost again each time it was rebuilt")
        return out

    def _value(self, ref: ObjectRef) -> Any:
        e = self.objects.get(ref.hex())
        if e is None:
            raise OwnerDiedError(f"{ref!r} is not known here: its value was freed or lost")
        if e.state == READY:
            if self._is_lost(e):
                raise ObjectLostError("the node that stored it died")
            if self.store is None and is_stored(e.frames):
                # No store of our own: read it from the node that holds it, into our memory.
                return fetch_stored(self._transport, e.frames, lambda _store: e.lost)
            return loads(e.frames, self.store)
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
                self._post(SetBlocked(True))
            try:
                _wait_event(ev, None if timeout is None else time.monotonic() + timeout)
            finally:
                if blocked:
                    self._post(SetBlocked(False))
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

        def settle() -> None:
            try:
                fut.set_result(self._value(ref))
            except BaseException as exc:
                fut.set_exception(exc)

        def resolve(e: Entry | None = None) -> None:
            # A stored value may have to come from another node: never wait for that on the
            # I/O thread (it also delivers the NODE_DIED that would end such a wait).
            if e is not None and e.state == READY and is_stored(e.frames):
                threading.Thread(target=settle, name="nbcluster-fetch", daemon=True).start()
            else:
                settle()

        self._prepare([ref])
        if not self.objects.on_ready(ref.hex(), resolve):
            settle()
        return fut


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
