"""``ObjectRef``: a reference to a value that exists (or will exist) somewhere in the cluster."""

from __future__ import annotations

from typing import Any

from nbcluster.client import current


class ObjectRef:
    """A future value owned by the process that created it (a ``put`` or a task submission).

    Pass it to tasks (a top-level argument arrives as its value), ``get`` it, ``wait`` on it. It is
    hashable and comparable by id. When the last reference to it in the owner's process disappears
    (and it was never sent to another process), the owner frees the value.
    """

    __slots__ = ("__weakref__", "_client", "_id", "_owner")

    def __init__(self, oid: str, owner: str, client: Any, *, borrowed: bool = False) -> None:
        self._id = oid
        self._owner = owner
        self._client = client
        client.add_local_ref(oid, owner, borrowed)

    def hex(self) -> str:
        """The object id as a string."""
        return self._id

    @property
    def owner_address(self) -> str:
        return self._owner

    def task_id(self) -> str:
        """The id of the task that produces this object (``put`` objects have their own)."""
        return self._id.rsplit(".", 1)[0]

    def __repr__(self) -> str:
        return f"ObjectRef({self._id})"

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to another process: the owner keeps the value for the borrower.
        self._client.mark_escaped(self._id)
        return (_rebuild_ref, (self._id, self._owner))

    def __del__(self) -> None:
        try:
            self._client.remove_local_ref(self._id)
        except Exception:  # interpreter shutdown
            pass

    def __await__(self) -> Any:
        return self._client.await_ref(self).__await__()

    def future(self) -> Any:
        """A ``concurrent.futures.Future`` resolved with the value (or the error)."""
        return self._client.ref_future(self)


def _rebuild_ref(oid: str, owner: str) -> ObjectRef:
    client = current.require()
    return ObjectRef(oid, owner, client, borrowed=owner != client.owner_address)
