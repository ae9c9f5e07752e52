"""The client's I/O shell: one thread, one asyncio loop, every socket.

:class:`IoShell` owns the I/O thread (``nbcluster-io``) and everything on it: the sockets (to
the head, to workers, to objects' owners, and the owner socket others fetch our objects from),
the timers, and the :class:`~nbcluster.client.state.ClientState`. It turns each message it
receives into a typed event, feeds it to the state, and carries out the instructions the state
returns. User threads reach it only through :meth:`IoShell.post` (a typed command, carried out
in order) and :meth:`IoShell.call` (a coroutine run on the loop, e.g. a query).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil
import zmq

from nbcluster.client.commands import CancelTask, Command
from nbcluster.client.events import owner_identity
from nbcluster.client.inputs import (
    ActorStateChanged,
    BorrowReleased,
    Event,
    LeaseFailed,
    LeaseGranted,
    LeaseInfeasible,
    LeaseLost,
    NodeDied,
    ObjectArrived,
    ObjectEscaped,
    ObjectRequested,
    Rejoined,
    Released,
    TaskOutput,
    TaskResult,
)
from nbcluster.client.instructions import (
    AwaitReply,
    CancelOnWorker,
    CloseWorker,
    FreeStored,
    Instruction,
    OpenWorker,
    ReplyObject,
    ShowOutput,
    StartTimer,
    ToHead,
    ToOwner,
    ToWorker,
)
from nbcluster.client.objects import ObjectTable
from nbcluster.client.state import ClientState
from nbcluster.client.wire import probe_listening, send_nowait
from nbcluster.client.workers import WorkerConn
from nbcluster.exceptions import (
    ConnectionFailedError,
    NbclusterError,
    ProtocolError,
    TaskCancelledError,
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
from nbcluster.transport import Transport

if TYPE_CHECKING:
    from nbcluster.store.client import StoreClient

log = logging.getLogger("nbcluster")
_malformed_head = RateLimitedLog(log, "dropping a malformed message from the head")
_malformed_peer = RateLimitedLog(log, "dropping a malformed message about an object")
_malformed_worker = RateLimitedLog(log, "dropping a malformed message from a worker")

HEARTBEAT_S = 1.0


class _WorkerSockets:
    """The sockets behind one :class:`WorkerConn`, and the task reading its answers."""

    __slots__ = ("ctrl", "reader", "sock")

    def __init__(self, sock: Any, ctrl: Any) -> None:
        self.sock = sock
        self.ctrl = ctrl
        self.reader: asyncio.Task[Any] | None = None


class IoShell:
    """The I/O thread of one client.

    Parameters
    ----------
    objects
        The client's object table (shared with user threads).
    ref_client
        The ``CoreClient``: what refs made on this thread count themselves with, and where the
        output hooks (``on_output``) are read from.
    head_address, token
        Where the head is, and the cluster secret.
    job_id, worker_id, node_id
        Set when this client lives in a worker.
    bind_host
        The interface our owner socket listens on.
    log_to_driver
        Whether task output is shown here.
    namespace
        The job's namespace (workers are bound to it).
    """

    def __init__(
        self,
        objects: ObjectTable,
        ref_client: Any,
        head_address: str,
        token: str,
        *,
        job_id: str,
        worker_id: str | None,
        node_id: str,
        bind_host: str,
        log_to_driver: bool,
        namespace: str,
    ) -> None:
        self.objects = objects
        self._client = ref_client
        self.head_address = head_address
        self._token = token
        self.job_id = job_id
        self.worker_id = worker_id
        self.node_id = node_id
        self.bind_host = bind_host
        self.log_to_driver = log_to_driver
        self.namespace = namespace
        self.owner_address = ""
        self.store: StoreClient | None = None  # set once, by attach_store
        # Any thread: the inbox and the released refs (appends are atomic; the loop drains).
        self._inbox: deque[Command] = deque()
        self.released: deque[str] = deque()  # ObjectRefs gone, not yet counted
        self._wake_pending = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        # I/O thread only, from here on.
        self.state: ClientState | None = None  # made once our owner socket is bound
        self.transport: Transport | None = None
        self._head: Any = None
        self._owner_sock: Any = None
        self._stop: asyncio.Event | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._queries: dict[int, list[Any]] = {}  # unanswered queries, sent again on rejoin
        self._workers: dict[WorkerConn, _WorkerSockets] = {}
        self._owner_conns: dict[str, Any] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._hello: dict[str, Any] = {}  # what we said to the head, said again after it restarts
        self.rejoining = False
        self._rejoin_sent = 0.0  # when; a rejoin unanswered for REJOIN_AGAIN_S is sent again
        self.closing = False

    # ================================================================== lifecycle
    def start(self) -> None:
        """Start the I/O thread (``ready`` resolves once the head accepted us)."""
        self.thread = threading.Thread(target=self._thread_main, name="nbcluster-io", daemon=True)
        self.thread.start()

    def stop(self, shutdown_cluster: bool) -> None:
        """Say goodbye (or shut the cluster down) and stop the thread (a user thread)."""
        loop = self.loop
        if (
            loop is not None
            and loop.is_running()
            and self.ready.done()
            and self.ready.exception() is None
        ):
            with contextlib.suppress(RuntimeError):
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(shutdown_cluster), loop)
                with contextlib.suppress(Exception):
                    fut.result(10)
        elif loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._abort)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            self._main_task = loop.create_task(self._main())
            loop.run_until_complete(self._main_task)
        except BaseException as exc:  # surface start-up failures to connect()
            if not self.ready.done():
                self.ready.set_exception(exc)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            if self.state is not None:
                self.state.fail_all("the connection to the cluster was closed")

    async def _main(self) -> None:
        self.transport = Transport(derive_keys(self._token))
        try:
            self._owner_sock, self.owner_address = self.transport.server(
                zmq.ROUTER, f"tcp://{self.bind_host}:0"
            )
            self.state = ClientState(
                self.objects,
                self.owner_address,
                self._client,
                worker_id=self.worker_id,
                node_id=self.node_id,
            )
            await probe_listening(self.head_address)
            self._head = await self.transport.connect_verified(
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
            self.ready.set_result(None)
            await self._stop.wait()
        finally:
            for t in list(self._bg):
                t.cancel()
            for t in list(self._bg):
                with contextlib.suppress(BaseException):
                    await t
            self.transport.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    async def _shutdown(self, shutdown_cluster: bool) -> None:
        self.closing = True
        if self.state is not None:
            self.state.leasing.closing = True  # leases granted from now on go back
        with contextlib.suppress(Exception):
            if shutdown_cluster:
                await self._head.send_multipart(encode({"k": Kind.SHUTDOWN_CLUSTER}))
            else:
                await self._head.send_multipart(encode({"k": Kind.GOODBYE}))
            await asyncio.sleep(0.02)  # let the frame leave before the socket closes
        assert self._stop is not None
        self._stop.set()

    def _abort(self) -> None:
        """Stop a client whose start-up never finished."""
        if self._stop is not None:
            self._stop.set()
        for t in list(self._bg):
            t.cancel()
        if self._main_task is not None:
            self._main_task.cancel()

    # ================================================================== user threads -> loop
    def post(self, command: Command) -> None:
        """Hand ``command`` to the I/O thread (any thread)."""
        self._inbox.append(command)
        if not self._wake_pending:
            self._wake_pending = True
            loop = self.loop
            if loop is None or loop.is_closed():
                raise NbclusterError("the connection to the cluster is closed")
            loop.call_soon_threadsafe(self._drain_inbox)

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run ``coro`` on the I/O thread and wait for its result (a user thread)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _drain_inbox(self) -> None:
        self._wake_pending = False
        if self.released:
            self._release()
        inbox = self._inbox
        while inbox:
            self.feed(inbox.popleft())

    def _release(self) -> None:
        released = self.released
        oids = [released.popleft() for _ in range(len(released))]
        self.feed(Released(oids))
        if self.store is not None:
            self.store.flush()

    # ================================================================== state <-> sockets
    def feed(self, event: Event) -> None:
        """Hand ``event`` to the state and carry out what it says (I/O thread)."""
        state = self.state
        if state is None:
            return
        try:
            out = state.handle(event, time.time())
        except Exception:
            log.exception("nbcluster internal error handling %s", type(event).__name__)
            out = state.take()
        if out:
            self._execute(out)

    def _execute(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            try:
                self._do(ins)
            except Exception:
                log.exception("nbcluster internal error carrying out %s", type(ins).__name__)

    def _do(self, ins: Instruction) -> None:
        match ins:
            case ToWorker(conn, header, payload):
                socks = self._workers.get(conn)
                if socks is not None:
                    send_nowait(socks.sock, encode(header, payload))
            case ToHead(header, payload):
                send_nowait(self._head, encode(header, payload))
            case StartTimer(delay, event):
                assert self.loop is not None
                self.loop.call_later(delay, self.feed, event)
            case OpenWorker(conn):
                self._open_worker(conn)
            case CloseWorker(conn):
                socks = self._workers.pop(conn, None)
                if socks is not None:
                    if socks.reader is not None:
                        socks.reader.cancel()
                    socks.sock.close(linger=0)
                    socks.ctrl.close(linger=0)
            case CancelOnWorker(conn, header):
                socks = self._workers.get(conn)
                if socks is not None:
                    msg = encode(header)
                    send_nowait(socks.sock, list(msg))
                    send_nowait(socks.ctrl, list(msg))
            case ToOwner(owner, header):
                self._send_to_owner(owner, header)
            case ReplyObject(ident, header, payload):
                send_nowait(self._owner_sock, [ident, *encode(header, payload)])
            case FreeStored(oids):
                if self.store is not None:
                    self.store.free(oids)
            case ShowOutput(stream, text, tag):
                self._show(stream, text, tag)
            case AwaitReply(rid, reply):
                assert self.loop is not None
                fut = self.loop.create_future()
                self._replies[rid] = fut
                fut.add_done_callback(lambda f: _settle(reply, f))

    def _show(self, stream: str, text: str, tag: Any) -> None:
        on_output: Callable[[str, str, Any], None] | None = self._client.on_output
        if on_output is not None:
            on_output(stream, text, tag)
            return
        out = sys.stderr if stream == "stderr" else sys.stdout
        with contextlib.suppress(Exception):
            out.write(text)
            out.flush()

    # ================================================================== head
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
        if kind == Kind.LEASE_GRANTED:
            self.feed(
                LeaseGranted(
                    h["rid"],
                    h["lease_id"],
                    h["worker_id"],
                    h["worker_addr"],
                    h["control_addr"],
                    h["pid"],
                    h["node_id"],
                    h.get("node_name", ""),
                    list(h.get("gpus") or []),
                    h["shape"],
                )
            )
        elif kind == Kind.ACTOR_STATE:
            self.feed(
                ActorStateChanged(
                    h["aid"],
                    h["state"] if "infeasible" not in h else "",
                    h.get("cls_name", ""),
                    h.get("addr") or "",
                    str(h.get("control_addr") or ""),
                    h.get("worker_id") or "",
                    str(h.get("reason") or ""),
                    bool(h.get("init_error")),
                    h.get("infeasible") if "infeasible" in h else None,
                    payload,
                )
            )
        elif kind == Kind.LEASE_LOST:
            reason = h.get("reason", "worker died")
            self.feed(LeaseLost(h["lease_id"], reason, bool(h.get("drain"))))
        elif kind == Kind.LEASE_FAILED:
            self.feed(LeaseFailed(h["rid"], str(h.get("msg") or "no node can run it")))
        elif kind == Kind.LEASE_INFEASIBLE:
            self.feed(LeaseInfeasible(h["rid"], h["shape"], h["missing"]))
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
            self.feed(NodeDied(str(h["node_id"]), str(h.get("store_id") or "")))
        elif kind == Kind.ERROR and h.get("code") == "nohello":
            self._rejoin()
        elif kind == Kind.TASK_CANCEL:  # from the Jupyter panel, through the head
            self.feed(CancelTask(f"{h['tid']}.0", bool(h.get("force"))))
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
        if self.closing or self.state is None:
            return
        if self.rejoining and time.monotonic() - self._rejoin_sent < REJOIN_AGAIN_S:
            return
        # (Sent again when unanswered: the head that got it may have died before answering.)
        self.rejoining = True
        self._rejoin_sent = time.monotonic()
        log.warning("the nbcluster head restarted: reconnecting")
        hello = {**self._hello, "rejoin": True, **self.state.rejoin_claims()}
        send_nowait(self._head, encode(hello))

    def _rejoined(self) -> None:
        """The restarted head took us back: ask again for the leases and answers we wait for."""
        self.rejoining = False
        for frames in self._queries.values():  # sent to the old head, or before our hello
            send_nowait(self._head, list(frames))
        self.feed(Rejoined())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            send_nowait(self._head, encode({"k": Kind.PING}))

    async def _release_loop(self) -> None:
        # Refs dropped while nothing was posted are counted at least every 0.1 s.
        while True:
            await asyncio.sleep(0.1)
            if self.released:
                self._release()

    async def query(self, what: str, timeout: float = 10.0, **args: Any) -> Any:
        """Ask the head (on the I/O thread); raises ``ConnectionFailedError`` on no answer."""
        assert self.loop is not None and self.state is not None
        rid = self.state.next_rid()
        fut: asyncio.Future[Any] = self.loop.create_future()
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
                if self.rejoining
                else "it is unreachable, stopped or overloaded"
            )
            raise ConnectionFailedError(
                f"the nbcluster head at {self.head_address} did not answer the {what!r} query "
                f"within {timeout:g} s ({why})"
            ) from None
        finally:
            self._replies.pop(rid, None)
            self._queries.pop(rid, None)

    async def request(self, header: dict[str, Any], timeout: float | None = 10.0) -> Any:
        """Send the head a request (``header`` with its kind, without ``rid``) and return the
        ``result`` of its ``QUERY_REPLY`` (``timeout=None``: however long it takes); as
        :meth:`query`, resent after a head restart (the requests sent this way are idempotent)."""
        assert self.loop is not None and self.state is not None
        rid = self.state.next_rid()
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._replies[rid] = fut
        frames = encode({**header, "rid": rid})
        self._queries[rid] = list(frames)
        send_nowait(self._head, frames)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ConnectionFailedError(
                f"the nbcluster head at {self.head_address} did not answer a {header['k']!r} "
                f"request within {timeout} s"
            ) from None
        finally:
            self._replies.pop(rid, None)
            self._queries.pop(rid, None)

    # ================================================================== workers
    def _open_worker(self, conn: WorkerConn) -> None:
        assert self.transport is not None
        sock = self.transport.client(zmq.DEALER, conn.addr)
        ctrl = self.transport.client(zmq.DEALER, conn.control_addr)
        socks = self._workers[conn] = _WorkerSockets(sock, ctrl)
        bind = {
            "k": Kind.BIND,
            "job_id": self.job_id,
            "namespace": self.namespace,
            "sys_path": [os.path.abspath(p) if p in ("", ".") else p for p in sys.path],
        }
        send_nowait(sock, encode(bind))
        socks.reader = self._spawn(self._read_worker(conn, sock))

    async def _read_worker(self, conn: WorkerConn, sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                h, payload = receive(frames)
                kind = h["k"]
                if kind == Kind.RESULT:
                    self.feed(
                        TaskResult(
                            conn,
                            h["tid"],
                            bool(h.get("ok")),
                            h.get("n", []),
                            h.get("err"),
                            h.get("lost"),
                            h.get("kept", ()),
                            h.get("returned") or [],
                            payload,
                        )
                    )
                elif kind == Kind.LOG and self.log_to_driver:
                    self.feed(
                        TaskOutput(
                            conn,
                            h.get("tid", ""),
                            h.get("name", "task"),
                            h.get("pid"),
                            h.get("stream", "stdout"),
                            h.get("lines", []),
                        )
                    )
            except ProtocolError as exc:
                _malformed_worker(f"{conn.addr}: {exc}")
            except Exception:
                log.exception("nbcluster internal error handling a worker message")

    # ================================================================== objects
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
                kind = h["k"]
                if kind == Kind.GET_OBJECT:
                    self.feed(ObjectRequested(ident, h["oid"]))
                elif kind == Kind.BORROW_DEL:
                    self.feed(BorrowReleased(h["oid"], int(h.get("n", 1))))
                elif kind == Kind.ESCAPE:
                    self.feed(ObjectEscaped(h["oid"]))
            except Exception:  # a bug: keep serving the objects we own
                log.exception("nbcluster internal error serving %s", h["k"])

    def _send_to_owner(self, owner: str, header: dict[str, Any]) -> None:
        """Send on our (one, ordered) connection to an object's owner."""
        sock = self._owner_conns.get(owner)
        if sock is None:
            assert self.transport is not None
            sock = self._owner_conns[owner] = self.transport.client(zmq.DEALER, owner)
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
                gone = h.get("err") == "lost"
                self.feed(ObjectArrived(owner, h["oid"], bool(h.get("ok")), gone, payload))
            except Exception:  # a bug: keep reading this owner's answers
                log.exception("nbcluster internal error handling an object from %s", owner)


def _settle(fut: concurrent.futures.Future[dict[str, Any]], reply: Any) -> None:
    if fut.done():
        return
    if reply.cancelled():
        fut.set_exception(TaskCancelledError(None, "actor creation was cancelled"))
    elif reply.exception() is not None:
        fut.set_exception(reply.exception())
    else:
        fut.set_result(reply.result())
