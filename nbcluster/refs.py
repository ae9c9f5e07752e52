"""``ObjectRef``: a reference to a value that exists (or will exist) somewhere in the cluster."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
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
        collected = getattr(_tracking, "serialized", None)
        if collected is not None:
            # Serialized into a call's arguments: the caller keeps the ref until the call is
            # done and learns whether the callee kept it.
            collected.append(self)
        else:
            # Sent elsewhere for good: the owner keeps the value for whoever gets it.
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
    loaded = getattr(_tracking, "loaded", None)
    if loaded is not None:
        loaded.append(oid)
    return ObjectRef(oid, owner, client, borrowed=owner != client.owner_address)


_tracking = threading.local()


@contextlib.contextmanager
def _collecting(name: str) -> Iterator[list[Any]]:
    prev = getattr(_tracking, name, None)
    items: list[Any] = []
    setattr(_tracking, name, items)
    try:
        yield items
    finally:
        setattr(_tracking, name, prev)


def serialized_refs() -> contextlib.AbstractContextManager[list[ObjectRef]]:
    """Collect (instead of pinning) the refs pickled in this thread inside the block."""
    return _collecting("serialized")


def loaded_refs() -> contextlib.AbstractContextManager[list[str]]:
    """Collect the ids of the refs unpickled in this thread inside the block."""
    return _collecting("loaded")
