"""The one process-global the public API needs: the current connection to a cluster."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbcluster.client.core import CoreClient

_client: CoreClient | None = None
_lock = threading.RLock()


def get() -> CoreClient | None:
    """The connected client, or ``None``."""
    return _client


def set_current(client: CoreClient | None) -> None:
    global _client
    _client = client


def require() -> CoreClient:
    """The connected client; inside a worker, connect on first use.

    Raises
    ------
    RuntimeError
        In a driver that has not called ``nbcluster.init()``.
    """
    c = _client
    if c is not None:
        return c
    with _lock:
        if _client is not None:
            return _client
        if "NBCLUSTER_WORKER_ID" in os.environ:
            from nbcluster.client.core import connect_from_worker

            set_current(connect_from_worker())
            assert _client is not None
            return _client
    raise RuntimeError("nbcluster is not initialized: call nbcluster.init() first")


lock = _lock
