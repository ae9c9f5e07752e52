"""Helpers for tests with a standalone head and several node agents as separate processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import nbcluster as nb
from nbcluster.head.recovery import load_snapshot
from nbcluster.launch import free_port
from tests.conftest import stop_processes, wait_until


class Procs:
    """A head and node agents started as real processes, their output kept in files.

    Output goes to files, not pipes: a process whose pipe nobody reads would block on a full
    pipe and look dead.
    """

    def __init__(self, tmp: Path, host: str = "127.0.0.1", prefix: list[str] | None = None):
        self.tmp = tmp
        self.host = host
        self.port = free_port(host) if not prefix else free_port("127.0.0.1")
        self.token_file = tmp / "token"
        self.state_file = tmp / "head.state"
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", "ns1"]
        self.head: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[str, str] = {}
        self._logs: list[Path] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _popen(self, args: list[str], log: Path, prefix: list[str]) -> subprocess.Popen[bytes]:
        self._logs.append(log)
        with open(log, "ab") as out:
            return subprocess.Popen(
                [*prefix, sys.executable, "-m", "nbcluster", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_head(self, *flags: str, prefix: list[str] | None = None) -> None:
        log = self.tmp / "head.log"
        start = log.stat().st_size if log.exists() else 0
        self.head = self._popen(
            [
                "head",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--token-file",
                str(self.token_file),
                "--state-file",
                str(self.state_file),
                *flags,
            ],
            log,
            self.prefix if prefix is None else prefix,
        )
        wait_until(lambda: "NBCLUSTER_HEAD_READY" in log.read_bytes()[start:].decode(), 30)

    def join(self, name: str, *flags: str, prefix: list[str] | None = None) -> str:
        """Start a node agent named ``name``; returns its node id once it is ready."""
        log = self.tmp / f"agent-{name}.log"
        self.agents[name] = self._popen(
            [
                "worker",
                "--address",
                self.address,
                "--token-file",
                str(self.token_file),
                "--node-name",
                name,
                *flags,
            ],
            log,
            self.prefix if prefix is None else prefix,
        )

        def ready() -> str | None:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("NBCLUSTER_AGENT_READY"):
                    return line.split()[1]
            if self.agents[name].poll() is not None:
                raise AssertionError(f"agent {name} exited:\n{log.read_text(errors='replace')}")
            return None

        node_id = str(wait_until(ready, 60))
        self.node_ids[name] = node_id
        return node_id

    def wait_saved(self, actors: int, jobs: int, timeout: float = 10.0) -> None:
        """Wait until the head's restart snapshot lists ``actors`` ALIVE actors and ``jobs`` jobs.

        The head writes it a moment after a change: a head killed sooner restarts from the
        previous one (see test_hardening_faults for what that does to the newest actors).
        """

        def saved() -> bool:
            snap = load_snapshot(str(self.state_file))
            if snap is None:
                return False
            alive = sum(1 for a in snap.actors if a.get("state") == "ALIVE")
            return (alive, len(snap.jobs)) == (actors, jobs)

        wait_until(saved, timeout)

    def kill_head(self) -> None:
        assert self.head is not None
        self.head.kill()
        self.head.wait(10)

    def kill_agent(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.agents[name].send_signal(sig)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self._logs
        )

    def close(self) -> None:
        nb.shutdown()
        procs = [*([self.head] if self.head else []), *self.agents.values()]
        for p in procs:
            if p.poll() is None:  # a test may have frozen it (SIGSTOP): it must hear SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
        stop_processes(procs)


def node_alive(node_id: str) -> bool | None:
    """Whether the head sees ``node_id`` alive (``None``: unknown)."""
    for n in nb.nodes():
        if n["node_id"] == node_id:
            return bool(n["alive"])
    return None
