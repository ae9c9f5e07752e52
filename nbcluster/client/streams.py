"""``StreamBuffer``: the items of one generator task, between the I/O thread and its consumer.

The client's I/O thread (:class:`~nbcluster.client.submission.Tasks`) appends the id of each
item as its ``STREAM_ITEM`` arrives and marks the stream done when the task's result (the
generator's end) is in; the user thread behind an
:class:`~nbcluster.generators.ObjectRefGenerator` takes them in order, blocking or awaiting.
Until taken, each item is held by the buffer (one count in the object table).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

#: ``gen`` of ``TASK``/``ACTOR_CALL``: a streaming generator (``num_returns="streaming"``).
STREAMING = 1
#: ``gen``: Ray's older dynamic generator (``num_returns="dynamic"``).
DYNAMIC = 2


class StreamBuffer:
    """Item ids of a generator task, in order, and whether it has ended.

    Parameters
    ----------
    tid
        The task id (item ``i`` is the object ``{tid}.{i+1}``).
    mode
        :data:`STREAMING` or :data:`DYNAMIC`.
    backpressure
        Pause the worker when this many items are unconsumed (0: never).
    """

    def __init__(self, tid: str, mode: int, backpressure: int = 0) -> None:
        self.tid = tid
        self.mode = mode
        self.backpressure = backpressure
        self.items: list[str] = []  # every item received (appended by the I/O thread only)
        self.taken = 0  # items handed to the consumer
        self.done = False
        self.closed = False  # the consumer is gone: items are no longer held
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        #: Called (I/O thread) with each item count received; the notebook's progress.
        self.on_item: Callable[[int], None] | None = None

    def item_id(self, i: int) -> str:
        """The object id of item ``i`` (from 0)."""
        return f"{self.tid}.{i + 1}"

    # ------------------------------------------------------------------ I/O thread
    def push(self, oid: str) -> bool:
        """Item ``len(items)`` arrived; ``False`` if the consumer is gone (nobody holds it)."""
        with self._cond:
            if self.closed:
                return False
            self.items.append(oid)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        self._wake(waiters)
        return True

    def finish(self) -> None:
        """The task ended (its last item, if any, arrived before)."""
        with self._cond:
            self.done = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        self._wake(waiters)

    @staticmethod
    def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_settle, fut)
            except RuntimeError:  # its loop is closed: nobody waits any more
                pass

    # ------------------------------------------------------------------ consumer
    def ready(self) -> bool:
        """Whether :meth:`take` would not block (an item is here, or the stream ended)."""
        with self._cond:
            return self.taken < len(self.items) or self.done

    def take(self, timeout: float | None) -> tuple[str | None, bool]:
        """The next item's id, waiting up to ``timeout`` seconds.

        Returns ``(oid, True)`` for an item, ``(None, True)`` once the stream ended with every
        item taken, ``(None, False)`` on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.taken >= len(self.items) and not self.done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None, False
                # Bounded waits: a KeyboardInterrupt in a notebook is seen promptly.
                self._cond.wait(0.5 if left is None else min(left, 0.5))
            return self._next()

    async def take_async(self) -> tuple[str | None, bool]:
        """:meth:`take` for an event loop (never blocks the loop)."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self.taken < len(self.items) or self.done:
                    return self._next()
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    def _next(self) -> tuple[str | None, bool]:
        if self.taken < len(self.items):
            oid = self.items[self.taken]
            self.taken += 1
            return oid, True
        return None, True

    def close(self) -> list[str]:
        """The consumer is gone: returns the ids received but never taken (still held)."""
        with self._cond:
            self.closed = True
            left = self.items[self.taken :]
            self.taken = len(self.items)
            return left


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
