"""``ray.util.multiprocessing``: a ``multiprocessing.Pool`` whose processes are cluster actors."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from multiprocessing import TimeoutError
from typing import Any

from nbcluster.actor import kill
from nbcluster.api import cluster_resources, get, init, is_initialized, wait
from nbcluster.refs import ObjectRef
from nbcluster.remote import remote

__all__ = ["AsyncResult", "IMapIterator", "Pool", "TimeoutError"]


class _PoolActor:
    """One pool process: runs the initializer once, then chunks of calls in order."""

    def __init__(self, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
        if initializer is not None:
            initializer(*initargs)

    def run_batch(
        self, fn: Callable[..., Any], chunk: list[Any], star: bool
    ) -> tuple[list[Any] | None, BaseException | None]:
        # The error travels as a value so the caller re-raises the function's own exception,
        # as multiprocessing does (not a wrapper naming the actor).
        try:
            return [fn(*item) if star else fn(item) for item in chunk], None
        except Exception as exc:
            return None, exc

    def stop(self) -> None:
        from nbcluster.actor import exit_actor

        exit_actor()


def _unpack(value: tuple[list[Any] | None, BaseException | None]) -> list[Any]:
    results, error = value
    if error is not None:
        raise error
    assert results is not None
    return results


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class AsyncResult:
    """The result of :meth:`Pool.apply_async` or :meth:`Pool.map_async` (stdlib's interface).

    Completion comes from the refs' futures (no thread per result); ``callback`` (with the value)
    or ``error_callback`` (with the exception) runs on the pool's one callback thread, as in the
    standard library.
    """

    def __init__(
        self,
        refs: list[ObjectRef],
        single: bool,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
        callbacks: concurrent.futures.Executor | None = None,
    ) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._value: Any = None
        self._error: BaseException | None = None
        self._single = single
        self._refs = refs  # keeps the chunks' objects alive until they are read
        self._parts: list[list[Any]] = [[] for _ in refs]
        self._remaining = len(refs)
        self._callback = callback
        self._error_callback = error_callback
        self._callbacks = callbacks
        if not refs:
            self._finish()
        for i, ref in enumerate(refs):
            ref.future().add_done_callback(functools.partial(self._one_done, i))

    def _one_done(self, index: int, fut: concurrent.futures.Future[Any]) -> None:
        # On the client's I/O thread (or a fetch thread): record, never run user code here.
        try:
            part, error = _unpack(fut.result()), None
        except BaseException as exc:  # the function's error, or the task's failure
            part, error = [], exc
        with self._lock:
            if self._done.is_set():
                return
            if error is not None:
                self._error = error
            else:
                self._parts[index] = part
                self._remaining -= 1
                if self._remaining:
                    return
        self._finish()

    def _finish(self) -> None:
        if self._error is None:
            results = [v for part in self._parts for v in part]
            self._value = results[0] if self._single and results else results
        self._parts = []
        self._done.set()
        wanted = self._callback if self._error is None else self._error_callback
        if wanted is not None and self._callbacks is not None:
            with contextlib.suppress(RuntimeError):  # the pool was terminated
                self._callbacks.submit(self._run_callback, wanted)

    def _run_callback(self, fn: Callable[[Any], Any]) -> None:
        try:
            fn(self._value if self._error is None else self._error)
        except Exception:  # a failing callback must not go unseen
            logging.getLogger("nbcluster").exception("pool result callback failed")

    def get(self, timeout: float | None = None) -> Any:
        """The value; re-raises the function's exception.

        Raises
        ------
        multiprocessing.TimeoutError
            If it is not ready within ``timeout`` seconds.
        """
        if not self._done.wait(timeout):
            raise TimeoutError("Result not ready within the timeout")
        if self._error is not None:
            raise self._error
        return self._value

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is ready, or ``timeout`` seconds."""
        self._done.wait(timeout)

    def ready(self) -> bool:
        """Whether the call has finished."""
        return self._done.is_set()

    def successful(self) -> bool:
        """Whether the call finished without raising.

        Raises
        ------
        ValueError
            If the result is not ready yet.
        """
        if not self._done.is_set():
            raise ValueError("AsyncResult is not ready")
        return self._error is None


class IMapIterator:
    """The iterator of :meth:`Pool.imap` and :meth:`Pool.imap_unordered`.

    ``next(timeout)`` raises ``multiprocessing.TimeoutError`` when no result comes in time.
    """

    def __init__(self, refs: list[ObjectRef], ordered: bool) -> None:
        self._pending = list(refs)
        self._ordered = ordered
        self._buffer: list[Any] = []

    def __iter__(self) -> IMapIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result: in order for ``imap``, the next one done for ``imap_unordered``."""
        while not self._buffer:
            if not self._pending:
                raise StopIteration
            if self._ordered:
                ready, _ = wait(self._pending[:1], num_returns=1, timeout=timeout)
            else:
                ready, _ = wait(self._pending, num_returns=1, timeout=timeout)
            if not ready:
                raise TimeoutError("No result ready within the timeout")
            self._pending.remove(ready[0])
            self._buffer.extend(_unpack(get(ready[0])))
        return self._buffer.pop(0)


class Pool:
    """Processes for ``multiprocessing.Pool`` code (Ray's ``util.multiprocessing.Pool``).

    Each process is an actor of the cluster holding one CPU; work is sent in chunks of
    ``chunksize`` items, round robin. Functions and arguments are pickled with cloudpickle, so
    lambdas and functions of a notebook work.

    Parameters
    ----------
    processes
        Number of actors; by default the cluster's CPU count.
    initializer, initargs
        Called as ``initializer(*initargs)`` once in each process.
    maxtasksperchild
        After this many chunks a process is replaced by a fresh one (its queued work finishes
        first).
    context
        Accepted for signature compatibility with ``multiprocessing.Pool``; ignored.
    ray_address
        The cluster to join (``init(address=...)``) when none is connected yet; else the current
        one is used (started if needed).
    ray_remote_args
        Options of the actors (``num_cpus`` 1 by default, ``num_gpus``, ``resources``...).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] | None = None,
        maxtasksperchild: int | None = None,
        context: Any = None,
        ray_address: str | None = None,
        ray_remote_args: dict[str, Any] | None = None,
    ) -> None:
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild < 1
        ):
            raise ValueError("maxtasksperchild must be a positive integer or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if ray_address is not None and not is_initialized():
            init(address=ray_address)  # as Ray: join that cluster when none is connected yet
        if processes is None:
            processes = max(1, int(cluster_resources().get("CPU", 1)))
        self._initializer = initializer
        self._initargs = tuple(initargs or ())
        self._maxtasks = maxtasksperchild
        self._actor_cls = remote(**{"num_cpus": 1, **(ray_remote_args or {})})(_PoolActor)
        self._actors = [self._new_actor() for _ in range(processes)]
        self._counts = [0] * processes
        self._next = itertools.count()
        self._running = True
        self._outstanding: list[ObjectRef] = []
        self._lock = threading.Lock()
        self._results: list[AsyncResult] = []
        self._callbacks = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="nbcluster-pool-callbacks"
        )

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self._initializer, self._initargs)

    # --- submission ----------------------------------------------------------------------------

    def _check_running(self) -> None:
        if not self._running:
            raise ValueError("Pool not running")

    def _submit_chunk(self, fn: Callable[..., Any], chunk: list[Any], star: bool) -> ObjectRef:
        with self._lock:
            i = next(self._next) % len(self._actors)
            if self._maxtasks is not None and self._counts[i] >= self._maxtasks:
                # Queued after the chunks already sent, so they finish before the process goes.
                self._actors[i].stop.remote()
                self._actors[i] = self._new_actor()
                self._counts[i] = 0
            self._counts[i] += 1
            ref: ObjectRef = self._actors[i].run_batch.remote(fn, chunk, star)
            self._outstanding.append(ref)
            if len(self._outstanding) > 256:  # forget the finished ones now and then
                _, self._outstanding = wait(
                    self._outstanding, num_returns=len(self._outstanding), timeout=0
                )
            return ref

    def _track(self, result: AsyncResult) -> AsyncResult:
        with self._lock:  # join() waits for these, callbacks included
            self._results = [r for r in self._results if not r.ready()] + [result]
        return result

    def _chunksize(self, n: int, chunksize: int | None) -> int:
        if chunksize is not None:
            if not isinstance(chunksize, int) or chunksize < 1:
                raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
            return chunksize
        size, extra = divmod(n, len(self._actors) * 4)  # as multiprocessing.Pool
        return size + 1 if extra else max(size, 1)

    def _map_refs(
        self, fn: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None, star: bool
    ) -> list[ObjectRef]:
        self._check_running()
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        items = list(iterable)
        if star:
            items = [tuple(a) for a in items]
        size = self._chunksize(len(items), chunksize)
        return [self._submit_chunk(fn, c, star) for c in _chunks(items, size)]

    # --- the multiprocessing.Pool interface ----------------------------------------------------

    def apply(
        self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        """Call ``func(*args, **kwds)`` in a pool process and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """Start ``func(*args, **kwds)`` in a pool process; returns an :class:`AsyncResult`."""
        self._check_running()
        if not callable(func):
            raise TypeError(f"{type(func).__name__!r} object is not callable")
        call = _Call(func, dict(kwds or {}))
        ref = self._submit_chunk(call, [tuple(args)], True)
        return self._track(AsyncResult([ref], True, callback, error_callback, self._callbacks))

    def map(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        """``[func(x) for x in iterable]``, computed by the pool; re-raises the first error."""
        result: list[Any] = self.map_async(func, iterable, chunksize).get()
        return result

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """Start :meth:`map`; returns an :class:`AsyncResult` of the list."""
        refs = self._map_refs(func, iterable, chunksize, False)
        return self._track(AsyncResult(refs, False, callback, error_callback, self._callbacks))

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[Any]:
        """``[func(*args) for args in iterable]``, computed by the pool."""
        result: list[Any] = self.starmap_async(func, iterable, chunksize).get()
        return result

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """Start :meth:`starmap`; returns an :class:`AsyncResult` of the list."""
        refs = self._map_refs(func, iterable, chunksize, True)
        return self._track(AsyncResult(refs, False, callback, error_callback, self._callbacks))

    def imap(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """Results of ``func`` over ``iterable`` in order, each once it and those before are."""
        return IMapIterator(self._map_refs(func, iterable, chunksize, False), ordered=True)

    def imap_unordered(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """Results of ``func`` over ``iterable`` in the order they finish."""
        return IMapIterator(self._map_refs(func, iterable, chunksize, False), ordered=False)

    def close(self) -> None:
        """Accept no more work; the processes end once :meth:`join` has seen the work done."""
        self._running = False

    def terminate(self) -> None:
        """Stop now: kill every process (work not finished fails)."""
        self._running = False
        self._callbacks.shutdown(wait=False)
        with self._lock:
            actors, self._actors = self._actors, []
        for a in actors:
            try:
                kill(a)
            except Exception:
                pass

    def join(self) -> None:
        """Wait for the submitted work to finish, then end the processes.

        Raises
        ------
        ValueError
            If the pool was not closed (or terminated) first.
        """
        if self._running:
            raise ValueError("Pool is still running")
        with self._lock:
            pending, results = list(self._outstanding), list(self._results)
        if pending:
            wait(pending, num_returns=len(pending))
        for r in results:
            r.wait()
        self._callbacks.shutdown(wait=True)  # the callbacks of that work have run
        self.terminate()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


class _Call:
    """``func`` with keyword arguments bound, for :meth:`Pool.apply_async`."""

    def __init__(self, func: Callable[..., Any], kwds: dict[str, Any]) -> None:
        self.func = func
        self.kwds = kwds

    def __call__(self, *args: Any) -> Any:
        return self.func(*args, **self.kwds)
