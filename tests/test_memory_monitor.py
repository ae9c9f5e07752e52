"""The node's memory monitor: a task that fills the node's memory is killed with a clear
``OutOfMemoryError`` (or retried, when its driver retries it), before the kernel's OOM killer."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

import nbcluster as nb
from nbcluster.agent import memory
from nbcluster.agent.memory import RunningTask, choose
from tests.multinode import Procs

TIMEOUT = 120
#: How far above the node's use at the test's start the monitor steps in.
HEADROOM = 1536 << 20
#: The most a test task allocates (it is killed long before, at HEADROOM).
MOST = 8 << 30
CHUNK = 128 << 20


def _fill() -> int:
    held = []
    for _ in range(MOST // CHUNK):
        held.append(b"x" * CHUNK)  # written: resident, unlike a calloc'd bytearray
        time.sleep(0.02)
    return len(held)


@nb.remote(max_retries=0)
def hog() -> int:
    return _fill()


@nb.remote(max_retries=1)
def hog_once(marker: str) -> str:
    if Path(marker).exists():
        return "second try"
    Path(marker).write_text("")
    _fill()
    return "first try"


def _monitor_env(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = psutil.virtual_memory()
    if vm.available < HEADROOM + (2 << 30):
        pytest.skip("not enough free memory to fill some of it safely")
    used = vm.total - vm.available
    monkeypatch.setenv(memory.THRESHOLD_ENV, f"{(used + HEADROOM) / vm.total:.4f}")
    monkeypatch.setenv(memory.REFRESH_MS_ENV, "50")


def test_a_task_filling_memory_is_killed_with_a_clear_error(
    procs: Procs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _monitor_env(monkeypatch)  # the agent inherits the test's environment
    procs.start_head()
    procs.join("box", "--num-cpus", "2")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    with pytest.raises(nb.exceptions.OutOfMemoryError) as err:
        nb.get(hog.remote(), timeout=TIMEOUT)
    text = str(err.value)
    assert isinstance(err.value, nb.exceptions.WorkerCrashedError)  # caught as a crash too
    assert "memory monitor killed the worker running task hog" in text
    assert "above the threshold" in text and "GiB" in text and "node box" in text
    assert "0 retries used of max_retries=0" in text

    # A retriable task is run again (here it then succeeds), as Ray does.
    marker = tmp_path / "first-try"
    assert nb.get(hog_once.remote(str(marker)), timeout=TIMEOUT) == "second try"
    # The node serves on: the agent was not the one killed.
    assert nb.get(nb.remote(lambda: os.getpid()).remote(), timeout=TIMEOUT) > 0


def test_the_newest_retriable_task_is_chosen() -> None:
    old_r = RunningTask("a", "f", True, 1.0)
    new_r = RunningTask("b", "f", True, 2.0)
    newest = RunningTask("c", "g", False, 3.0)
    assert choose({"w1": old_r, "w2": new_r, "w3": newest}) == "w2"
    assert choose({"w1": old_r, "w3": newest}) == "w1"
    assert choose({"w3": newest, "w4": RunningTask("d", "g", False, 0.5)}) == "w3"
    assert choose({}) is None


def test_settings_fall_back_to_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory.THRESHOLD_ENV, "1.5")
    monkeypatch.setenv(memory.REFRESH_MS_ENV, "nonsense")
    assert memory.settings() == (memory.DEFAULT_THRESHOLD, memory.DEFAULT_REFRESH_MS / 1000)
    monkeypatch.setenv(memory.REFRESH_MS_ENV, "0")
    assert memory.settings()[1] == 0  # off
    used, total = memory.node_usage()
    assert 0 < used < total


def test_task_slot_is_shared_between_worker_and_agent(tmp_path: Path) -> None:
    path = str(tmp_path / "w1.task")
    agent = memory.TaskSlot(path, create=True)
    worker = memory.TaskSlot(path)
    assert agent.read() is None  # nothing ran yet
    worker.started("t" * 300, "fn", True)  # an over-long id is cut, not spilled into the name
    got = agent.read()
    assert got is not None and got.tid == "t" * 128 and got.name == "fn" and got.retriable
    assert abs(got.started - time.monotonic()) < 60
    worker.ended()
    assert agent.read() is None
    worker.started("t2", "g", False)
    got = agent.read()
    assert got is not None and (got.tid, got.name, got.retriable) == ("t2", "g", False)
    worker.close()
    agent.close(unlink=True)
    assert not os.path.exists(path)
