"""The client a worker process's tasks use: made on first use from the worker's identity."""

from __future__ import annotations

import os

from nbcluster import context
from nbcluster.client.core import CoreClient
from nbcluster.exceptions import NbclusterError
from nbcluster.protocol.security import token_from_environment


def connect_from_worker() -> CoreClient:
    """The client a worker process uses when its task submits tasks or gets borrowed refs."""
    ident = context.worker_identity
    if ident is None:
        raise RuntimeError("not inside an nbcluster worker")
    token = token_from_environment()
    if not token:
        raise NbclusterError("no cluster secret in this worker's environment")
    client = CoreClient(
        ident.head_address,
        token,
        job_id=ident.job_id,
        worker_id=ident.worker_id,
        node_id=ident.node_id,
        namespace=ident.namespace or None,
    )
    client.connect()
    store = os.environ.get("NBCLUSTER_STORE")
    if store:
        client.attach_store(store, os.environ.get("NBCLUSTER_STORE_ID", ""))
    return client
