"""Hosting one actor in a worker process: creation, calls (sequential, threaded or async), exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbcluster import context
from nbcluster.cells import EXEC_METHOD, run_cell
from nbcluster.context import ActorExit
from nbcluster.exceptions import ActorDiedError
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import ActorCall, ActorInit
from nbcluster.serialization import loads, restore_filenames

if TYPE_CHECKING:
    from nbcluster.worker.main import Worker


@dataclass
class _Call:
    method: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loaded: list[str]


class ActorHost:
    """The actor instance living in this worker and the machinery that runs its methods.

    Sync actors with ``max_concurrency=1`` run calls on the main thread in arrival order (which is
    each caller's submission order). ``max_concurrency=N`` runs sync methods on N threads; an actor
    with ``async def`` methods runs them concurrently on one event loop.
    """

    def __init__(
        self,
        worker: Worker,
        aid: str,
        cls_name: str,
        head: bytes,
        max_concurrency: int,
        is_async: bool,
    ) -> None:
        self.worker = worker
        self.aid = aid
        self.cls_name = cls_name
        self.head = head
        self.instance: Any = None
        self.is_async = is_async
        self.max_concurrency = max_concurrency
        self.concurrent = is_async or max_concurrency > 1
        self.assigned: dict[str, Any] = {}
        self.exited = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None

    @classmethod
    def create(
        cls, worker: Worker, head: bytes, h: ActorInit, payload: list[Any]
    ) -> ActorHost | None:
        """Instantiate the actor; tells the head whether ``__init__`` succeeded."""
        worker.bind(h.job_id, h.sys_path)
        worker.set_gpus(h.gpus)
        aid = h.aid
        host = cls(worker, aid, h.cls_name, head, h.max_concurrency or 1, h.is_async)
        worker.actor = host
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
            err = worker.task_error(f"{host.cls_name}.__init__", exc, skip=1)
            worker.send(head, {"k": Kind.ACTOR_FAILED, "aid": aid}, worker.error_frames(err))
            worker.actor = None
            return None
        finally:
            worker.stdout.default = worker.stderr.default = None
            target.partial.clear()  # __init__ output has no driver to go to yet
            worker.end(target, (tokens[0], tokens[1]))
        if host.is_async:
            host._start_loop()
        elif host.max_concurrency > 1:
            host._pool = concurrent.futures.ThreadPoolExecutor(
                host.max_concurrency, thread_name_prefix=f"{host.cls_name}-call"
            )
        worker.send(head, {"k": Kind.ACTOR_READY, "aid": aid})
        return host

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._sem = asyncio.Semaphore(
                self.max_concurrency if self.max_concurrency > 1 else 1000
            )
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
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._call_async(ident, h, payload), self._loop)
        elif self._pool is not None:
            self._pool.submit(self._call_threaded, ident, h, payload)

    def _call_threaded(self, ident: bytes, h: ActorCall, payload: list[Any]) -> None:
        call = self._prepare(ident, h, payload)
        if call is None:
            return
        w = self.worker
        target, *tokens = w.begin(ident, h.tid, h.name)
        result: Any = None
        error: BaseException | None = None
        try:
            result = call.method(*call.args, **call.kwargs)
        except BaseException as exc:
            error = exc
        w.end(target, (tokens[0], tokens[1]))
        self._send_outcome(ident, h, call, result, error)

    async def _call_async(self, ident: bytes, h: ActorCall, payload: list[Any]) -> None:
        assert self._sem is not None
        async with self._sem:
            call = self._prepare(ident, h, payload)
            if call is None:
                return
            w = self.worker
            target, *tokens = w.begin(ident, h.tid, h.name)
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.method(*call.args, **call.kwargs)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as exc:
                error = exc
            w.end(target, (tokens[0], tokens[1]))
            self._send_outcome(ident, h, call, result, error)

    def _prepare(self, ident: bytes, h: ActorCall, payload: list[Any]) -> _Call | None:
        """The bound method and arguments of a call, or ``None`` after reporting why not."""
        if self.refuse(ident, h):
            return None
        loaded: list[str] = []
        try:
            method = self._method(h)
            args, kwargs = self.worker.load_args(h, payload, loaded)
        except Exception as exc:
            self.worker.send_error(ident, h.tid, self.worker.task_error(h.name, exc, 0), "exc")
            return None
        return _Call(method, args, kwargs, loaded)

    def _send_outcome(
        self, ident: bytes, h: ActorCall, call: _Call, result: Any, exc: BaseException | None
    ) -> None:
        """Send a concurrent call's result or error; ``exit_actor()`` ends the actor after it."""
        w = self.worker
        call.args, call.kwargs = (), {}  # before asking which argument refs are still alive
        kept = w.kept(call.loaded)
        tid, name, nret = h.tid, h.name, h.nret
        if isinstance(exc, ActorExit):
            w.send_error(ident, tid, self.exit_error(), "exc", kept)  # as in Ray: see main.py
            self.exit()
        elif exc is not None:
            w.send_error(ident, tid, w.task_error(name, exc, skip=1), "exc", kept)
        else:
            w.send_result(ident, tid, name, nret, result, kept)

    def exit(self) -> None:
        """``exit_actor()`` was called: refuse further calls and let the head end us.

        The head kills this worker after recording why, so the actor is never restarted and its
        callers learn that it exited rather than crashed.
        """
        self.exited = True
        self.worker.send(self.head, {"k": Kind.ACTOR_EXIT, "aid": self.aid})

    def refuse(self, ident: bytes, h: ActorCall) -> bool:
        """Answer a call that arrived after ``exit_actor()``; returns whether it did."""
        if not self.exited:
            return False
        self.worker.send_error(ident, h.tid, self.exit_error(), "exc")
        return True

    def exit_error(self) -> ActorDiedError:
        """What callers of this actor get once it called ``exit_actor()``."""
        return ActorDiedError(f"the actor {self.cls_name} called exit_actor()")
