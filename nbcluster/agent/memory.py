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
Workers tell their agent which task they run in a page they share (:class:`TaskSlot`), so
the choice needs no round trip and costs nothing per task.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
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

#: Where a worker finds its task slot (a file its agent made: see :class:`TaskSlot`).
SLOT_ENV = "NBCLUSTER_TASK_SLOT"

# seq (odd while being written), started (CLOCK_MONOTONIC: one clock for all processes),
# running, retriable, len(tid), len(name); then tid and name.
_HEAD = struct.Struct("<QdBBHH")
_SEQ = struct.Struct("<Q")
_RUNNING_AT = 16
_TID_MAX, _NAME_MAX = 128, 240
SLOT_BYTES = _HEAD.size + _TID_MAX + _NAME_MAX


@dataclass(frozen=True)
class RunningTask:
    """The task a worker runs, as its slot says."""

    tid: str
    name: str
    retriable: bool
    started: float


class TaskSlot:
    """Which task a worker runs, in a page of memory it shares with its agent.

    The worker writes it at each task's start and end (memory writes of a few dozen bytes: no
    system call, nothing for the agent to wake up for; a line on its pipe per task cost the
    agent ~70 µs of CPU per task); the agent reads it only when the node's memory runs out. A
    sequence number that is odd while the worker writes lets the reader retry a torn read.

    Parameters
    ----------
    path
        The slot's file (in the agent's private log folder).
    create
        Make the file (the agent) rather than open it (the worker).
    """

    def __init__(self, path: str, create: bool = False) -> None:
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, SLOT_BYTES)
            self._map = mmap.mmap(fd, SLOT_BYTES)
        finally:
            os.close(fd)
        self.path = path
        self._seq = 0

    @classmethod
    def from_environment(cls) -> TaskSlot | None:
        """The slot a worker's agent made for it (``None`` outside an agent, or if unusable)."""
        path = os.environ.get(SLOT_ENV)
        if not path:
            return None
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def _begin(self) -> mmap.mmap:
        self._seq += 1
        _SEQ.pack_into(self._map, 0, self._seq)
        return self._map

    def _commit(self) -> None:
        self._seq += 1
        _SEQ.pack_into(self._map, 0, self._seq)

    def started(self, tid: str, name: str, retriable: bool) -> None:
        """A task starts (the worker's side)."""
        t = tid.encode(errors="replace")[:_TID_MAX]
        n = name.encode(errors="replace")[:_NAME_MAX]
        m = self._begin()
        _HEAD.pack_into(m, 0, self._seq, time.monotonic(), 1, retriable, len(t), len(n))
        at = _HEAD.size
        m[at : at + len(t)] = t
        m[at + len(t) : at + len(t) + len(n)] = n
        self._commit()

    def ended(self) -> None:
        """The task ended (the worker's side)."""
        m = self._begin()
        m[_RUNNING_AT] = 0
        self._commit()

    def read(self) -> RunningTask | None:
        """The task running now, if any (the agent's side)."""
        m = self._map
        for _ in range(1000):
            seq, started, running, retriable, lt, ln = _HEAD.unpack_from(m, 0)
            if seq % 2:  # being written: a few µs
                time.sleep(0)
                continue
            at = _HEAD.size
            lt, ln = min(lt, _TID_MAX), min(ln, _NAME_MAX)
            tid, name = bytes(m[at : at + lt]), bytes(m[at + lt : at + lt + ln])
            if _SEQ.unpack_from(m, 0)[0] != seq:
                continue
            if not running:
                return None
            text = tid.decode(errors="replace"), name.decode(errors="replace")
            return RunningTask(text[0], text[1], bool(retriable), started)
        return None

    def close(self, unlink: bool = False) -> None:
        """Unmap it (and, the agent, remove its file)."""
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


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
