"""``ObjectRef``: a reference to a value that exists (or will exist) somewhere in the cluster."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from nbcluster.client import current

#: Bytes of :meth:`ObjectRef.binary`, as Ray's object ids (ids are NUL-padded to it).
ID_SIZE = 28


class ObjectRef:
    """A future value owned by the process that created it (a ``put`` or a task submission).

    Pass it to tasks (a top-level argument arrives as its value; one nested in a list, dict or
    object stays a ref), ``get`` it, ``wait`` on it. It is hashable and comparable by id. When the
    last reference to it in the owner's process disappears (and it was never sent to another
    process), the owner frees the value.

    ``ObjectRef(ref.binary())`` (also ``ObjectRef(bytes.fromhex(ref.hex()))``) makes another ref
    to an object this process already holds a ref to, as in Ray; ``ObjectRef.nil()`` is the empty
    ref.
    """

    __slots__ = ("__weakref__", "_client", "_id", "_owner")

    def __init__(
        self,
        oid: str | bytes,
        owner: str | None = None,
        client: Any = None,
        *,
        borrowed: bool = False,
    ) -> None:
        if isinstance(oid, str) and len(oid) == 2 * ID_SIZE and _is_hex(oid):
            oid = bytes.fromhex(oid)  # ``ref.hex()``
        if isinstance(oid, bytes | bytearray):
            oid = id_from_binary(bytes(oid))
        if not isinstance(oid, str):
            raise TypeError(
                f"ObjectRef() takes the bytes of an object id, got {type(oid).__name__}"
            )
        if not oid:
            raise ValueError("ObjectRef() of the nil id: use ObjectRef.nil()")
        if owner is None:
            client, owner, borrowed = _known(oid)
        self._id = oid
        self._owner = owner
        self._client = client
        client.add_local_ref(oid, owner, borrowed)

    @classmethod
    def nil(cls) -> ObjectRef:
        """The nil ref (Ray's ``ObjectRef.nil()``): refers to nothing, ``is_nil()`` is true."""
        ref = object.__new__(cls)
        ref._id = ""
        ref._owner = ""
        ref._client = None
        return ref

    def is_nil(self) -> bool:
        """Whether this is :meth:`nil`."""
        return not self._id

    @classmethod
    def from_binary(cls, binary: bytes) -> ObjectRef:
        """``ObjectRef(binary)``, by Ray's name."""
        return cls(binary)

    @classmethod
    def from_hex(cls, hex_id: str) -> ObjectRef:
        """The ref whose :meth:`hex` is ``hex_id`` (Ray's ``ObjectRef.from_hex``)."""
        return cls(bytes.fromhex(hex_id))

    @property
    def oid(self) -> str:
        """The object id as this process's tables and the wire protocol know it."""
        return self._id

    def binary(self) -> bytes:
        """The object id as bytes: ``ID_SIZE`` (28) bytes, as Ray's, for any id that fits."""
        return binary_id(self._id)

    def hex(self) -> str:
        """:meth:`binary` in hex, as Ray's: ``ObjectRef(bytes.fromhex(ref.hex()))`` is ``ref``."""
        return binary_id(self._id).hex()

    @property
    def owner_address(self) -> str:
        return self._owner

    def task_id(self) -> str:
        """The id of the task that produces this object (``put`` objects have their own)."""
        return self._id.rsplit(".", 1)[0]

    def __repr__(self) -> str:
        return f"ObjectRef({self._id or 'nil'})"

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __reduce__(self) -> tuple[Any, ...]:
        if not self._id:
            return (ObjectRef.nil, ())
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
        if getattr(self, "_client", None) is None:  # nil, or __init__ raised
            return
        try:
            self._client.remove_local_ref(self._id)
        except Exception:  # interpreter shutdown
            pass

    def __await__(self) -> Any:
        return self._client.await_ref(self).__await__()

    def future(self) -> Any:
        """A ``concurrent.futures.Future`` resolved with the value (or the error)."""
        return self._client.ref_future(self)


def _known(oid: str) -> tuple[Any, str, bool]:
    """The client, owner and borrowed flag of an id this process holds a ref to."""
    client = current.require()
    entry = client.objects.get(oid)
    if entry is None:
        raise ValueError(
            f"ObjectRef({oid!r}): no object with this id is known here (a ref can be remade "
            "from its id only in a process that holds a ref to it)"
        )
    owner = client.owner_address if entry.owned else entry.owner
    return client, owner, not entry.owned


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


_HEX = frozenset("0123456789abcdef")


def _is_hex(text: str) -> bool:
    return set(text) <= _HEX


def id_from_binary(binary: bytes) -> str:
    """The object id of :meth:`ObjectRef.binary` (ids are ASCII, padded with zero bytes)."""
    return binary.rstrip(b"\0").decode("ascii", "replace")


def binary_id(oid: str) -> bytes:
    """``ObjectRef.binary()`` of the object id ``oid``: ASCII, padded with zero bytes."""
    return oid.encode("ascii").ljust(ID_SIZE, b"\0")


def hex_id(oid: str) -> str:
    """``ObjectRef.hex()`` of the object id ``oid`` (what users and listings show)."""
    return binary_id(oid).hex()
