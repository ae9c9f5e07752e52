"""nbcluster: Ray's programming model, at home in Jupyter.

``import nbcluster as ray`` runs Ray Core code: ``init``, ``remote``, ``get``, ``put``, ``wait``,
``cancel``, ``nodes``, ``cluster_resources``, ``available_resources``, ``get_runtime_context``.
"""

from nbcluster import exceptions
from nbcluster._version import __version__
from nbcluster.actor import ActorClass, ActorHandle, exit_actor, get_actor, kill, method
from nbcluster.api import (
    ClusterInfo,
    RuntimeContext,
    actors,
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_gpu_ids,
    get_runtime_context,
    init,
    is_initialized,
    nodes,
    put,
    shutdown,
    wait,
)
from nbcluster.refs import ObjectRef
from nbcluster.remote import RemoteFunction, remote

__all__ = [
    "ActorClass",
    "ActorHandle",
    "ClusterInfo",
    "ObjectRef",
    "RemoteFunction",
    "RuntimeContext",
    "__version__",
    "actors",
    "available_resources",
    "cancel",
    "cluster_resources",
    "exceptions",
    "exit_actor",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "wait",
]
