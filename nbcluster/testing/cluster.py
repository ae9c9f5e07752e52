"""A standalone head and node agents as real processes, for chaos and recovery testing.

:class:`ProcessCluster` starts ``nbcluster head`` (with a restart snapshot, ``--state-file``) and
``nbcluster worker`` agents as separate processes with their output in log files, and can SIGKILL
and restart any of them, find their worker processes, and check what they leave behind
(:meth:`ProcessCluster.leaks`). It only uses the command lines a user would run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import nbcluster
from nbcluster.launch import AGENT_READY, HEAD_READY, free_port
from nbcluster.store.segment import SHM_DIR

Popen = subprocess.Popen[bytes]


class ClusterStartError(RuntimeError):
    """A head or agent did not print its ready line in time, or exited while starting."""


@dataclass
class Agent:
    """One node agent process (the latest incarnation of a node name)."""

    name: str
    proc: Popen
    node_id: str
    store_id: str
    flags: tuple[str, ...]
    prefix: tuple[str, ...]


@dataclass
class Leaks:
    """What a stopped cluster left behind.

    Attributes
    ----------
    processes
        ``"pid cmdline"`` of processes of this cluster still running (head, agents, workers).
    shm_files
        Files in ``/dev/shm`` of this cluster's stores (``nbc-<store_id>*``).
    """

    processes: list[str] = field(default_factory=list)
    shm_files: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.shm_files)


class ProcessCluster:
    """A head and node agents started as real processes; output kept in ``workdir``.

    Output goes to files, not pipes: a process whose pipe nobody reads blocks on a full pipe and
    looks dead.

    Parameters
    ----------
    workdir
        Folder for the token, the head's snapshot and the logs (one ``*.log`` per process name;
        a restarted process appends to its log).
    host
        Address the head binds.
    log_level
        ``NBCLUSTER_LOG_LEVEL`` of the head and the agents.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1", log_level: str = "INFO") -> None:
        self.workdir = workdir
        self.host = host
        self.port = free_port(host)
        self.token_file = workdir / "token"
        self.state_file = workdir / "head.state"
        self.head: Popen | None = None
        self.agents: dict[str, Agent] = {}
        self.store_ids: set[str] = set()
        self._pids: set[int] = set()  # every process of ours ever seen (workers included)
        self._env = dict(os.environ)
        # Agents, workers and the head import the same nbcluster as this process.
        root = str(Path(nbcluster.__file__).resolve().parent.parent)
        path = self._env.get("PYTHONPATH", "")
        self._env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
        self._env["NBCLUSTER_LOG_LEVEL"] = log_level

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the head."""
        return f"{self.host}:{self.port}"

    def log_path(self, name: str) -> Path:
        """The log file of process ``name`` (``"head"`` or ``"agent-<node name>"``)."""
        return self.workdir / f"{name}.log"

    def _popen(self, args: list[str], name: str, prefix: tuple[str, ...]) -> tuple[Popen, int]:
        log = self.log_path(name)
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "nbcluster", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._env,
            )
        self._pids.add(proc.pid)
        return proc, start

    def _wait_line(
        self, proc: Popen, name: str, start: int, marker: str, timeout: float
    ) -> list[str]:
        """The words of the first line of ``name``'s log past ``start`` that begins ``marker``."""
        log = self.log_path(name)
        deadline = time.monotonic() + timeout
        while True:
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            for line in text.splitlines():
                if line.startswith(marker):
                    return line.split()
            if proc.poll() is not None:
                raise ClusterStartError(
                    f"{name} exited ({proc.returncode}) while starting:\n{text}"
                )
            if time.monotonic() > deadline:
                raise ClusterStartError(f"{name} not ready within {timeout} s:\n{text[-3000:]}")
            time.sleep(0.05)

    def start_head(self, timeout: float = 60.0) -> None:
        """Start the head (again: it takes the cluster back from its snapshot)."""
        args = ["head", "--host", self.host, "--port", str(self.port)]
        args += ["--token-file", str(self.token_file), "--state-file", str(self.state_file)]
        self.head, start = self._popen(args, "head", ())
        self._wait_line(self.head, "head", start, HEAD_READY, timeout)

    def kill_head(self) -> None:
        """SIGKILL the head (it leaves its snapshot behind)."""
        if self.head is not None and self.head.poll() is None:
            self.head.kill()
            self.head.wait(10)

    def join(
        self,
        name: str,
        *flags: str,
        prefix: tuple[str, ...] = (),
        timeout: float = 60.0,
    ) -> str:
        """Start a node agent named ``name``; returns its node id once it is ready.

        ``prefix`` runs it under another command (e.g. ``ip netns exec NS``).
        """
        args = ["worker", "--address", self.address, "--token-file", str(self.token_file)]
        proc, start = self._popen([*args, "--node-name", name, *flags], f"agent-{name}", prefix)
        words = self._wait_line(proc, f"agent-{name}", start, AGENT_READY, timeout)
        node_id, store_id = words[1], words[3]
        self.store_ids.add(store_id)
        self.agents[name] = Agent(name, proc, node_id, store_id, tuple(flags), prefix)
        return node_id

    def kill_agent(self, name: str) -> None:
        """SIGKILL node ``name``'s agent (its workers exit on their own when they notice)."""
        self._note_workers()
        proc = self.agents[name].proc
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def restart_agent(self, name: str, timeout: float = 60.0) -> str:
        """Start node ``name`` again with the flags it had; returns the new node id."""
        a = self.agents[name]
        return self.join(name, *a.flags, prefix=a.prefix, timeout=timeout)

    def worker_pids(self, name: str | None = None) -> list[int]:
        """Pids of the worker processes of node ``name`` (of every node when ``None``)."""
        pids = []
        for a in self.agents.values():
            if name is not None and a.name != name:
                continue
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(a.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "nbcluster.worker" in " ".join(child.cmdline()):
                            pids.append(child.pid)
        self._pids.update(pids)
        return pids

    def _note_workers(self) -> None:
        self.worker_pids()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of every log of this cluster, one section per process name."""
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"--- {log.name} (last {chars} chars)\n{text[-chars:]}")
        return "\n".join(parts)

    def close(self, timeout: float = 20.0) -> None:
        """SIGTERM the agents, then the head; SIGKILL what outlives ``timeout``."""
        self._note_workers()
        procs = [a.proc for a in self.agents.values()]
        if self.head is not None:
            procs.append(self.head)
        for p in procs:
            if p.poll() is None:  # a frozen (SIGSTOPped) process must hear SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def leaks(self, timeout: float = 15.0) -> Leaks:
        """What is left of this cluster after :meth:`close`, once given ``timeout`` to go.

        Workers poll their agent every 0.5 s and exit when it is gone, so they get a moment.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = Leaks(self._live_processes(), self._shm_files())
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def purge(self) -> None:
        """Remove what :meth:`leaks` found (after reporting it): SIGKILL, delete the files."""
        from nbcluster.store.manager import cleanup_store

        for line in self._live_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        for sid in self.store_ids:
            cleanup_store(sid)

    def _live_processes(self) -> list[str]:
        me = psutil.Process()
        mine = {me.pid, *(p.pid for p in me.parents())}  # e.g. a `timeout` wrapping this run
        live = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if proc.pid in mine or proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(proc.info["cmdline"] or [])
                ours = proc.pid in self._pids or str(self.token_file) in cmd
                if not ours and "nbcluster" in cmd:
                    # A worker we never saw: it names our head in its environment.
                    ours = proc.environ().get("NBCLUSTER_HEAD", "").endswith(f":{self.port}")
                if ours:
                    live.append(f"{proc.pid} {cmd}")
            except psutil.Error:
                continue
        return live

    def _shm_files(self) -> list[str]:
        names = []
        with contextlib.suppress(OSError):
            for entry in os.listdir(SHM_DIR):
                if any(entry.startswith(f"nbc-{sid}") for sid in self.store_ids):
                    names.append(entry)
        return sorted(names)
