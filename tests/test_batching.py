"""Several messages sent as one ``BATCH`` between a driver and its workers.

The driver sends what one turn of its loop produced for a worker as one message; a worker
running short calls back to back holds their results for a moment and sends them together
(``worker/batching.py``). Unit tests of the dispatcher's unpacking, then real clusters: the
results of a run of short tasks arrive batched, and a held result never waits for a call that
turns out long, not even for one that waits for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.transport.serve import Dispatcher, batched

TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(300)


def _dispatcher(seen: list[Any], errors: list[Any]) -> Dispatcher[str]:
    return Dispatcher[str](
        {
            m.Pong: lambda _, msg, payload: seen.append(("pong", payload)),
            m.Stolen: lambda _, msg, payload: seen.append(("stolen", msg.tids)),
        },
        what="in the test",
        answer=lambda peer, header: errors.append(header),
        batches=True,
    )


def test_a_batch_is_dispatched_message_by_message_in_order() -> None:
    seen: list[Any] = []
    errors: list[Any] = []
    d = _dispatcher(seen, errors)
    parts = [encode({"k": Kind.STOLEN, "tids": ["a"]}), encode({"k": Kind.PONG}),
             encode({"k": Kind.STOLEN, "tids": ["b", "c"]})]  # fmt: skip
    d.dispatch_sync(
        "peer", [*encode({"k": Kind.BATCH, "n": [1, 1, 1]}), *(f for p in parts for f in p)]
    )
    assert seen == [("stolen", ["a"]), ("pong", []), ("stolen", ["b", "c"])]
    assert errors == []


def test_batched_splits_at_the_limit_and_round_trips_in_order() -> None:
    seen: list[Any] = []
    errors: list[Any] = []
    d = _dispatcher(seen, errors)
    one = encode({"k": Kind.STOLEN, "tids": ["only"]})
    assert batched([one]) == [one]  # one message goes as it is
    messages = [encode({"k": Kind.STOLEN, "tids": [str(i)]}) for i in range(m.MAX_BATCH + 3)]
    wire = batched(messages)
    assert len(wire) == 2
    for frames in wire:
        d.dispatch_sync("peer", frames)
    assert seen == [("stolen", [str(i)]) for i in range(m.MAX_BATCH + 3)]
    assert errors == []


def test_bad_batches_are_refused_and_lose_nothing_else() -> None:
    seen: list[Any] = []
    errors: list[Any] = []
    d = _dispatcher(seen, errors)
    stolen = encode({"k": Kind.STOLEN, "tids": ["x"]})
    inner = [*encode({"k": Kind.BATCH, "n": [1]}), *stolen]
    # A BATCH inside a BATCH: refused; the message beside it is still handled.
    d.dispatch_sync("peer", [*encode({"k": Kind.BATCH, "n": [2, 1]}), *inner, *stolen])
    assert seen == [("stolen", ["x"])]
    # Counts that do not add up to the frames, an empty count: refused whole.
    d.dispatch_sync("peer", [*encode({"k": Kind.BATCH, "n": [2]}), *stolen])
    d.dispatch_sync("peer", [*encode({"k": Kind.BATCH, "n": [0, 1]}), *stolen])
    assert seen == [("stolen", ["x"])]
    # A dispatcher not built for batches ignores them.
    plain = Dispatcher[str]({m.Stolen: lambda *a: seen.append(a)}, what="in the test")
    plain.dispatch_sync("peer", [*encode({"k": Kind.BATCH, "n": [1]}), *stolen])
    assert seen == [("stolen", ["x"])]


@nb.remote(max_retries=0)
def step(i: int, wait_for: str = "", refs: list[Any] | None = None) -> int:
    """Short unless told to wait for a file, or to get a ref passed inside a list."""
    if wait_for:
        while not os.path.exists(wait_for):
            time.sleep(0.005)
    if refs:
        return int(nb.get(refs[0], timeout=TIMEOUT)) + i
    return i


@pytest.fixture
def one_worker() -> Iterator[None]:
    nb.shutdown()
    nb.init(num_cpus=1)  # one worker: everything is pipelined on it
    nb.get([step.remote(i) for i in range(20)], timeout=TIMEOUT)  # ``step`` is short here now
    yield
    nb.shutdown()


def test_results_of_short_tasks_come_back_batched(one_worker: None) -> None:
    from nbcluster.client import current

    client = current.get()
    assert client is not None
    table = client.io._from_worker.table  # the driver's handlers of worker messages
    unbatch = table[m.Batch]
    sizes: list[int] = []

    def counting(peer: Any, msg: m.Batch, payload: list[Any]) -> None:
        sizes.append(len(msg.n))
        unbatch(peer, msg, payload)

    table[m.Batch] = counting
    assert nb.get([step.remote(i) for i in range(400)], timeout=TIMEOUT) == list(range(400))
    assert sizes and max(sizes) > 1
    assert sum(sizes) > 200  # most of the 400 results came in batches


def test_results_held_behind_a_call_that_runs_long_still_come_back(
    one_worker: None, tmp_path: Path
) -> None:
    flag = tmp_path / "go"
    shorts = [step.remote(i) for i in range(6)]
    # ``step`` is known to be short here and more calls wait behind this one: the results
    # before it stay held when it starts ...
    long = step.remote(99, str(flag))
    after = step.remote(7)
    # ... and come back while it runs (it would run until the end of the test).
    assert nb.get(shorts, timeout=TIMEOUT) == list(range(6))
    assert not flag.exists()
    flag.touch()
    assert nb.get([long, after], timeout=TIMEOUT) == [99, 7]


def test_a_call_waiting_for_a_result_held_before_it_is_not_stuck(one_worker: None) -> None:
    first = step.remote(1)
    # Pipelined right behind it on the same worker; the ref travels inside a list, so the driver
    # does not wait for it first: the call itself gets it, while its result is held here
    # (held: a third call waits behind the second).
    second = step.remote(10, "", [first])
    third = step.remote(3)
    assert nb.get([second, third], timeout=TIMEOUT) == [11, 3]
