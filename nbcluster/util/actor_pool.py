"""``ray.util.ActorPool``: spread calls over a fixed set of actors, one call per actor at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from nbcluster.api import get, wait
from nbcluster.refs import ObjectRef

_TIMEOUT_MSG = "Timed out waiting for result"


def _refs(future: Any) -> list[ObjectRef]:
    """The refs of what ``fn`` returned: one ref, or a list of them (``num_returns > 1``)."""
    return list(future) if isinstance(future, list | tuple) else [future]


def _key(future: Any) -> Any:
    return tuple(future) if isinstance(future, list) else future


class ActorPool:
    """A pool of actors that takes work as actors become free (Ray's ``ray.util.ActorPool``).

    Each submitted value goes to an idle actor through ``fn(actor, value)``, which must start an
    actor call and return its ``ObjectRef`` (or a list of refs). The actor counts as busy until
    its result is taken with :meth:`get_next` or :meth:`get_next_unordered`; values submitted
    while every actor is busy wait in the pool, in order, and start as actors come back.

    Parameters
    ----------
    actors
        The actor handles to use. The pool does not own them: killing them is the caller's job.

    Examples
    --------
    >>> pool = ActorPool([Doubler.remote(), Doubler.remote()])  # doctest: +SKIP
    >>> list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3]))  # doctest: +SKIP
    [2, 4, 6]
    """

    def __init__(self, actors: Iterable[Any]) -> None:
        self._idle_actors: list[Any] = list(actors)
        self._future_to_actor: dict[Any, tuple[int, Any]] = {}
        self._index_to_future: dict[int, Any] = {}
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending_submits: list[tuple[Callable[[Any, Any], Any], Any]] = []

    def map(self, fn: Callable[[Any, Any], Any], values: Iterable[Any]) -> Iterator[Any]:
        """Apply ``fn`` to every value; yields the results in the order of ``values``.

        Every value is submitted before this returns. Results not yet taken from earlier
        submissions are dropped first (as in Ray).

        Parameters
        ----------
        fn
            ``fn(actor, value)`` starts one actor call and returns its ``ObjectRef``.
        values
            The inputs.

        Returns
        -------
        Iterator
            The results; taking one re-raises the error of a failed call.
        """
        self._drop_unreturned()
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next()

        return results()

    def map_unordered(self, fn: Callable[[Any, Any], Any], values: Iterable[Any]) -> Iterator[Any]:
        """As :meth:`map`, but yields each result as soon as it is ready (completion order)."""
        self._drop_unreturned()
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next_unordered()

        return results()

    def submit(self, fn: Callable[[Any, Any], Any], value: Any) -> None:
        """Start ``fn(actor, value)`` on an idle actor, or queue it until one is free.

        Take the result with :meth:`get_next` (submission order) or :meth:`get_next_unordered`.
        """
        if self._idle_actors:
            actor = self._idle_actors.pop()
            future = fn(actor, value)
            self._future_to_actor[_key(future)] = (self._next_task_index, actor)
            self._index_to_future[self._next_task_index] = future
            self._next_task_index += 1
        else:
            self._pending_submits.append((fn, value))

    def has_next(self) -> bool:
        """Whether a submitted value's result is still to be taken."""
        return bool(self._future_to_actor)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The result of the next submitted value, in submission order (waits for it).

        Parameters
        ----------
        timeout
            Seconds to wait; ``None`` waits as long as it takes.
        ignore_if_timedout
            On a timeout, drop that value's result (its actor returns to the pool) before raising,
            so that the next call moves on to the following value.

        Raises
        ------
        StopIteration
            If there is no result to take.
        ValueError
            After :meth:`get_next_unordered` took results out of order.
        TimeoutError
            If the result is not ready within ``timeout`` seconds.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        future = self._index_to_future[self._next_return_index]
        timed_out = False
        if timeout is not None:
            refs = _refs(future)
            ready, _ = wait(refs, num_returns=len(refs), timeout=timeout)
            if len(ready) < len(refs):
                if not ignore_if_timedout:
                    raise TimeoutError(_TIMEOUT_MSG)
                timed_out = True
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(_key(future))
        self._return_actor(actor)
        if timed_out:
            raise TimeoutError(f"{_TIMEOUT_MSG}. The task {future} has been ignored.")
        return get(future)

    def get_next_unordered(
        self, timeout: float | None = None, ignore_if_timedout: bool = False
    ) -> Any:
        """The result of whichever submitted value finishes first (waits for one).

        After this, :meth:`get_next` raises ``ValueError``: the order is lost.

        Parameters
        ----------
        timeout
            Seconds to wait; ``None`` waits as long as it takes.
        ignore_if_timedout
            On a timeout, drop the oldest outstanding value's result (its actor returns to the
            pool) before raising.

        Raises
        ------
        StopIteration
            If there is no result to take.
        TimeoutError
            If no result is ready within ``timeout`` seconds.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        key = self._first_done(timeout)
        timed_out = key is None
        if key is None:
            if not ignore_if_timedout:
                raise TimeoutError(_TIMEOUT_MSG)
            key = min(self._future_to_actor, key=lambda k: self._future_to_actor[k][0])
        index, actor = self._future_to_actor.pop(key)
        future = self._index_to_future.pop(index)
        self._return_actor(actor)
        self._next_return_index = max(self._next_return_index, index + 1)
        if timed_out:
            raise TimeoutError(f"{_TIMEOUT_MSG}. The task {future} has been ignored.")
        return get(future)

    def has_free(self) -> bool:
        """Whether an actor is idle and no submitted value is waiting for one."""
        return bool(self._idle_actors) and not self._pending_submits

    def pop_idle(self) -> Any | None:
        """Take an idle actor out of the pool (``None`` if none is free, see :meth:`has_free`)."""
        if self.has_free():
            return self._idle_actors.pop()
        return None

    def push(self, actor: Any) -> None:
        """Add ``actor`` to the pool (it starts a waiting value at once, if there is one).

        Raises
        ------
        ValueError
            If ``actor`` already belongs to this pool, idle or busy.
        """
        busy = [a for _, a in self._future_to_actor.values()]
        if any(actor is a or actor == a for a in [*self._idle_actors, *busy]):
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)

    def _return_actor(self, actor: Any) -> None:
        self._idle_actors.append(actor)
        if self._pending_submits:
            self.submit(*self._pending_submits.pop(0))

    def _first_done(self, timeout: float | None) -> Any | None:
        """The key of an outstanding call whose refs are all ready, or ``None`` at ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done: set[ObjectRef] = set()
        while True:
            for key in self._future_to_actor:
                if all(r in done for r in _refs(key)):
                    return key
            waiting = [r for key in self._future_to_actor for r in _refs(key) if r not in done]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = wait(waiting, num_returns=1, timeout=left)
            if not ready:
                return None
            done.update(ready)

    def _drop_unreturned(self) -> None:
        """Forget the results not yet taken (Ray's ``map`` does this before it submits)."""
        while self.has_next():
            index = min(self._index_to_future)
            future = self._index_to_future.pop(index)
            _, actor = self._future_to_actor.pop(_key(future))
            self._next_return_index = max(self._next_return_index, index + 1)
            self._return_actor(actor)
