"""Putting and getting values through a store in one process (tests, and a template for the
runtime's writer and reader paths)."""

from __future__ import annotations

import errno
import weakref
from typing import Any

from nbcluster.store.errors import ObjectStoreFullError
from nbcluster.store.manager import StoreManager
from nbcluster.store.segment import (
    dumps_oob,
    loads_frames,
    open_segment,
    segment_frames,
    segment_size,
    write_segment,
)

__all__ = ["get_local", "put_local"]


def put_local(manager: StoreManager, oid: str, value: Any) -> int:
    """Serialize ``value`` into a new sealed object ``oid`` of ``manager``'s store.

    Out-of-band buffers (numpy arrays, ...) are copied once, from ``value`` straight into the
    segment file.

    Parameters
    ----------
    manager
        The node's store.
    oid
        A new object id.
    value
        Anything cloudpickle can serialize.

    Returns
    -------
    int
        The object's size in bytes.

    Raises
    ------
    ObjectStoreFullError
        If neither memory nor disk can take it (also when the file system itself runs out of
        space during the write); nothing is left behind.
    """
    frames = dumps_oob(value)
    size = segment_size(frames)
    path, reused = manager.reserve_segment(oid, size)
    try:
        write_segment(path, frames, reuse=reused)
    except OSError as exc:
        manager.free(oid)
        if exc.errno == errno.ENOSPC:
            stats = manager.stats()
            raise ObjectStoreFullError(
                oid,
                size,
                stats["capacity"],
                stats["used"],
                0,
                stats["spilled"],
                manager.disk_limit,
                f"no space left on the device holding {path}",
            ) from exc
        raise
    except BaseException:
        manager.free(oid)
        raise
    manager.seal(oid)
    return size


def get_local(manager: StoreManager, oid: str) -> Any:
    """Read object ``oid`` back: numpy arrays are read-only zero-copy views of its segment.

    The object stays pinned (not spillable) for as long as anything from the returned value
    still uses the mapping; it is unpinned when the mapping is garbage-collected.

    Raises
    ------
    ObjectNotFoundError
        If ``oid`` is not in the store.
    """
    path = manager.locate(oid, pin=True)
    try:
        mm = open_segment(path)
    except BaseException:
        manager.unpin(oid)
        raise
    # From here on the mapping's death unpins, whether loads succeeds or not.
    weakref.finalize(mm, manager.unpin, oid)
    return loads_frames(segment_frames(mm))
