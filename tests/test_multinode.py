"""Several node agents and a standalone head, as real processes: node death, drain, rejoin and
head restart."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import nbcluster as nb
from tests.conftest import all_gone, wait_until
from tests.multinode import Procs, node_alive


@nb.remote
def where() -> tuple[str, int]:
    return nb.get_runtime_context().get_node_id(), os.getpid()


@nb.remote(max_retries=2)
def slow_where(started: str, seconds: float) -> tuple[str, int]:
    Path(started).write_text(str(os.getpid()))
    time.sleep(seconds)
    return nb.get_runtime_context().get_node_id(), os.getpid()


@nb.remote(max_restarts=1)
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n

    def where(self) -> tuple[str, int]:
        return nb.get_runtime_context().get_node_id(), os.getpid()

    def quit(self) -> None:
        nb.exit_actor()


def test_dead_node_is_detected_and_its_work_moves(procs: Procs, tmp_path: Path) -> None:
    procs.start_head()
    a = procs.join("a", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    counter = Counter.remote()
    assert nb.get(counter.incr.remote(), timeout=30) == 1
    assert nb.get(counter.where.remote(), timeout=30)[0] == a
    marker = tmp_path / "started"
    ref = slow_where.remote(str(marker), 3.0)
    wait_until(marker.exists, 30)
    b = procs.join("b", "--num-cpus", "2")

    procs.kill_agent("a")
    killed = time.monotonic()
    wait_until(lambda: node_alive(a) is False, timeout=12)
    assert time.monotonic() - killed < 10.0  # declared dead within 10 s
    node, _ = nb.get(ref, timeout=60)  # retried on the surviving node
    assert node == b
    # The actor was restarted there: its constructor ran again.
    assert nb.get(counter.where.remote(), timeout=60)[0] == b
    assert nb.get(counter.incr.remote(), timeout=30) == 1
    assert nb.get(where.remote(), timeout=30)[0] == b


def test_drained_node_hands_its_tasks_over_without_using_retries(
    procs: Procs, tmp_path: Path
) -> None:
    procs.start_head()
    a = procs.join("a", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    marker = tmp_path / "started"
    ref = slow_where.options(max_retries=0).remote(str(marker), 3.0)
    wait_until(marker.exists, 30)
    wpid = int(marker.read_text())
    b = procs.join("b", "--num-cpus", "1")
    procs.kill_agent("a", signal.SIGTERM)
    assert procs.agents["a"].wait(15) == 0
    wait_until(lambda: node_alive(a) is False, timeout=5)  # at once, not after a timeout
    node, pid = nb.get(ref, timeout=60)
    assert node == b and pid != wpid
    wait_until(lambda: all_gone([wpid]), timeout=15)


def test_node_cut_off_then_back_rejoins_as_new_incarnation(procs: Procs, tmp_path: Path) -> None:
    procs.start_head()
    a = procs.join("a", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    marker = tmp_path / "started"
    ref = slow_where.remote(str(marker), 8.0)
    wait_until(marker.exists, 30)
    old_worker = int(marker.read_text())
    b = procs.join("b", "--num-cpus", "1")
    # Freeze agent a (its worker goes on): to the head the node is cut off.
    os.kill(procs.agents["a"].pid, signal.SIGSTOP)
    try:
        wait_until(lambda: node_alive(a) is False, timeout=12)
        # Retried on b; the old worker's late result (it is still running) must not count.
        node, pid = nb.get(ref, timeout=60)
        assert (node, pid) != (a, old_worker) and node == b
    finally:
        os.kill(procs.agents["a"].pid, signal.SIGCONT)

    def rejoined() -> str | None:
        for n in nb.nodes():
            if n["name"] == "a" and n["alive"] and n["node_id"] != a:
                return str(n["node_id"])
        return None

    new_id = wait_until(rejoined, timeout=20)
    assert node_alive(a) is False  # the old incarnation stays dead
    wait_until(lambda: all_gone([old_worker]), timeout=15)  # its old workers are recycled
    seen = {n for n, _ in nb.get([where.remote() for _ in range(10)], timeout=60)}
    assert seen <= {b, new_id}


def test_head_restart_keeps_nodes_actors_and_running_tasks(procs: Procs, tmp_path: Path) -> None:
    procs.start_head()
    a = procs.join("a", "--num-cpus", "2")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    counter = Counter.remote()
    named = Counter.options(name="keeper", lifetime="detached").remote()
    assert nb.get([counter.incr.remote(), named.incr.remote()], timeout=30) == [1, 1]
    actor_pid = nb.get(counter.where.remote(), timeout=30)[1]
    marker = tmp_path / "started"
    ref = slow_where.options(max_retries=0).remote(str(marker), 4.0)
    wait_until(marker.exists, 30)
    procs.wait_saved(actors=2, jobs=1)

    procs.kill_head()
    procs.start_head()
    # The running task finishes where it ran; the actor kept its state and its process.
    assert nb.get(ref, timeout=60)[0] == a
    assert nb.get(counter.incr.remote(), timeout=30) == 2
    assert nb.get(counter.where.remote(), timeout=30) == (a, actor_pid)
    # The head knows them again: nodes, the named actor (from another driver too), new work.
    wait_until(lambda: node_alive(a) is True, timeout=20)
    assert nb.get(nb.get_actor("keeper").incr.remote(), timeout=30) == 2
    assert nb.get(where.remote(), timeout=30)[0] == a
    states = {x["actor_id"]: x["state"] for x in nb.actors()}
    assert states.get(counter._aid) == "ALIVE"
    nb.kill(named)
    # The restarted head watches the actor's process: exit_actor() still ends it.
    with pytest.raises(nb.exceptions.ActorDiedError, match="exit_actor"):
        nb.get(counter.quit.remote(), timeout=30)
    wait_until(lambda: all_gone([actor_pid]), timeout=15)
    with pytest.raises(nb.exceptions.ActorDiedError):
        nb.get(counter.incr.remote(), timeout=30)
    head_log = (tmp_path / "head.log").read_text()
    assert "restarted: waiting for 1 node(s), 2 actor(s), 1 job(s)" in head_log, head_log


def test_lost_results_are_rebuilt_and_lost_puts_raise(procs: Procs, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    procs.start_head()
    procs.join("main", "--num-cpus", "1")  # the driver's node (it attaches to the first)
    a = procs.join("a", "--num-cpus", "1", "--resources", '{"a": 1}')
    nb.init(address=procs.address, token_file=str(procs.token_file))
    runs = tmp_path / "runs"

    @nb.remote(resources={"a": 1})
    def produce(seed: int) -> object:
        with open(runs, "a") as f:
            f.write(nb.get_runtime_context().get_node_id() + "\n")
        return np.full(1_000_000, seed, dtype=np.int64)  # 8 MB: stored on the producing node

    @nb.remote
    def total(x: object) -> int:
        return int(np.asarray(x).sum())

    ref = produce.remote(7)
    ready, _ = nb.wait([ref], timeout=60)
    assert ready
    other = produce.remote(1)
    nb.wait([other], timeout=60)
    procs.kill_agent("a")
    wait_until(lambda: node_alive(a) is False, timeout=12)
    c = procs.join("c", "--num-cpus", "1", "--resources", '{"a": 1}')
    # get() rebuilds it by running the task again, on the node that can.
    assert int(nb.get(ref, timeout=60)[0]) == 7
    # So does a task that needs it as an argument.
    assert nb.get(total.remote(other), timeout=60) == 1_000_000
    assert runs.read_text().split() == [a, a, c, c]

    p = nb.put(np.ones(1_000_000))
    procs.kill_agent("main")
    wait_until(lambda: any(not n["alive"] and n["name"] == "main" for n in nb.nodes()), 12)
    with pytest.raises(nb.exceptions.ObjectLostError, match="put"):
        nb.get(p, timeout=30)


def test_status_command_lists_nodes_tasks_and_actors(procs: Procs, tmp_path: Path) -> None:
    import subprocess
    import sys

    procs.start_head()
    procs.join("box-a", "--num-cpus", "2", "--num-gpus", "1")
    procs.join("box-b", "--num-cpus", "1", "--resources", '{"tpu": 4}')
    nb.init(address=procs.address, token_file=str(procs.token_file))
    counter = Counter.options(name="ctr").remote()
    nb.get(counter.incr.remote(), timeout=30)
    marker = tmp_path / "started"
    ref = slow_where.remote(str(marker), 30.0)
    wait_until(marker.exists, 30)

    def status() -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "nbcluster", "status", "--address", procs.address],
            env={**os.environ, "NBCLUSTER_TOKEN_FILE": str(procs.token_file)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def shows_task() -> str | None:
        out = status()
        return out if "slow_where" in out else None  # task events reach the head in batches

    out = str(wait_until(shows_task, timeout=20))
    assert "box-a" in out and "box-b" in out and "tpu 0/4" in out
    assert "2 node(s)" in out
    task_line = next(line for line in out.splitlines() if line.startswith("slow_where"))
    assert "running" in task_line
    actor_line = next(line for line in out.splitlines() if line.startswith("Counter"))
    assert "ctr" in actor_line and "alive" in actor_line
    assert procs.token_file.read_text().strip() not in out  # never the secret
    nb.cancel(ref, force=True)


def test_files_of_a_killed_agents_store_are_removed_by_the_next_agent(
    procs: Procs, tmp_path: Path
) -> None:
    np = pytest.importorskip("numpy")
    procs.start_head()
    procs.join("main", "--num-cpus", "1")
    procs.join("doomed", "--num-cpus", "1", "--resources", '{"d": 1}')
    nb.init(address=procs.address, token_file=str(procs.token_file))

    @nb.remote(resources={"d": 1})
    def big() -> object:
        return np.ones(1_000_000)

    ref = big.remote()
    nb.wait([ref], timeout=60)
    store_id = next(n["store_id"] for n in nb.nodes() if n["name"] == "doomed")
    shm = Path("/dev/shm")
    assert list(shm.glob(f"nbc-{store_id}-*"))
    procs.kill_agent("doomed")  # SIGKILL: it cannot clean up
    procs.agents["doomed"].wait(10)
    owner = shm / f"nbc-{store_id}.owner"
    old = time.time() - 60  # owner files younger than 2 s are left alone (a store may be starting)
    os.utime(owner, (old, old))
    procs.join("next", "--num-cpus", "1")
    assert not list(shm.glob(f"nbc-{store_id}*"))
