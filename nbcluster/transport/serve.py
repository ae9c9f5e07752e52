"""The one receive loop: decode each message to its typed message, dispatch it, and own the
malformed-message policy.

Every peer that serves messages (head, agent, worker, client) builds a :class:`Dispatcher` with
a table of handlers, one per message type, and hands it the frames it receives (:func:`serve` and
:func:`follow` are the asyncio loops over a :class:`~nbcluster.transport.channel.Listener` or
:class:`~nbcluster.transport.channel.Channel`; the worker's synchronous loop calls
:meth:`Dispatcher.dispatch_sync`). The policy, written here once:

- a message that is not one, or does not match its kind's schema, is logged (rate-limited) and
  dropped; when the dispatcher can answer (``answer`` given) and the sender waits for an answer
  (:func:`~nbcluster.protocol.validation.should_answer`), it is answered with ``ERROR {code:
  "protocol"}`` first. An ``on_malformed`` hook may answer it some other way instead (a worker
  answers a malformed ``TASK`` with a failed ``RESULT``, which is what its sender waits for);
- a handler that raises is a bug: it is logged with its traceback, and when the sender waits for
  an answer it gets ``ERROR {code: "internal"}`` naming the request's ``rid``; the loop serves on;
- a message of a type the table has no handler for goes to ``default``, or is logged
  (rate-limited) and dropped;
- a ``BATCH`` (several whole messages sent as one, between a driver and its workers) is taken
  apart by a dispatcher built with ``batches=True``: each message in it is dispatched in order
  under this same policy; a ``BATCH`` inside one is malformed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Generic, NoReturn, TypeVar

from nbcluster.exceptions import ProtocolError
from nbcluster.protocol.codec import Header, encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import MAX_BATCH, Batch, Message
from nbcluster.protocol.validation import (
    INTERNAL,
    RateLimitedLog,
    error_reply,
    receive_message,
    should_answer,
)
from nbcluster.transport.channel import Channel, Listener

log = logging.getLogger(__name__)

P = TypeVar("P")

#: A handler: ``(peer, message, payload frames)``; a coroutine function in asyncio loops.
Handler = Callable[[P, Any, list[Any]], Awaitable[None] | None]
#: Sends an answer header to a peer (a coroutine function in asyncio loops).
Answer = Callable[[P, Header], Awaitable[None] | None]


class Dispatcher(Generic[P]):
    """Routes received messages to their handlers by type; owns the malformed-message policy.

    Parameters
    ----------
    handlers
        Message type -> handler, or one handler for every message (which then dispatches with
        a ``match`` of its own).
    what
        Names the sender in log lines, e.g. ``"from the head"``.
    logger
        Where malformed messages and handler failures are logged.
    answer
        How to answer a peer; ``None`` where nothing is ever answered (a connection to the head:
        answering it an ``ERROR`` would only start a ping-pong of errors).
    default
        Handler of messages whose type has no entry (``None``: logged and dropped).
    on_malformed
        Called with each malformed message before the default answer; returning ``True`` means
        it was answered (or handled) and the default answer is not sent.
    on_error
        The same for a handler that raised (after it was logged).
    spawn
        Where given, handlers run concurrently: each handler's coroutine is handed to
        ``spawn`` (e.g. a task of its own) instead of being awaited, the policy included.
    batches
        Take ``BATCH`` messages apart (:meth:`dispatch_sync` only: the driver's and the
        worker's loops).
    """

    def __init__(
        self,
        handlers: Mapping[type[Message], Handler[P]] | Handler[P],
        *,
        what: str,
        logger: logging.Logger = log,
        answer: Answer[P] | None = None,
        default: Handler[P] | None = None,
        on_malformed: Callable[[P, ProtocolError], bool] | None = None,
        on_error: Callable[[P, Message, Exception], bool] | None = None,
        spawn: Callable[[Coroutine[Any, Any, None]], object] | None = None,
        batches: bool = False,
    ) -> None:
        if callable(handlers):
            self.table: dict[type[Message], Handler[P]] = {}
            default = handlers
        else:
            self.table = dict(handlers)
        self.default = default
        self.answer = answer
        self.on_malformed = on_malformed
        self.on_error = on_error
        self.spawn = spawn
        self.what = what
        self.logger = logger
        self.malformed_log = RateLimitedLog(logger, f"dropping a malformed message {what}")
        self.unexpected_log = RateLimitedLog(
            logger, f"ignoring a message of an unexpected kind {what}"
        )
        self._in_batch = False
        if batches:
            self.table[Batch] = self._unbatch

    def _refuse(self, peer: P, exc: ProtocolError) -> Header | None:
        """Log a malformed message; the answer it gets (``None``: none)."""
        self.malformed_log(f"from {peer!r}: {exc}" if isinstance(peer, bytes) else exc)
        if self.on_malformed is not None and self.on_malformed(peer, exc):
            return None
        if self.answer is not None and should_answer(exc):
            return error_reply(exc)
        return None

    def _failed(self, peer: P, msg: Message, exc: Exception) -> Header | None:
        """Log a handler's failure; the answer its sender gets (``None``: none)."""
        kind = msg.__struct_config__.tag
        self.logger.error("error handling %s %s", kind, self.what, exc_info=exc)
        if self.on_error is not None and self.on_error(peer, msg, exc):
            return None
        if self.answer is not None and msg.expects_reply:
            return error_reply(exc, INTERNAL, getattr(msg, "rid", None))
        return None

    def _unexpected(self, msg: Message) -> None:
        self.unexpected_log(msg.__struct_config__.tag)

    async def dispatch(self, peer: P, frames: Sequence[Any]) -> None:
        """Decode ``frames`` from ``peer`` and run their handler (asyncio loops)."""
        try:
            msg, payload = receive_message(frames)
        except ProtocolError as exc:
            reply = self._refuse(peer, exc)
        else:
            fn = self.table.get(type(msg), self.default)
            if fn is None:
                self._unexpected(msg)
                return
            if self.spawn is not None:
                self.spawn(self._run(fn, peer, msg, payload))
                return
            try:  # (not through _run: one coroutine less per message on the hot path)
                pending = fn(peer, msg, payload)
                if pending is not None:
                    await pending
                return
            except Exception as exc:  # a bug: answer it, and keep serving everyone else
                reply = self._failed(peer, msg, exc)
        await self._send(peer, reply)

    async def _run(self, fn: Handler[P], peer: P, msg: Message, payload: list[Any]) -> None:
        try:
            pending = fn(peer, msg, payload)
            if pending is not None:
                await pending
        except Exception as exc:  # a bug: answer it, and keep serving everyone else
            await self._send(peer, self._failed(peer, msg, exc))

    async def _send(self, peer: P, reply: Header | None) -> None:
        if reply is not None and self.answer is not None:
            sent = self.answer(peer, reply)
            if sent is not None:
                await sent

    def dispatch_sync(self, peer: P, frames: Sequence[Any]) -> None:
        """:meth:`dispatch` for a synchronous loop (handlers and ``answer`` return ``None``)."""
        try:
            msg, payload = receive_message(frames)
        except ProtocolError as exc:
            reply = self._refuse(peer, exc)
        else:
            fn = self.table.get(type(msg), self.default)
            if fn is None:
                self._unexpected(msg)
                return
            try:
                fn(peer, msg, payload)
                return
            except Exception as exc:  # a bug: answer it and serve on
                reply = self._failed(peer, msg, exc)
        if reply is not None and self.answer is not None:
            self.answer(peer, reply)

    def _unbatch(self, peer: P, msg: Batch, payload: list[Any]) -> None:
        if self._in_batch:
            reply = self._refuse(peer, ProtocolError("a BATCH inside a BATCH"))
            if reply is not None and self.answer is not None:
                self.answer(peer, reply)
            return
        self._in_batch = True
        try:
            start = 0
            for n in msg.n:
                self.dispatch_sync(peer, payload[start : start + n])
                start += n
        finally:
            self._in_batch = False


def batched(messages: Sequence[list[Any]]) -> list[list[Any]]:
    """What to send for ``messages`` (each a message's frames): one alone as it is, several as
    ``BATCH`` messages of at most :data:`~nbcluster.protocol.schema.MAX_BATCH` each (taken
    apart in order by a dispatcher built with ``batches=True``)."""
    if len(messages) == 1:
        return [messages[0]]
    out = []
    for start in range(0, len(messages), MAX_BATCH):
        part = messages[start : start + MAX_BATCH]
        head = encode({"k": Kind.BATCH, "n": [len(f) for f in part]})
        out.append([*head, *(f for fs in part for f in fs)])
    return out


def answer_on(listener: Listener) -> Answer[bytes]:
    """An ``answer`` for a :class:`Dispatcher` serving ``listener``: the header goes back to the
    peer that sent the message (dropped if that peer left meanwhile)."""

    def answer(peer: bytes, header: Header) -> None:
        listener.send_nowait(peer, encode(header))

    return answer


async def serve(listener: Listener, dispatcher: Dispatcher[bytes]) -> NoReturn:
    """Serve every peer of ``listener``: each message goes to ``dispatcher`` in arrival order."""
    while True:
        peer, frames = await listener.recv()
        await dispatcher.dispatch(peer, frames)


async def follow(
    channel: Channel,
    dispatcher: Dispatcher[P],
    peer: P,
    on_receive: Callable[[], None] | None = None,
) -> NoReturn:
    """Handle every message arriving on ``channel`` (whose other end is ``peer``), in order.

    ``on_receive`` is called for every frame set, well-formed or not (an agent notes that its
    head is still there).
    """
    while True:
        frames = await channel.recv()
        if on_receive is not None:
            on_receive()
        await dispatcher.dispatch(peer, frames)
