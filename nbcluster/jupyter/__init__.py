"""The Jupyter server extension: the server hosts the cluster's head and serves its REST API.

Enabled on install (``jupyter-config/``); see ``docs/jupyter-api.md`` for the API and
``docs/operations.md`` for its settings (``c.NbclusterApp.*``).
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from nbcluster.jupyter.app import NbclusterApp

    return [{"module": "nbcluster.jupyter", "app": NbclusterApp}]
