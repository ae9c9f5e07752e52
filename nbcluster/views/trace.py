"""The timeline's spans as a Chrome trace (what ``chrome://tracing``, Perfetto and Ray's
``ray.timeline()`` users read).

Each node is a process (``pid``: a small number, named by a ``process_name`` metadata event),
each worker a thread of it (``tid``: the worker's pid, named ``worker ID (pid N)``). A task or
actor call is a complete event (``ph: "X"``) named after its function on its worker's lane,
``ts``/``dur`` in microseconds; its phases are nested complete events under Ray's names
(``task:deserialize_arguments``, ``task:execute``, ``task:store_outputs``). ``args`` hold the
task id, state, error flag, job, notebook and cell, and the time it waited before its worker
started it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: The nested events of a span's phases (Ray's names), in order.
PHASES = (
    ("fetch", "task:deserialize_arguments"),
    ("run", "task:execute"),
    ("store", "task:store_outputs"),
)


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def chrome_trace(
    spans: Iterable[Mapping[str, Any]], node_names: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Chrome trace events of ``spans`` (:class:`~nbcluster.views.SpanView` as dicts).

    ``node_names`` names nodes by id (their ids otherwise). Metadata events come first, then
    the spans' events ordered by start time.
    """
    node_names = node_names or {}
    pids: dict[str, int] = {}
    tids: dict[tuple[int, str], int] = {}
    meta: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for s in spans:
        node = str(s["node_id"])
        pid = pids.get(node)
        if pid is None:
            pid = pids[node] = len(pids) + 1
            label = node_names.get(node) or node or "unknown node"
            meta.append(_meta("process_name", pid, 0, f"node {label}"))
            meta.append(
                {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}}
            )
        worker = str(s["worker_id"])
        tid = tids.get((pid, worker))
        if tid is None:
            # The worker's pid names its lane; a worker that never answered has none known.
            tid = int(s["pid"]) or -(len(tids) + 1)
            tids[(pid, worker)] = tid
            who = f"worker {worker}" + (f" (pid {s['pid']})" if s["pid"] else "")
            meta.append(_meta("thread_name", pid, tid, who))
        events.extend(_span_events(s, pid, tid))
    events.sort(key=lambda e: e["ts"])
    return meta + events


def _meta(name: str, pid: int, tid: int, label: str) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}}


def _span_events(s: Mapping[str, Any], pid: int, tid: int) -> list[dict[str, Any]]:
    state = s["state"]
    failed = state != "finished"
    cat = "actor_task" if s.get("actor_id") else "task"
    started = s.get("started_at")
    args: dict[str, Any] = {
        "task_id": s["task_id"],
        "state": state,
        "error": failed,
        "job_id": s["job_id"],
        "node_id": s["node_id"],
        "worker_id": s["worker_id"],
    }
    for key in ("actor_id", "notebook", "cell"):
        if s.get(key):
            args[key] = s[key]
    args["queued_us"] = max(0, _us(s["sent_at"] - s["submitted_at"]))
    if started is None:
        # Its worker never answered (it died, or the call was cancelled): sent until ended.
        ts = _us(s["sent_at"])
        ev = {"name": s["name"], "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": ts}
        ev.update(dur=max(1, _us(s["ended_at"]) - ts), args=args)
        if failed:
            ev["cname"] = "terrible"  # chrome://tracing's red
        return [ev]
    ts = _us(started)
    durs = [max(0, _us(s[key])) for key, _ in PHASES]
    args["dispatch_us"] = max(0, ts - _us(s["sent_at"]))
    for (key, _), d in zip(PHASES, durs, strict=True):
        args[f"{key}_us"] = d
    out: list[dict[str, Any]] = [
        {
            "name": s["name"],
            "cat": cat,
            "ph": "X",
            "pid": pid,
            "tid": tid,
            "ts": ts,
            "dur": max(1, sum(durs)),
            "args": args,
        }
    ]
    if failed:
        out[0]["cname"] = "terrible"  # chrome://tracing's red
    at = ts
    for (_, phase), d in zip(PHASES, durs, strict=True):
        if d > 0:
            out.append(
                {
                    "name": phase,
                    "cat": f"{cat}:phase",
                    "ph": "X",
                    "pid": pid,
                    "tid": tid,
                    "ts": at,
                    "dur": d,
                    "args": {"task_id": s["task_id"]},
                }
            )
        at += d
    return out
