"""The worker process: receives tasks (or actor calls) from drivers and runs them.

The main thread owns the task socket and runs tasks one at a time. Actors with
``max_concurrency > 1`` or ``async def`` methods run calls on other threads; those hand their
results back through :meth:`Worker.send`, which queues them for the main thread and wakes it.
A control thread handles cancellation of the running task and notices a dead agent.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from nbcluster import context
from nbcluster.agent import memory
from nbcluster.agent.logs import tag
from nbcluster.client import current
from nbcluster.exceptions import ObjectLostError, ProtocolError, TaskCancelledError, TaskError
from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import Header, encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.validation import INTERNAL, MalformedMessage, error_reply
from nbcluster.refs import loaded_refs, serialized_refs
from nbcluster.serialization import dumps, loads, loads_args, restore_filenames
from nbcluster.store.client import StoreClient
from nbcluster.transport import Transport
from nbcluster.transport.serve import Dispatcher
from nbcluster.transport.sockets import max_message_bytes
from nbcluster.worker.batching import WATCH_MS, Holder, call_key
from nbcluster.worker.local_links import LocalPeers
from nbcluster.worker.output import LineForwarder, OutputTarget, current_output
from nbcluster.worker.streaming import Call, Streaming
from nbcluster.worker.timing import timing

# To the worker's own stderr (the agent's log), never to a driver's task output.
log = logging.getLogger(__name__)

#: A call waiting for the main thread: (its sender, the message, its payload frames).
Queued = tuple[bytes, m.Task | m.ActorInit | m.ActorCall, list[Any]]
#: Tasks remembered as started (a late ask for one of them is not kept: see ``Worker._steal``);
#: far more than a driver pipelines to one worker.
RAN_KEPT = 256


class Worker(Streaming):
    """One worker process's task loop."""

    def __init__(
        self,
        transport: Transport,
        sock: Any,
        ctrl: Any,
        ident: context.WorkerIdentity,
        local: socket.socket | None = None,
    ) -> None:
        self.transport = transport
        self.sock = sock
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        # Drivers on this host, over a Unix socket (nbcluster.transport.local)
        self._local = LocalPeers(local, self.poller, max_message_bytes()) if local else None
        self.ctrl = ctrl
        self.ident = ident
        self.functions: dict[str, Any] = {}
        self._blobs: dict[str, Any] = {}  # function id -> its pickle, until first loaded
        # Work stealing: tasks asked back that were not here yet (still in the socket, or on
        # the way: the ask comes on the other socket), and the last tasks run (asked too late).
        self._wanted: set[str] = set()
        self._cancelled: set[str] = set()  # cancelled before they started here
        self._answered: deque[str] = deque(maxlen=RAN_KEPT)  # taken out of the queue, cancelled
        self._ran: deque[str] = deque(maxlen=RAN_KEPT)
        self.queue: deque[Queued] = deque()
        self.pid = os.getpid()
        # Started by an agent: fd 1 is the pipe to it, which keeps this worker's log.
        self._keep_log = "NBCLUSTER_AGENT_PID" in os.environ
        self._slot = memory.TaskSlot.from_environment()  # which task runs, for the agent
        self._lock = threading.Lock()
        self._running: str | None = None  # id of the task the main thread runs now
        self._cancel_requested: str | None = None
        self._main = threading.main_thread()
        self._outbox: deque[tuple[bytes, Header | m.Message, list[Any]]] = deque()
        # While the main thread runs user code it does not touch the task socket, so other
        # threads (a task's own threads printing) send on it at once under this lock instead of
        # queueing for a main thread that may be busy for hours (see ``_user_code``).
        # (Reentrant: the control thread reads the socket under it while stealing, and its
        # handlers may answer.)
        self._sock_lock = threading.RLock()
        self._direct = False
        self._wake_pending = False  # a byte is (about to be) in the wake pipe
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._holder = Holder(self._send_frames)  # results of short calls, sent together
        self.stdout = LineForwarder("stdout", sys.stdout, self._emit)
        self.stderr = LineForwarder("stderr", sys.stderr, self._emit)
        self._orig_cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.actor: Any = None  # ActorHost once this worker hosts an actor
        # The placement group of the task (or of the actor) here, and whether it captures.
        self.placement: tuple[str | None, bool] = (None, False)
        self._calls: dict[str, int] = {}  # function id -> tasks of it run here (max_calls)
        self._retire_tid: str | None = None  # the task whose result says we retire
        self._env_key: str | None = None  # the runtime_env this worker entered, if any
        self._acked: dict[str, int] = {}  # stream -> items its consumer has taken
        self._ack_cond = threading.Condition()
        store_addr = os.environ.get("NBCLUSTER_STORE")
        self.store = (
            StoreClient(
                transport,
                store_addr,
                os.environ.get("NBCLUSTER_STORE_ID", ""),
                keep_mapped=2,
                writer=os.environ.get("NBCLUSTER_WORKER_ID", ""),
            )
            if store_addr
            else None
        )
        self.dispatcher = Dispatcher[bytes](
            {
                m.Task: self._enqueue,
                m.ActorInit: self._enqueue,
                m.ActorCall: self._on_actor_call,
                m.ActorAttach: self._on_attach,
                m.Bind: self._on_bind,
                m.Cancel: self._on_cancel,
                m.StreamAck: self._on_stream_ack,
            },
            what="from a driver",
            logger=log,
            answer=self.send,
            on_malformed=self._refuse_call,
            on_error=self._call_failed,
            batches=True,
        )

    # ----------------------------------------------------------------------------- sending
    def send(
        self, ident: bytes, header: Header | m.Message, payload: list[Any] | None = None
    ) -> None:
        """Send a message; from threads other than the main one it is queued for the main thread."""
        if threading.current_thread() is self._main:
            with self._sock_lock:
                holder = self._holder
                if not holder.hold:  # (then nothing older is held back: see batching.py)
                    self._send_locked(ident, header, payload or [])
                elif self.actor is not None and ident == self.actor.head:
                    holder.flush()  # (the head takes no BATCH: what is held goes first)
                    self._send_locked(ident, header, payload or [])
                else:
                    holder.add(ident, encode(header, payload or []))
            return
        with self._sock_lock:
            if self._direct:
                self._send_locked(ident, header, payload or [])
                return
            self._outbox.append((ident, header, payload or []))
            if self._wake_pending:
                return  # the main thread has been woken and has not looked yet
            # (Set and written under the lock: the main thread drains and clears under it too,
            # so a byte is in the pipe exactly while the flag is set.)
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _send(self, ident: bytes, header: Header | m.Message, payload: list[Any]) -> None:
        with self._sock_lock:
            self._send_locked(ident, header, payload)

    def _send_locked(self, ident: bytes, header: Header | m.Message, payload: list[Any]) -> None:
        self._send_frames([ident, *encode(header, payload)])

    def _send_frames(self, frames: list[Any]) -> None:
        if self._local is not None and LocalPeers.is_local(frames[0]):
            self._local.send(frames[0], frames[1:])
            return
        try:
            # (Copied: for frames this small, faster than zero-copy; large values go through the
            # node's store, not this socket.)
            self.sock.send_multipart(frames)
        except zmq.ZMQError:
            pass  # the driver is gone; the head will recycle this worker

    @contextlib.contextmanager
    def _user_code(self) -> Iterator[None]:
        """The main thread runs user code: other threads may send on the task socket meanwhile.

        Without this, what a task's threads print would wait for the task's end, and be lost
        if its driver exits first.
        """
        with self._sock_lock:
            self._direct = True
        try:
            yield
        finally:
            with self._sock_lock:
                self._direct = False

    def _flush_outbox(self) -> None:
        if self._wake_pending:  # (not a read per task: most tasks queue nothing here)
            with self._sock_lock:
                self._wake_pending = False
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
        while self._outbox:  # (what was queued before the flag was cleared, and since)
            self._send(*self._outbox.popleft())

    def _emit(self, target: OutputTarget, stream: str, lines: list[str]) -> None:
        msg = m.Log(tid=target.tid, stream=stream, lines=lines, name=target.name, pid=self.pid)
        self.send(target.ident, msg)
        if self._keep_log:  # a copy for the node's log of this worker, tagged with its task
            with contextlib.suppress(OSError):
                os.write(1, tag(target.tid, target.name, stream, lines))

    # ----------------------------------------------------------------------------- main loop
    def run(self) -> None:
        sys.stdout = self.stdout
        sys.stderr = self.stderr
        threading.Thread(target=self._control_loop, name="nbcluster-control", daemon=True).start()
        poller = self.poller
        poller.register(self._wake_r, zmq.POLLIN)
        holder, local = self._holder, self._local
        while True:  # until the agent kills us (or goes away: see the control thread)
            try:
                if not self.queue:
                    if holder.busy:
                        # Nothing held while we wait: only then does the control thread not
                        # send on the socket this thread polls (ZeroMQ sockets are not shared).
                        with self._sock_lock:
                            holder.idle()
                    ready = poller.poll()
                    # (A call on a local link leaves the ZeroMQ socket alone: no failed read.)
                    on_zmq = any(s is self.sock for s, _ in ready)
                    if local is not None:
                        with self._sock_lock:
                            local.polled(ready)
                else:
                    on_zmq = True
                self._flush_outbox()
                with self._sock_lock:  # (the control thread may send what is held meanwhile)
                    self._receive(on_zmq)
                with self._lock:  # (the control thread may take queued tasks away: _steal)
                    item = self.queue.popleft() if self.queue else None
                    if item is not None and isinstance(item[1], m.Task):
                        self._ran.append(item[1].tid)  # from now on it cannot be given back
                if item is not None:
                    ident, msg, payload = item
                    key = call_key(msg)
                    with self._sock_lock:
                        holder.next_call(key is not None and holder.short(key), bool(self.queue))
                    t0 = time.perf_counter()
                    try:
                        self._run_message(ident, msg, payload)
                    except Exception as exc:  # a bug: answer it and serve on
                        log.error("error handling %s", msg.__struct_config__.tag, exc_info=exc)
                        if not self._call_failed(ident, msg, exc) and msg.expects_reply:
                            self.send(ident, error_reply(exc, INTERNAL))
                    if key is not None:
                        holder.took(key, time.perf_counter() - t0)
                    self._flush_outbox()
            except KeyboardInterrupt:
                continue  # a cancellation that arrived just after its task finished

    def _receive(self, on_zmq: bool = True) -> None:
        """Take in every message waiting on the task socket and local links (calls are
        queued, not run); ``on_zmq``: look at the ZeroMQ socket too."""
        sock, dispatch = self.sock, self.dispatcher.dispatch_sync
        if self._local is not None:
            for ident, frames in self._local.receive():
                dispatch(ident, frames)
        while on_zmq:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)  # (small: copying is cheaper)
            except zmq.Again:
                return
            dispatch(frames[0], frames[1:])

    def _steal(self, tids: list[str]) -> None:
        """Give back the queued tasks among ``tids`` that have not started (control thread).

        A driver steals tasks queued here for a worker of its that went idle. While the main
        thread runs user code (perhaps for hours) it reads nothing, so this thread reads the
        task socket for it: tasks sent since are queued, and can be taken back too.
        """
        with self._sock_lock:
            if self._direct:
                self._receive()
            want = set(tids)
            with self._lock:
                taken = [q for q in self.queue if isinstance(q[1], m.Task) and q[1].tid in want]
                for q in taken:
                    self.queue.remove(q)
                    want.discard(q[1].tid)  # type: ignore[union-attr]
                # Not here yet: given back when it comes (unless it already ran).
                self._wanted.update(want.difference(self._ran))
            by_driver: dict[bytes, list[str]] = {}
            for ident, msg, _ in taken:
                by_driver.setdefault(ident, []).append(msg.tid)  # type: ignore[union-attr]
            for ident, stolen in by_driver.items():
                self.send(ident, m.Stolen(tids=stolen))

    def _refuse_call(self, ident: bytes, exc: ProtocolError) -> bool:
        """Answer a malformed call with its result, which is what its sender waits for."""
        if isinstance(exc, MalformedMessage) and exc.kind in (Kind.TASK, Kind.ACTOR_CALL):
            tid = exc.header.get("tid")
            if isinstance(tid, str):  # not ``exc`` itself: it holds the malformed header
                self.send_error(ident, tid, ProtocolError(str(exc)), "exc")
                return True
        return False  # the dispatcher's ERROR answer, when its sender waits for one

    def _call_failed(self, ident: bytes, msg: m.Message, exc: Exception) -> bool:
        """A call whose handling failed (a bug) fails with the error as its result."""
        if isinstance(msg, m.Task | m.ActorCall):
            self.send_error(ident, msg.tid, self.task_error(msg.name, exc, 0), "exc")
            return True
        return False

    def _enqueue(self, ident: bytes, msg: m.Task | m.ActorInit, payload: list[Any]) -> None:
        if isinstance(msg, m.Task):
            if msg.fnb and msg.fn not in self.functions:
                # Kept apart: if this task is stolen, the next ones of its function (sent
                # without it) still find it.
                self._blobs.setdefault(msg.fn, payload[0])
            if self._wanted:
                with self._lock:
                    wanted = msg.tid in self._wanted
                    self._wanted.discard(msg.tid)
                if wanted:  # asked back before it got here
                    self.send(ident, m.Stolen(tids=[msg.tid]))
                    return
        self.queue.append((ident, msg, payload))

    def _on_actor_call(self, ident: bytes, msg: m.ActorCall, payload: list[Any]) -> None:
        if self.actor is not None and self.actor.concurrent:
            self.actor.submit(ident, msg, payload)
        else:
            self.queue.append((ident, msg, payload))

    def _on_attach(self, ident: bytes, msg: m.ActorAttach, payload: list[Any]) -> None:
        # A restarted head took over this actor: its notices (exit_actor) go there now.
        if self.actor is not None and self.actor.aid == msg.aid:
            self.actor.head = ident

    def _on_bind(self, ident: bytes, msg: m.Bind, payload: list[Any]) -> None:
        self.bind(msg.job_id, msg.sys_path)
        if msg.namespace and not self.ident.namespace:
            self.ident.namespace = msg.namespace

    def _on_cancel(self, ident: bytes, msg: m.Cancel, payload: list[Any]) -> None:
        if self.actor is not None and self.actor.concurrent:
            self.actor.cancel(msg.tid)  # its calls run on other threads or its event loop
            return
        self._cancel_queued(msg.tid)

    def _cancel_queued(self, tid: str) -> bool:
        """Take call ``tid`` out of the queue and answer it cancelled; False if not queued."""
        with self._lock:
            found = None
            for i, (qident, queued, _) in enumerate(self.queue):
                if isinstance(queued, m.Task | m.ActorCall) and queued.tid == tid:
                    del self.queue[i]
                    found = qident
                    self._ran.append(tid)  # (done with here: a later ask is not kept)
                    self._answered.append(tid)
                    self._cancelled.discard(tid)  # (if the control thread heard first)
                    break
        if found is None:
            return False
        self.send_error(found, tid, TaskCancelledError(tid), "cancelled")
        return True

    def bind(self, job_id: str | None, sys_path: list[str]) -> None:
        """Serve this job (for the rest of our life) with its module search path."""
        if self.ident.job_id is None and job_id:
            self.ident.job_id = job_id
        for p in sys_path:
            if p not in sys.path:
                sys.path.append(p)

    def _run_message(
        self, ident: bytes, h: m.Task | m.ActorInit | m.ActorCall, payload: list[Any]
    ) -> None:
        match h:
            case m.Task():
                self.placement = (h.pg, h.capture)
                t0 = time.perf_counter()  # the function's loading counts as fetching
                self.set_gpus(h.gpus)
                try:
                    self.enter_env(h.renv)  # before the function: it may import from it
                    fn, pos = self._function(h, payload)
                except Exception as exc:
                    self.send_error(ident, h.tid, self.task_error(h.name, exc, 0), "exc")
                    return
                if h.mc:  # Ray's max_calls: the result of the last call says we retire
                    done = self._calls[h.fn] = self._calls.get(h.fn, 0) + 1
                    if done >= h.mc:
                        self._retire_tid = h.tid
                self.invoke(ident, h, payload[pos:], fn, t0)
            case m.ActorInit():
                from nbcluster.worker.actor_host import ActorHost

                self.actor = ActorHost.create(self, ident, h, payload)
            case m.ActorCall():
                if self.actor is not None:
                    self.actor.call_inline(ident, h, payload)

    def enter_env(self, renv: m.RuntimeEnv | None) -> None:
        """Enter a task's runtime_env (packages fetched and unpacked on first use).

        A worker serves one environment for life; a task without one must not run in a worker
        that entered one (its variables and modules would leak into it).
        """
        if renv is not None:
            import msgspec

            from nbcluster.runtime_env import node  # only workers of such tasks need it

            node.apply(msgspec.to_builtins(renv))
            self._env_key = renv.key
        elif self._env_key is not None:
            raise RuntimeError(
                f"this worker runs runtime_env {self._env_key}: it cannot run a task without one"
            )

    def _function(self, h: m.Task, payload: list[Any]) -> tuple[Any, int]:
        fid = h.fn
        fn = self.functions.get(fid)
        if fn is None:
            blob = payload[0] if h.fnb else self._blobs.get(fid)
            if blob is None:
                raise ProtocolError(f"function {h.name} ({fid}) was never sent to this worker")
            fn, filename = loads([blob])
            fn = self.functions[fid] = restore_filenames(fn, filename)
            self._blobs.pop(fid, None)
        return fn, 1 if h.fnb else 0

    def set_gpus(self, gpus: list[int] | None) -> None:
        want = ",".join(str(g) for g in gpus) if gpus else self._orig_cuda
        if os.environ.get("CUDA_VISIBLE_DEVICES") == want:
            return  # (the usual case: writing the environment costs more than a no-op task)
        if want is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = want

    # ----------------------------------------------------------------------------- calls
    def load_args(
        self, h: Call | m.ActorInit, payload: list[Any], loaded: list[str] | None = None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Arguments of a call: ``nargs`` frames of pickled args, then each dependency's frames.

        The ids of refs found inside them are added to ``loaded`` (see :meth:`kept`).
        """
        nargs = h.nargs
        pos = nargs
        dep_values = []
        with loaded_refs() as oids:
            for i, count in enumerate(h.deps):
                try:
                    dep_values.append(loads(payload[pos : pos + count], self.store))
                except ObjectLostError as exc:
                    exc.dep_index = i  # type: ignore[attr-defined]  # see invoke: "lost"
                    raise
                pos += count
            values = loads_args(payload[:nargs], dep_values, self.store)
        if loaded is not None:
            loaded.extend(oids)
        return values

    def kept(self, loaded: list[str]) -> list[str]:
        """Refs from a call's arguments that are still alive here once the call is over.

        The caller keeps those objects (it would otherwise free them when it drops its refs).
        """
        client = current.get()
        if client is None or not loaded:
            return []
        alive = []
        for oid in dict.fromkeys(loaded):
            e = client.objects.get(oid)
            if e is not None and e.refs > 0:
                e.reported += 1  # released with a BORROW_DEL when we drop it
                alive.append(oid)
        return alive

    def begin(
        self, ident: bytes, tid: str, name: str, assigned: dict[str, Any] | None = None
    ) -> tuple[OutputTarget, Any, Any]:
        """Enter a call's context: runtime context and output capture (undo with :meth:`end`)."""
        ctx = context.TaskContext(
            task_id=tid,
            job_id=self.ident.job_id or "",
            name=name,
            node_id=self.ident.node_id,
            worker_id=self.ident.worker_id,
            assigned=assigned or (self.actor.assigned if self.actor is not None else {}),
            actor_id=self.actor.aid if self.actor is not None else None,
            placement_group=self.placement[0],
            capture=self.placement[1],
        )
        target = OutputTarget(ident, tid, name)
        return target, context.current_task.set(ctx), current_output.set(target)

    def end(self, target: OutputTarget, tokens: tuple[Any, Any]) -> None:
        context.current_task.reset(tokens[0])
        current_output.reset(tokens[1])
        self.stdout.drain(target)
        self.stderr.drain(target)

    def invoke(
        self,
        ident: bytes,
        h: Call,
        payload: list[Any],
        fn: Callable[..., Any],
        t0: float | None = None,
    ) -> None:
        """Run one call on the main thread and send its result (cancellable via SIGINT).

        ``t0``: when the call started (``perf_counter``), if before this method.
        """
        tid, name = h.tid, h.name
        if t0 is None:
            t0 = time.perf_counter()
        loaded: list[str] = []
        try:
            args, kwargs = self.load_args(h, payload, loaded)
        except Exception as exc:
            # An argument lost with its node: the caller (its owner) may rebuild it and send the
            # task again, so it learns which one.
            lost = getattr(exc, "dep_index", None)
            err = self.task_error(name, exc, skip=0)
            t1 = time.perf_counter()
            lost_at = [lost] if isinstance(lost, int) else []
            self.send_error(ident, tid, err, "exc", lost=lost_at, ran=timing(t0, t1, t1))
            return
        assigned = h.assigned if isinstance(h, m.Task) else None
        t1 = time.perf_counter()
        target, *tokens = self.begin(ident, tid, name, assigned)
        self.stdout.default = self.stderr.default = target
        with self._lock:
            self._running = tid
            early = tid in self._cancelled  # cancelled while it waited here (pipelined)
            self._cancelled.discard(tid)
        slot = self._slot if isinstance(h, m.Task) else None  # for the memory monitor
        if slot is not None:
            slot.started(tid, name, h.retry)  # type: ignore[union-attr]
        ok = cancelled = exiting = False
        result: Any = None
        error: BaseException | None = None
        try:
            try:
                if early:
                    self._cancel_requested = tid
                    raise KeyboardInterrupt
                with self._user_code():
                    result = fn(*args, **kwargs)
                if h.gen:
                    result = self.stream(ident, h, result)
                ok = True
            except (context.ActorExit, SystemExit) as exc:
                if self.actor is not None and isinstance(h, m.ActorCall):
                    ok = exiting = True
                    self.actor.note_exit(exc)
                else:  # sys.exit() in a task fails the task; the worker serves on
                    error = exc
            except KeyboardInterrupt as exc:
                cancelled = self._cancel_requested == tid
                error = exc
            except BaseException as exc:  # user code may raise anything, SystemExit included
                error = exc
            finally:
                with self._lock:
                    self._running = None
        except KeyboardInterrupt:  # cancellation landed between the call and the bookkeeping
            cancelled = not ok
        finally:
            ran = timing(t0, t1, time.perf_counter())
            self._cancel_requested = None
            with self._sock_lock:  # again: a cancellation may have landed in _user_code's exit
                self._direct = False
            self.stdout.default = self.stderr.default = None
            self.end(target, (tokens[0], tokens[1]))
            if slot is not None:
                slot.ended()
        del args, kwargs
        kept = self.kept(loaded)
        if cancelled:
            self.send_error(ident, tid, TaskCancelledError(tid), "cancelled", kept, ran=ran)
        elif exiting and self.actor is not None:
            # As in Ray, the caller of the method that called exit_actor() sees the actor's
            # death, not a value: the same answer whichever of this reply and the head's
            # notice of the death reaches it first.
            self.send_error(ident, tid, self.actor.exit_error(), "exc", kept, ran=ran)
        elif not ok:
            assert error is not None
            err = self.task_error(name, error, skip=1)
            self.send_error(ident, tid, err, "exc", kept, ran=ran)
        else:
            self.send_result(ident, tid, name, h.nret, result, kept, ran)
        if exiting and self.actor is not None:
            self.actor.exit()
        if self.store is not None:
            self.store.forget_freed()
            self.store.flush()

    def send_result(
        self,
        ident: bytes,
        tid: str,
        name: str,
        nret: int,
        result: Any,
        kept: list[str] | None = None,
        ran: tuple[int, int, int] | None = None,
    ) -> None:
        """Send call ``tid``'s ``result`` (``ran``: its :func:`timing`, for the timeline)."""
        kept = list(kept or ())
        t = time.perf_counter()
        try:
            with serialized_refs() as returned:
                parts = self._serialize_returns(tid, name, nret, result)
        except Exception as exc:
            err = self.task_error(name, exc, skip=0, what="its result")
            self.send_error(ident, tid, err, "exc", kept, ran=ran)
            return
        for ref in returned:  # refs we own inside the result: kept until our job ends
            ref._client.mark_escaped(ref.oid)
        frames = [f for p in parts for f in p]
        header = m.Result(
            tid=tid,
            ok=True,
            n=[len(p) for p in parts],
            kept=kept,
            returned=[[r.oid, r.owner_address] for r in returned],
            ph=[*ran, int((time.perf_counter() - t) * 1e6), self.pid] if ran else [],
            retire=tid == self._retire_tid,
        )
        self.send(ident, header, frames)

    def _serialize_returns(self, tid: str, name: str, nret: int, result: Any) -> list[list[Any]]:
        if nret == 1:
            return [self.serialize(f"{tid}.0", result)]
        if nret == 0:
            return []
        if inspect.isgenerator(result):  # Ray's static generator: one return per value
            result = tuple(result)
        values = tuple(result) if isinstance(result, list | tuple) else None
        if values is None or len(values) != nret:
            got = f"{len(values)} values" if values is not None else type(result).__name__
            raise ValueError(f"task {name} declared num_returns={nret} but returned {got}")
        return [self.serialize(f"{tid}.{i}", v) for i, v in enumerate(values)]

    def serialize(self, oid: str, value: Any) -> list[Any]:
        """A return value's frames: inline when small, else written once into the node's store."""
        if self.store is not None:
            return self.store.put(oid, value, self.ident.job_id or "")
        return dumps(value)

    def task_error(self, name: str, exc: BaseException, skip: int, what: str = "") -> TaskError:
        tb = exc.__traceback__
        for _ in range(skip):
            if tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
        # A generator task's values are drawn here (stream): the user's frames start after.
        while (
            tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__
        ):
            tb = tb.tb_next
        frames = [
            (f.filename, f.lineno or 0, f.name, f.line or "") for f in traceback.extract_tb(tb)
        ]
        # The stack is sent as frames (the driver fills in source lines it alone has, such as
        # notebook cells); the text holds the exception itself, chained ones included.
        text = "".join(traceback.format_exception_only(type(exc), exc))
        chained = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if chained is not None:
            text = "".join(traceback.format_exception(chained)) + "\nThe above led to:\n" + text
        if what:
            text = f"{text}(raised while serializing {what})"
        where = f"pid={self.pid}, node={self.ident.node_name}"
        return TaskError(name, text, exc, where, frames)

    def error_frames(self, err: BaseException) -> list[Any]:
        try:
            return dumps(err)
        except Exception:
            if isinstance(err, TaskError):  # the original exception does not pickle
                bare = TaskError(err.function_name, err.traceback_str, None, err.where, err.frames)
                bare.cause_type = err.cause_type  # the driver still names it
                bare.cause_unavailable = "it could not be pickled in the worker"
                err = bare
            return dumps(err)

    def send_error(
        self,
        ident: bytes,
        tid: str,
        err: BaseException,
        kind: str,
        kept: list[str] | None = None,
        lost: list[int] | None = None,
        ran: tuple[int, int, int] | None = None,
    ) -> None:
        """Fail call ``tid`` with ``err`` (``kind``: ``RESULT.err``; ``lost``: the indexes of
        arguments lost with their node; ``ran``: its :func:`timing`, if it ran)."""
        frames = self.error_frames(err)
        header = m.Result(
            tid=tid,
            ok=False,
            err=kind,
            n=[len(frames)],
            kept=kept or [],
            lost=lost or [],
            ph=[*ran, 0, self.pid] if ran else [],
            retire=tid == self._retire_tid,
        )
        self.send(ident, header, frames)

    # ----------------------------------------------------------------------------- control
    def _control_loop(self) -> None:
        agent_pid = int(os.environ.get("NBCLUSTER_AGENT_PID", "0"))
        # No answers (nobody waits on this socket); a bug: this thread must live on (cancels,
        # the agent watch).
        control = Dispatcher[bytes](
            {
                m.Cancel: lambda _, msg, __: self._cancel_running(msg.tid, msg.force),
                m.Steal: lambda _, msg, __: self._steal(msg.tids),
            },
            what="on the control socket",
            logger=log,
        )
        poller = zmq.Poller()
        poller.register(self.ctrl, zmq.POLLIN)
        poller.register(self._holder.wake_r, zmq.POLLIN)
        holder = self._holder
        while True:
            busy = holder.watching or (self._local is not None and self._local.pending)
            ready = dict(poller.poll(WATCH_MS if busy else 500))
            if self.ctrl in ready:
                frames = self.ctrl.recv_multipart()
                control.dispatch_sync(frames[0], frames[1:])
            if holder.wake_r in ready:
                holder.drain_wake()  # (a run of short calls began: look every WATCH_MS)
            if holder.watching:
                with self._sock_lock:
                    holder.watch()  # (a call that runs long sends what it held up)
            pending = self._local is not None and self._local.pending
            if self._direct and (pending or self._cancelled):
                with self._sock_lock:  # (the main thread, in a long call, cannot)
                    if self._local is not None:
                        self._local.flush()
                    if self._cancelled and self._direct:  # (those not here when cancelled)
                        self._receive()
                        for tid in list(self._cancelled):
                            self._cancel_queued(tid)
            if agent_pid and os.getppid() != agent_pid:
                os._exit(0)  # our agent is gone: nobody will ever use us again

    def _cancel_running(self, tid: str, force: bool) -> None:
        with self._lock:
            running = self._running == tid
        if not running:
            # Not started yet. While the main thread runs user code (perhaps for hours) nobody
            # reads the task socket: take in what waits there and answer it cancelled now, as
            # _steal does. Else (or not here yet) it is cancelled when its turn comes. (The
            # CANCEL on the task socket may come too late: the main thread may have taken the
            # task up by then.)
            with self._sock_lock:
                if self._direct and not (self.actor is not None and self.actor.concurrent):
                    self._receive()
                    if self._cancel_queued(tid):
                        return
            with self._lock:
                if self._running != tid:
                    if tid not in self._answered:  # (not by the task socket's CANCEL)
                        self._cancelled.add(tid)  # (taken up just now: cancelled as it starts)
                    return
        with self._lock:
            if self._running != tid:
                return  # (it ended meanwhile)
            if force:
                os.kill(self.pid, signal.SIGKILL)
            self._cancel_requested = tid
            os.kill(self.pid, signal.SIGINT)
