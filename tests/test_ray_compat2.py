"""More of Ray Core through ``import nbcluster as ray``: ``util.multiprocessing.Pool``, the joblib
backend, refs, options and the runtime context, ``util.state``; each against a real cluster."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.util.multiprocessing import Pool, TimeoutError

T = 60  # seconds: the bound of every wait here


@pytest.fixture(scope="module")
def cluster() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=2)
    yield info
    nb.shutdown()


# --- util.multiprocessing.Pool -----------------------------------------------------------------


def _square(x: int) -> int:
    return x * x


def _pid(_: object = None) -> int:
    return os.getpid()


def _inverse(x: int) -> float:
    return 1 / x


_SEEN: list[str] = []


def _remember(tag: str) -> None:
    _SEEN.append(tag)


def _seen(_: object) -> list[str]:
    return list(_SEEN)


def test_pool_map_starmap_imap_apply(cluster: nb.ClusterInfo) -> None:
    with Pool(processes=2) as pool:
        assert pool.map(_square, range(10)) == [x * x for x in range(10)]
        assert pool.map(_square, range(7), chunksize=3) == [x * x for x in range(7)]
        assert pool.starmap(pow, [(2, 3), (3, 2), (5, 0)]) == [8, 9, 1]
        assert list(pool.imap(_square, range(6))) == [0, 1, 4, 9, 16, 25]
        assert sorted(pool.imap_unordered(_square, range(6), chunksize=2)) == [0, 1, 4, 9, 16, 25]
        assert pool.apply(divmod, (7, 2)) == (3, 1)
        assert pool.apply(sorted, ([3, 1, 2],), {"reverse": True}) == [3, 2, 1]
        assert pool.map(lambda s: s.upper(), ["a", "b"]) == ["A", "B"]  # lambdas pickle
        assert pool.map(_square, []) == []
        # Work runs in two other processes, not in the driver.
        pids = set(pool.map(_pid, range(8), chunksize=1))
        assert len(pids) == 2 and os.getpid() not in pids


def test_pool_default_processes_is_the_cluster_cpu_count(cluster: nb.ClusterInfo) -> None:
    pool = Pool()
    try:
        assert len(set(pool.map(_pid, range(8), chunksize=1))) == 2
    finally:
        pool.terminate()


def test_pool_async_results_callbacks_and_timeouts(cluster: nb.ClusterInfo) -> None:
    got: list[Any] = []
    errors: list[BaseException] = []
    done = threading.Event()
    with Pool(processes=2) as pool:
        slow = pool.apply_async(time.sleep, (1.5,))
        with pytest.raises(TimeoutError):
            slow.get(timeout=0.1)
        assert not slow.ready()
        with pytest.raises(ValueError, match="not ready"):
            slow.successful()
        assert slow.get(timeout=T) is None and slow.successful()
        res = pool.map_async(_square, range(4), callback=lambda v: (got.append(v), done.set()))
        assert res.get(timeout=T) == [0, 1, 4, 9]
        assert done.wait(T) and got == [[0, 1, 4, 9]]
        done.clear()
        bad = pool.starmap_async(
            divmod, [(1, 1), (1, 0)], error_callback=lambda e: (errors.append(e), done.set())
        )
        bad.wait(timeout=T)
        assert bad.ready() and not bad.successful()
        with pytest.raises(ZeroDivisionError):
            bad.get(timeout=T)
        assert done.wait(T) and isinstance(errors[0], ZeroDivisionError)


def test_pool_errors_are_the_functions_own(cluster: nb.ClusterInfo) -> None:
    with Pool(processes=2) as pool:
        with pytest.raises(ZeroDivisionError):
            pool.map(_inverse, [1, 2, 0, 4])
        it = pool.imap(_inverse, [1, 0])
        assert next(it) == 1.0
        with pytest.raises(ZeroDivisionError):
            next(it)
        slow = pool.imap(time.sleep, [2])
        with pytest.raises(TimeoutError):
            slow.next(timeout=0.1)
        assert slow.next(timeout=T) is None
        with pytest.raises(StopIteration):
            slow.next(timeout=T)
        with pytest.raises(ValueError, match="Chunksize"):
            pool.map(_square, [1], chunksize=0)
    with pytest.raises(ValueError, match="at least 1"):
        Pool(processes=0)


def test_pool_initializer_runs_in_every_process(cluster: nb.ClusterInfo) -> None:
    with Pool(processes=2, initializer=_remember, initargs=("init",)) as pool:
        seen = pool.map(_seen, range(6), chunksize=1)
    assert all(s == ["init"] for s in seen)


def test_pool_maxtasksperchild_replaces_processes(cluster: nb.ClusterInfo) -> None:
    with Pool(processes=1, maxtasksperchild=2) as pool:
        pids = pool.map(_pid, range(6), chunksize=1)
    # Two chunks per process, then a fresh one: three processes in turn.
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_pool_close_join_terminate(cluster: nb.ClusterInfo) -> None:
    pool = Pool(processes=2)
    res = pool.map_async(time.sleep, [0.5, 0.5])
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(_square, [1])
    pool.join()  # waits for the work first
    assert res.ready() and res.get(timeout=0) == [None, None]
    pool.terminate()  # twice is fine
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(_square, (1,))


# --- joblib backend ----------------------------------------------------------------------------


def _square_and_pid(i: int) -> tuple[int, int]:
    return i * i, os.getpid()


def test_joblib_backend_runs_batches_on_the_cluster(cluster: nb.ClusterInfo) -> None:
    joblib = pytest.importorskip("joblib")
    from nbcluster.util.joblib import register_nbcluster, register_ray

    register_ray()
    with joblib.parallel_backend("ray"):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(_square_and_pid)(i) for i in range(40))
    assert [v for v, _ in out] == [i * i for i in range(40)]
    pids = {p for _, p in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # n_jobs=-1: the cluster's 2 CPUs
    register_nbcluster()
    with joblib.parallel_backend("nbcluster", n_jobs=2), pytest.raises(ZeroDivisionError):
        joblib.Parallel()(joblib.delayed(_inverse)(i) for i in [1, 0, 2])


def test_joblib_backend_serves_scikit_learn(cluster: nb.ClusterInfo) -> None:
    joblib = pytest.importorskip("joblib")
    pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    from nbcluster.util.joblib import register_ray

    register_ray()
    x, y = make_classification(n_samples=200, random_state=0)
    with joblib.parallel_backend("ray"):
        scores = cross_val_score(DecisionTreeClassifier(random_state=0), x, y, cv=4, n_jobs=-1)
    assert len(scores) == 4 and all(0.5 < s <= 1.0 for s in scores)


def test_joblib_missing_is_a_clear_error() -> None:
    from tests.conftest import ROOT, run_script

    proc = run_script(
        "import sys\n"
        "sys.modules['joblib'] = None\n"
        "sys.modules['joblib._parallel_backends'] = None\n"
        "from nbcluster.util.joblib import register_ray\n"
        "try:\n"
        "    register_ray()\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n",
        timeout=60,
        cwd=ROOT,
    )
    assert "ERR the joblib backend of nbcluster needs joblib" in proc.stdout, proc.stderr


# --- refs --------------------------------------------------------------------------------------


@nb.remote
def _echo(x: Any) -> Any:
    return x


@nb.remote
def _kinds(top: Any, nested: list[Any], keyed: dict[str, Any]) -> tuple[str, str, str, Any]:
    inner = nested[0]
    return (
        type(top).__name__,
        type(inner).__name__,
        type(keyed["r"]).__name__,
        nb.get(inner, timeout=T),
    )


def test_ref_ids_round_trip(cluster: nb.ClusterInfo) -> None:
    ref = nb.put({"a": 1})
    assert len(ref.binary()) == 28  # Ray's object id size
    again = nb.ObjectRef(ref.binary())
    assert again == ref and hash(again) == hash(ref) and again is not ref
    assert nb.get(again, timeout=T) == {"a": 1}
    assert nb.ObjectRef(ref.hex()) == ref
    # Ray's round trip through the hex form, and its class methods.
    assert ref.hex() == ref.binary().hex() and len(ref.hex()) == 56
    assert nb.ObjectRef(bytes.fromhex(ref.hex())) == ref
    assert nb.ObjectRef.from_hex(ref.hex()) == ref == nb.ObjectRef.from_binary(ref.binary())
    task_ref = _echo.remote(7)
    assert nb.get(nb.ObjectRef(task_ref.binary()), timeout=T) == 7
    # A ref remade from bytes keeps the object alive like any other ref.
    del ref
    assert nb.get(again, timeout=T) == {"a": 1}
    with pytest.raises(ValueError, match="no object with this id is known here"):
        nb.ObjectRef(b"ffffffffff99.p")
    with pytest.raises(TypeError, match="bytes of an object id"):
        nb.ObjectRef(5)  # type: ignore[arg-type]


def test_nil_ref(cluster: nb.ClusterInfo) -> None:
    nil = nb.ObjectRef.nil()
    assert nil.is_nil() and not nb.put(1).is_nil()
    assert nil.binary() == b"\0" * 28
    assert nil == nb.ObjectRef.nil() and nil != nb.put(1)
    with pytest.raises(ValueError, match="nil ObjectRef"):
        nb.get(nil)
    with pytest.raises(ValueError, match="nil ObjectRef"):
        nb.wait([nil], timeout=1)
    with pytest.raises(ValueError, match=r"ObjectRef\.nil"):
        nb.ObjectRef(b"\0" * 28)


def test_get_of_non_refs_raises_rays_errors(cluster: nb.ClusterInfo) -> None:
    ref = nb.put(1)
    with pytest.raises(TypeError) as info:
        nb.get([ref, 5])  # type: ignore[list-item]
    assert (
        str(info.value) == "Attempting to call `get` on the value 5, which is not an ray.ObjectRef."
    )
    with pytest.raises(ValueError, match="'object_refs' must either be an ObjectRef or a list"):
        nb.get(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid type of object refs, <class 'dict'>"):
        nb.get({"a": ref})  # type: ignore[arg-type]
    assert nb.get(ref, timeout=T) == 1  # nothing lost


def test_refs_nested_in_arguments_stay_refs(cluster: nb.ClusterInfo) -> None:
    ref = nb.put(41)
    top, nested, keyed, value = nb.get(_kinds.remote(ref, [ref], {"r": ref}), timeout=T)
    assert (top, nested, keyed, value) == ("int", "ObjectRef", "ObjectRef", 41)
    # A returned container of refs comes back as refs, not values.
    out = nb.get(_echo.remote([ref]), timeout=T)
    assert isinstance(out[0], nb.ObjectRef) and nb.get(out[0], timeout=T) == 41


# --- options and the runtime context -----------------------------------------------------------

# Every option Ray documents for remote functions, with a value Ray accepts.
RAY_TASK_OPTIONS: dict[str, Any] = {
    "num_cpus": 1,
    "num_gpus": 0,
    "resources": {},
    "memory": 0,
    "accelerator_type": None,
    "object_store_memory": None,
    "max_calls": 0,
    "max_retries": 1,
    "retry_exceptions": False,
    "num_returns": 1,
    "name": "renamed",
    "runtime_env": None,
    "scheduling_strategy": "DEFAULT",
    "_metadata": {"k": "v"},
    "enable_task_events": False,
    "label_selector": {},
    "_labels": {},
    "placement_group": "default",
    "placement_group_bundle_index": -1,
    "placement_group_capture_child_tasks": None,
    "_generator_backpressure_num_objects": -1,
}

RAY_ACTOR_OPTIONS: dict[str, Any] = {
    "num_cpus": 0,
    "num_gpus": 0,
    "resources": {},
    "memory": 0,
    "accelerator_type": None,
    "object_store_memory": None,
    "name": None,
    "namespace": None,
    "lifetime": None,
    "get_if_exists": False,
    "max_restarts": 0,
    "max_task_retries": 0,
    "max_pending_calls": -1,
    "max_concurrency": 1,
    "concurrency_groups": {"io": 2},
    "runtime_env": None,
    "scheduling_strategy": "DEFAULT",
    "_metadata": {},
    "enable_task_events": True,
    "label_selector": {},
    "placement_group": None,
    "placement_group_bundle_index": -1,
    "placement_group_capture_child_tasks": None,
    "allow_out_of_order_execution": False,
}


@nb.remote
def _plus_one(x: int) -> int:
    return x + 1


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    @nb.method(num_returns=1, concurrency_group="io", max_task_retries=0)
    def add(self, k: int) -> int:
        self.n += k
        return self.n


def test_every_ray_option_is_accepted(cluster: nb.ClusterInfo) -> None:
    assert nb.get(_plus_one.options(**RAY_TASK_OPTIONS).remote(1), timeout=T) == 2
    deco = nb.remote(**{k: v for k, v in RAY_TASK_OPTIONS.items() if k != "name"})
    assert nb.get(deco(lambda x: x * 3).remote(2), timeout=T) == 6
    actor = nb.remote(**RAY_ACTOR_OPTIONS)(_Counter).remote()
    assert nb.get(actor.add.remote(2), timeout=T) == 2
    call = actor.add.options(num_returns=1, concurrency_group="io", enable_task_events=False)
    assert nb.get(call.remote(3), timeout=T) == 5
    nb.kill(actor)


def test_misspelled_options_name_the_nearest_valid_one(cluster: nb.ClusterInfo) -> None:
    with pytest.raises(
        ValueError, match=r"Invalid option keyword num_cpu .*did you mean 'num_cpus'"
    ):
        _plus_one.options(num_cpu=1)
    with pytest.raises(ValueError, match=r"did you mean 'max_retries'"):
        nb.remote(max_retry=2)
    with pytest.raises(ValueError, match=r"for actors \(did you mean 'max_restarts'\?\)"):
        nb.remote(concurrency_groups={"io": 1})(_Counter).options(max_restart=1)
    with pytest.raises(ValueError, match=r"for actor methods \(did you mean 'num_returns'"):
        nb.method(num_return=2)
    with pytest.raises(ValueError, match=r"Invalid option keyword zzz for remote functions\. "):
        _plus_one.options(zzz=1)
    # Accepted-and-ignored options still refuse what would change a result here.
    with pytest.raises(ValueError, match="placement_group must be a PlacementGroup"):
        _plus_one.options(placement_group=object())  # the legacy way to name a group
    with pytest.raises(ValueError, match="max_calls must be an integer >= 0"):
        _plus_one.options(max_calls=-1)


@nb.remote
class _Introspect:
    def __init__(self) -> None:
        self.me = nb.get_runtime_context().current_actor

    def context(self) -> dict[str, Any]:
        ctx = nb.get_runtime_context()
        return {
            "get": ctx.get(),
            "actor_id": ctx.actor_id,
            "name": ctx.get_actor_name(),
            "reconstructed": ctx.was_current_actor_reconstructed,
            "pg": ctx.get_placement_group_id(),
            "namespace": ctx.namespace,
            "same": ctx.current_actor == self.me,
        }


@nb.remote
def _task_context() -> dict[str, Any]:
    ctx = nb.get_runtime_context()
    return {"get": ctx.get(), "task_id": ctx.task_id, "node_id": ctx.node_id}


def test_runtime_context_has_rays_properties(cluster: nb.ClusterInfo) -> None:
    ctx = nb.get_runtime_context()
    assert ctx.task_id is None and ctx.actor_id is None
    assert ctx.node_id == ctx.get_node_id() != ""
    assert ctx.namespace == f"job-{ctx.get_job_id()}"
    assert ctx.gcs_address == cluster.address
    assert ctx.get() == {"job_id": ctx.job_id, "node_id": ctx.node_id, "namespace": ctx.namespace}
    assert ctx.get_actor_name() is None and not ctx.was_current_actor_reconstructed
    with pytest.raises(RuntimeError, match="only available inside an actor"):
        _ = ctx.current_actor
    task = nb.get(_task_context.remote(), timeout=T)
    assert task["task_id"] and task["get"]["task_id"] == task["task_id"]
    assert task["get"]["job_id"] == ctx.job_id and "actor_id" not in task["get"]
    actor = _Introspect.options(name="introspect").remote()
    info = nb.get(actor.context.remote(), timeout=T)
    assert info["actor_id"] == actor.actor_id == info["get"]["actor_id"]
    assert info["name"] == "introspect" and info["reconstructed"] is False
    assert info["pg"] is None and info["same"] is True
    assert info["namespace"] == ctx.namespace
    nb.kill(actor)


# --- util.state --------------------------------------------------------------------------------


@nb.remote
def _nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@nb.remote
def _fails() -> None:
    raise ValueError("on purpose")


def _until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)  # polling the head's view: there is no event for "the head saw it"
    raise AssertionError(f"timed out waiting for {what}")


def test_state_lists_tasks_with_rays_fields_and_filters(cluster: nb.ClusterInfo) -> None:
    from nbcluster.util.state import list_tasks, summarize_tasks

    nb.get([_nap.remote(0) for _ in range(3)], timeout=T)
    with pytest.raises(ValueError):
        nb.get(_fails.remote(), timeout=T)
    long = _nap.remote(30)
    running = _until(  # (the others' ends reach the head up to half a second late)
        lambda: (
            [
                t
                for t in list_tasks(filters=[("state", "=", "RUNNING"), ("name", "=", "_nap")])
                if [t.task_id] == [long.task_id()]
            ]
            or None
        ),
        "the long task to run",
    )
    assert [t.task_id for t in running] == [long.task_id()]
    t = running[0]
    assert t["state"] == t.state == "RUNNING" and t.node_id == nb.get_runtime_context().node_id
    assert t.job_id == nb.get_runtime_context().job_id and t.type == "NORMAL_TASK"
    assert "required_resources" not in t  # Ray's default columns...
    assert list_tasks(filters=[("task_id", "=", t.task_id)], detail=True)[0][
        "required_resources"
    ] == {"CPU": 1.0}  # ...and every field with detail=True
    finished = list_tasks(filters=[("name", "=", "_nap"), ("state", "!=", "RUNNING")])
    assert len(finished) >= 3 and all(x.state == "FINISHED" for x in finished)
    failed = list_tasks(filters=[("name", "=", "_fails")])
    assert [x.state for x in failed] == ["FAILED"]
    assert len(list_tasks(limit=2)) == 2
    summary = summarize_tasks()["cluster"]
    counts = summary["summary"]["_nap"]["state_counts"]
    assert counts["RUNNING"] == 1 and counts["FINISHED"] >= 3
    assert summary["total_tasks"] >= 5 and summary["summary_by"] == "func_name"
    with pytest.raises(ValueError, match="filter column bogus is not supported"):
        list_tasks(filters=[("bogus", "=", 1)])
    with pytest.raises(ValueError, match="predicate"):
        list_tasks(filters=[("state", ">", "RUNNING")])
    nb.cancel(long, force=True)


def test_state_lists_actors_nodes_objects_placement_groups(cluster: nb.ClusterInfo) -> None:
    from nbcluster.util.state import (
        list_actors,
        list_nodes,
        list_objects,
        list_placement_groups,
    )

    actor = _Introspect.options(name="listed").remote()
    nb.get(actor.context.remote(), timeout=T)
    mine = list_actors(filters=[("name", "=", "listed")])
    assert len(mine) == 1 and mine[0].actor_id == actor.actor_id
    assert mine[0].state == "ALIVE" and mine[0].class_name == "_Introspect"
    assert mine[0].pid and mine[0].ray_namespace == nb.get_runtime_context().namespace
    nb.kill(actor)
    _until(
        lambda: list_actors(filters=[("actor_id", "=", actor.actor_id), ("state", "=", "DEAD")]),
        "the actor to be listed dead",
    )
    nodes = list_nodes()
    assert [n.node_id for n in nodes] == [nb.get_runtime_context().node_id]
    assert nodes[0].state == "ALIVE" and nodes[0].resources_total["CPU"] == 2.0
    assert list_nodes(filters=[("state", "=", "DEAD")]) == []
    ref = nb.put(b"x" * 1000)
    objs = list_objects(filters=[("object_id", "=", ref.hex())])
    assert len(objs) == 1 and objs[0].task_status == "FINISHED"
    assert objs[0].object_size is not None and objs[0].object_size >= 1000
    assert objs[0].reference_type == "LOCAL_REFERENCE" and objs[0].owned is True
    assert list_placement_groups() == []


def test_pool_many_async_results_and_join_runs_their_callbacks(cluster: nb.ClusterInfo) -> None:
    seen: list[int] = []
    threads_before = threading.active_count()
    pool = Pool(processes=2)
    results = [pool.apply_async(_square, (i,), callback=seen.append) for i in range(200)]
    # Completion needs no thread per pending result.
    assert threading.active_count() < threads_before + 20
    pool.close()
    pool.join()
    assert sorted(seen) == [i * i for i in range(200)]  # every callback ran before join returned
    assert [r.get(timeout=0) for r in results] == [i * i for i in range(200)]
