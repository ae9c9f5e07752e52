"""Notebook widgets (ipywidgets): the live cluster dashboard.

ipywidgets is imported only when a widget is made, so that ``import nbcluster`` stays light in
workers and scripts.
"""

from __future__ import annotations

from typing import Any

from nbcluster.kernel import kernel_shell
from nbcluster.status import cluster_nodes


def dashboard(interval: float = 1.0) -> Any:
    """A live view of the cluster: one row per node, updated every ``interval`` seconds.

    Each row shows the node's CPU and memory use, per-GPU utilisation and memory, resources
    used/total, and its running tasks and actors. Display it (last expression of a cell, or
    ``display()``); it updates while shown and stops when ``.close()`` is called or nbcluster
    shuts down. Outside a notebook, its ``repr`` is a text table of the same data.

    Returns
    -------
    nbcluster.widgets.cluster_view.Dashboard
        An ``ipywidgets.VBox``.
    """
    from nbcluster.widgets.cluster_view import Dashboard  # imports ipywidgets: only when used

    return Dashboard(interval=interval)


def dashboard_bundle(html: str, **kwargs: Any) -> dict[str, Any] | None:
    """The mime bundle ``init()``'s result shows: a live dashboard in a kernel with ipywidgets.

    ``None`` elsewhere (IPython then uses the plain HTML summary).
    """
    if kernel_shell() is None:
        return None
    try:
        from nbcluster.widgets.cluster_view import Dashboard
    except ImportError:  # no ipywidgets
        return None
    bundle = Dashboard()._repr_mimebundle_(**kwargs)
    if isinstance(bundle, tuple):  # (data, metadata) from some ipywidgets versions
        bundle = bundle[0]
    if not isinstance(bundle, dict):
        return None
    return {**bundle, "text/html": html}


__all__ = ["cluster_nodes", "dashboard", "dashboard_bundle"]
