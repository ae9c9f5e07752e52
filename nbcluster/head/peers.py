"""Who is connected to the head, and how it tells a driver on this machine is gone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil


@dataclass
class Peer:
    """Someone connected to the head: a driver, a worker acting as a client, or an agent."""

    ident: bytes
    role: str
    pid: int
    job_id: str | None = None
    owns_job: bool = False
    worker_id: str | None = None
    node_id: str | None = None
    last_seen: float = 0.0
    ping_s: tuple[float, float] = (1.0, 1.0)  # an agent's ping interval as last told, and before
    proc: psutil.Process | None = None  # a driver's process, when it runs on this machine


def local_process(pid: int, started: Any) -> psutil.Process | None:
    """The process ``pid`` if it is the one that said hello (same start time), else ``None``.

    ``None`` for a driver on another machine (or in another pid namespace): the head then knows
    it only by its pings.
    """
    if not pid or not isinstance(started, int | float):
        return None
    try:
        proc = psutil.Process(pid)
        return proc if abs(proc.create_time() - float(started)) < 0.05 else None
    except psutil.Error:
        return None


def running(proc: psutil.Process) -> bool:
    """Whether a driver's process still runs (a zombie does not)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
