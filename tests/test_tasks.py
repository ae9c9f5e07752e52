"""Remote functions, object refs, get/put/wait against a real local cluster."""

from __future__ import annotations

import time

import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.exceptions import GetTimeoutError, NbclusterError, RayTaskError, TaskError


@nb.remote
def square(x: int) -> int:
    return x * x


@nb.remote
def identity(x: object) -> object:
    return x


def test_seed_example(cluster: nb.ClusterInfo) -> None:
    futures = [square.remote(i) for i in range(4)]
    assert nb.get(futures, timeout=30) == [0, 1, 4, 9]


def test_calling_directly_says_use_remote(cluster: nb.ClusterInfo) -> None:
    with pytest.raises(TypeError, match=r"square\.remote\("):
        square(3)


def test_is_initialized_and_init_twice(cluster: nb.ClusterInfo) -> None:
    assert nb.is_initialized()
    again = nb.init()
    assert again == cluster
    assert nb.get(square.remote(5), timeout=30) == 25


def test_kwargs_and_defaults(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def f(a: int, b: int = 10, *, c: int = 100) -> int:
        return a + b + c

    assert nb.get(f.remote(1), timeout=30) == 111
    assert nb.get(f.remote(1, 2, c=3), timeout=30) == 6


def test_num_returns_and_options(cluster: nb.ClusterInfo) -> None:
    @nb.remote(num_returns=2)
    def two() -> tuple[int, int]:
        return 1, 2

    a, b = two.remote()
    assert nb.get([a, b], timeout=30) == [1, 2]

    @nb.remote
    def three() -> list[int]:
        return [7, 8, 9]

    refs = three.options(num_returns=3).remote()
    assert nb.get(refs, timeout=30) == [7, 8, 9]
    single = three.remote()
    assert nb.get(single, timeout=30) == [7, 8, 9]


def test_num_returns_mismatch_is_an_error(cluster: nb.ClusterInfo) -> None:
    @nb.remote(num_returns=2)
    def one() -> int:
        return 1

    a, _b = one.remote()
    with pytest.raises(TaskError, match="num_returns=2"):
        nb.get(a, timeout=30)


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_cpu"):
        nb.remote(num_cpu=1)
    with pytest.raises(ValueError, match="num_gpus"):
        square.options(num_gpus=-1)
    with pytest.raises(ValueError, match="max_retries"):
        square.options(max_retries="3")


def test_top_level_refs_arrive_as_values_nested_stay_refs(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def inspect(x: object, nested: list[object], *, kw: object) -> tuple[str, str, str, int]:
        inner = nested[0]
        assert isinstance(inner, nb.ObjectRef)
        return type(x).__name__, type(inner).__name__, type(kw).__name__, nb.get(inner, timeout=30)

    r1 = nb.put(41)
    r2 = square.remote(6)
    r3 = nb.put("kw")
    assert nb.get(inspect.remote(r1, [r2], kw=r3), timeout=30) == ("int", "ObjectRef", "str", 36)


def test_task_waits_for_ref_argument(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def slow(x: int) -> int:
        time.sleep(0.5)
        return x

    t0 = time.monotonic()
    out = nb.get(square.remote(slow.remote(3)), timeout=30)
    assert out == 9
    assert time.monotonic() - t0 >= 0.5


def test_chain_of_dependent_tasks(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def inc(x: int) -> int:
        return x + 1

    x = inc.remote(0)
    for _ in range(199):
        x = inc.remote(x)
    assert nb.get(x, timeout=60) == 200


def test_tasks_submit_tasks_without_deadlock(cluster: nb.ClusterInfo) -> None:
    # 2 CPUs, and each level blocks in get(): only works if blocked workers lend their CPU.
    @nb.remote
    def leaf(i: int) -> int:
        return i

    @nb.remote
    def middle(i: int) -> int:
        return sum(nb.get([leaf.remote(i), leaf.remote(i)], timeout=60))

    @nb.remote
    def top(n: int) -> int:
        return sum(nb.get([middle.remote(i) for i in range(n)], timeout=60))

    assert nb.get([top.remote(3), top.remote(3)], timeout=90) == [6, 6]


def test_task_returns_a_ref_it_created(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def make() -> nb.ObjectRef:
        return square.remote(9)

    inner = nb.get(make.remote(), timeout=30)
    assert isinstance(inner, nb.ObjectRef)
    assert nb.get(inner, timeout=30) == 81


def test_put_get_roundtrip_and_copy_semantics(cluster: nb.ClusterInfo) -> None:
    value = {"a": [1, 2, 3], "b": b"bytes" * 100}
    ref = nb.put(value)
    got = nb.get(ref, timeout=30)
    assert got == value
    got["a"].append(4)
    assert nb.get(ref, timeout=30) == value  # every get deserializes afresh
    with pytest.raises(TypeError):
        nb.put(ref)


def test_numpy_roundtrip(cluster: nb.ClusterInfo) -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(100_000, dtype=np.float64)

    @nb.remote
    def double(a: object) -> object:
        return a * 2  # type: ignore[operator]

    out = nb.get(double.remote(nb.put(arr)), timeout=30)
    assert np.array_equal(out, arr * 2)


def test_values_are_captured_at_call_time(cluster: nb.ClusterInfo) -> None:
    np = pytest.importorskip("numpy")
    arr = np.zeros(1000)
    ref = nb.put(arr)
    task_ref = identity.remote(arr)
    arr += 1  # changing the array afterwards changes neither the object nor the argument
    got = nb.get(ref, timeout=30)
    assert got.sum() == 0 and nb.get(task_ref, timeout=30).sum() == 0
    assert not got.flags.writeable  # a read-only view of the stored value, as in Ray


def test_cancelled_error_message_survives_pickling() -> None:
    import pickle

    from nbcluster.exceptions import TaskCancelledError

    err = pickle.loads(pickle.dumps(TaskCancelledError("abc")))
    assert str(err) == "task abc was cancelled" and err.task_id == "abc"


def test_init_to_another_address_needs_shutdown_first(cluster: nb.ClusterInfo) -> None:
    with pytest.raises(RuntimeError, match="shutdown"):
        nb.init(address="127.0.0.1:1")
    assert nb.init(address=cluster.address) == cluster


def test_get_timeout(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def sleepy() -> int:
        time.sleep(3)
        return 1

    ref = sleepy.remote()
    t0 = time.monotonic()
    with pytest.raises(GetTimeoutError) as info:
        nb.get(ref, timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert isinstance(info.value, TimeoutError)
    assert nb.get(ref, timeout=30) == 1  # nothing lost: it still completes
    # A get that timed out leaves nothing behind: a ref dropped meanwhile frees its object.
    ref2 = sleepy.remote()
    oid = ref2.oid
    with pytest.raises(GetTimeoutError, match=oid):
        nb.get([ref, ref2], timeout=0.3)
    objects = current.require().objects
    del ref2
    deadline = time.monotonic() + 30
    while objects.get(oid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert objects.get(oid) is None


def test_get_rejects_non_refs(cluster: nb.ClusterInfo) -> None:
    with pytest.raises(TypeError):
        nb.get(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        nb.get([square.remote(1), 3])  # type: ignore[list-item]


def test_wait_semantics(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def sleep_then(x: float) -> float:
        time.sleep(x)
        return x

    slow = sleep_then.remote(5)
    fast = [sleep_then.remote(0) for _ in range(3)]
    refs = [slow, *fast]
    t0 = time.monotonic()
    ready, not_ready = nb.wait(refs, num_returns=3, timeout=20)
    assert time.monotonic() - t0 < 4, nb.nodes()
    assert ready == fast  # order as given
    assert not_ready == [slow]
    ready, not_ready = nb.wait(refs, num_returns=4, timeout=0.2)
    assert slow in not_ready and len(ready) == 3
    ready, not_ready = nb.wait(refs, num_returns=1, timeout=0)
    assert ready == [fast[0]] and not_ready == [slow, *fast[1:]]
    with pytest.raises(ValueError):
        nb.wait(refs, num_returns=5)
    nb.cancel(slow, force=True)


def test_redefined_function_runs_new_body(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def version() -> int:
        return 1

    assert nb.get(version.remote(), timeout=30) == 1

    @nb.remote  # type: ignore[no-redef]
    def version() -> int:
        return 2

    assert nb.get(version.remote(), timeout=30) == 2


def test_runtime_context(cluster: nb.ClusterInfo) -> None:
    ctx = nb.get_runtime_context()
    assert ctx.get_task_id() is None
    assert ctx.get_job_id() == cluster.job_id
    assert ctx.get_node_id() == cluster.node_id

    @nb.remote(num_cpus=1, resources={"custom": 0.5})
    def info() -> dict[str, object]:
        c = nb.get_runtime_context()
        return {
            "job": c.get_job_id(),
            "task": c.get_task_id(),
            "node": c.get_node_id(),
            "res": c.get_assigned_resources(),
        }

    ref = info.remote()
    got = nb.get(ref, timeout=30)
    assert got["job"] == cluster.job_id
    assert got["task"] == ref.task_id()
    assert got["node"] == cluster.node_id
    assert got["res"] == {"CPU": 1.0, "custom": 0.5}


def test_nodes_and_resources(cluster: nb.ClusterInfo) -> None:
    nodes = nb.nodes()
    assert len(nodes) == 1
    node = nodes[0]
    for key in ("node_id", "name", "address", "alive", "resources_total", "resources_available"):
        assert key in node
    assert node["alive"] is True and node["NodeID"] == node["node_id"]
    total = nb.cluster_resources()
    assert total["CPU"] == 2 and total["GPU"] == 2 and total["custom"] == 1
    assert total["memory"] > 0

    @nb.remote(num_cpus=2)
    def hold(seconds: float) -> None:
        time.sleep(seconds)

    ref = hold.remote(2)

    def cpus_busy() -> bool:
        return nb.available_resources().get("CPU", 0) == 0

    from tests.conftest import wait_until

    wait_until(cpus_busy, timeout=10)
    nb.get(ref, timeout=30)
    wait_until(lambda: nb.available_resources().get("CPU") == 2, timeout=10)


def test_errors_are_both_task_error_and_original_type(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def bad(x: int) -> int:
        if x > 0:
            raise ValueError(f"bad value {x}")
        return x

    with pytest.raises(ValueError, match="bad value 3") as info:
        nb.get(bad.remote(3), timeout=30)
    err = info.value
    assert isinstance(err, TaskError) and isinstance(err, RayTaskError)
    assert isinstance(err, NbclusterError)
    text = str(err)
    assert "Traceback (most recent call last)" in text
    assert 'raise ValueError(f"bad value {x}")' in text  # the remote source line
    assert "in bad" in text


class CustomError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


def test_custom_and_unpicklable_exceptions(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def custom() -> None:
        raise CustomError(7)

    with pytest.raises(CustomError) as info:
        nb.get(custom.remote(), timeout=30)
    assert info.value.code == 7  # type: ignore[attr-defined]

    @nb.remote
    def unpicklable() -> None:
        import threading

        class Bad(Exception):
            def __reduce__(self) -> object:
                raise TypeError("no pickling")

        e = Bad("oops")
        e.lock = threading.Lock()  # type: ignore[attr-defined]
        raise e

    with pytest.raises(TaskError, match="oops"):
        nb.get(unpicklable.remote(), timeout=30)


def test_error_propagates_through_dependencies(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def fail() -> int:
        raise KeyError("upstream")

    with pytest.raises(KeyError, match="upstream"):
        nb.get(square.remote(fail.remote()), timeout=30)


def test_unserializable_argument_fails_at_submit(cluster: nb.ClusterInfo) -> None:
    import threading

    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"argument 0 \(<unlocked _thread.lock .* of square\(\)"):
        square.remote(lock)

    @nb.remote
    def two(a: object, b: object) -> None:
        pass

    with pytest.raises(
        nb.exceptions.SerializationError, match=r"argument 1 .*_thread.lock.* of two\(\)"
    ):
        two.remote(1, lock)
    with pytest.raises(nb.exceptions.SerializationError, match=r"keyword argument 'b'"):
        two.remote(1, b=lock)


def test_unserializable_return_is_reported(cluster: nb.ClusterInfo) -> None:
    @nb.remote
    def returns_lock() -> object:
        import threading

        return threading.Lock()

    with pytest.raises(TaskError, match="while serializing its result"):
        nb.get(returns_lock.remote(), timeout=30)


def test_many_tasks(cluster: nb.ClusterInfo) -> None:
    refs = [square.remote(i) for i in range(2000)]
    assert nb.get(refs, timeout=120) == [i * i for i in range(2000)]
