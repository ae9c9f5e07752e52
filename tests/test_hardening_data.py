"""Fault semantics of data and errors: lost arguments rebuilt for tasks already submitted, a
driver without a store of its own, remote exceptions that cannot be rebuilt in the driver, and
argument checks of get / wait / cancel."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.exceptions import TaskError
from tests.conftest import wait_until
from tests.multinode import Procs, node_alive


# ------------------------------------------------------------------ remote errors
class TwoArgError(Exception):
    """Unpickling calls ``TwoArgError(message)``: its ``__init__`` wants two arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")


WORKER_ONLY = """
class WorkerOnlyError(Exception):
    pass
"""


def raise_two_args() -> None:
    raise TwoArgError(7, "disk on fire")


def raise_worker_only(where: str) -> None:
    # A module only the worker can import: the driver cannot unpickle the exception.
    sys.path.insert(0, where)
    import nbc_worker_only_mod  # type: ignore[import-not-found]

    raise nbc_worker_only_mod.WorkerOnlyError("only the worker knows this class")


@nb.remote(max_retries=0)
def two_args_task() -> None:
    raise_two_args()


@nb.remote(max_retries=0)
def worker_only_task(where: str) -> None:
    raise_worker_only(where)


@nb.remote
class Failing:
    def __init__(self, mode: str = "", where: str = "") -> None:
        if mode == "two":
            raise_two_args()
        if mode == "worker-only":
            raise_worker_only(where)

    def two(self) -> None:
        raise_two_args()

    def worker_only(self, where: str) -> None:
        raise_worker_only(where)


def check_wrapped(err: BaseException, name: str, type_name: str, message: str, fn: str) -> None:
    """The wrapper names the task, the remote type and message, and shows the remote stack."""
    assert isinstance(err, TaskError), repr(err)
    text = str(err)
    assert name in text, text
    assert type_name in text and message in text, text
    assert "Traceback (most recent call last)" in text and f"in {fn}" in text, text
    assert err.cause_type.endswith(type_name)
    assert err.cause_unavailable  # and why it is only a wrapper


@pytest.fixture
def worker_only_dir(tmp_path: Path) -> str:
    (tmp_path / "nbc_worker_only_mod.py").write_text(WORKER_ONLY)
    return str(tmp_path)


def test_task_exception_that_cannot_be_unpickled_keeps_its_story(
    cluster: nb.ClusterInfo, worker_only_dir: str
) -> None:
    with pytest.raises(TaskError) as info:
        nb.get(two_args_task.remote(), timeout=60)
    check_wrapped(info.value, "two_args_task", "TwoArgError", "code 7: disk on fire", "raise_two")
    assert "TypeError" in str(info.value)  # why it could not be rebuilt

    with pytest.raises(TaskError) as info:
        nb.get(worker_only_task.remote(worker_only_dir), timeout=60)
    check_wrapped(
        info.value,
        "worker_only_task",
        "WorkerOnlyError",
        "only the worker knows this class",
        "raise_worker_only",
    )
    assert "ModuleNotFoundError" in str(info.value)


def test_actor_exception_that_cannot_be_unpickled_keeps_its_story(
    cluster: nb.ClusterInfo, worker_only_dir: str
) -> None:
    a = Failing.remote()
    with pytest.raises(TaskError) as info:
        nb.get(a.two.remote(), timeout=60)
    check_wrapped(info.value, "two", "TwoArgError", "code 7: disk on fire", "raise_two_args")
    with pytest.raises(TaskError) as info:
        nb.get(a.worker_only.remote(worker_only_dir), timeout=60)
    check_wrapped(
        info.value, "worker_only", "WorkerOnlyError", "only the worker knows", "raise_worker_only"
    )

    for mode in ("two", "worker-only"):
        broken = Failing.remote(mode, worker_only_dir)
        with pytest.raises(TaskError) as info:
            nb.get(broken.two.remote(), timeout=60)
        assert "__init__" in str(info.value)
        if mode == "two":
            check_wrapped(info.value, "Failing", "TwoArgError", "disk on fire", "raise_two_args")
        else:
            check_wrapped(
                info.value, "Failing", "WorkerOnlyError", "only the worker", "raise_worker_only"
            )


def test_exception_that_unpickles_is_still_raised_as_its_own_type(
    cluster: nb.ClusterInfo,
) -> None:
    @nb.remote(max_retries=0)
    def boom() -> None:
        raise KeyError("plain")

    with pytest.raises(KeyError) as info:
        nb.get(boom.remote(), timeout=60)
    assert isinstance(info.value, TaskError) and not info.value.cause_unavailable


# ------------------------------------------------------------------ argument checks
def test_get_wait_cancel_reject_what_is_not_a_ref(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def one() -> int:
        return 1

    ref = one.remote()
    with pytest.raises(TypeError, match=r"wait\(\) expected a list of ObjectRefs, got a list "):
        nb.wait([5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="containing str"):
        nb.wait([ref, "x"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="got a single ObjectRef"):
        nb.wait(ref)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got dict"):
        nb.wait({})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="containing list"):
        nb.wait([[ref]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"value 5, which is not an ray\.ObjectRef"):
        nb.get([ref, 5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="got int"):
        nb.get(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cancel\(\) expected an ObjectRef, got int"):
        nb.cancel(5)  # type: ignore[arg-type]
    # Nothing was lost by the bad calls.
    assert nb.get(ref, timeout=60) == 1
    assert nb.wait([ref], timeout=60) == ([ref], [])


# ------------------------------------------------------------------ a driver with no store
def test_driver_without_a_store_reads_large_results_from_their_node(
    procs: Procs, tmp_path: Path
) -> None:
    np = pytest.importorskip("numpy")
    procs.start_head()
    # Connected before any agent registered: this driver has no store of its own.
    nb.init(address=procs.address, token_file=str(procs.token_file))
    assert current.require().store is None
    procs.join("a", "--num-cpus", "1")
    runs = tmp_path / "runs"

    @nb.remote
    def make(n: int) -> object:
        with open(runs, "a") as f:
            f.write(f"{n}\n")
        return np.arange(n, dtype=np.int64)

    small, big = make.remote(1_000_000 // 8), make.remote(50_000_000 // 8)  # 1 MB and 50 MB
    a, b = nb.get([small, big], timeout=120)
    assert np.array_equal(a, np.arange(1_000_000 // 8, dtype=np.int64))
    assert np.array_equal(b, np.arange(50_000_000 // 8, dtype=np.int64))
    assert nb.get(small, timeout=60).sum() == a.sum()  # read again: still there
    # Resolved on the client's I/O thread when it completes: the read happens off that thread.
    later = make.remote(2_000_000 // 8)
    fut = later.future()
    assert np.array_equal(fut.result(timeout=60), np.arange(2_000_000 // 8, dtype=np.int64))
    assert sorted(runs.read_text().split()) == sorted(
        str(k // 8) for k in (1_000_000, 50_000_000, 2_000_000)
    )  # each producer ran once
    # A task of this driver can take them as arguments too (read on the node, not here).
    assert nb.get(total.remote(big), timeout=60) == int(b.sum())


@nb.remote
def total(x: object) -> int:
    import numpy as np

    return int(np.asarray(x).sum())


# ------------------------------------------------------------------ lost arguments
def test_consumers_submitted_right_after_their_arguments_node_died_get_them_rebuilt(
    procs: Procs, tmp_path: Path
) -> None:
    np = pytest.importorskip("numpy")
    procs.start_head()
    procs.join("main", "--num-cpus", "3")  # the driver's node (it attaches to the first)
    b = procs.join("b", "--num-cpus", "2")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    runs = tmp_path / "runs"
    n = 10_000_000 // 8  # 10 MB each: stored on the producing node

    @nb.remote
    def produce(seed: int) -> object:
        with open(runs, "a") as f:
            f.write(f"{seed} {nb.get_runtime_context().get_node_id()}\n")
        return np.full(n, seed, dtype=np.int64)

    @nb.remote
    def consume(x: object, seed: int) -> tuple[int, int]:
        arr = np.asarray(x)
        return int(arr.sum()), int((arr == seed).all())

    on_b = nb.NodeAffinitySchedulingStrategy(b, soft=True)  # soft: it may be rebuilt elsewhere
    refs = [produce.options(scheduling_strategy=on_b).remote(i) for i in range(6)]
    ready, _ = nb.wait(refs, num_returns=6, timeout=120)
    assert len(ready) == 6
    assert {line.split()[1] for line in runs.read_text().splitlines()} == {b}

    procs.kill_agent("b")
    consumers = [consume.remote(r, i) for i, r in enumerate(refs)]  # at once: b not known dead
    wait_until(lambda: node_alive(b) is False, timeout=15)
    declared = time.monotonic()
    assert nb.get(consumers, timeout=60) == [(i * n, 1) for i in range(6)]
    took = time.monotonic() - declared
    print(f"consumers done {took:.2f} s after the node was declared dead")
    assert took < 6.0, f"consumers finished {took:.1f} s after the node was declared dead"
    # Each producer ran again, elsewhere (lineage), exactly once more.
    seen: dict[int, list[str]] = {}
    for line in runs.read_text().splitlines():
        seed, node = line.split()
        seen.setdefault(int(seed), []).append(node)
    assert sorted(seen) == list(range(6))
    assert all(len(v) == 2 and v[0] == b and v[1] != b for v in seen.values()), seen


def test_queued_consumers_of_a_dead_nodes_results_wait_for_them_to_be_rebuilt(
    procs: Procs, tmp_path: Path
) -> None:
    np = pytest.importorskip("numpy")
    procs.start_head()
    procs.join("main", "--num-cpus", "2", "--resources", '{"m": 1}')
    b = procs.join("b", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    runs = tmp_path / "runs"
    go = tmp_path / "go"
    n = 2_000_000 // 8

    @nb.remote
    def produce(seed: int) -> object:
        with open(runs, "a") as f:
            f.write(f"{seed} {nb.get_runtime_context().get_node_id()}\n")
        return np.full(n, seed, dtype=np.int64)

    @nb.remote(resources={"m": 1})
    def hold() -> None:
        wait_until(go.exists, timeout=60)

    @nb.remote(resources={"m": 1})
    def consume(x: object) -> int:
        return int(np.asarray(x).sum())

    on_b = nb.NodeAffinitySchedulingStrategy(b, soft=True)
    refs = [produce.options(scheduling_strategy=on_b).remote(i) for i in range(3)]
    assert len(nb.wait(refs, num_returns=3, timeout=120)[0]) == 3
    blocker = hold.remote()
    procs.kill_agent("b")
    consumers = [consume.remote(r) for r in refs]  # queued: "m" is held
    wait_until(lambda: node_alive(b) is False, timeout=15)
    go.write_text("")  # now they get a worker, with their arguments' node known dead
    released = time.monotonic()
    assert nb.get(consumers, timeout=60) == [i * n for i in range(3)]
    nb.get(blocker, timeout=30)
    took = time.monotonic() - released
    assert took < 6.0, f"consumers finished {took:.1f} s after they could run"
    nodes = [line.split()[1] for line in runs.read_text().splitlines()]
    assert len(nodes) == 6 and nodes[:3] == [b] * 3 and b not in nodes[3:]


def test_values_stored_on_a_node_back_from_a_cut_are_alive_and_old_ones_rebuilt(
    procs: Procs, tmp_path: Path
) -> None:
    """A node cut off long enough is declared dead, then rejoins as a new incarnation with the
    same (emptied) store: what it stored before is lost, what it stores after is not."""
    np = pytest.importorskip("numpy")
    procs.start_head()
    procs.join("main", "--num-cpus", "1")  # the driver's node (it attaches to the first)
    a = procs.join("a", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    runs = tmp_path / "runs"
    n = 2_000_000 // 8  # 2 MB each: stored on the producing node

    @nb.remote
    def produce(seed: int) -> object:
        with open(runs, "a") as f:
            f.write(f"{seed} {nb.get_runtime_context().get_node_id()}\n")
        return np.full(n, seed, dtype=np.int64)

    @nb.remote
    def consume(x: object) -> int:
        return int(np.asarray(x).sum())

    old = produce.options(scheduling_strategy=nb.NodeAffinitySchedulingStrategy(a, soft=True))
    before = old.remote(7)
    assert nb.wait([before], timeout=60) == ([before], [])
    # Freeze agent a: to the head the node is cut off, and declared dead.
    os.kill(procs.agents["a"].pid, signal.SIGSTOP)
    try:
        wait_until(lambda: node_alive(a) is False, timeout=15)
    finally:
        os.kill(procs.agents["a"].pid, signal.SIGCONT)

    def rejoined() -> str | None:
        for node in nb.nodes():
            if node["name"] == "a" and node["alive"] and node["node_id"] != a:
                return str(node["node_id"])
        return None

    new_a = str(wait_until(rejoined, timeout=20))
    # Stored by the new incarnation (in the store the dead one had): read as they are, each
    # made once. (They were taken for lost: rebuilt on the same node until it gave up.)
    on_new = produce.options(scheduling_strategy=nb.NodeAffinitySchedulingStrategy(new_a))
    after = [on_new.remote(i) for i in range(3)]
    assert nb.get([consume.remote(r) for r in after], timeout=60) == [i * n for i in range(3)]
    assert np.array_equal(nb.get(after[2], timeout=60), np.full(n, 2, dtype=np.int64))
    # Stored by the old incarnation: lost with it, rebuilt (wherever: the new one is fine).
    assert nb.get(consume.remote(before), timeout=60) == 7 * n
    seen: dict[int, list[str]] = {}
    for line in runs.read_text().splitlines():
        seed, node = line.split()
        seen.setdefault(int(seed), []).append(node)
    assert {i: seen[i] for i in range(3)} == {i: [new_a] for i in range(3)}, seen
    assert len(seen[7]) == 2 and seen[7][0] == a, seen


def _worker_store() -> Any:
    """Inside a task: a store client of this worker's node, writing as this worker."""
    from nbcluster.protocol.security import derive_keys, token_from_environment
    from nbcluster.store.client import StoreClient
    from nbcluster.transport import Transport

    transport = Transport(derive_keys(token_from_environment() or ""))
    env = os.environ
    return StoreClient(
        transport,
        env["NBCLUSTER_STORE"],
        env["NBCLUSTER_STORE_ID"],
        writer=env["NBCLUSTER_WORKER_ID"],
    )


@nb.remote(max_retries=0)
def _reserve_and_die(oid: str) -> None:
    store = _worker_store()
    store._request({"k": "sreserve", "oid": oid, "size": 1 << 20, "job": "", "w": store.writer})
    os.kill(os.getpid(), signal.SIGKILL)  # dies between reserving and sealing


@nb.remote
def _store_state(oid: str) -> str:
    store = _worker_store()
    try:
        store._request({"k": "slocate", "oid": oid})
    except Exception as exc:
        return str(exc)
    return "readable"


def test_an_object_its_writer_died_writing_is_freed() -> None:
    """Found by the 30-minute chaos run: a worker killed between reserving and sealing a result
    left it "in the store" but unsealed for good, so a retry's copy pulled to that node was never
    fetched ("not sealed yet") and the value could not be read there."""
    nb.shutdown()
    nb.init(num_cpus=1)
    try:
        with pytest.raises(nb.exceptions.NbclusterError):
            nb.get(_reserve_and_die.remote("half.written"), timeout=30)
        states: list[str] = []

        def freed() -> bool:
            states.append(nb.get(_store_state.remote("half.written"), timeout=30))
            return "not in the object store" in states[-1]

        wait_until(freed, timeout=20, interval=0.2)
        assert "not sealed" not in states[-1]
    finally:
        nb.shutdown()
