"""The client's I/O shell: one thread, one asyncio loop, every socket.

:class:`IoShell` owns the I/O thread (``nbcluster-io``) and everything on it: the sockets (to
the head, to workers, to objects' owners, and the owner socket others fetch our objects from),
the timers, and the :class:`~nbcluster.client.state.ClientState`. It turns each message it
receives into a typed event, feeds it to the state, and carries out the instructions the state
returns. User threads reach it only through :meth:`IoShell.post` (a typed command, carried out
in order) and :meth:`IoShell.call` (a coroutine run on the loop, e.g. a query). A task or an
actor call posted while nothing waits before it is handled on the posting thread, under
:attr:`IoShell.lock`, which the I/O thread holds whenever it uses the state or a worker link.
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

import msgspec
import psutil
import zmq

from nbcluster.client.commands import CallActor, Command, SubmitTask
from nbcluster.client.events import owner_identity
from nbcluster.client.inputs import (
    BorrowReleased,
    Event,
    FlushTaskEvents,
    ObjectArrived,
    ObjectEscaped,
    ObjectRequested,
    Rejoined,
    Released,
    TaskOutput,
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
    ToControl,
    ToHead,
    ToOwner,
    ToWorker,
)
from nbcluster.client.interrupts import InterruptGuard
from nbcluster.client.objects import ObjectTable
from nbcluster.client.state import ClientState
from nbcluster.client.translate import FROM_HEAD, FROM_WORKER, Translate
from nbcluster.client.wire import probe_listening, send_nowait
from nbcluster.client.worker_links import WorkerLinks
from nbcluster.client.workers import WorkerConn
from nbcluster.exceptions import (
    ConnectionFailedError,
    NbclusterError,
    ProtocolError,
    TaskCancelledError,
)
from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import PROTOCOL_VERSION, REJOIN_AGAIN_S, Kind
from nbcluster.protocol.security import derive_keys
from nbcluster.protocol.validation import MalformedMessage, RateLimitedLog, receive_message
from nbcluster.transport import Transport
from nbcluster.transport.channel import ZmqChannel, ZmqListener
from nbcluster.transport.serve import Dispatcher, answer_on, follow, serve

if TYPE_CHECKING:
    from nbcluster.store.client import StoreClient

log = logging.getLogger("nbcluster")
#: Commands a user thread handles itself when it can (see IoShell.post).
_HANDLED_HERE = (SubmitTask, CallActor)
#: At exit with tasks still running: how long no output must have come before we leave.
OUTPUT_QUIET_S = 0.05

_worker_errors = RateLimitedLog(log, "a worker answered with an error")
_owner_errors = RateLimitedLog(log, "an object's owner answered with an error")

HEARTBEAT_S = 1.0


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
        # The state and the worker links: held by the I/O thread while it uses them, and by a
        # user thread that sends a task itself (see post). Reentrant: a read feeds the state.
        self.lock = threading.RLock()
        self._handling = False  # inside state.handle (a nested post must not feed it again)
        self._deferred: deque[Instruction] = deque()  # left by user threads for the loop
        self._deferred_wake = False
        self._closed = False  # (under the lock) no more sending from user threads
        self._interrupts = InterruptGuard()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        # I/O thread only, from here on.
        self.state: ClientState | None = None  # made once our owner socket is bound
        self.transport: Transport | None = None
        self._head: Any = None
        self._owner: ZmqListener | None = None  # objects we own: others ask for them here
        self._stop: asyncio.Event | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._queries: dict[int, list[Any]] = {}  # unanswered queries, sent again on rejoin
        self._links: WorkerLinks | None = None  # our leased workers' sockets
        self._owner_conns: dict[str, Any] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._hello: dict[str, Any] = {}  # what we said to the head, said again after it restarts
        self.rejoining = False
        self._rejoin_sent = 0.0  # when; a rejoin unanswered for REJOIN_AGAIN_S is sent again
        self.closing = False
        self._last_log = 0.0  # when a worker's LOG last arrived (monotonic)
        # The receive loops (transport/serve.py owns what a malformed message gets). Nothing
        # here is answered but requests for our objects: an ERROR sent to the head, a worker or
        # an owner could only start a ping-pong of errors.
        self._from_head = Dispatcher[None](
            {
                **{kind: self._feeding(to_event) for kind, to_event in FROM_HEAD.items()},
                m.QueryReply: self._on_query_reply,
                m.ActorCreated: self._on_actor_created,
                m.Pong: _ignore,
                m.Warning_: self._on_warning,
                m.Welcome: self._on_welcome,
                m.Error: self._on_head_error,
                m.Log: self._on_head_log,
            },
            what="from the head",
            logger=log,
            on_malformed=self._head_malformed,
        )
        self._from_worker = Dispatcher[WorkerConn](
            {
                **{kind: self._feeding(to_event) for kind, to_event in FROM_WORKER.items()},
                m.Log: self._on_log,
                m.Error: self._on_worker_error,
            },
            what="from a worker",
            logger=log,
            batches=True,
        )
        self._from_owner = Dispatcher[str](
            {m.Object: self._on_object, m.Error: self._on_owner_error},
            what="from an object's owner",
            logger=log,
        )

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
            with self.lock:
                self._closed = True
                if self.state is not None:
                    self.state.fail_all("the connection to the cluster was closed")

    async def _main(self) -> None:
        self.transport = Transport(derive_keys(self._token))
        try:
            owner_sock, self.owner_address = self.transport.server(
                zmq.ROUTER, f"tcp://{self.bind_host}:0", aio=False
            )
            self._owner = ZmqListener(owner_sock, self.owner_address)
            assert self.loop is not None
            self._links = WorkerLinks(
                self.loop, self.transport, self._from_worker.dispatch_sync, self.lock
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
            reply, _ = receive_message(await asyncio.wait_for(self._head.recv_multipart(), 30.0))
            if isinstance(reply, m.Error):
                raise ProtocolError(reply.msg or "the head refused the connection")
            if not isinstance(reply, m.Welcome):
                raise ProtocolError(f"the head answered {reply.__struct_config__.tag} to HELLO")
            self.job_id = reply.job_id
            self._hello["job_id"] = self.job_id
            if not self.worker_id and "job_id" not in hello:
                self._hello["owns_job"] = True  # said again if the head restarts
            self._stop = asyncio.Event()
            owner = self._owner
            for coro in (
                follow(ZmqChannel(self._head), self._from_head, None),
                serve(owner, self._owner_dispatcher(owner)),
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
            if self._owner is not None:
                self._owner.close()  # (its descriptor leaves the loop first)
            with self.lock:
                self._closed = True
                if self._links is not None:
                    self._links.close_all()  # (local links are not the transport's to close)
            self.transport.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    async def _shutdown(self, shutdown_cluster: bool) -> None:
        self.closing = True
        await self._drain_output()
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

    async def _drain_output(self, quiet: float = OUTPUT_QUIET_S, limit: float = 1.0) -> None:
        """Before leaving while tasks still run: take in what they printed so far (Ray flushes
        it too), until no line came for ``quiet`` seconds, ``limit`` seconds at most.

        Lines a worker sent before our goodbye may still be in flight; the head kills our
        workers once we leave, and their output is lost with our sockets.
        """
        if self.state is None or not self.state.tasks.by_tid or not self.log_to_driver:
            return
        start = time.monotonic()
        while True:
            await asyncio.sleep(quiet / 5)
            now = time.monotonic()
            if now - max(start, self._last_log) >= quiet or now - start >= limit:
                return

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
        """Hand ``command`` to the I/O thread (any thread).

        A task or an actor call is handled on the calling thread instead, under :attr:`lock`,
        when nothing posted before it waits: what it sends to a worker on a local link leaves
        at once (the I/O thread is not woken for it: a wake-up and a turn of its loop less per
        call); anything else it causes is left to the loop, in order (:meth:`_carry_out`).
        """
        # (Ctrl-C on the main thread waits until the command is handled or queued: a
        # KeyboardInterrupt half-way would leave the state, or the wake-up flag, half changed.)
        held = self._interrupts.enter()
        try:
            if type(command) in _HANDLED_HERE and self.lock.acquire(blocking=False):
                try:
                    if not (self._inbox or self._handling or self._closed) and self.state:
                        self._handle_here(command)
                        return
                finally:
                    self.lock.release()
            self._inbox.append(command)
            if not self._wake_pending:
                self._wake_pending = True
                loop = self.loop
                if loop is None or loop.is_closed():
                    raise NbclusterError("the connection to the cluster is closed")
                loop.call_soon_threadsafe(self._drain_inbox)
        finally:
            if held:
                self._interrupts.leave()

    def _handle_here(self, command: Command) -> None:
        state = self.state
        assert state is not None
        events: list[Event] = [command]
        released = self.released
        if released:  # (as the loop would first: frees before what follows)
            events.insert(0, Released([released.popleft() for _ in range(len(released))]))
        self._carry_out(self._handle(state, events))

    def _carry_out(self, instructions: list[Instruction]) -> None:
        """Carry out what a user thread's command caused: sends on local links and frees here,
        the rest (and all after it) on the loop, in order."""
        links = self._links
        assert links is not None
        for i, ins in enumerate(instructions):
            if not self._deferred:
                if type(ins) is ToWorker and links.send_now(ins.conn, ins.header, ins.payload):
                    continue
                if type(ins) is FreeStored:
                    self._do(ins)  # (the store client is thread-safe)
                    continue
            self._deferred.extend(instructions[i:])
            if not self._deferred_wake:
                self._deferred_wake = True
                assert self.loop is not None
                self.loop.call_soon_threadsafe(self._run_deferred)
            return
        if self.store is not None:
            self.store.flush()

    def _run_deferred(self) -> None:
        assert self._links is not None
        with self.lock, self._links.burst():
            self._deferred_wake = False
            self._drain_deferred()

    def _drain_deferred(self) -> None:
        deferred = self._deferred
        while deferred:
            self._execute([deferred.popleft()])
        if self.store is not None:
            self.store.flush()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run ``coro`` on the I/O thread and wait for its result (a user thread)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _drain_inbox(self) -> None:
        with self.lock:
            self._wake_pending = False
            assert self._links is not None
            with self._links.burst():  # (the tasks just submitted leave now, not a turn later)
                if self.released:
                    self._release()
                inbox = self._inbox
                while inbox:
                    self.feed(inbox.popleft())

    async def send_releases(self) -> None:
        """Count the refs dropped so far now (their frees leave before whatever follows)."""
        if self.released:
            self._release()

    def _release(self) -> None:
        with self.lock:  # (a user thread handling a task takes them too: see post)
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
        with self.lock:
            if self._deferred:  # (what user threads' commands caused comes first)
                self._drain_deferred()
            out = self._handle(state, [event])
            if out:
                self._execute(out)

    def _handle(self, state: ClientState, events: list[Event]) -> list[Instruction]:
        """The state's instructions for ``events``, in order (the lock held)."""
        self._handling = True
        out: list[Instruction] = []
        now = time.time()
        try:
            for event in events:
                try:
                    out += state.handle(event, now)
                except Exception:
                    log.exception("nbcluster internal error handling %s", type(event).__name__)
                    out += state.take()
        finally:
            self._handling = False
        return out

    def _feeding(self, to_event: Translate) -> Callable[[Any, Any, list[Any]], None]:
        """A receive handler that feeds the state the event a message becomes."""

        def handler(ctx: Any, msg: Any, payload: list[Any]) -> None:
            self.feed(to_event(ctx, msg, payload))

        return handler

    def _execute(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            try:
                self._do(ins)
            except Exception:
                log.exception("nbcluster internal error carrying out %s", type(ins).__name__)

    def _do(self, ins: Instruction) -> None:
        match ins:
            case ToWorker(conn, header, payload):
                assert self._links is not None
                self._links.send(conn, encode(header, payload))
            case ToHead(header, payload):
                send_nowait(self._head, encode(header, payload))
            case StartTimer(delay, event):
                assert self.loop is not None
                self.loop.call_later(delay, self.feed, event)
            case OpenWorker(conn):
                self._open_worker(conn)
            case CloseWorker(conn):
                assert self._links is not None
                self._links.close(conn)
            case CancelOnWorker(conn, header):
                assert self._links is not None
                self._links.send_both(conn, encode(header))
            case ToControl(conn, header):
                assert self._links is not None
                self._links.send(conn, encode(header), control=True)
            case ToOwner(owner, header):
                self._send_to_owner(owner, header)
            case ReplyObject(ident, header, payload):
                assert self._owner is not None
                self._owner.send_nowait(ident, encode(header, payload))
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
    def _head_malformed(self, _: None, exc: ProtocolError) -> bool:
        """A malformed answer to one of our requests fails that request (it must not wait)."""
        rid = exc.rid if isinstance(exc, MalformedMessage) else None
        fut = self._replies.pop(rid, None) if rid is not None else None
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        return True  # (nothing is answered to the head)

    def _on_query_reply(self, _: None, msg: m.QueryReply, payload: list[Any]) -> None:
        fut = self._replies.pop(msg.rid, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.result)

    def _on_actor_created(self, _: None, msg: m.ActorCreated, payload: list[Any]) -> None:
        fut = self._replies.pop(msg.rid, None)
        if fut is not None and not fut.done():
            fut.set_result(msgspec.structs.asdict(msg))  # create_actor's answer: a dict

    def _on_warning(self, _: None, msg: m.Warning_, payload: list[Any]) -> None:
        log.warning("nbcluster: %s", msg.msg)  # e.g. workers that keep dying, with the reason

    def _on_welcome(self, _: None, msg: m.Welcome, payload: list[Any]) -> None:
        self._rejoined()

    def _on_head_error(self, _: None, msg: m.Error, payload: list[Any]) -> None:
        if msg.code == "nohello":
            self._rejoin()
            return
        fut = self._replies.pop(msg.rid, None) if msg.rid is not None else None
        if fut is not None and not fut.done():
            fut.set_exception(ValueError(msg.msg or "the head refused the request"))
        else:
            log.error("the head reports: %s", msg.msg)

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
        with self.lock:
            claims = self.state.rejoin_claims()
        hello = {**self._hello, "rejoin": True, **claims}
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
        if what == "timeline":  # our buffered task events first: it shows what just ended
            self.feed(FlushTaskEvents())
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
        assert self._links is not None
        bind = {
            "k": Kind.BIND,
            "job_id": self.job_id,
            "namespace": self.namespace,
            "sys_path": [os.path.abspath(p) if p in ("", ".") else p for p in sys.path],
        }
        self._links.open(conn, encode(bind))

    def _on_log(self, conn: WorkerConn, msg: m.Log, payload: list[Any]) -> None:
        self._last_log = time.monotonic()
        if self.log_to_driver:
            self.feed(TaskOutput(conn, msg.tid or "", msg.name, msg.pid, msg.stream, msg.lines))

    def _on_head_log(self, _: None, msg: m.Log, payload: list[Any]) -> None:
        # What the __init__ of an actor we created printed (its worker has no channel to us yet).
        if self.log_to_driver:
            self.feed(TaskOutput(None, msg.tid or "", msg.name, msg.pid, msg.stream, msg.lines))

    def _on_worker_error(self, conn: WorkerConn, msg: m.Error, payload: list[Any]) -> None:
        _worker_errors(f"{conn.addr}: {msg.msg}")  # e.g. a message of ours it found malformed

    # ================================================================== objects
    def _owner_dispatcher(self, owner: ZmqListener) -> Dispatcher[bytes]:
        """Serves requests for the objects we own (a malformed one is answered an ERROR)."""
        return Dispatcher[bytes](
            {
                m.GetObject: self._on_get_object,
                m.BorrowDel: self._on_borrow_del,
                m.Escape: self._on_escape,
            },
            what="about an object we own",
            logger=log,
            answer=answer_on(owner),
        )

    def _on_get_object(self, ident: bytes, msg: m.GetObject, payload: list[Any]) -> None:
        self.feed(ObjectRequested(ident, msg.oid))

    def _on_borrow_del(self, ident: bytes, msg: m.BorrowDel, payload: list[Any]) -> None:
        self.feed(BorrowReleased(msg.oid, msg.n))

    def _on_escape(self, ident: bytes, msg: m.Escape, payload: list[Any]) -> None:
        self.feed(ObjectEscaped(msg.oid))

    def _send_to_owner(self, owner: str, header: dict[str, Any]) -> None:
        """Send on our (one, ordered) connection to an object's owner."""
        sock = self._owner_conns.get(owner)
        if sock is None:
            assert self.transport is not None
            sock = self._owner_conns[owner] = self.transport.client(zmq.DEALER, owner)
            reader = ZmqChannel(sock, copy=False)  # (payloads are not copied)
            self._spawn(follow(reader, self._from_owner, owner))
        send_nowait(sock, encode(header))

    def _on_object(self, owner: str, msg: m.Object, payload: list[Any]) -> None:
        self.feed(ObjectArrived(owner, msg.oid, msg.ok, msg.err == "lost", payload))

    def _on_owner_error(self, owner: str, msg: m.Error, payload: list[Any]) -> None:
        _owner_errors(f"{owner}: {msg.msg}")  # e.g. a request of ours it found malformed


def _ignore(peer: object, msg: m.Message, payload: list[Any]) -> None:
    """A message that needs nothing done (``PONG``)."""


def _settle(fut: concurrent.futures.Future[dict[str, Any]], reply: Any) -> None:
    if fut.done():
        return
    if reply.cancelled():
        fut.set_exception(TaskCancelledError(None, "actor creation was cancelled"))
    elif reply.exception() is not None:
        fut.set_exception(reply.exception())
    else:
        fut.set_result(reply.result())
