"""Checking received messages against their kind's schema, at every receive loop's entry.

Every receive loop calls :func:`receive_message` (or :func:`receive`, :func:`validate` after its
own decode, where a handler still reads the header as a dict) before it dispatches, so that no
handler ever sees a header that lacks a field, carries a field of another type, or comes with the
wrong number of payload frames. What fails is a
:class:`MalformedMessage`: the loop answers it with :func:`error_reply` when the sender waits for
an answer and the loop can answer it, and otherwise drops it, logging through a
:class:`RateLimitedLog` so that a flood of bad messages cannot flood the log either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Union

import msgspec

from nbcluster.exceptions import ProtocolError
from nbcluster.protocol.codec import Header, decode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import SCHEMAS, Message

#: ``ERROR.code`` of an answer to a malformed message, and of a handler that failed.
MALFORMED, INTERNAL = "protocol", "internal"


class MalformedMessage(ProtocolError):
    """A message that does not match its kind's schema (or has no known kind).

    Attributes
    ----------
    kind
        The header's kind when it was a known one, else ``None``.
    rid
        The header's request id when it had an integer one (the answer names it).
    expects_reply
        Whether the sender of this kind waits for an answer.
    header
        The decoded header (untrusted: only for answering, e.g. with its ``tid``).
    """

    def __init__(
        self,
        msg: str,
        kind: str | None = None,
        rid: int | None = None,
        expects_reply: bool = False,
        header: Header | None = None,
    ) -> None:
        super().__init__(msg)
        self.kind, self.rid, self.expects_reply = kind, rid, expects_reply
        self.header: Header = header if header is not None else {}


def _rid(header: Header) -> int | None:
    rid = header.get("rid")
    return rid if type(rid) is int else None


def validate(header: Header, payload: Sequence[Any] = ()) -> Message:
    """Check a decoded message against its kind's schema; return it as its typed message.

    Raises
    ------
    MalformedMessage
        If the kind is unknown, a required field is missing, a field has the wrong type or
        value, or the number of payload frames is not what the header declares.
    """
    kind = header.get("k")
    cls = SCHEMAS.get(kind) if type(kind) is str or isinstance(kind, Kind) else None
    if cls is None:
        raise MalformedMessage(
            f"unknown message kind {_short(kind)}", rid=_rid(header), header=header
        )
    if isinstance(kind, Kind):  # a header built here; received ones hold a plain str
        header = {**header, "k": kind.value}
    try:
        msg = msgspec.convert(header, cls)
    except msgspec.ValidationError as exc:
        raise MalformedMessage(
            f"malformed {kind!s} message: {exc}",
            str(kind),
            _rid(header),
            cls.expects_reply,
            header,
        ) from None
    want = msg.frames()
    if want is not None and want != len(payload):
        raise MalformedMessage(
            f"malformed {kind!s} message: {len(payload)} payload frames, its header declares "
            f"{want}",
            str(kind),
            _rid(header),
            cls.expects_reply,
            header,
        )
    return msg


def receive(frames: Sequence[Any]) -> tuple[Header, list[Any]]:
    """:func:`~nbcluster.protocol.codec.decode` and :func:`validate` one received message.

    Raises
    ------
    ProtocolError
        If the frames are not a message (:class:`MalformedMessage` if they are one that does
        not match its schema).
    """
    header, payload = decode(frames)
    validate(header, payload)
    return header, payload


#: Decodes a header frame straight into its kind's typed message (tagged by ``"k"``).
_DECODER: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(
    Union[tuple(SCHEMAS.values())]  # noqa: UP007  (built from a tuple: no X | Y spelling)
)


def receive_message(frames: Sequence[Any]) -> tuple[Message, list[Any]]:
    """Decode one received message into its typed message and its payload frames.

    The header frame is decoded and checked in one step (faster than decoding it into a dict
    and validating that: ``benchmarks/validate_cost.py``). A message that fails is decoded
    again the slow way, only to raise the same error :func:`receive` would.

    Raises
    ------
    ProtocolError
        If the frames are not a message (:class:`MalformedMessage` if they are one that does
        not match its schema).
    """
    if not frames:
        raise ProtocolError("empty message")
    first = frames[0]
    try:
        msg = _DECODER.decode(first.buffer if hasattr(first, "buffer") else first)
    except msgspec.DecodeError:
        msg = None
    if msg is not None:
        want = msg.frames()
        if want is None or want == len(frames) - 1:
            return msg, list(frames[1:])
    receive(frames)  # raises the detailed error
    raise MalformedMessage("malformed message")  # pragma: no cover - both checks agree


def error_reply(exc: BaseException, code: str = MALFORMED, rid: int | None = None) -> Header:
    """The ``ERROR`` header answering a malformed message (or a request whose handler failed)."""
    if isinstance(exc, MalformedMessage) and rid is None:
        rid = exc.rid
    msg = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
    reply: Header = {"k": Kind.ERROR, "msg": msg, "code": code}
    if rid is not None:
        reply["rid"] = rid
    return reply


def should_answer(exc: ProtocolError) -> bool:
    """Should a server answer this malformed message?

    Yes when its kind is answered, and when it has no kind we know (the sender may be waiting:
    the answer tells it why nothing else comes); no for a kind nobody waits on.
    """
    if isinstance(exc, MalformedMessage) and exc.kind is not None:
        return exc.expects_reply
    return True


def expects_reply(header: Header) -> bool:
    """Does the sender of this (valid) message wait for an answer?"""
    cls = SCHEMAS.get(header.get("k"))  # type: ignore[arg-type]  # validated: a str kind
    return cls is not None and cls.expects_reply


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class RateLimitedLog:
    """Logs at most ``burst`` warnings per ``interval`` seconds, then one line with the count.

    Parameters
    ----------
    logger
        Where to log.
    what
        What is logged, e.g. ``"malformed message from the head"``.
    """

    def __init__(
        self, logger: logging.Logger, what: str, burst: int = 5, interval: float = 10.0
    ) -> None:
        self.logger, self.what = logger, what
        self.burst, self.interval = burst, interval
        self._window = 0.0
        self._count = 0
        self.suppressed = 0
        self.total = 0

    def __call__(self, detail: object) -> None:
        """Log one event (or count it, when ``burst`` were logged in this interval)."""
        self.total += 1
        now = time.monotonic()
        if now - self._window >= self.interval:
            if self.suppressed:
                self.logger.warning("%s: %d more not logged", self.what, self.suppressed)
            self._window, self._count, self.suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            self.logger.warning("%s: %s", self.what, detail)
        else:
            self.suppressed += 1
