"""The node's memory monitor: before the kernel's OOM killer picks a process (perhaps the agent),
kill the worker of the newest retriable task, and tell its driver why.

The agent checks the node's memory every :data:`REFRESH_MS_ENV` milliseconds (default 250; 0
turns the monitor off). Above :data:`THRESHOLD_ENV` (a fraction of the node's memory, default
0.95) it kills the worker running the most recently started task whose driver would retry it;
if no running task is retriable, the most recently started one. The worker's death report says
so (:data:`nbcluster.protocol.messages.OOM_REASON`, the node's usage, the worker's resident
memory), and the driver raises :class:`nbcluster.exceptions.OutOfMemoryError` for a task it does
not retry. Actors are never chosen: killing one loses its state.

Memory is the cgroup's (``memory.current`` of ``memory.max``) where the agent runs in a limited
cgroup (a container, a Slurm job), else the host's (total minus available, as ``free`` shows).
Workers tell their agent which task they run (tagged lines on their pipe,
:func:`task_started`/:func:`task_ended`), so the choice needs no round trip.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

#: The fraction of the node's memory above which a task is killed.
THRESHOLD_ENV = "NBCLUSTER_MEMORY_USAGE_THRESHOLD"
#: How often the monitor looks, in milliseconds (0: never).
REFRESH_MS_ENV = "NBCLUSTER_MEMORY_MONITOR_REFRESH_MS"
DEFAULT_THRESHOLD = 0.95
DEFAULT_REFRESH_MS = 250

_START = b"\x1d+"
_END = b"\x1d-"
_SEP = "\x1f"


def task_started(tid: str, name: str, retriable: bool) -> bytes:
    """The line a worker writes to its pipe when a task starts."""
    return f"\x1d+{tid}{_SEP}{name}{_SEP}{int(retriable)}\n".encode(errors="replace")


def task_ended() -> bytes:
    """The line a worker writes to its pipe when its task ends."""
    return b"\x1d-\n"


def is_control(line: bytes) -> bool:
    """Whether a line of a worker's pipe is one of these notices (not output)."""
    return line.startswith(b"\x1d")


@dataclass(frozen=True)
class RunningTask:
    """The task a worker runs, as it told its agent."""

    tid: str
    name: str
    retriable: bool
    started: float


def parse(line: bytes, now: float) -> RunningTask | None:
    """The task a notice announces; ``None`` for "it ended" (or a garbled line)."""
    if not line.startswith(_START):
        return None
    parts = line[2:].decode(errors="replace").rstrip("\n").split(_SEP)
    if len(parts) != 3:
        return None
    return RunningTask(parts[0], parts[1], parts[2] == "1", now)


def settings() -> tuple[float, float]:
    """``(threshold, interval seconds)`` from the environment (interval 0: off)."""
    try:
        threshold = float(os.environ.get(THRESHOLD_ENV, DEFAULT_THRESHOLD))
    except ValueError:
        threshold = DEFAULT_THRESHOLD
    try:
        refresh_ms = float(os.environ.get(REFRESH_MS_ENV, DEFAULT_REFRESH_MS))
    except ValueError:
        refresh_ms = DEFAULT_REFRESH_MS
    if not 0 < threshold <= 1:
        threshold = DEFAULT_THRESHOLD
    return threshold, max(0.0, refresh_ms / 1000)


def _cgroup_usage() -> tuple[int, int] | None:
    """``(used, limit)`` of this process's cgroup (v2) when it has a limit."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("\n")[-1].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int((base / "memory.current").read_text()), int(limit)
    except (OSError, ValueError, IndexError):
        return None


def node_usage() -> tuple[int, int]:
    """``(used, total)`` bytes of the memory that the node's processes share."""
    cg = _cgroup_usage()
    vm = psutil.virtual_memory()
    host = (int(vm.total - vm.available), int(vm.total))
    if cg is None or cg[1] >= host[1]:
        return host
    return cg


def choose(running: dict[str, RunningTask]) -> str | None:
    """The worker to kill: the newest retriable task's, else the newest task's."""
    if not running:
        return None
    retriable = {w: t for w, t in running.items() if t.retriable}
    pool = retriable or running
    return max(pool, key=lambda w: pool[w].started)


def rss_of(pid: int) -> int:
    """Resident memory of a process and its children (0 if gone)."""
    try:
        p = psutil.Process(pid)
        return int(
            p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        )
    except psutil.Error:
        return 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def now() -> float:
    return time.monotonic()
