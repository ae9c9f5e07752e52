"""``ray.util.queue``: a first-in first-out queue held by an actor, shared by tasks and actors."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterable
from typing import Any

from nbcluster.actor import ActorHandle, kill
from nbcluster.api import get, wait
from nbcluster.exceptions import ActorDiedError
from nbcluster.remote import remote

__all__ = ["Empty", "Full", "Queue"]

# The actor answers (_OK, value) or (_EMPTY / _FULL, message); the caller raises Empty or Full
# itself, so callers catch exactly those (not a remote error wrapping them).
_OK, _EMPTY, _FULL = "ok", "empty", "full"


class Empty(queue.Empty):
    """Raised by ``get`` when the queue stays empty (``queue.Empty``, as Ray's)."""


class Full(queue.Full):
    """Raised by ``put`` when the queue stays full (``queue.Full``, as Ray's)."""


class _QueueActor:
    """The actor that holds the items: an ``asyncio.Queue``, so blocked calls wait concurrently."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.queue.qsize()

    async def empty(self) -> bool:
        return self.queue.empty()

    async def full(self) -> bool:
        return self.queue.full()

    async def put(self, item: Any, timeout: float | None = None) -> tuple[str, Any]:
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except TimeoutError:
            return _FULL, ""
        return _OK, None

    async def get(self, timeout: float | None = None) -> tuple[str, Any]:
        try:
            return _OK, await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return _EMPTY, ""

    async def put_nowait(self, item: Any) -> tuple[str, Any]:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return _FULL, ""
        return _OK, None

    async def put_nowait_batch(self, items: list[Any]) -> tuple[str, Any]:
        if self.maxsize > 0 and len(items) + self.queue.qsize() > self.maxsize:
            return _FULL, (
                f"Cannot add {len(items)} items to queue of size {self.queue.qsize()} "
                f"and maxsize {self.maxsize}."
            )
        for item in items:
            self.queue.put_nowait(item)
        return _OK, None

    async def get_nowait(self) -> tuple[str, Any]:
        try:
            return _OK, self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return _EMPTY, ""

    async def get_nowait_batch(self, num_items: int) -> tuple[str, Any]:
        if num_items > self.queue.qsize():
            return _EMPTY, f"Cannot get {num_items} items from queue of size {self.queue.qsize()}."
        return _OK, [self.queue.get_nowait() for _ in range(num_items)]

    async def terminate(self) -> None:
        from nbcluster.actor import exit_actor

        exit_actor()


_RemoteQueueActor = remote(_QueueActor)


def _unwrap(answer: tuple[str, Any]) -> Any:
    status, value = answer
    if status == _EMPTY:
        raise Empty(value) if value else Empty
    if status == _FULL:
        raise Full(value) if value else Full
    return value


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


class Queue:
    """A first-in first-out queue that tasks and actors share (Ray's ``ray.util.queue.Queue``).

    The items live in an actor created with the queue. A ``Queue`` can be passed to tasks and
    actors: it travels as the handle of that actor, so every copy is the same queue.

    Parameters
    ----------
    maxsize
        Most items the queue holds; ``0`` (the default) means no limit.
    actor_options
        Options for the queue's actor, as for ``Cls.options(...)`` (``num_cpus``, ``name``,
        ``lifetime``, ...).

    Examples
    --------
    >>> q = Queue(maxsize=10)  # doctest: +SKIP
    >>> q.put(1); q.get(timeout=5)  # doctest: +SKIP
    1
    """

    def __init__(self, maxsize: int = 0, actor_options: dict[str, Any] | None = None) -> None:
        self.maxsize = maxsize
        self.actor: ActorHandle | None = _RemoteQueueActor.options(**(actor_options or {})).remote(
            maxsize
        )

    def _handle(self) -> ActorHandle:
        if self.actor is None:
            raise RuntimeError("the queue was shut down")
        return self.actor

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue."""
        return int(get(self._handle().qsize.remote()))

    def qsize(self) -> int:
        """The number of items in the queue (as :meth:`size`)."""
        return self.size()

    def empty(self) -> bool:
        """Whether the queue holds no item."""
        return bool(get(self._handle().empty.remote()))

    def full(self) -> bool:
        """Whether the queue holds ``maxsize`` items (never, for ``maxsize=0``)."""
        return bool(get(self._handle().full.remote()))

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add ``item`` at the end of the queue.

        Parameters
        ----------
        item
            Any picklable value.
        block
            Wait for room when the queue is full (else raise ``Full`` at once).
        timeout
            With ``block``: seconds to wait for room; ``None`` waits as long as it takes.

        Raises
        ------
        Full
            If there is no room (``block=False``), or none came within ``timeout``.
        ValueError
            If ``timeout`` is negative.
        """
        if not block:
            _unwrap(get(self._handle().put_nowait.remote(item)))
            return
        _check_timeout(timeout)
        _unwrap(get(self._handle().put.remote(item, timeout)))

    async def put_async(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """As :meth:`put`, awaited (for async actors and ``asyncio`` code)."""
        if not block:
            _unwrap(await self._handle().put_nowait.remote(item))
            return
        _check_timeout(timeout)
        _unwrap(await self._handle().put.remote(item, timeout))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the first item.

        Parameters
        ----------
        block
            Wait for an item when the queue is empty (else raise ``Empty`` at once).
        timeout
            With ``block``: seconds to wait for an item; ``None`` waits as long as it takes.

        Raises
        ------
        Empty
            If there is no item (``block=False``), or none came within ``timeout``.
        ValueError
            If ``timeout`` is negative.
        """
        if not block:
            return _unwrap(get(self._handle().get_nowait.remote()))
        _check_timeout(timeout)
        return _unwrap(get(self._handle().get.remote(timeout)))

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """As :meth:`get`, awaited (for async actors and ``asyncio`` code)."""
        if not block:
            return _unwrap(await self._handle().get_nowait.remote())
        _check_timeout(timeout)
        return _unwrap(await self._handle().get.remote(timeout))

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``: raises ``Full`` when there is no room."""
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable[Any]) -> None:
        """Add all ``items`` at once, or none of them.

        Raises
        ------
        Full
            If they do not all fit.
        TypeError
            If ``items`` is not iterable.
        """
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        _unwrap(get(self._handle().put_nowait_batch.remote(list(items))))

    def get_nowait(self) -> Any:
        """``get(block=False)``: raises ``Empty`` when there is no item."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list[Any]:
        """Remove and return the first ``num_items`` items, or none of them.

        Raises
        ------
        Empty
            If the queue holds fewer than ``num_items``.
        TypeError, ValueError
            If ``num_items`` is not an int, or is negative.
        """
        if not isinstance(num_items, int):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        return list(_unwrap(get(self._handle().get_nowait_batch.remote(num_items))))

    def shutdown(self, force: bool = False, grace_period_s: float = 5) -> None:
        """End the queue's actor; the items still in it are lost.

        Parameters
        ----------
        force
            Kill the actor at once (else it exits on its own, killed after ``grace_period_s``).
        grace_period_s
            Seconds to wait for the actor to exit before killing it.
        """
        actor, self.actor = self.actor, None
        if actor is None:
            return
        if not force:
            done, _ = wait([actor.terminate.remote()], timeout=grace_period_s)
            if done:
                try:
                    get(done[0])
                except ActorDiedError:
                    return  # exited, as asked
                except Exception:
                    pass
        kill(actor, no_restart=True)
