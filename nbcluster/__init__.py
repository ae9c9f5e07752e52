"""nbcluster: Ray's programming model, at home in Jupyter.

``import nbcluster as ray`` runs Ray Core code: ``init``, ``remote``, ``get``, ``put``, ``wait``,
``cancel``, ``nodes``, ``cluster_resources``, ``available_resources``, ``get_runtime_context``,
``timeline``.
In Jupyter, ``%load_ext nbcluster`` adds magics; ``dashboard()`` and ``progress()`` are widgets.
``nbcluster.deploy`` grows a cluster with jobs of Slurm (``SlurmCluster``), SSH hosts, Kubernetes.
"""

from typing import TYPE_CHECKING, Any

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
    timeline,
    wait,
)
from nbcluster.generators import DynamicObjectRefGenerator, ObjectRefGenerator
from nbcluster.progress import progress
from nbcluster.refs import ObjectRef
from nbcluster.remote import RemoteFunction, remote
from nbcluster.scheduling import NodeAffinitySchedulingStrategy
from nbcluster.widgets import dashboard

if TYPE_CHECKING:
    from nbcluster import deploy, util

#: Subpackages imported on first use (``nb.util.ActorPool``, ``nb.deploy.SlurmCluster``): most
#: programs need neither, and together they took a third of ``import nbcluster``.
_LAZY = ("deploy", "util")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"nbcluster.{name}")
    raise AttributeError(f"module 'nbcluster' has no attribute {name!r}")


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext nbcluster``: connect to the cluster and register the magics."""
    from nbcluster.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext nbcluster`` (the connection stays open)."""
    from nbcluster.magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "ActorClass",
    "ActorHandle",
    "ClusterInfo",
    "DynamicObjectRefGenerator",
    "NodeAffinitySchedulingStrategy",
    "ObjectRef",
    "ObjectRefGenerator",
    "RemoteFunction",
    "RuntimeContext",
    "__version__",
    "actors",
    "available_resources",
    "cancel",
    "cluster_resources",
    "dashboard",
    "deploy",
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
    "progress",
    "put",
    "remote",
    "shutdown",
    "timeline",
    "util",
    "wait",
]
