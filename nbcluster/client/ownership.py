"""Objects across processes: serving the ones we own, fetching and releasing borrowed ones.

Part of :class:`~nbcluster.client.state.ClientState` (pure: it only returns instructions). The
process that made an object owns it and answers ``GET_OBJECT`` for it; a process holding a ref
it did not make borrows it, fetches its value from the owner once, and tells the owner when it
kept a ref (``ESCAPE``) or let go of one it said it kept (``BORROW_DEL``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nbcluster.client.inputs import ObjectArrived
from nbcluster.client.instructions import FreeStored, Instruction, ReplyObject, ToOwner
from nbcluster.client.objects import FAILED, PENDING, READY, Entry, ObjectTable
from nbcluster.exceptions import ObjectLostError
from nbcluster.protocol.messages import Kind
from nbcluster.refs import ObjectRef
from nbcluster.serialization import dumps
from nbcluster.store.client import is_stored

if TYPE_CHECKING:
    from nbcluster.client.lineage import Lineage
    from nbcluster.client.tasks import TaskRecord


class Ownership:
    """The owner's and the borrower's side of objects shared between processes.

    Parameters
    ----------
    objects
        The object table.
    owner_address
        Our owner socket's address (refs naming it are ours).
    ref_client
        What new ``ObjectRef`` instances count themselves with (the ``CoreClient``).
    emit
        Where instructions go.
    """

    # Collaborator, set once by ClientState.
    lineage: Lineage

    def __init__(
        self,
        objects: ObjectTable,
        owner_address: str,
        ref_client: Any,
        emit: Callable[[Instruction], None],
    ) -> None:
        self.objects = objects
        self.owner_address = owner_address
        self._ref_client = ref_client
        self._emit = emit

    # ------------------------------------------------------------------ borrower side
    def fetch(self, entry: Entry, owner: str) -> None:
        """Ask ``owner`` for a borrowed object's value (once while it is pending)."""
        if entry.state == PENDING and not entry.owned and not entry.fetching:
            entry.fetching = True
            self._emit(ToOwner(owner, {"k": Kind.GET_OBJECT, "oid": entry.oid}))

    def arrived(self, ev: ObjectArrived) -> None:
        """An owner's ``OBJECT`` answer."""
        if ev.gone:
            err = ObjectLostError(
                f"object {ev.oid} is no longer held by its owner at {ev.owner} "
                "(it was freed, or its owner restarted)"
            )
            self.objects.complete(ev.oid, FAILED, dumps(err))
        else:
            self.objects.complete(ev.oid, READY if ev.ok else FAILED, ev.payload)

    def tell_owner(self, owner: str, header: dict[str, Any]) -> None:
        """Send ``ESCAPE`` or ``BORROW_DEL`` to an object's owner."""
        self._emit(ToOwner(owner, header))

    def note_kept(self, rec: TaskRecord, kept: list[str], returned: list[Any]) -> None:
        """Account for refs the callee kept, and for refs inside its result.

        A kept ref we own counts as a borrow until the callee lets go (``BORROW_DEL``); one we
        borrowed ourselves makes its owner keep it for good (``ESCAPE``). Refs inside the result
        stay alive as long as the result does.
        """
        for oid in kept:
            e = self.objects.get(oid)
            if e is None:
                continue
            if e.owned:
                self.objects.add_borrows(oid, 1)
            elif e.owner:
                self._emit(ToOwner(e.owner, {"k": Kind.ESCAPE, "oid": oid}))
        if returned:
            rec.contained = self.result_refs(returned)

    def result_refs(self, returned: list[Any]) -> list[ObjectRef]:
        """Refs for the ``[oid, owner]`` pairs inside a result (borrowed ones kept by their
        owners for good)."""
        refs = []
        for oid, owner in returned:
            mine = owner == self.owner_address
            refs.append(self.make_ref(oid, owner))
            if not mine:
                self._emit(ToOwner(owner, {"k": Kind.ESCAPE, "oid": oid}))
        return refs

    def make_ref(self, oid: str, owner: str) -> ObjectRef:
        """An ``ObjectRef`` counted in this client (made on the I/O thread)."""
        return ObjectRef(oid, owner, self._ref_client, borrowed=owner != self.owner_address)

    def dropped(self, entry: Entry) -> None:
        """The last local use of an object is gone: free it, or tell its owner we let go."""
        self.lineage.forget(entry.oid)
        if entry.owned:
            if entry.frames and is_stored(entry.frames):
                self._emit(FreeStored([entry.oid]))
        elif entry.reported and entry.owner:
            # We told callers we kept it: now tell its owner we let go.
            self._emit(
                ToOwner(entry.owner, {"k": Kind.BORROW_DEL, "oid": entry.oid, "n": entry.reported})
            )

    # ------------------------------------------------------------------ owner side
    def requested(self, ident: bytes, oid: str) -> None:
        """``GET_OBJECT``: answer now, or once the value is ready (rebuilt if it was lost)."""
        entry = self.objects.get(oid)
        if entry is None:
            self._emit(
                ReplyObject(ident, {"k": Kind.OBJECT, "oid": oid, "ok": False, "err": "lost"})
            )
        elif entry.state == PENDING or (
            self.lineage.is_lost(entry) and self.lineage.can_rebuild(oid)
        ):
            if entry.state != PENDING:
                self.lineage.reconstruct(oid)  # lost with its node: run its task again
            self.objects.on_ready(oid, lambda e: self._reply(ident, e))
        else:
            self._reply(ident, entry)

    def _reply(self, ident: bytes, entry: Entry) -> None:
        h = {"k": Kind.OBJECT, "oid": entry.oid, "ok": entry.state == READY}
        self._emit(ReplyObject(ident, h, entry.frames))
