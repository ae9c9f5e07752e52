"""Notebook widgets (ipywidgets): the live cluster dashboard.

ipywidgets is imported only when a widget is made, so that ``import nbcluster`` stays light in
workers and scripts.
"""

from __future__ import annotations

from typing import Any

from nbcluster.client import current


def cluster_nodes() -> list[dict[str, Any]]:
    """Every node with its latest ``metrics`` and counts of running tasks and actors.

    The head's panel view (the same data as ``GET /nbcluster/api/cluster``); from a head without
    it, ``nodes()`` (no metrics: the views show n/a).
    """
    import nbcluster as nb

    data = current.require().query("cluster")
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return list(data["nodes"])
    return nb.nodes()


def dashboard(interval: float = 1.0) -> Any:
    """A live view of the cluster: one row per node, updated every ``interval`` seconds.

    Each row shows the node's CPU and memory use, per-GPU utilisation and memory, resources
    used/total, and its running tasks and actors. Display it (last expression of a cell, or
    ``display()``); it updates while shown and stops when ``.close()`` is called or nbcluster
    shuts down. Outside a notebook, its ``repr`` is a text table of the same data.

    Returns
    -------
    nbcluster.widgets.dashboard.Dashboard
        An ``ipywidgets.VBox``.
    """
    from nbcluster.widgets.dashboard import Dashboard

    return Dashboard(interval=interval)


def dashboard_bundle(html: str, **kwargs: Any) -> dict[str, Any] | None:
    """The mime bundle ``init()``'s result shows: a live dashboard in a kernel with ipywidgets.

    ``None`` elsewhere (IPython then uses the plain HTML summary).
    """
    from nbcluster.magics import _kernel_shell

    if _kernel_shell() is None:
        return None
    try:
        from nbcluster.widgets.dashboard import Dashboard
    except ImportError:  # no ipywidgets
        return None
    bundle = Dashboard()._repr_mimebundle_(**kwargs)
    if isinstance(bundle, tuple):  # (data, metadata) from some ipywidgets versions
        bundle = bundle[0]
    if not isinstance(bundle, dict):
        return None
    return {**bundle, "text/html": html}


__all__ = ["cluster_nodes", "dashboard", "dashboard_bundle"]
