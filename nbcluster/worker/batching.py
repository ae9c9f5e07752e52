"""Results of short calls held back for a moment and sent together (one ``BATCH``).

A worker running many short calls back to back (pipelined tasks, an actor's queued calls) would
send one message per result; each costs both ends' ZeroMQ I/O threads a wake-up and ~20 µs of
CPU, more than a no-op task's own work. While such a run lasts, what the main thread sends is
held and leaves as one ``BATCH`` per driver:

- only while more calls wait in the queue, and only for calls whose function (or actor method)
  took under :data:`SHORT_S` its last time here, and never for generators;
- the held messages leave before a call that is not known to be short starts, when
  :data:`MAX_HELD` are held, when the oldest is :data:`HOLD_S` old, and when the queue runs
  empty (before the worker waits);
- a call known to be short that runs long this time: the control thread sends what is held
  once it is :data:`WATCH_MS` old (it looks every :data:`WATCH_MS` while a run of short calls
  lasts), so a result never waits behind another call for more than about twice that. A call
  blocked in ``get`` on a result held here is therefore never stuck.

Messages are held in the order sent and leave in that order (what a call printed before its
result, as before).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from nbcluster.protocol import schema as m
from nbcluster.transport.serve import batched

#: A call that took less than this (wall clock) its last time is "short".
SHORT_S = 0.0005
#: Most messages held at once.
MAX_HELD = 64
#: Held messages leave (at the next call) once the oldest is this old.
HOLD_S = 0.002
#: How often the control thread looks while short calls run (milliseconds), and how old the
#: oldest held message must be for it to send them (the main thread is stuck in a call).
WATCH_MS = 5
#: The control thread stops looking after this long without anything held.
QUIET_S = 1.0


class Holder:
    """Held messages of one worker's main thread (guarded by the worker's socket lock).

    Parameters
    ----------
    send
        Sends one message's frames (``[ident, header, *payload]``), under the socket lock.
    """

    def __init__(self, send: Callable[[list[Any]], None]) -> None:
        self._send = send
        self.hold = False  # the main thread's messages are held (for the call now running)
        self.watching = False  # a run of short calls lasts: the control thread looks often
        self._held: list[tuple[bytes, list[Any]]] = []
        self._since = 0.0
        self._took: dict[str, float] = {}  # function id / method -> its last run (seconds)
        self.wake_r, self._wake_w = os.pipe()  # wakes the control thread when a run starts
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)

    def took(self, key: str, seconds: float) -> None:
        """A call of ``key`` just took ``seconds``."""
        self._took[key] = seconds

    def short(self, key: str) -> bool:
        """Did ``key``'s last call here take under :data:`SHORT_S`?"""
        took = self._took.get(key)
        return took is not None and took < SHORT_S

    def add(self, ident: bytes, frames: list[Any]) -> None:
        """Hold one message (socket lock held, :attr:`hold` set)."""
        if not self._held:
            self._since = time.monotonic()
        self._held.append((ident, frames))

    def next_call(self, short: bool, more: bool) -> None:
        """A call starts (socket lock held): send what is held unless it may wait for it too;
        hold this call's messages if it is ``short`` and ``more`` calls wait behind it."""
        hold = short and more
        held = self._held
        # (Not holding: what is held leaves first, so nothing is ever held while the main
        # thread sends at once or waits for work; only then may the control thread send.)
        if held and (not hold or len(held) >= MAX_HELD or time.monotonic() - self._since >= HOLD_S):
            self.flush()
        self.hold = hold
        if hold and not self.watching:
            self.watching = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    @property
    def busy(self) -> bool:
        """Anything held, or being held?"""
        return self.hold or bool(self._held)

    def idle(self) -> None:
        """The queue ran empty (socket lock held): send what is held."""
        self.hold = False
        if self._held:
            self.flush()

    def watch(self) -> None:
        """The control thread's look (socket lock held): send what a call held up; stop
        watching once nothing was held for :data:`QUIET_S` (it is woken when a run begins,
        which with this lag happens once per busy spell, not once per queue refill)."""
        if self._held:
            if time.monotonic() - self._since >= WATCH_MS / 1000:
                self.flush()
                self.hold = False  # (the rest of this call's messages go at once)
        elif time.monotonic() - self._since >= QUIET_S:
            self.watching = False

    def drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass

    def flush(self) -> None:
        """Send what is held: alone if one message, else one ``BATCH`` per driver (in order)."""
        held, self._held = self._held, []
        if len(held) == 1:
            ident, frames = held[0]
            self._send([ident, *frames])
            return
        by_driver: dict[bytes, list[list[Any]]] = {}
        for ident, frames in held:
            by_driver.setdefault(ident, []).append(frames)
        for ident, messages in by_driver.items():
            for message in batched(messages):
                self._send([ident, *message])


def call_key(msg: m.Message) -> str | None:
    """What a call's duration is remembered by (``None``: its results are never held)."""
    if isinstance(msg, m.Task):
        return None if msg.gen or msg.mc else msg.fn
    if isinstance(msg, m.ActorCall):
        return None if msg.gen else "." + msg.method
    return None
