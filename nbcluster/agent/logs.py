"""Each worker's output kept on its node: one bounded, rotated log file per worker process.

A worker's stdout and stderr (file descriptors 1 and 2) are one pipe to its agent. What user code
prints inside a task or an actor call is also sent to the driver (``LOG``); the worker copies each
such line to the pipe with a tag naming its task (:func:`tag`), so that the node's log says which
task printed it. Everything else on the pipe (the worker's own log, C extensions' output, a
``faulthandler`` dump before a segfault) is kept untagged.

Lines are written as ``2026-12-01 09:41:35.123 [task <tid> <name>] stdout: text`` or
``2026-12-01 09:41:35.123 [worker] text``. A file past :data:`MAX_BYTES` is renamed ``.1``
(replacing the previous one) and started again; the logs of the newest :data:`KEEP_DEAD` dead
workers are kept, older ones removed. The folder is private to the user
(:mod:`nbcluster._private_fs`) and removed with the agent.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nbcluster._private_fs import open_private_dir

#: A file is rotated past this many bytes (one previous file is kept: twice this in all).
MAX_BYTES = 8 << 20
#: Dead workers whose logs are kept (the newest).
KEEP_DEAD = 200
#: Lines of a dead worker's log that its death report carries.
TAIL_LINES = 30
#: Most bytes one read returns.
READ_MAX = 1 << 20

_TAG = "\x1e"
_SEP = "\x1f"


def tag(tid: str, name: str, stream: str, lines: list[str]) -> bytes:
    """Lines of a task's output as the worker copies them to its pipe."""
    head = f"{_TAG}{tid}{_SEP}{name}{_SEP}{stream}{_SEP}"
    return "".join(f"{head}{line}\n" for line in lines).encode(errors="replace")


def format_line(raw: bytes, now: float) -> bytes:
    """One line of the pipe as it is written to the log."""
    text = raw.decode(errors="replace").rstrip("\n")
    stamp = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    )
    if text.startswith(_TAG):
        parts = text[1:].split(_SEP, 3)
        if len(parts) == 4:
            tid, name, stream, line = parts
            return f"{stamp} [task {tid} {name}] {stream}: {line}\n".encode()
    return f"{stamp} [worker] {text}\n".encode()


def task_marker(tid: str) -> bytes:
    """What the lines of task ``tid`` contain (to filter a log by task)."""
    return f"[task {tid} ".encode()


@dataclass
class WorkerLog:
    """The log file of one worker process, appended to by its agent."""

    path: str
    fd: int
    size: int = 0
    alive: bool = True

    def write(self, raw: bytes, now: float) -> None:
        data = format_line(raw, now)
        if self.size + len(data) > MAX_BYTES and self.size:
            self._rotate()
        os.write(self.fd, data)
        self.size += len(data)

    def _rotate(self) -> None:
        os.close(self.fd)
        os.replace(self.path, self.path + ".1")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.size = 0

    def close(self) -> None:
        if self.alive:
            self.alive = False
            os.close(self.fd)


@dataclass
class NodeLogs:
    """The log files of a node's workers (see the module docstring)."""

    folder: str
    logs: dict[str, WorkerLog] = field(default_factory=dict)
    dead: deque[str] = field(default_factory=deque)

    @classmethod
    def create(cls, folder: str) -> NodeLogs:
        os.close(open_private_dir(folder, "log directory"))
        return cls(folder)

    def open(self, worker_id: str) -> WorkerLog:
        """A new worker's log."""
        path = os.path.join(self.folder, f"{_safe(worker_id)}.log")
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW, 0o600
        )
        log = self.logs[worker_id] = WorkerLog(path, fd)
        return log

    def closed(self, worker_id: str) -> None:
        """The worker is gone: its log is kept among the newest dead ones."""
        log = self.logs.get(worker_id)
        if log is None:
            return
        log.close()
        self.dead.append(worker_id)
        while len(self.dead) > KEEP_DEAD:
            old = self.logs.pop(self.dead.popleft(), None)
            if old is not None:
                for p in (old.path, old.path + ".1"):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass

    def tail(self, worker_id: str, n: int = TAIL_LINES) -> list[str]:
        """The last ``n`` lines of a worker's log (for its death report)."""
        log = self.logs.get(worker_id)
        if log is None:
            return []
        data = _read_end(log.path, 64 << 10)
        return [ln.decode(errors="replace") for ln in data.splitlines()[-n:]]

    def read(
        self, worker_id: str, task: str | None = None, offset: int = -1, limit: int = READ_MAX
    ) -> dict[str, Any]:
        """Part of a worker's log: from byte ``offset`` of the current file (``-1``: its last
        ``limit`` bytes, the rotated file included when it is short), only task ``task``'s lines
        if given. ``offset`` in the answer is where to read on from (``--follow``)."""
        log = self.logs.get(worker_id)
        if log is None:
            return {"error": f"no log of worker {worker_id} on this node (unknown, or pruned)"}
        limit = max(1, min(limit, READ_MAX))
        size = os.path.getsize(log.path)
        if offset < 0 or offset > size:  # a first read, or the file was rotated since
            start = max(0, size - limit)
            data = _read_range(log.path, start, size)
            if start == 0 and len(data) < limit and os.path.exists(log.path + ".1"):
                data = _read_end(log.path + ".1", limit - len(data)) + data
            if start > 0 or len(data) >= limit:
                data = data[data.find(b"\n") + 1 :]  # no half first line
        else:
            data = _read_range(log.path, offset, min(size, offset + limit))
            cut = data.rfind(b"\n") + 1  # whole lines only; the rest comes with the next read
            data, size = data[:cut], offset + cut
        if task is not None:
            mark = task_marker(task)
            data = b"".join(ln for ln in data.splitlines(keepends=True) if mark in ln)
        return {"text": data.decode(errors="replace"), "offset": size, "alive": log.alive}

    def close(self) -> None:
        for log in self.logs.values():
            log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _safe(worker_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_id)


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(max(0, end - start))


def _read_end(path: str, n: int) -> bytes:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return b""
    data = _read_range(path, max(0, size - n), size)
    return data if size <= n else data[data.find(b"\n") + 1 :]
