"""The objects a client knows: the ones it owns and local copies of borrowed ones."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

PENDING = 0
READY = 1
FAILED = 2

Callback = Callable[["Entry"], None]

#: The frames of an entry with no value yet (shared: an entry's frames are replaced, never
#: changed in place).
NO_FRAMES: list[Any] = []


def _no_frames() -> list[Any]:
    return NO_FRAMES


@dataclass(slots=True)
class Entry:
    """One object as this process sees it.

    ``frames`` hold the serialized value (READY) or the serialized error (FAILED); values are
    deserialized on each ``get``, so callers never share mutable state by accident. A driver
    keeps one per object it holds a ref to (a million of them for a million results): slots,
    and no per-entry containers until they are needed.
    """

    oid: str
    owned: bool
    state: int = PENDING
    frames: list[Any] = field(default_factory=_no_frames)  # (replaced, never changed)
    refs: int = 0  # live ObjectRef instances in this process
    escaped: bool = False  # sent to another process for good: keep it until the job ends
    owner: str = ""  # the owner's address (for borrowed objects)
    borrows: int = 0  # owned: callees that kept a ref (signed: a release may arrive first)
    reported: int = 0  # borrowed: times we told a caller we kept it (released when dropped)
    contained: Sequence[Any] = ()  # refs inside this value, kept with it
    event: threading.Event | None = None  # what user threads wait on, while pending
    callbacks: list[Callback] | None = None  # run once it is no longer pending
    fetching: bool = False
    lost: bool = False  # READY, stored on a node the head since said died (see lineage)


class ObjectTable:
    """Thread-safe map of object id to :class:`Entry` with completion callbacks.

    Completion happens on the client's I/O thread; waiting happens on user threads.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self.lock = threading.Lock()
        #: Called (outside the lock) with each dropped entry: free a stored value, release a borrow.
        self.on_drop: Callable[[Entry], None] | None = None

    @staticmethod
    def _droppable(e: Entry) -> bool:
        return (
            e.refs <= 0
            and not e.escaped
            and e.borrows == 0
            and e.state != PENDING
            and not e.callbacks
        )

    def _dropped(self, e: Entry) -> None:
        e.contained = ()  # releases the refs inside the value (outside the lock)
        if self.on_drop is not None:
            self.on_drop(e)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, oid: str) -> Entry | None:
        return self._entries.get(oid)

    def create(self, oid: str, owned: bool) -> Entry:
        with self.lock:
            e = self._entries.get(oid)
            if e is None:
                e = self._entries[oid] = Entry(oid, owned)
            return e

    def add_ref(self, oid: str, owned: bool, owner: str = "") -> Entry:
        with self.lock:
            e = self._entries.get(oid)
            if e is None:
                e = self._entries[oid] = Entry(oid, owned, owner=owner)
            e.refs += 1
            return e

    def remove_ref(self, oid: str) -> None:
        with self.lock:
            e = self._entries.get(oid)
            if e is None:
                return
            e.refs -= 1
            if not self._droppable(e):
                return
            del self._entries[oid]
        self._dropped(e)

    def add_borrows(self, oid: str, n: int) -> None:
        """Count callees holding an owned object (``n`` < 0 when they let go)."""
        with self.lock:
            e = self._entries.get(oid)
            if e is None or not e.owned:
                return
            e.borrows += n
            if not self._droppable(e):
                return
            del self._entries[oid]
        self._dropped(e)

    def set_contained(self, oid: str, refs: list[Any]) -> None:
        with self.lock:
            e = self._entries.get(oid)
            if e is not None:
                e.contained = refs

    def mark_escaped(self, oid: str) -> None:
        with self.lock:
            e = self._entries.get(oid)
            if e is not None and e.owned:
                e.escaped = True

    def complete(self, oid: str, state: int, frames: list[Any]) -> None:
        """Set an object's value or error and run its waiters (I/O thread)."""
        with self.lock:
            e = self._entries.get(oid)
            if e is None or e.state != PENDING:
                return
            e.state = state
            e.frames = frames
            callbacks, e.callbacks = e.callbacks, None
            ev, e.event = e.event, None  # (its waiters hold it; a finished entry needs none)
            dropped = self._droppable(e) and not callbacks
            if dropped:
                del self._entries[oid]  # nobody can ask for it any more
        if dropped:
            self._dropped(e)
        if ev is not None:
            ev.set()
        for cb in callbacks or ():
            cb(e)

    def reset(self, oid: str) -> bool:
        """Make a ready object pending again (it is being rebuilt); ``False`` if unknown."""
        with self.lock:
            e = self._entries.get(oid)
            if e is None or e.state == PENDING:
                return False
            e.state = PENDING
            e.frames = NO_FRAMES
            e.event = None
            e.lost = False
            return True

    def ready(self) -> list[Entry]:
        """The objects whose value is here now (a snapshot)."""
        with self.lock:
            return [e for e in self._entries.values() if e.state == READY]

    def on_ready(self, oid: str, cb: Callback) -> bool:
        """Run ``cb(entry)`` once the object is no longer pending.

        Returns ``False`` (without calling ``cb``) if it is already done or unknown.
        """
        with self.lock:
            e = self._entries.get(oid)
            if e is None or e.state != PENDING:
                return False
            if e.callbacks is None:
                e.callbacks = [cb]
            else:
                e.callbacks.append(cb)
            return True

    def waiter(self, oids: list[str]) -> Waiter | None:
        """One event, set once none of ``oids`` is pending any more; ``None`` if none is now.

        For a ``get`` of many refs: the waiting thread sleeps once, not once per object (a
        wake-up per result took the GIL from the I/O thread a million times for a million
        results), and no event is made per object. A waiter given up on (a timeout) must be
        cancelled: an entry keeps the callbacks it still has when it completes.
        """
        w = Waiter(self)
        with self.lock:  # (no entry completes meanwhile: its callbacks are taken under it)
            for oid in oids:
                e = self._entries.get(oid)
                if e is None or e.state != PENDING:
                    continue
                if e.callbacks is None:
                    e.callbacks = [w.one_done]
                else:
                    e.callbacks.append(w.one_done)
                w.oids.append(oid)
            w.left = len(w.oids)
        return w if w.left else None

    def event_for(self, oid: str) -> threading.Event | None:
        """An event set when the object completes; ``None`` if already complete."""
        with self.lock:
            e = self._entries.get(oid)
            if e is None or e.state != PENDING:
                return None
            if e.event is None:
                e.event = threading.Event()
            return e.event


class Waiter:
    """What :meth:`ObjectTable.waiter` returns: an event set when its objects are done."""

    def __init__(self, table: ObjectTable) -> None:
        self.table = table
        self.event = threading.Event()
        self.oids: list[str] = []
        self.left = 0
        self._lock = threading.Lock()

    def one_done(self, _e: Entry) -> None:
        """One of the objects completed (I/O thread)."""
        with self._lock:
            self.left -= 1
            if self.left == 0:
                self.event.set()

    def cancel(self) -> None:
        """Take the callbacks off the objects still pending (the waiting thread gave up)."""
        with self.table.lock:
            for oid in self.oids:
                e = self.table.get(oid)
                if e is not None and e.callbacks:
                    e.callbacks = [cb for cb in e.callbacks if cb != self.one_done] or None
