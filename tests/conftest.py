"""Shared fixtures: real local clusters (head, node agent and worker processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

import nbcluster as nb

if TYPE_CHECKING:
    from tests.multinode import Procs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[nb.ClusterInfo]:
    """A local cluster with 2 CPUs, 2 logical GPUs and one custom resource."""
    nb.shutdown()
    info = nb.init(num_cpus=2, num_gpus=2, resources={"custom": 1})
    yield info
    nb.shutdown()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """A standalone head and node agents started by the test (``tests/multinode.py``); their
    logs are printed when the test fails."""
    from tests.multinode import Procs  # it imports this module

    nb.shutdown()
    p = Procs(tmp_path)
    try:
        yield p
    except BaseException:
        print(p.logs())
        raise
    finally:
        p.close()


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[Any]:
    """A single-node Slurm of this test session (``tests/slurm_local.py``), installed with apt
    and started on first use; skipped with the reason where it cannot run (not root)."""
    from tests.slurm_local import INFRASTRUCTURE_PIDS, LocalSlurm, why_unavailable

    why = why_unavailable()
    if why is not None:
        pytest.skip(f"no local Slurm: {why}")
    slurm = LocalSlurm()
    try:
        slurm.start()
    except BaseException:
        slurm.stop()
        raise
    daemons = {p.pid for p in slurm.procs}
    INFRASTRUCTURE_PIDS.update(daemons)
    try:
        yield slurm
    finally:
        slurm.stop()
        INFRASTRUCTURE_PIDS.difference_update(daemons)


def wait_until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> object:
    """Poll ``cond`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {cond}")
        time.sleep(interval)


def descendants() -> list[psutil.Process]:
    """This process's descendants, without long-lived test infrastructure and its children."""
    from tests.slurm_local import INFRASTRUCTURE_PIDS  # one registry, however conftest is loaded

    procs = psutil.Process().children(recursive=True)
    if not INFRASTRUCTURE_PIDS:
        return procs
    skip = set(INFRASTRUCTURE_PIDS)
    for pid in INFRASTRUCTURE_PIDS:
        try:
            skip.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return [p for p in procs if p.pid not in skip]


def all_gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def ready_line(stream: Any, marker: str = "NBCLUSTER_AGENT_READY", max_lines: int = 100) -> str:
    """Read a started process's merged stdout/stderr up to the line starting with ``marker``.

    Warnings may come first (e.g. an agent removing what a killed store left in /dev/shm); a
    process that exits first ends the stream, which fails here with what it printed.
    """
    seen: list[str] = []
    for _ in range(max_lines):
        line = stream.readline()
        if line.startswith(marker):
            return str(line)
        if not line:
            break
        seen.append(line)
    raise AssertionError(f"no {marker} line; the process printed:\n{''.join(seen)}")


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float = 15.0) -> None:
    """Terminate ``procs`` (last started first), kill what outlives ``timeout``, close pipes."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if p.stdout is not None:
            p.stdout.close()


def run_script(
    code: str, timeout: float = 60.0, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a separate driver script (its ``__main__``)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )
