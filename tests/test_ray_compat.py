"""Ray Core code through ``import nbcluster as ray``: automatic start, ``util.ActorPool``,
``util.queue.Queue``, each against real clusters."""

from __future__ import annotations

import asyncio
import queue
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.exceptions import ActorDiedError
from nbcluster.util import ActorPool
from nbcluster.util.queue import Empty, Full, Queue
from tests.conftest import ROOT, run_script
from tests.multinode import Procs

STARTED = "Started a local nbcluster instance at"


def _run(code: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    # An empty $NBCLUSTER_ADDRESS is no address: a local start even under a Jupyter server's head.
    env = {"NBCLUSTER_ADDRESS": "", **(env or {})}
    proc = run_script(textwrap.dedent(code), timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, proc.stderr


# --- automatic start ---------------------------------------------------------------------------


def test_remote_and_get_without_init_start_a_local_cluster() -> None:
    out, err = _run(
        """
        import nbcluster as ray

        @ray.remote
        def square(x):
            return x * x

        assert not ray.is_initialized()
        print("RESULT", ray.get([square.remote(i) for i in range(4)]))
        assert ray.is_initialized()
        print("LOCAL", ray.get_runtime_context().get_node_id() != "")
        """
    )
    assert "RESULT [0, 1, 4, 9]" in out
    assert "LOCAL True" in out
    assert err.count(STARTED) == 1, err
    assert " INFO nbcluster -- " in err  # shown although logging is not configured


def test_put_first_then_shutdown_and_use_again_starts_again() -> None:
    out, err = _run(
        """
        import logging
        logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
        import nbcluster as ray

        ref = ray.put(41)
        print("GOT", ray.get(ref) + 1)
        first = ray.cluster_resources()
        ray.shutdown()
        assert not ray.is_initialized()
        print("AGAIN", ray.get(ray.put("x")), sorted(first))
        """
    )
    assert "GOT 42" in out
    assert "AGAIN x ['CPU'" in out
    # With logging configured the line goes through it (once per start), not around it.
    assert err.count(f"LOG INFO {STARTED}") == 2, err
    assert " INFO nbcluster -- " not in err


def test_no_automatic_start_after_the_exit_shutdown() -> None:
    out, err = _run(
        """
        import atexit

        def late():  # registered first: runs after nbcluster's own exit handler
            try:
                ray.put(1)
                print("LATE started")
            except RuntimeError as exc:
                print("LATE", exc)

        atexit.register(late)
        import nbcluster as ray

        print("GOT", ray.get(ray.put(1)))
        """
    )
    assert "GOT 1" in out
    assert "LATE nbcluster is shut down: the interpreter is exiting" in out
    assert err.count(STARTED) == 1, err


def test_threads_racing_to_start_get_one_cluster() -> None:
    out, err = _run(
        """
        import threading
        import nbcluster as ray
        from nbcluster.client import current

        barrier = threading.Barrier(4)
        clients, refs, errors = [], [], []

        def use(i):
            try:
                barrier.wait(10)
                refs.append(ray.put(i))
                clients.append(current.get())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=use, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        print("CLIENTS", len({id(c) for c in clients}), "VALUES", sorted(ray.get(refs)))
        print("NODES", len(ray.nodes()))
        """
    )
    assert "CLIENTS 1 VALUES [0, 1, 2, 3]" in out
    assert "NODES 1" in out
    assert err.count(STARTED) == 1, err


def test_nbcluster_address_joins_the_running_head(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        procs.start_head()
        node = procs.join("a", "--num-cpus", "1")
        out, err = _run(
            """
            import nbcluster as ray

            @ray.remote
            def where():
                return ray.get_runtime_context().get_node_id()

            print("NODE", ray.get(where.remote(), timeout=60))
            print("LOCAL", ray.get_runtime_context().get_node_id())
            """,
            env={
                "NBCLUSTER_ADDRESS": procs.address,
                "NBCLUSTER_TOKEN_FILE": str(procs.token_file),
            },
        )
        assert f"NODE {node}" in out
        assert f"LOCAL {node}" in out  # joined the head's node, started none of its own
        assert f"Connected to nbcluster cluster at {procs.address}." in err, err
        assert STARTED not in err
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


def test_without_a_session_the_old_error_remains_for_code_that_is_not_a_driver() -> None:
    out, _ = _run(
        """
        import os
        os.environ["NBCLUSTER_WORKER_ID"] = "w-test"  # looks like a worker: no automatic start
        import nbcluster as ray
        try:
            ray.put(1)
        except RuntimeError as exc:
            print("ERROR", exc)
        print("INIT", ray.is_initialized())
        """
    )
    assert "ERROR nbcluster is not initialized: call nbcluster.init() first" in out
    assert "INIT False" in out


# --- util.ActorPool ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=2)
    yield info
    nb.shutdown()


@nb.remote
class Sleeper:
    def work(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def double(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative {x}")
        return 2 * x


def _work(actor: Any, seconds: float) -> Any:
    return actor.work.remote(seconds)


@pytest.fixture(scope="module")
def sleepers(small_cluster: nb.ClusterInfo) -> list[Any]:
    actors = [Sleeper.remote() for _ in range(2)]
    assert nb.get([a.double.remote(1) for a in actors], timeout=60) == [2, 2]
    return actors


def test_actor_pool_map_keeps_order_map_unordered_does_not(sleepers: list[Any]) -> None:
    pool = ActorPool(sleepers)
    durations = [1.0, 0.1, 0.1]
    assert list(pool.map(_work, durations)) == durations
    assert list(pool.map(lambda a, v: a.double.remote(v), range(5))) == [0, 2, 4, 6, 8]
    # One actor sleeps 1 s while the other runs both short calls: they come out first.
    assert list(pool.map_unordered(_work, durations)) == [0.1, 0.1, 1.0]
    assert not pool.has_next()


def test_actor_pool_map_drops_results_not_taken_before(sleepers: list[Any]) -> None:
    pool = ActorPool(sleepers)
    for v in (0.2, 0.2, 0.2):  # two run, one waits for an actor: none is taken
        pool.submit(_work, v)
    assert list(nb.util.ActorPool.map(pool, lambda a, v: a.double.remote(v), [5, 6])) == [10, 12]
    assert not pool.has_next() and pool.has_free()


def test_actor_pool_submit_get_next_and_its_errors(sleepers: list[Any]) -> None:
    pool = ActorPool(sleepers)
    with pytest.raises(StopIteration, match="No more results to get"):
        pool.get_next()
    for v in (3, -1, 4):
        pool.submit(lambda a, v: a.double.remote(v), v)
    assert not pool.has_free()  # two busy, one waiting for an actor
    assert pool.get_next(timeout=60) == 6
    with pytest.raises(ValueError, match="negative -1"):
        pool.get_next(timeout=60)
    assert pool.get_next(timeout=60) == 8
    assert not pool.has_next()
    assert pool.has_free()


def test_actor_pool_get_next_timeout_raises_and_can_ignore(sleepers: list[Any]) -> None:
    pool = ActorPool(sleepers)
    pool.submit(_work, 1.5)
    pool.submit(_work, 0.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^Timed out waiting for result$"):
        pool.get_next(timeout=0.2)
    assert time.monotonic() - start < 1.2
    assert pool.has_next()  # not ignored: still the next result
    with pytest.raises(TimeoutError, match="has been ignored"):
        pool.get_next(timeout=0.1, ignore_if_timedout=True)
    assert pool.get_next(timeout=60) == 0.0  # moved on past the ignored one
    assert not pool.has_next()
    pool.submit(_work, 1.5)
    with pytest.raises(TimeoutError, match=r"^Timed out waiting for result$"):
        pool.get_next_unordered(timeout=0.1)
    assert pool.get_next_unordered(timeout=60) == 1.5


def test_actor_pool_get_next_after_unordered_is_refused(sleepers: list[Any]) -> None:
    pool = ActorPool(sleepers)
    pool.submit(_work, 0.5)
    pool.submit(_work, 0.0)
    assert pool.get_next_unordered(timeout=60) == 0.0
    with pytest.raises(ValueError, match=r"not allowed to call get_next\(\) after"):
        pool.get_next()
    assert pool.get_next_unordered(timeout=60) == 0.5
    with pytest.raises(StopIteration):
        pool.get_next_unordered()


def test_actor_pool_pop_idle_and_push(sleepers: list[Any]) -> None:
    a, b = sleepers
    pool = ActorPool([a])
    with pytest.raises(ValueError, match="Actor already belongs to current ActorPool"):
        pool.push(a)
    pool.submit(_work, 0.3)
    pool.submit(_work, 0.0)  # waits: the only actor is busy
    assert not pool.has_free() and pool.pop_idle() is None
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a)  # busy counts too
    pool.push(b)  # takes the waiting value at once
    assert pool.get_next_unordered(timeout=60) == 0.0
    assert pool.get_next_unordered(timeout=60) == 0.3
    assert pool.has_free()
    taken = {id(pool.pop_idle()), id(pool.pop_idle())}
    assert taken == {id(a), id(b)}
    assert pool.pop_idle() is None and not pool.has_free()


# --- util.queue.Queue --------------------------------------------------------------------------


def test_queue_fifo_sizes_and_nonblocking_errors(small_cluster: nb.ClusterInfo) -> None:
    q = Queue(maxsize=3)
    try:
        assert issubclass(Empty, queue.Empty) and issubclass(Full, queue.Full)
        assert q.empty() and not q.full() and q.qsize() == 0
        with pytest.raises(Empty):
            q.get_nowait()
        with pytest.raises(Empty):
            q.get(block=False)
        q.put("a")
        q.put_nowait("b")
        q.put("c", block=False)
        assert q.full() and q.size() == 3 and len(q) == 3
        with pytest.raises(Full):
            q.put_nowait("d")
        assert [q.get(), q.get_nowait(), q.get(timeout=5)] == ["a", "b", "c"]
        # Batches are all or nothing.
        q.put_nowait_batch([1, 2])
        with pytest.raises(Full, match="Cannot add 2 items to queue of size 2 and maxsize 3"):
            q.put_nowait_batch([3, 4])
        assert q.qsize() == 2
        with pytest.raises(Empty, match="Cannot get 3 items from queue of size 2"):
            q.get_nowait_batch(3)
        assert q.get_nowait_batch(2) == [1, 2]
        assert q.get_nowait_batch(0) == []
        with pytest.raises(TypeError, match="'items' must be an Iterable"):
            q.put_nowait_batch(5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'num_items' must be an int"):
            q.get_nowait_batch("2")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="'num_items' must be nonnegative"):
            q.get_nowait_batch(-1)
        with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
            q.get(timeout=-1)
        with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
            q.put(1, timeout=-1)
    finally:
        q.shutdown(force=True)


def test_queue_blocking_timeouts_raise_full_and_empty(small_cluster: nb.ClusterInfo) -> None:
    q = Queue(maxsize=1)
    try:
        start = time.monotonic()
        with pytest.raises(Empty):
            q.get(timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 5
        q.put(1)
        start = time.monotonic()
        with pytest.raises(Full):
            q.put(2, timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 5
        assert q.get_nowait() == 1 and q.empty()  # the timed-out put left nothing behind
    finally:
        q.shutdown(force=True)


@nb.remote
def _put_later(q: Queue, item: Any, delay: float) -> None:
    time.sleep(delay)
    q.put(item, timeout=30)


@nb.remote
class Consumer:
    async def take(self, q: Queue, n: int) -> list[Any]:
        return [await q.get_async(timeout=30) for _ in range(n)]


def test_queue_blocking_get_is_woken_by_a_put_from_a_task(small_cluster: nb.ClusterInfo) -> None:
    q = Queue()
    try:
        start = time.monotonic()
        done = _put_later.remote(q, "hello", 0.5)  # the task gets the same queue
        assert q.get(timeout=30) == "hello"
        assert time.monotonic() - start >= 0.5
        nb.get(done, timeout=30)
    finally:
        q.shutdown(force=True)


def test_queue_shared_with_an_actor_and_async_api(small_cluster: nb.ClusterInfo) -> None:
    q = Queue(maxsize=2)
    consumer = Consumer.remote()
    try:
        taken = consumer.take.remote(q, 3)  # waits in the actor for items put below

        async def produce() -> None:
            for i in range(3):
                await q.put_async(i, timeout=30)  # the third waits for room

        asyncio.run(asyncio.wait_for(produce(), 60))
        assert nb.get(taken, timeout=60) == [0, 1, 2]

        async def nonblocking() -> None:
            with pytest.raises(Empty):
                await q.get_async(block=False)
            with pytest.raises(Empty):
                await q.get_async(timeout=0.2)
            await q.put_async("x", block=False)
            assert await q.get_async() == "x"

        asyncio.run(asyncio.wait_for(nonblocking(), 60))
    finally:
        nb.kill(consumer)
        q.shutdown(force=True)


def test_queue_shutdown_ends_its_actor(small_cluster: nb.ClusterInfo) -> None:
    q = Queue()
    q.put(1)
    actor = q.actor
    assert actor is not None
    q.shutdown(grace_period_s=10)
    assert q.actor is None
    with pytest.raises(RuntimeError, match="the queue was shut down"):
        q.put(2)
    q.shutdown()  # twice is fine
    with pytest.raises(ActorDiedError):
        nb.get(actor.qsize.remote(), timeout=30)
    forced = Queue()
    handle = forced.actor
    assert handle is not None
    forced.shutdown(force=True)
    with pytest.raises(ActorDiedError):
        nb.get(handle.qsize.remote(), timeout=30)
