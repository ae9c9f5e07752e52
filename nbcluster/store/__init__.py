"""The node-local shared-memory object store.

Large values (above :data:`INLINE_THRESHOLD_BYTES`) live as segment files in ``/dev/shm``, written
once by their producer and mapped read-only by their readers, so numpy arrays come back as
zero-copy views. A :class:`StoreManager` (in the node agent) keeps the books: capacity, LRU
spilling to disk, transparent restore, and cleanup of every file of a store. See
``docs/object-store.md``.
"""

from __future__ import annotations

from nbcluster.store.client import INLINE_THRESHOLD_BYTES, StoreClient, is_stored
from nbcluster.store.errors import ObjectNotFoundError, ObjectStoreError, ObjectStoreFullError
from nbcluster.store.local import get_local, put_local
from nbcluster.store.manager import (
    StoreManager,
    cleanup_store,
    default_capacity,
    default_spill_dir,
)
from nbcluster.store.segment import (
    SHM_DIR,
    dumps_oob,
    loads_frames,
    map_segment,
    open_segment,
    segment_frames,
    segment_name,
    segment_size,
    write_segment,
)

__all__ = [
    "INLINE_THRESHOLD_BYTES",
    "SHM_DIR",
    "ObjectNotFoundError",
    "ObjectStoreError",
    "ObjectStoreFullError",
    "StoreClient",
    "StoreManager",
    "cleanup_store",
    "default_capacity",
    "default_spill_dir",
    "dumps_oob",
    "get_local",
    "is_stored",
    "loads_frames",
    "map_segment",
    "open_segment",
    "put_local",
    "segment_frames",
    "segment_name",
    "segment_size",
    "write_segment",
]
