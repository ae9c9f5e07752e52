"""Lineage: rebuilding task results that were lost with the node that stored them.

A large task result lives in the store of the node that produced it. When that node dies, the
owner (the process that submitted the task) still holds the task's description, so it runs the
task again and the ref becomes ready anew — the user's ``get`` only sees a delay. What cannot
be rebuilt raises :class:`ObjectLostError` at once instead of hanging:

- values made by ``put`` (there is no task to re-run);
- results of tasks whose own large arguments were already freed from the store;
- results rebuilt :data:`MAX_RECONSTRUCTIONS` times already.

The head tells every client which nodes died (``NODE_DIED``); a stored value whose store
belonged to one of them is known lost without trying to read it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import msgpack

from nbcluster.client.objects import READY, Entry, ObjectTable
from nbcluster.client.tasks import TaskRecord
from nbcluster.exceptions import ObjectLostError
from nbcluster.refs import ObjectRef
from nbcluster.store.client import MARKER, is_stored

MAX_RECONSTRUCTIONS = 3


def stored_in(frames: list[Any]) -> str:
    """The store id a stored value lives in ('' for inline values)."""
    if not is_stored(frames):
        return ""
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    meta = msgpack.unpackb(raw[len(MARKER) :])
    return str(meta.get("store", ""))


class Lineage:
    """Mixin of :class:`~nbcluster.client.core.CoreClient`: keeps and replays task lineage."""

    if TYPE_CHECKING:
        objects: ObjectTable
        _by_tid: dict[str, TaskRecord]

        def _post(self, *item: Any) -> None: ...
        def _do_submit(self, rec: TaskRecord) -> None: ...

    def _init_lineage(self) -> None:
        self._lineage: dict[str, TaskRecord] = {}  # stored result id -> the task that made it
        self._dead_stores: set[str] = set()

    def _keep_lineage(self, rec: TaskRecord, parts: Any) -> bool:
        """Remember ``rec`` for its stored results; ``True`` if it was kept (keep its deps)."""
        if rec.actor_id is not None or rec.args_oid is not None:
            return False
        kept = False
        for oid, frames in zip(rec.return_ids, parts, strict=False):
            if is_stored(frames):
                self._lineage[oid] = rec
                kept = True
        return kept

    def _forget_lineage(self, oid: str) -> None:
        # Any thread (called when an entry is dropped): a plain dict pop, no lock.
        self._lineage.pop(oid, None)

    def _is_lost(self, entry: Entry) -> bool:
        """Whether a ready value lives in the store of a node known to be dead."""
        return (
            bool(self._dead_stores)
            and entry.state == READY
            and stored_in(entry.frames) in self._dead_stores
        )

    def _can_rebuild(self, oid: str) -> bool:
        rec = self._lineage.get(oid)
        return rec is not None and rec.rebuilds < MAX_RECONSTRUCTIONS

    def _do_node_died(self, store_id: str) -> None:
        if store_id:
            self._dead_stores.add(store_id)

    def _do_reconstruct(self, oid: str) -> None:
        """Re-run the task that made ``oid`` (I/O thread); idempotent while it runs."""
        rec = self._lineage.get(oid)
        if rec is None:
            return
        if rec.tid in self._by_tid:
            return  # already being rebuilt
        rec.rebuilds += 1
        for rid in rec.return_ids:
            self.objects.reset(rid)
        rec.lease = None
        rec.attempts = 0
        self._do_submit(rec)

    def _lost_error(self, ref: ObjectRef, why: str) -> ObjectLostError:
        return ObjectLostError(
            f"{ref!r} was lost: {why}. Results of tasks are rebuilt by running the task again; "
            "values made by put() (and results of tasks whose large arguments were already "
            "freed) cannot be"
        )

    def _recover(self, ref: ObjectRef, why: str, timeout: float | None) -> None:
        """Rebuild ``ref`` and wait for it (user thread); raises when it cannot be rebuilt."""
        oid = ref.hex()
        if not self._can_rebuild(oid):
            raise self._lost_error(ref, why)
        ev = threading.Event()
        self._post("reconstruct_then", oid, ev)
        if not ev.wait(timeout if timeout is not None else 3600.0):
            raise self._lost_error(ref, f"{why}; rebuilding it did not finish in time")

    def _do_reconstruct_then(self, oid: str, ev: threading.Event) -> None:
        self._do_reconstruct(oid)
        if not self.objects.on_ready(oid, lambda _e: ev.set()):
            ev.set()
