"""The one process-global the public API needs: the current session (connection to a cluster).

This module sits below the client (``refs`` and ``remote`` find the client here), so it cannot
import the client to connect a worker's tasks on first use: the worker process registers how
(:func:`set_worker_connector`). A driver that uses the API before ``init()`` starts or joins a
cluster as Ray does: the API layer registers how (:func:`set_driver_connector`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbcluster.api import ClusterInfo
    from nbcluster.client.core import CoreClient
    from nbcluster.client.launcher import LocalCluster


@dataclass
class Session:
    """This process's connection to a cluster, and what ``shutdown()`` ends with it."""

    client: CoreClient
    info: ClusterInfo | None = None
    """What ``init()`` returned (``None`` for a worker's own connection)."""
    local: LocalCluster | None = None
    """The local cluster ``init()`` started, stopped by ``shutdown()``."""


_session: Session | None = None
_lock = threading.RLock()
_worker_connector: Callable[[], CoreClient] | None = None
_driver_connector: Callable[[], CoreClient] | None = None


def session() -> Session | None:
    """The current session, or ``None``."""
    return _session


def get() -> CoreClient | None:
    """The connected client, or ``None``."""
    s = _session
    return s.client if s is not None else None


def set_session(new: Session | None) -> None:
    """Make ``new`` the current session (``None``: disconnected)."""
    global _session
    _session = new


def set_worker_connector(connect: Callable[[], CoreClient]) -> None:
    """In a worker process: how to connect when a task first uses the cluster."""
    global _worker_connector
    _worker_connector = connect


def set_driver_connector(connect: Callable[[], CoreClient]) -> None:
    """In a driver: how to start or join a cluster when the API is used before ``init()``."""
    global _driver_connector
    _driver_connector = connect


def require() -> CoreClient:
    """The connected client; connect on first use (a worker's tasks, or a driver without init).

    Raises
    ------
    RuntimeError
        In a driver that has not called ``nbcluster.init()``, when no automatic start is set up.
    """
    s = _session
    if s is not None:
        return s.client
    with _lock:
        if _session is not None:
            return _session.client
        if _worker_connector is not None:
            client = _worker_connector()
            set_session(Session(client))
            return client
        driver = _driver_connector
    if driver is not None:
        # Outside our lock: the connector serialises with init()/shutdown() on its own lock, which
        # init() holds while it calls require() (one lock order, no deadlock).
        return driver()
    raise RuntimeError("nbcluster is not initialized: call nbcluster.init() first")
