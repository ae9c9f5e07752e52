"""Ray's generator results: ``ObjectRefGenerator`` (streaming) and ``DynamicObjectRefGenerator``.

A remote generator function (or actor method) run with ``num_returns="streaming"`` (the default
for generator functions) returns an :class:`ObjectRefGenerator` at once; the refs of the values
it yields arrive while it runs. With ``num_returns="dynamic"`` the task returns one ref whose
value, once the task is done, is a :class:`DynamicObjectRefGenerator` of the refs of every value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from nbcluster.client.objects import FAILED
from nbcluster.client.streams import StreamBuffer
from nbcluster.exceptions import GetTimeoutError
from nbcluster.refs import ObjectRef


class ObjectRefGenerator:
    """The refs of the values a streaming generator task yields, in order, as they arrive.

    Iterate it (``for ref in gen``, ``next(gen)``) or ``async for ref in gen``; each step waits
    for the next value's ref. If the task raises after yielding ``k`` values, the first ``k``
    refs are good and the next one raises the task's error when got; then iteration stops.

    Parameters
    ----------
    ref
        The ref of the task's end (:meth:`completed`).
    buffer
        The items as the client receives them.
    client
        The ``CoreClient`` that submitted the task.
    """

    def __init__(self, ref: ObjectRef, buffer: StreamBuffer, client: Any) -> None:
        self._ref = ref
        self._buffer = buffer
        self._client = client
        self._error_given = False
        self._progress: Any = None  # the notebook's count (False outside a notebook)
        self._progress_closed = False

    # ------------------------------------------------------------------ sync
    def __iter__(self) -> ObjectRefGenerator:
        return self

    def __next__(self) -> ObjectRef:
        return self._next_sync()

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next ref, waiting up to ``timeout_s`` seconds (Ray's name).

        Raises
        ------
        StopIteration
            When the task ended and every ref was taken.
        GetTimeoutError
            If none arrived within ``timeout_s``.
        """
        buffer, client = self._buffer, self._client
        # A task waiting for another's values lends its CPUs back meanwhile (as get does).
        blocked = bool(client.worker_id) and not buffer.ready()
        if blocked:
            client.set_blocked(True)
        try:
            oid, got = buffer.take(timeout_s)
        finally:
            if blocked:
                client.set_blocked(False)
        if not got:
            raise GetTimeoutError(f"no new item of {self._ref.task_id()} within {timeout_s} s")
        return self._deliver(oid)

    def next_ready(self) -> bool:
        """Whether ``next()`` would return at once (a ref arrived, or the stream ended)."""
        return self._buffer.ready()

    # ------------------------------------------------------------------ async
    def __aiter__(self) -> ObjectRefGenerator:
        return self

    async def __anext__(self) -> ObjectRef:
        buffer, client = self._buffer, self._client
        blocked = bool(client.worker_id) and not buffer.ready()
        if blocked:
            client.set_blocked(True)
        try:
            oid, _ = await buffer.take_async()
        finally:
            if blocked:
                client.set_blocked(False)
        try:
            return self._deliver(oid)
        except StopIteration:
            raise StopAsyncIteration from None

    # ------------------------------------------------------------------ state
    def completed(self) -> ObjectRef:
        """A ref that is ready when the task has ended (its ``get`` raises the task's error)."""
        return self._ref

    def is_finished(self) -> bool:
        """Whether the task ended and every ref was taken."""
        b = self._buffer
        return b.done and b.taken >= len(b.items)

    def task_id(self) -> str:
        """The generator task's id."""
        return self._ref.task_id()

    def _deliver(self, oid: str | None) -> ObjectRef:
        client = self._client
        if oid is not None:
            ref = ObjectRef(oid, client.owner_address, client)
            client.remove_local_ref(oid)  # the buffer's hold: the ref holds it now
            self._consumed()
            return ref
        self._finish_progress()
        e = client.objects.get(self._ref.oid)
        if e is not None and e.state == FAILED and not self._error_given:
            self._error_given = True  # the ref after the last good one raises the error
            return self._ref
        raise StopIteration

    def _consumed(self) -> None:
        b = self._buffer
        if b.backpressure > 0:
            client = self._client
            client.stream_consumed(b.tid, b.taken)
        if self._progress is None:
            from nbcluster.progress import stream_progress

            self._progress = stream_progress(self._ref.task_id()) or False
        if self._progress:
            self._progress.update(b.taken)

    def _finish_progress(self) -> None:
        if self._progress and not self._progress_closed:
            self._progress_closed = True
            self._progress.close(self._buffer.taken)

    def __del__(self) -> None:
        buffer = getattr(self, "_buffer", None)
        if buffer is None:
            return
        try:
            left = buffer.close()
            for oid in left:
                self._client.remove_local_ref(oid)
            if buffer.backpressure > 0 and not buffer.done:
                self._client.stream_consumed(buffer.tid, 2**62)  # let the worker run to its end
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._ref.task_id()})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "an ObjectRefGenerator cannot be passed to another task or pickled (as in Ray); "
            "pass the refs it yields"
        )


class DynamicObjectRefGenerator:
    """The value of a ``num_returns="dynamic"`` task: the refs of every value it yielded.

    Iterate it (``for ref in ray.get(gen_ref)``); ``len()`` gives their number.
    """

    def __init__(self, refs: list[ObjectRef]) -> None:
        self._refs = list(refs)

    def __iter__(self) -> Iterator[ObjectRef]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"


__all__ = ["DynamicObjectRefGenerator", "ObjectRefGenerator"]
