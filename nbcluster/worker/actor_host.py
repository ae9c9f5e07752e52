"""Hosting one actor in a worker process: creation, calls (sequential, threaded or async), exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbcluster import context
from nbcluster.cells import EXEC_METHOD, run_cell
from nbcluster.context import ActorExit
from nbcluster.exceptions import ActorDiedError, TaskCancelledError
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import ActorCall, ActorInit
from nbcluster.serialization import loads, restore_filenames
from nbcluster.worker.timing import timing

if TYPE_CHECKING:
    from nbcluster.worker.main import Worker


@dataclass
class _Call:
    method: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loaded: list[str]
    ran: tuple[int, int, int] | None = None  # its timing, once it ran


class ActorHost:
    """The actor instance living in this worker and the machinery that runs its methods.

    Sync actors with ``max_concurrency=1`` run calls on the main thread in arrival order (which is
    each caller's submission order). ``max_concurrency=N`` runs sync methods on N threads; an actor
    with ``async def`` methods runs them concurrently on one event loop. Concurrency groups
    (``@remote(concurrency_groups={"io": 2})``) each have their own limit: their own threads for
    a sync actor, their own semaphore on the event loop for an async one; the default group
    ("") has ``max_concurrency``.
    """

    def __init__(
        self,
        worker: Worker,
        aid: str,
        cls_name: str,
        head: bytes,
        max_concurrency: int,
        is_async: bool,
        groups: dict[str, int] | None = None,
    ) -> None:
        self.worker = worker
        self.aid = aid
        self.cls_name = cls_name
        self.head = head
        self.instance: Any = None
        self.is_async = is_async
        self.max_concurrency = max_concurrency
        self.groups = dict(groups or {})
        self.concurrent = is_async or max_concurrency > 1 or bool(self.groups)
        self.assigned: dict[str, Any] = {}
        self.exited = False
        self.exit_why = "called exit_actor()"
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}  # by group
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sems: dict[str, asyncio.Semaphore] = {}  # by group
        # Concurrent calls not answered yet, by id: whoever takes a call out (the call itself
        # when done, or cancel()) answers it, so each call gets exactly one answer.
        self._calls: dict[str, tuple[bytes, concurrent.futures.Future[Any]]] = {}
        self._calls_lock = threading.Lock()

    @classmethod
    def create(
        cls, worker: Worker, head: bytes, h: ActorInit, payload: list[Any]
    ) -> ActorHost | None:
        """Instantiate the actor; tells the head whether ``__init__`` succeeded."""
        worker.bind(h.job_id, h.sys_path)
        worker.set_gpus(h.gpus)
        aid = h.aid
        host = cls(
            worker,
            aid,
            h.cls_name,
            head,
            h.max_concurrency or 1,
            h.is_async,
            dict(h.concurrency_groups),
        )
        worker.actor = host
        worker.placement = (h.pg, h.capture)
        host.assigned = dict(h.assigned)
        if h.gpus:
            host.assigned["GPU_IDS"] = list(h.gpus)
        try:
            worker.enter_env(h.renv)
            klass, filename = loads([payload[0]])
            restore_filenames(klass, filename)
            context.actor_class = klass  # get_runtime_context().current_actor's methods
            args, kwargs = worker.load_args(h, payload[1:])
        except Exception as exc:
            worker.send(
                head,
                {"k": Kind.ACTOR_FAILED, "aid": aid},
                worker.error_frames(worker.task_error(f"{host.cls_name}.__init__", exc, 0)),
            )
            worker.actor = None
            return None
        target, *tokens = worker.begin(head, f"{aid}.init", host.cls_name, h.assigned)
        worker.stdout.default = worker.stderr.default = target
        try:
            host.instance = klass(*args, **kwargs)
        except BaseException as exc:
            why = exit_reason(exc)
            err: BaseException
            if why is not None:  # as in Ray: an intentional exit, callers see the actor died
                err = ActorDiedError(f"the actor {host.cls_name} exited in __init__ ({why})")
            else:
                err = worker.task_error(f"{host.cls_name}.__init__", exc, skip=1)
            worker.send(head, {"k": Kind.ACTOR_FAILED, "aid": aid}, worker.error_frames(err))
            worker.actor = None
            return None
        finally:
            worker.stdout.default = worker.stderr.default = None
            # __init__'s output went to the head, which passes it on to the actor's creator.
            worker.end(target, (tokens[0], tokens[1]))
        if host.is_async:
            host._start_loop()
        elif host.concurrent:
            limits = {"": host.max_concurrency, **host.groups}
            host._pools = {
                g: concurrent.futures.ThreadPoolExecutor(
                    n, thread_name_prefix=f"{host.cls_name}-{g or 'call'}"
                )
                for g, n in limits.items()
            }
        worker.send(head, {"k": Kind.ACTOR_READY, "aid": aid})
        return host

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            default = self.max_concurrency if self.max_concurrency > 1 else 1000
            limits = {"": default, **self.groups}
            self._sems = {g: asyncio.Semaphore(n) for g, n in limits.items()}
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, name=f"{self.cls_name}-loop", daemon=True).start()
        ready.wait()

    def _method(self, h: ActorCall) -> Any:
        name = h.method
        if name == EXEC_METHOD:  # ``%%on ACTOR``: run a notebook cell with the instance as self
            return functools.partial(run_cell, bound_self=self.instance)
        if name.startswith("__") and name != "__call__":
            raise AttributeError(f"{self.cls_name} actors do not expose {name}")
        return getattr(self.instance, name)

    # ------------------------------------------------------------------------ calls
    def call_inline(self, ident: bytes, h: ActorCall, payload: list[Any]) -> None:
        """Run a call on the main thread (sequential actors)."""
        if self.refuse(ident, h):
            return
        try:
            method = self._method(h)
        except Exception as exc:
            self.worker.send_error(ident, h.tid, self.worker.task_error(h.name, exc, 0), "exc")
            return
        self.worker.invoke(ident, h, payload, method)

    def submit(self, ident: bytes, h: ActorCall, payload: list[Any]) -> None:
        """Start a call on the pool or the event loop (concurrent actors)."""
        try:
            group = self._group(h)
        except ValueError as exc:
            self.worker.send_error(ident, h.tid, self.worker.task_error(h.name, exc, 0), "exc")
            return
        fut: concurrent.futures.Future[Any]
        with self._calls_lock:
            if self._loop is not None:
                coro = self._call_async(ident, h, payload, self._sems[group])
                fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
            elif self._pools:
                fut = self._pools[group].submit(self._call_threaded, ident, h, payload)
            else:
                return
            self._calls[h.tid] = (ident, fut)  # before it can answer: it takes this lock

    def _group(self, h: ActorCall) -> str:
        """The concurrency group a call runs in: the call's choice, else its method's."""
        group = h.group
        if not group:
            fn = getattr(type(self.instance), h.method, None)
            group = getattr(fn, "__nbcluster_concurrency_group__", "") if fn is not None else ""
        if group and group not in self.groups:
            raise ValueError(
                f"{self.cls_name} has no concurrency group {group!r} "
                f"(declared: {sorted(self.groups)})"
            )
        return str(group)

    def cancel(self, tid: str) -> None:
        """Cancel a call of a concurrent actor: its caller gets ``TaskCancelledError`` now.

        An async call's asyncio task is cancelled (``CancelledError`` at its next ``await``);
        a threaded call not started yet never starts, and one already running runs on (threads
        cannot be interrupted; as in Ray the actor keeps its state) but its outcome is dropped.
        """
        with self._calls_lock:
            found = self._calls.pop(tid, None)
        if found is None:
            return  # already answered (or never here)
        ident, fut = found
        fut.cancel()
        self.worker.send_error(ident, tid, TaskCancelledError(tid), "cancelled")

    def _answered(self, tid: str) -> bool:
        """Claim the right to answer call ``tid``; ``False`` when cancel() answered it."""
        with self._calls_lock:
            return self._calls.pop(tid, None) is not None

    def _call_threaded(self, ident: bytes, h: ActorCall, payload: list[Any]) -> None:
        t0 = time.perf_counter()
        call = self._prepare(ident, h, payload)
        if call is None:
            return
        w = self.worker
        t1 = time.perf_counter()
        target, *tokens = w.begin(ident, h.tid, h.name)
        result: Any = None
        error: BaseException | None = None
        try:
            result = call.method(*call.args, **call.kwargs)
            if h.gen:
                result = w.stream(ident, h, result)
        except BaseException as exc:
            error = exc
        w.end(target, (tokens[0], tokens[1]))
        call.ran = timing(t0, t1, time.perf_counter())
        self._send_outcome(ident, h, call, result, error)

    async def _call_async(
        self, ident: bytes, h: ActorCall, payload: list[Any], sem: asyncio.Semaphore
    ) -> None:
        async with sem:
            t0 = time.perf_counter()
            call = self._prepare(ident, h, payload)
            if call is None:
                return
            w = self.worker
            t1 = time.perf_counter()
            target, *tokens = w.begin(ident, h.tid, h.name)
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.method(*call.args, **call.kwargs)
                if inspect.isawaitable(result):
                    result = await result
                if h.gen and inspect.isasyncgen(result):
                    result = await w.stream_async(ident, h, result)
                elif h.gen:
                    result = w.stream(ident, h, result)
            except BaseException as exc:
                error = exc
            w.end(target, (tokens[0], tokens[1]))
            call.ran = timing(t0, t1, time.perf_counter())
            self._send_outcome(ident, h, call, result, error)

    def _prepare(self, ident: bytes, h: ActorCall, payload: list[Any]) -> _Call | None:
        """The bound method and arguments of a call, or ``None`` after reporting why not."""
        if self.exited:
            if self._answered(h.tid):
                self.worker.send_error(ident, h.tid, self.exit_error(), "exc")
            return None
        loaded: list[str] = []
        try:
            method = self._method(h)
            args, kwargs = self.worker.load_args(h, payload, loaded)
        except Exception as exc:
            if self._answered(h.tid):
                err = self.worker.task_error(h.name, exc, 0)
                self.worker.send_error(ident, h.tid, err, "exc")
            return None
        return _Call(method, args, kwargs, loaded)

    def _send_outcome(
        self, ident: bytes, h: ActorCall, call: _Call, result: Any, exc: BaseException | None
    ) -> None:
        """Send a concurrent call's result or error; ``exit_actor()`` ends the actor after it."""
        w = self.worker
        call.args, call.kwargs = (), {}  # before asking which argument refs are still alive
        if not self._answered(h.tid):
            return  # cancelled: its caller already has its TaskCancelledError
        kept = w.kept(call.loaded)
        tid, name, nret = h.tid, h.name, h.nret
        why = exit_reason(exc) if exc is not None else None
        if why is not None:
            self.exit_why = why
            # Refuse calls first: the caller may send its next call as soon as it has this answer,
            # and that call reaches the main thread while this thread is still here.
            self.exited = True
            # As in Ray: see main.py.
            w.send_error(ident, tid, self.exit_error(), "exc", kept, ran=call.ran)
            self.exit()
        elif exc is not None:
            w.send_error(ident, tid, w.task_error(name, exc, skip=1), "exc", kept, ran=call.ran)
        else:
            w.send_result(ident, tid, name, nret, result, kept, call.ran)

    def note_exit(self, exc: BaseException) -> None:
        """Remember why the actor is exiting (``exc``: its ``ActorExit`` or ``SystemExit``)."""
        self.exit_why = exit_reason(exc) or self.exit_why

    def exit(self) -> None:
        """``exit_actor()`` or ``sys.exit()`` was called: refuse further calls and let the head
        end us.

        The head kills this worker after recording why, so the actor is never restarted and its
        callers learn that it exited rather than crashed.
        """
        self.exited = True
        self.worker.send(self.head, {"k": Kind.ACTOR_EXIT, "aid": self.aid, "why": self.exit_why})

    def refuse(self, ident: bytes, h: ActorCall) -> bool:
        """Answer a call that arrived after ``exit_actor()``; returns whether it did."""
        if not self.exited:
            return False
        self.worker.send_error(ident, h.tid, self.exit_error(), "exc")
        return True

    def exit_error(self) -> ActorDiedError:
        """What callers of this actor get once it called ``exit_actor()`` or ``sys.exit()``."""
        return ActorDiedError(f"the actor {self.cls_name} {self.exit_why}")


def exit_reason(exc: BaseException) -> str | None:
    """Why an exception raised by actor code ends the actor (``None``: it does not).

    As in Ray, ``exit_actor()`` and ``sys.exit()`` (``SystemExit``) inside an actor end the
    actor, never the process that called it.
    """
    if isinstance(exc, ActorExit):
        return "called exit_actor()"
    if isinstance(exc, SystemExit):
        return f"called sys.exit({'' if exc.code is None else repr(exc.code)})"
    return None
