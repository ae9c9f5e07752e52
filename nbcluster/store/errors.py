"""Errors raised by the node-local object store."""

from __future__ import annotations

from typing import Any

from nbcluster.exceptions import NbclusterError


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class ObjectStoreError(NbclusterError):
    """Base of the object store's errors (an unreadable segment, a misused object id, ...)."""


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """The store holds no object with this id (never stored, or already freed)."""

    def __init__(self, oid: str) -> None:
        self.oid = oid
        super().__init__(oid)

    def __str__(self) -> str:  # KeyError would quote the message
        return f"object {self.oid} is not in the object store"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.oid,))


class ObjectExistsError(ObjectStoreError, ValueError):
    """The store already holds an object with this id.

    Task return values are named after their task, so a retried task whose earlier attempt ran
    on this node finds its value already stored; ``sealed`` says it is complete and readable.
    """

    def __init__(self, oid: str, size: int, sealed: bool) -> None:
        self.oid, self.size, self.sealed = oid, size, sealed
        super().__init__(oid, size, sealed)

    def __str__(self) -> str:
        state = "" if self.sealed else " (still being written)"
        return f"object {self.oid} is already in the store{state}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.oid, self.size, self.sealed))


class ObjectStoreFullError(ObjectStoreError):
    """Neither the store's memory nor its spill disk can take an object.

    Parameters
    ----------
    oid
        The object that could not be stored.
    requested
        Its size in bytes.
    capacity
        The store's memory capacity in bytes.
    used
        Bytes of memory in use (reserved or sealed objects).
    pinned
        Bytes of memory held by objects that readers have mapped (these cannot be spilled).
    spilled
        Bytes on the spill disk.
    disk_limit
        The spill disk limit in bytes, or ``None`` if limited only by free space.
    reason
        An extra explanation (for instance the OS error that ended a write).
    """

    def __init__(
        self,
        oid: str,
        requested: int,
        capacity: int,
        used: int,
        pinned: int,
        spilled: int,
        disk_limit: int | None,
        reason: str = "",
    ) -> None:
        self.oid = oid
        self.requested = requested
        self.capacity = capacity
        self.used = used
        self.pinned = pinned
        self.spilled = spilled
        self.disk_limit = disk_limit
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        disk = (
            f"disk limit {self.disk_limit} bytes ({_mib(self.disk_limit)})"
            if self.disk_limit is not None
            else "no disk limit (bounded by free space)"
        )
        msg = (
            f"object store full: cannot store object {self.oid} of {self.requested} bytes "
            f"({_mib(self.requested)}); memory capacity {self.capacity} bytes "
            f"({_mib(self.capacity)}), {self.used} bytes used ({_mib(self.used)}, "
            f"{_mib(self.pinned)} pinned by readers); {disk}, {self.spilled} bytes spilled "
            f"({_mib(self.spilled)})"
        )
        if self.reason:
            msg += f": {self.reason}"
        return msg + ". Free objects (drop their ObjectRefs) or raise the store's limits."

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (
                self.oid,
                self.requested,
                self.capacity,
                self.used,
                self.pinned,
                self.spilled,
                self.disk_limit,
                self.reason,
            ),
        )
