"""Generator tasks, as Ray's: streaming (``ObjectRefGenerator``) and dynamic, on a real cluster."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nbcluster as nb
from nbcluster.exceptions import GetTimeoutError, TaskCancelledError, TaskError
from tests.conftest import wait_until

GATE_TIMEOUT_S = 60.0  # a task waiting on a gate gives up after this (never hangs)


@pytest.fixture(scope="module")
def cluster() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=2)
    yield info
    nb.shutdown()


def _wait_gate(path: str) -> None:
    """In a task: wait for the test to create ``path``."""
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)


@nb.remote
def count_to(n: int) -> Iterator[int]:
    yield from range(n)


@nb.remote
def gated(gate: str, before: int, after: int) -> Iterator[int]:
    for i in range(before):
        yield i
    _wait_gate(gate)
    for i in range(before, before + after):
        yield i


def test_generator_function_streams_by_default(cluster: nb.ClusterInfo) -> None:
    gen = count_to.remote(5)
    assert isinstance(gen, nb.ObjectRefGenerator)
    refs = list(gen)
    assert all(isinstance(r, nb.ObjectRef) for r in refs)
    assert nb.get(refs, timeout=30) == [0, 1, 2, 3, 4]
    assert gen.is_finished()
    assert nb.get(gen.completed(), timeout=30) == 5  # the end: how many values there were
    with pytest.raises(StopIteration):
        next(gen)


def test_items_arrive_before_the_task_finishes(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gen = gated.options(num_returns="streaming").remote(str(gate), 2, 2)
    first = gen._next_sync(timeout_s=30)
    assert nb.get(first, timeout=30) == 0
    assert nb.get(gen._next_sync(timeout_s=30), timeout=30) == 1
    # The task is still running (blocked on the gate), yet its first values are here.
    ready, _ = nb.wait([gen.completed()], timeout=0)
    assert ready == []
    assert not gen.is_finished()
    with pytest.raises(GetTimeoutError):
        gen._next_sync(timeout_s=0.2)
    gate.touch()
    assert [nb.get(r, timeout=30) for r in gen] == [2, 3]
    assert gen.is_finished()


def test_wait_on_a_generator(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gen = gated.remote(str(gate), 0, 1)
    ready, not_ready = nb.wait([gen], timeout=0.2)
    assert (ready, not_ready) == ([], [gen])
    gate.touch()
    ready, not_ready = nb.wait([gen], timeout=30)
    assert ready == [gen] and not_ready == []
    assert nb.get(next(gen), timeout=30) == 0


def test_async_for(cluster: nb.ClusterInfo) -> None:
    async def consume() -> list[int]:
        out = []
        async for ref in count_to.remote(4):
            out.append(await ref)
        return out

    assert asyncio.run(asyncio.wait_for(consume(), 60)) == [0, 1, 2, 3]


@nb.remote
def fails_after(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError(f"failed after {n}")


def test_error_mid_stream(cluster: nb.ClusterInfo) -> None:
    gen = fails_after.remote(2)
    good = [next(gen), next(gen)]
    assert nb.get(good, timeout=30) == [0, 1]
    bad = next(gen)  # the ref after the last good one raises the task's error
    with pytest.raises(ValueError, match="failed after 2") as info:
        nb.get(bad, timeout=30)
    assert isinstance(info.value, TaskError)
    with pytest.raises(StopIteration):
        next(gen)
    assert gen.is_finished()


@nb.remote
def recording(path: str, n: int) -> Iterator[int]:
    for i in range(n):
        yield i
        Path(path).write_text(str(i + 1))  # how far the worker got: past yield i+1 times


def _progress(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_backpressure_pauses_the_worker(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    path = tmp_path / "progress"
    gen = recording.options(_generator_backpressure_num_objects=2).remote(str(path), 20)
    first = gen._next_sync(timeout_s=30)
    # One item taken, two unconsumed allowed: the worker produces item 3 and stops there.
    wait_until(lambda: len(gen._buffer.items) == 3, timeout=30)
    ready, _ = nb.wait([gen.completed()], timeout=0.5)
    assert ready == []
    assert len(gen._buffer.items) == 3
    assert _progress(path) <= 3
    del first
    values = [nb.get(r, timeout=30) for r in gen]
    assert values == list(range(1, 20))
    assert _progress(path) == 20


def test_without_backpressure_the_worker_runs_ahead(cluster: nb.ClusterInfo) -> None:
    gen = count_to.remote(50)
    first = next(gen)
    nb.get(gen.completed(), timeout=30)  # the task ends although one item was taken
    assert len(gen._buffer.items) == 50
    assert nb.get(first, timeout=30) == 0


def test_dropping_a_paused_generator_lets_the_worker_finish(
    cluster: nb.ClusterInfo, tmp_path: Path
) -> None:
    path = tmp_path / "progress"
    gen = recording.options(_generator_backpressure_num_objects=1).remote(str(path), 10)
    end = gen.completed()
    gen._next_sync(timeout_s=30)
    del gen
    assert nb.get(end, timeout=30) == 10
    assert _progress(path) == 10


@nb.remote
class Streamer:
    def __init__(self) -> None:
        self.calls = 0

    def numbers(self, n: int) -> Iterator[int]:
        self.calls += 1
        for i in range(n):
            yield i * self.calls

    def calls_made(self) -> int:
        return self.calls


@nb.remote
class AsyncStreamer:
    async def numbers(self, n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield i


def test_actor_generator_method(cluster: nb.ClusterInfo) -> None:
    s = Streamer.remote()
    gen = s.numbers.remote(3)
    assert isinstance(gen, nb.ObjectRefGenerator)
    assert [nb.get(r, timeout=30) for r in gen] == [0, 1, 2]
    assert [nb.get(r, timeout=30) for r in s.numbers.remote(3)] == [0, 2, 4]
    assert nb.get(s.calls_made.remote(), timeout=30) == 2
    dyn = nb.get(s.numbers.options(num_returns="dynamic").remote(2), timeout=30)
    assert isinstance(dyn, nb.DynamicObjectRefGenerator)
    assert nb.get(list(dyn), timeout=30) == [0, 3]
    nb.kill(s)


def test_async_actor_generator_method(cluster: nb.ClusterInfo) -> None:
    a = AsyncStreamer.remote()
    assert [nb.get(r, timeout=30) for r in a.numbers.remote(4)] == [0, 1, 2, 3]
    nb.kill(a)


@nb.remote(num_returns="dynamic")
def dynamic(n: int) -> Iterator[int]:
    for i in range(n):
        yield i * 10


def test_dynamic(cluster: nb.ClusterInfo) -> None:
    ref = dynamic.remote(3)
    assert isinstance(ref, nb.ObjectRef)
    gen = nb.get(ref, timeout=30)
    assert isinstance(gen, nb.DynamicObjectRefGenerator)
    assert len(gen) == 3
    refs = list(gen)
    del gen, ref  # the item refs keep their values
    assert nb.get(refs, timeout=30) == [0, 10, 20]


def test_dynamic_error(cluster: nb.ClusterInfo) -> None:
    ref = fails_after.options(num_returns="dynamic").remote(2)
    with pytest.raises(ValueError, match="failed after 2"):
        nb.get(ref, timeout=30)


def test_cancel_a_running_generator(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    gen = gated.remote(str(tmp_path / "never"), 1, 1)
    assert nb.get(gen._next_sync(timeout_s=30), timeout=30) == 0
    nb.cancel(gen)
    with pytest.raises(TaskCancelledError):
        nb.get(gen._next_sync(timeout_s=30), timeout=30)
    with pytest.raises(StopIteration):
        gen._next_sync(timeout_s=30)
    # The worker is free again: a new task runs.
    assert nb.get(list(count_to.remote(2)), timeout=30) == [0, 1]


@nb.remote
def big_items() -> Iterator[Any]:
    yield np.arange(1_000_000, dtype=np.float64)  # 8 MB: through the node's store
    yield "small"


def test_big_item_goes_through_the_store(cluster: nb.ClusterInfo) -> None:
    refs = list(big_items.remote())
    arr, small = nb.get(refs, timeout=60)
    assert arr.shape == (1_000_000,) and arr[-1] == 999_999.0
    assert small == "small"


def test_ten_thousand_items(cluster: nb.ClusterInfo) -> None:
    total = 0
    n = 0
    for ref in count_to.remote(10_000):
        total += nb.get(ref, timeout=30)
        n += 1
    assert n == 10_000
    assert total == sum(range(10_000))


@nb.remote
def dies_once(marker: str, n: int) -> Iterator[int]:
    for i in range(n):
        if i == 2 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # the worker dies mid-stream, once
        yield i


def test_worker_death_reruns_and_skips_what_arrived(
    cluster: nb.ClusterInfo, tmp_path: Path
) -> None:
    gen = dies_once.remote(str(tmp_path / "died"), 5)
    assert [nb.get(r, timeout=60) for r in gen] == [0, 1, 2, 3, 4]
    assert (tmp_path / "died").exists()


def test_options_and_bad_values(cluster: nb.ClusterInfo) -> None:
    with pytest.raises(ValueError, match="num_returns"):
        count_to.options(num_returns="sometimes")
    with pytest.raises(ValueError, match="_generator_backpressure_num_objects"):
        count_to.options(_generator_backpressure_num_objects="x")
    # An int num_returns on a generator function: Ray's static generator (one value each).
    a, b = count_to.options(num_returns=2).remote(2)
    assert nb.get([a, b], timeout=30) == [0, 1]


def test_a_generator_cannot_be_passed_to_a_task(cluster: nb.ClusterInfo) -> None:
    gen = count_to.remote(1)
    with pytest.raises(Exception, match="ObjectRefGenerator cannot be passed"):
        nb.get(count_to.remote(gen), timeout=30)
    list(gen)


@nb.remote
class Recorder:
    def numbers(self, path: str, n: int) -> Iterator[int]:
        for i in range(n):
            yield i
            Path(path).write_text(str(i + 1))

    def ping(self) -> str:
        return "pong"


def test_actor_method_backpressure(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    path = tmp_path / "progress"
    r = Recorder.remote()
    gen = r.numbers.options(_generator_backpressure_num_objects=1).remote(str(path), 5)
    ping = r.ping.remote()  # queued behind the paused generator (a sequential actor)
    gen._next_sync(timeout_s=30)
    wait_until(lambda: len(gen._buffer.items) == 2, timeout=30)
    ready, _ = nb.wait([gen.completed()], timeout=0.5)
    assert ready == [] and len(gen._buffer.items) == 2
    assert [nb.get(ref, timeout=30) for ref in gen] == [1, 2, 3, 4]
    assert nb.get(ping, timeout=30) == "pong"
    nb.kill(r)


def test_a_notebook_shows_the_count_of_items_taken(tmp_path: Path) -> None:
    from tests.kernels import kernel

    with kernel({"NBCLUSTER_ADDRESS": "", "NBCLUSTER_TOKEN_FILE": ""}, cwd=tmp_path) as k:
        out = k.run(
            "import nbcluster as nb\nnb.init(num_cpus=1)\n"
            "@nb.remote\ndef f(n):\n    for i in range(n):\n        yield i\n"
            "gen = f.remote(50)\nprint(sum(nb.get(r) for r in gen))\n"
            "print(gen._progress._text.value)\nnb.shutdown()",
            timeout=120,
        )
        text = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
        assert "1225" in text
        assert "50 items (done)" in text
        widgets = [
            m
            for m in out
            if m["msg_type"] == "display_data"
            and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
        ]
        assert widgets, [m["msg_type"] for m in out]


@nb.remote
def yields_refs(n: int) -> Iterator[list[Any]]:
    for i in range(n):
        yield [nb.put(i * 100)]  # a ref owned by the task's process, inside the value


def test_refs_inside_items(cluster: nb.ClusterInfo) -> None:
    outer = list(yields_refs.remote(3))
    inner = [nb.get(r, timeout=30)[0] for r in outer]
    assert all(isinstance(r, nb.ObjectRef) for r in inner)
    assert nb.get(inner, timeout=30) == [0, 100, 200]


@nb.remote(num_cpus=2)
def consumes_a_stream(n: int) -> int:
    # Holds both CPUs: the generator it waits for runs only because it lends them back.
    return sum(nb.get(ref) for ref in count_to.options(num_cpus=1).remote(n))


def test_a_task_consuming_a_stream_lends_its_cpus(cluster: nb.ClusterInfo) -> None:
    assert nb.get(consumes_a_stream.remote(10), timeout=60) == 45


@nb.remote
class AsyncRecorder:
    async def numbers(self, path: str, n: int) -> Any:
        for i in range(n):
            yield i
            Path(path).write_text(str(i + 1))


def test_async_actor_backpressure(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    path = tmp_path / "progress"
    a = AsyncRecorder.remote()
    gen = a.numbers.options(_generator_backpressure_num_objects=2).remote(str(path), 6)
    gen._next_sync(timeout_s=30)
    wait_until(lambda: len(gen._buffer.items) == 3, timeout=30)
    ready, _ = nb.wait([gen.completed()], timeout=0.5)
    assert ready == [] and len(gen._buffer.items) == 3
    assert [nb.get(ref, timeout=30) for ref in gen] == [1, 2, 3, 4, 5]
    nb.kill(a)
