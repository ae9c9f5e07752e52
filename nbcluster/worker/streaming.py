"""Generator tasks on a worker: each yielded value goes out as a ``STREAM_ITEM`` at once, with
backpressure (``STREAM_ACK``) when the caller asked for it. A part of
:class:`~nbcluster.worker.main.Worker`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import Header
from nbcluster.refs import serialized_refs
from nbcluster.transport.serve import Dispatcher
from nbcluster.worker.local_links import LocalPeers

#: A call: a task or an actor method.
Call = m.Task | m.ActorCall


class Streaming:
    """The worker's generator-task methods (mixed into ``Worker``, which sets these)."""

    sock: Any
    poller: Any  # the main thread's: the task socket, local links, the wake pipe
    _local: LocalPeers | None
    _sock_lock: Any  # (a threading.RLock)
    _receive: Callable[[], None]
    dispatcher: Dispatcher[bytes]
    _main: threading.Thread
    _acked: dict[str, int]
    _ack_cond: threading.Condition
    _flush_outbox: Callable[[], None]
    _user_code: Callable[[], contextlib.AbstractContextManager[None]]
    serialize: Callable[[str, Any], list[Any]]
    send: Callable[[bytes, Header | m.Message, list[Any] | None], None]

    def stream(self, ident: bytes, h: Call, gen: Any) -> int:
        """Run a generator task's generator: each value goes out as a ``STREAM_ITEM`` as soon as
        it is yielded; returns how many there were (the task's result)."""
        if not hasattr(gen, "__iter__") or isinstance(gen, str | bytes):
            raise TypeError(
                f"{h.name} was called with num_returns='streaming' or 'dynamic' but returned "
                f"{type(gen).__name__}, not a generator"
            )
        count = 0
        it = iter(gen)
        try:
            while True:
                with self._user_code():  # the generator's body runs in next()
                    try:
                        value = next(it)
                    except StopIteration:
                        break
                self.send_item(ident, h, count, value)
                count += 1
                if h.bp:
                    self._wait_consumer(h.tid, count, h.bp)
        finally:
            with self._ack_cond:
                self._acked.pop(h.tid, None)
        return count

    async def stream_async(self, ident: bytes, h: Call, gen: Any) -> int:
        """:meth:`stream` of an async generator (an async actor's method)."""
        import asyncio

        count = 0
        loop = asyncio.get_running_loop()
        try:
            async for value in gen:
                self.send_item(ident, h, count, value)
                count += 1
                if h.bp and count - self._acked.get(h.tid, 0) >= h.bp:
                    await loop.run_in_executor(None, self._wait_consumer, h.tid, count, h.bp)
        finally:
            with self._ack_cond:
                self._acked.pop(h.tid, None)
        return count

    def send_item(self, ident: bytes, h: Call, i: int, value: Any) -> None:
        """Send item ``i`` of stream ``h.tid`` (object ``{tid}.{i+1}``: in the store if large)."""
        with serialized_refs() as returned:
            frames = self.serialize(f"{h.tid}.{i + 1}", value)
        for ref in returned:
            ref._client.mark_escaped(ref.oid)
        header = m.StreamItem(
            tid=h.tid, i=i, n=len(frames), returned=[[r.oid, r.owner_address] for r in returned]
        )
        self.send(ident, header, frames)

    def _wait_consumer(self, tid: str, produced: int, limit: int) -> None:
        """Backpressure: wait while ``limit`` or more of the ``produced`` items are unconsumed.

        On the main thread it serves the task socket meanwhile (the acks arrive there; other
        calls are queued); elsewhere it waits for the main thread to pass the acks on.
        """
        main = threading.current_thread() is self._main
        while produced - self._acked.get(tid, 0) >= limit:
            if main:
                self._flush_outbox()
                # (The task socket and local links: the acks come where the call came from.)
                ready = self.poller.poll(200)
                if ready:
                    with self._sock_lock:
                        if self._local is not None:
                            self._local.polled(ready)
                        self._receive()
            else:
                with self._ack_cond:
                    self._ack_cond.wait(0.5)

    def _on_stream_ack(self, ident: bytes, msg: m.StreamAck, payload: list[Any]) -> None:
        with self._ack_cond:
            if msg.consumed > self._acked.get(msg.tid, 0):
                self._acked[msg.tid] = msg.consumed
            self._ack_cond.notify_all()
