"""Workers' logs, as each node keeps them: ``get_log`` (Ray's ``ray.util.state.get_log``) and
what ``nbcluster logs`` and the Jupyter panel read through.

A node agent keeps every worker's stdout and stderr in a file of its own, each line that a task
or actor call printed marked with its task (:mod:`nbcluster.agent.logs`); the head finds the
worker an actor, a task or a worker id means and fetches from its node (:mod:`nbcluster.head.logs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from nbcluster.api import _client
from nbcluster.exceptions import NbclusterError
from nbcluster.protocol.messages import Kind

__all__ = ["LogNotFoundError", "get_log", "read_log"]


class LogNotFoundError(NbclusterError, ValueError):
    """No log for what was named: an unknown actor, task or worker, or one that never ran."""


def read_log(
    request: Callable[[dict[str, Any], float], Any],
    *,
    actor: str | None = None,
    namespace: str | None = None,
    task: str | None = None,
    worker: str | None = None,
    offset: int = -1,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One read: ``{text, offset, alive, worker_id, node_id}`` (``offset``: where the next read of
    a ``follow`` goes on from). ``request`` sends a head request (``CoreClient.request``)."""
    header = {
        "k": Kind.LOG_READ,
        "actor": actor,
        "ns": namespace,
        "task": task,
        "worker": worker,
        "offset": offset,
    }
    result = request(header, timeout)
    if not isinstance(result, dict) or "error" in result:
        why = result.get("error") if isinstance(result, dict) else f"unexpected answer {result!r}"
        raise LogNotFoundError(str(why))
    return result


def follow_log(
    request: Callable[[dict[str, Any], float], Any],
    *,
    follow: bool = False,
    tail: int = 1000,
    interval: float = 0.5,
    timeout: float = 30.0,
    **target: Any,
) -> Iterator[str]:
    """Lines of a log: its last ``tail`` (``-1``: all kept), then, with ``follow``, new ones as
    they come until the worker is gone."""
    r = read_log(request, timeout=timeout, **target)
    lines = r["text"].splitlines()
    yield from (lines if tail < 0 else lines[-tail:] if tail else [])
    while follow and r.get("alive"):
        time.sleep(interval)
        r = read_log(request, offset=int(r["offset"]), timeout=timeout, **target)
        yield from r["text"].splitlines()
    if follow:  # what it wrote just before it ended
        r = read_log(request, offset=int(r["offset"]), timeout=timeout, **target)
        yield from r["text"].splitlines()


def get_log(
    actor_id: str | None = None,
    task_id: str | None = None,
    *,
    worker_id: str | None = None,
    namespace: str | None = None,
    follow: bool = False,
    tail: int = 1000,
    timeout: float = 30.0,
    _interval: float = 0.5,
    **ignored: Any,
) -> Iterator[str]:
    """Lines of the log of an actor, a task or a worker, as Ray's ``get_log``.

    Parameters
    ----------
    actor_id
        An actor's id, or its name (in ``namespace`` if given, else the newest of that name).
        Its whole worker's log: every call, its ``__init__``, whatever the process wrote.
    task_id
        A task's id (``ref.task_id()``): only the lines it printed, on the worker that ran it
        last (the head remembers recent tasks only).
    worker_id
        A worker process's id (nbcluster's own: a dead worker's log is kept on its node).
    follow
        Keep yielding new lines until the worker exits.
    tail
        How many of the last lines to yield first (``-1``: all the node kept).
    timeout
        Seconds each read may take.

    Raises
    ------
    LogNotFoundError
        When nothing is known by that name, or it has not run yet.

    Notes
    -----
    Ray's other arguments (``node_id``, ``filename``, ``pid``, ``suffix``, ...) are accepted and
    ignored: a log here is named by what ran, not by file.
    """
    client = _client()
    yield from follow_log(
        client.request,
        follow=follow,
        tail=tail,
        interval=_interval,
        timeout=timeout,
        actor=actor_id,
        namespace=namespace,
        task=task_id,
        worker=worker_id,
    )
