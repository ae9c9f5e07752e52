"""The task timeline: workers' phase timings, the head's bounded span ring, ``timeline()``.

Real clusters: spans of N tasks with their phases nested inside, errors flagged, actor calls,
the trace file loads as JSON, two nodes make two processes of the trace; the ring stays bounded
under a flood of spans (in-process, it is the head's pure bookkeeping).
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import nbcluster as nb
from nbcluster.head.timeline import Timeline
from nbcluster.views.trace import PHASES, chrome_trace

if TYPE_CHECKING:
    from tests.multinode import Procs

PHASE_NAMES = {name for _, name in PHASES}


@pytest.fixture(scope="module")
def cluster() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=2)
    yield info
    nb.shutdown()


@nb.remote
def nap(s: float) -> float:
    time.sleep(s)
    return s


@nb.remote
def boom() -> None:
    raise ValueError("boom")


@nb.remote
def big(n: int) -> bytes:
    return b"x" * n


@nb.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


def _tops(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["ph"] == "X" and e["name"] == name]


def _children(events: list[dict[str, Any]], top: dict[str, Any]) -> list[dict[str, Any]]:
    tid = top["args"]["task_id"]
    return [
        e
        for e in events
        if e["ph"] == "X" and e["name"] in PHASE_NAMES and e["args"]["task_id"] == tid
    ]


def test_spans_of_tasks_with_nested_phases(cluster: nb.ClusterInfo) -> None:
    refs = [nap.remote(0.05) for _ in range(20)]
    nb.get(refs, timeout=60)
    ids = {r.task_id() for r in refs}
    events = nb.timeline()
    assert events is not None
    tops = [t for t in _tops(events, "nap") if t["args"]["task_id"] in ids]
    assert len(tops) == 20
    for top in tops:
        assert top["cat"] == "task"
        assert top["args"]["state"] == "finished" and top["args"]["error"] is False
        assert isinstance(top["pid"], int) and isinstance(top["tid"], int) and top["tid"] > 0
        kids = _children(events, top)
        assert "task:execute" in {k["name"] for k in kids}
        run = next(k for k in kids if k["name"] == "task:execute")
        assert run["dur"] >= 45_000  # it slept 50 ms
        for k in kids:  # nested inside the task's span, on its lane
            assert (k["pid"], k["tid"]) == (top["pid"], top["tid"])
            assert top["ts"] <= k["ts"] and k["ts"] + k["dur"] <= top["ts"] + top["dur"] + 1
        assert top["args"]["queued_us"] >= 0 and top["args"]["dispatch_us"] >= 0
    # Lanes are named: one process per node, one thread per worker.
    meta = {(e["name"], e["pid"], e.get("tid")) for e in events if e["ph"] == "M"}
    assert any(name == "process_name" for name, _, _ in meta)
    lanes = {(t["pid"], t["tid"]) for t in tops}
    named = {(p, t) for name, p, t in meta if name == "thread_name"}
    assert lanes <= named
    assert len(lanes) == 2  # two CPUs: two workers ran them


def test_failed_tasks_are_flagged(cluster: nb.ClusterInfo) -> None:
    ref = boom.remote()
    with pytest.raises(ValueError):
        nb.get(ref, timeout=30)
    events = nb.timeline()
    assert events is not None
    (top,) = _tops(events, "boom")
    assert top["args"]["error"] is True and top["args"]["state"] == "failed"
    assert top["cname"] == "terrible"
    assert "task:execute" in {k["name"] for k in _children(events, top)}


class Unloadable:
    """Pickles fine; unpickling it (in the worker) raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (int, ("not a number",))


def test_an_argument_that_fails_to_load_is_a_failed_fetch(cluster: nb.ClusterInfo) -> None:
    ref = nap.remote(Unloadable())
    with pytest.raises(ValueError):
        nb.get(ref, timeout=30)
    events = nb.timeline()
    assert events is not None
    (top,) = [t for t in _tops(events, "nap") if t["args"]["task_id"] == ref.task_id()]
    assert top["args"]["error"] is True and "dispatch_us" in top["args"]  # its worker answered
    assert top["args"]["run_us"] == 0 and top["args"]["fetch_us"] > 0
    assert {k["name"] for k in _children(events, top)} == {"task:deserialize_arguments"}


def test_result_store_phase_and_actor_calls(cluster: nb.ClusterInfo) -> None:
    nb.get(big.remote(20 * 1024 * 1024), timeout=60)  # into the node's store: measurable
    c = Counter.remote()
    assert nb.get([c.incr.remote() for _ in range(5)], timeout=60) == [1, 2, 3, 4, 5]
    events = nb.timeline()
    assert events is not None
    (top,) = _tops(events, "big")
    store = [k for k in _children(events, top) if k["name"] == "task:store_outputs"]
    assert store and store[0]["dur"] > 0
    calls = _tops(events, "Counter.incr")
    assert len(calls) == 5
    assert {e["cat"] for e in calls} == {"actor_task"}
    assert all(e["args"]["actor_id"] for e in calls)
    assert len({(e["pid"], e["tid"]) for e in calls}) == 1  # the actor's one worker


def test_timeline_file_loads_as_json(cluster: nb.ClusterInfo, tmp_path: Path) -> None:
    nb.get([nap.remote(0) for _ in range(3)], timeout=30)
    path = tmp_path / "trace.json"
    assert nb.timeline(str(path)) is None
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    assert _tops(events, "nap")
    for e in events:
        assert e["ph"] in ("X", "M")
        if e["ph"] == "X":
            assert isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["dur"] >= 1


def test_spans_on_two_nodes(procs: Procs) -> None:
    procs.start_head()
    a = procs.join("a", "--num-cpus", "1")
    b = procs.join("b", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    try:
        spread = nap.options(scheduling_strategy="SPREAD")
        nb.get([spread.remote(0.2) for _ in range(4)], timeout=60)
        events = nb.timeline()
    finally:
        nb.shutdown()
    assert events is not None
    tops = _tops(events, "nap")
    assert {t["args"]["node_id"] for t in tops} == {a, b}
    assert len({t["pid"] for t in tops}) == 2
    names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {"node a", "node b"}


# --------------------------------------------------------------------------- the ring
def _span(i: int) -> list[Any]:
    ph = [1_700_000_000_000_000 + i, 10, 100, 5, 4242]
    return [f"f{i % 7}", 1.0, 1.1, "node-1", f"w{i % 16}", ph, None, None]


def test_ring_stays_bounded_under_a_flood() -> None:
    tl = Timeline(capacity=10_000)
    tracemalloc.start()
    try:
        for i in range(10_000):
            tl.add("job", "f", f"t{i:08d}", 2.0, _span(i))
        full, _ = tracemalloc.get_traced_memory()
        for i in range(10_000, 60_000):  # five times over
            tl.add("job", "f" if i % 3 else "x", f"t{i:08d}", 2.0, _span(i))
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tl.spans) == 10_000 and tl.dropped == 50_000
    assert tl.spans[0].task_id == "t00050000" and tl.last_seq == 60_000
    assert after < full * 1.2  # no growth once full
    assert full / 10_000 < 600  # bytes per span: 100k spans stay well under 60 MB
    # Incremental reads by sequence number.
    assert [s.seq for s in tl.since(59_995)] == [59_996, 59_997, 59_998, 59_999, 60_000]
    assert len(tl.since(0)) == 10_000 and len(tl.since(0, limit=100)) == 100
    assert tl.since(0, limit=100)[-1].seq == 60_000 and tl.since(60_000) == []


def test_malformed_spans_are_dropped() -> None:
    tl = Timeline(capacity=10)
    assert tl.add("job", "f", "t1", 2.0, ["only", "three", "items"]) is None
    assert tl.add("job", "?", "t1", 2.0, _span(1)) is None
    bad = _span(2)
    bad[5] = ["x"]
    assert tl.add("job", "f", "t2", 2.0, bad) is None
    assert len(tl.spans) == 0
    ok = tl.add("job", "F", "t3", 2.0, _span(3))
    assert ok is not None and ok.seq == 1 and ok.state == "finished"
    with pytest.raises(ValueError):
        Timeline(capacity=0)


def test_chrome_trace_of_a_span_without_an_answer() -> None:
    # A worker that died mid-task never sent phases: the span covers sent..ended, flagged.
    span = {
        "seq": 1,
        "task_id": "t1",
        "name": "f",
        "state": "failed",
        "job_id": "j",
        "node_id": "n",
        "worker_id": "w",
        "pid": 0,
        "actor_id": None,
        "notebook": None,
        "cell": None,
        "submitted_at": 10.0,
        "sent_at": 10.5,
        "started_at": None,
        "fetch": 0.0,
        "run": 0.0,
        "store": 0.0,
        "ended_at": 12.0,
    }
    events = chrome_trace([span], {"n": "host"})
    (top,) = _tops(events, "f")
    assert top["ts"] == 10_500_000 and top["dur"] == 1_500_000
    assert top["args"]["error"] is True and top["args"]["queued_us"] == 500_000
    assert top["tid"] < 0  # no pid known: a lane of its own
    name = {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "node host"}}
    assert name in events


def test_query_pages_cover_every_span_once() -> None:
    tl = Timeline(capacity=50_000)
    for i in range(45_000):
        tl.add(f"job{i % 2}", "f", f"t{i:08d}", 2.0, _span(i))
    seen: list[int] = []
    since, pages = 0, 0
    while True:
        page = tl.page(since, lambda job: "nb.ipynb" if job == "job0" else None)
        pages += 1
        fields = page["fields"]
        seen.extend(dict(zip(fields, row, strict=True))["seq"] for row in page["rows"])
        assert set(page["notebooks"]) <= {"job0"}
        if not page["more"]:
            break
        since = page["last"]
    assert pages == 3 and seen == list(range(1, 45_001))
    assert tl.page(45_000, lambda job: None) == {
        "fields": fields,
        "rows": [],
        "notebooks": {},
        "last": 45_000,
        "more": False,
    }
