"""Node metrics: the samplers, the agent pushing them, and the head's history and task table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.head.actors import ActorDirectory
from nbcluster.head.observe import ENDED_TASKS, METRICS_HISTORY, Observer
from nbcluster.head.state import ClusterState
from nbcluster.metrics import GpuSampler, HostSampler, MetricsSampler, MetricsThread
from nbcluster.views import ChangeEvent, TaskEvent
from tests.conftest import wait_until

FAKE = "nbcluster.testing.fake_nvml"


def _write_gpus(path: Path, gpus: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(gpus))
    tmp.replace(path)  # readers never see a half-written file


def test_host_sampler() -> None:
    s = HostSampler().sample()
    total = psutil.virtual_memory().total
    assert s["memory_total"] == total
    assert 0 < s["memory_used"] <= total
    assert 0.0 <= s["cpu_percent"] <= 100.0


def test_gpu_sampler_without_nvml_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBCLUSTER_NVML_MODULE", "nbcluster_no_such_nvml_module")
    assert GpuSampler().sample() == []
    # A library that loads but finds no driver: still no GPUs and no error.
    monkeypatch.setenv("NBCLUSTER_NVML_MODULE", FAKE)
    monkeypatch.delenv("NBCLUSTER_FAKE_NVML", raising=False)
    assert GpuSampler().sample() == []
    rec = MetricsSampler().sample()
    assert rec["gpus"] == [] and rec["memory_total"] > 0 and rec["time"] > 0


def test_gpu_sampler_reads_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "gpus.json"
    _write_gpus(
        f,
        [
            {"name": "NVIDIA H100", "utilization": 37, "memory_used": 1000, "memory_total": 8000},
            {"name": "NVIDIA H100", "utilization": 0, "memory_used": 0, "memory_total": 8000},
        ],
    )
    monkeypatch.setenv("NBCLUSTER_NVML_MODULE", FAKE)
    monkeypatch.setenv("NBCLUSTER_FAKE_NVML", str(f))
    gpus = GpuSampler().sample()
    assert gpus == [
        {
            "index": 0,
            "name": "NVIDIA H100",
            "utilization": 37.0,
            "memory_used": 1000,
            "memory_total": 8000,
            "processes": [],
        },
        {
            "index": 1,
            "name": "NVIDIA H100",
            "utilization": 0.0,
            "memory_used": 0,
            "memory_total": 8000,
            "processes": [],
        },
    ]
    # Per-process figures where NVML has them (utilisation only where it keeps samples).
    procs = [{"pid": 11, "memory_used": 300, "utilization": 25}, {"pid": 12, "memory_used": 9}]
    _write_gpus(f, [{"name": "NVIDIA H100", "memory_total": 8000, "processes": procs}])
    (gpu,) = GpuSampler().sample()
    assert gpu["processes"] == [
        {"pid": 11, "memory_used": 300, "utilization": 25.0},
        {"pid": 12, "memory_used": 9},
    ]


def test_metrics_thread_samples_off_the_caller() -> None:
    t = MetricsThread(interval=0.05)
    t.start()
    try:
        first = wait_until(lambda: t.latest, timeout=10)
        assert isinstance(first, dict)
        wait_until(lambda: t.latest is not None and t.latest["time"] > first["time"], timeout=10)
    finally:
        t.stop()
    assert not t._thread.is_alive()


def test_observer_keeps_ten_minutes_and_recent_tasks() -> None:
    st = ClusterState()
    obs = Observer(st, ActorDirectory(st))
    nid, _ = st.add_node(b"a", "n", "127.0.0.1", {"CPU": 2}, [])

    def sample(t: float) -> dict[str, Any]:
        return {"time": t, "cpu_percent": 1.0, "memory_used": 1, "memory_total": 2}

    for i in range(METRICS_HISTORY + 50):
        obs.on_metrics(nid, sample(float(i)))
    obs.on_metrics(nid, sample(float(METRICS_HISTORY + 49)))  # repeat
    obs.on_metrics(nid, {"time": "soon", "cpu_percent": 1.0})  # malformed: dropped
    hist = obs.history(nid)
    assert hist is not None and len(hist) == METRICS_HISTORY
    assert hist[0].time == 50.0 and hist[-1].time == METRICS_HISTORY + 49
    assert obs.history("node-nope") is None
    events: list[ChangeEvent] = []
    obs.subscribers.append(events.append)
    batch: list[Any] = []
    for i in range(ENDED_TASKS + 10):
        batch += [
            ("s", f"t{i}", 1.0, "f", {"CPU": 1.0}),
            ("r", f"t{i}", 2.0, nid),
            ("f", f"t{i}", 3.0),
        ]
    batch += [("s", "big", 1.0, "g", {"GPU": 1.0}), ("s", "run", 1.0, "h", {"CPU": 1.0})]
    batch += [("r", "run", 2.0, nid), ("x", "nope", 1.0), ("bogus",)]
    obs.on_task_events(b"c", "job1", batch)
    views = {t.task_id: t for t in obs.task_views()}
    assert len(views) == ENDED_TASKS + 2
    assert views["big"].state == "infeasible" and views["big"].missing == "GPU"
    assert views["run"].state == "running" and views["run"].node_id == nid
    assert views[f"t{ENDED_TASKS + 9}"].state == "finished"
    assert "t0" not in views  # only the last ENDED_TASKS ended ones are kept
    assert obs.node_view(st.nodes[nid]).tasks_running == 1
    assert [n.tasks_running for n in obs.node_views()] == [1]
    # One change event per task in the batch (its last state), not one per event.
    assert len([e for e in events if isinstance(e, TaskEvent)]) == ENDED_TASKS + 12
    obs.job_gone("job1")
    views = {t.task_id: t for t in obs.task_views()}
    assert views["run"].state == "cancelled" and views["big"].state == "cancelled"


def test_agent_pushes_metrics_to_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "gpus.json"
    _write_gpus(f, [{"name": "Fake A100", "utilization": 5, "memory_used": 1, "memory_total": 9}])
    # The agent is a child process: it inherits the fake NVML through the environment.
    monkeypatch.setenv("NBCLUSTER_NVML_MODULE", FAKE)
    monkeypatch.setenv("NBCLUSTER_FAKE_NVML", str(f))
    nb.shutdown()
    info = nb.init(num_cpus=1, num_gpus=0)
    try:
        client = current.require()

        def node() -> dict[str, Any] | None:
            cluster = client.query("cluster")
            n = cluster["nodes"][0]
            return n if n["metrics"] else None

        n = wait_until(node, timeout=20)
        assert isinstance(n, dict) and n["node_id"] == info.node_id
        m = n["metrics"]
        assert m["memory_total"] == psutil.virtual_memory().total
        assert m["gpus"][0]["name"] == "Fake A100" and m["gpus"][0]["utilization"] == 5.0
        _write_gpus(
            f, [{"name": "Fake A100", "utilization": 88, "memory_used": 7, "memory_total": 9}]
        )

        def updated() -> bool:
            g = client.query("cluster")["nodes"][0]["metrics"]["gpus"]
            return bool(g and g[0]["utilization"] == 88.0 and g[0]["memory_used"] == 7)

        wait_until(updated, timeout=20)
        hist = client.query_args("metrics", node_id=info.node_id)
        assert len(hist) >= 2
        times = [h["time"] for h in hist]
        assert times == sorted(times) and len(set(times)) == len(times)
        # About one sample a second.
        t0 = time.monotonic()
        before = len(client.query_args("metrics", node_id=info.node_id))
        wait_until(
            lambda: len(client.query_args("metrics", node_id=info.node_id)) >= before + 2,
            timeout=20,
        )
        assert time.monotonic() - t0 > 1.0
    finally:
        nb.shutdown()


@nb.remote(num_gpus=1)
class GpuHolder:
    def pid(self) -> int:
        return os.getpid()


@nb.remote(num_gpus=1)
def hold_gpu(pid_file: str, release_file: str) -> int:
    Path(pid_file).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not Path(release_file).exists():  # the test's signal to finish (a file: no API here)
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.02)
    return os.getpid()


def test_gpu_memory_is_shown_per_task_and_actor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each GPU's processes are named after the task or actor their worker runs."""
    f = tmp_path / "gpus.json"
    gpu = {"name": "Fake H100", "memory_total": 80 << 30}
    _write_gpus(f, [gpu, gpu])
    monkeypatch.setenv("NBCLUSTER_NVML_MODULE", FAKE)
    monkeypatch.setenv("NBCLUSTER_FAKE_NVML", str(f))
    nb.shutdown()
    nb.init(num_cpus=2, num_gpus=2)
    try:
        client = current.require()
        holder = GpuHolder.remote()
        actor_pid = nb.get(holder.pid.remote(), timeout=30)
        pid_file, release = tmp_path / "pid", tmp_path / "release"
        ref = hold_gpu.remote(str(pid_file), str(release))
        task_pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=30))
        stranger = os.getpid()  # this test process: on the GPU, but not a worker
        _write_gpus(
            f,
            [
                {
                    **gpu,
                    "processes": [{"pid": actor_pid, "memory_used": 3 << 30, "utilization": 40}],
                },
                {
                    **gpu,
                    "processes": [
                        {"pid": task_pid, "memory_used": 1 << 30},
                        {"pid": stranger, "memory_used": 5 << 20},
                    ],
                },
            ],
        )

        def users() -> dict[int, dict[str, Any]] | None:
            m = client.query("cluster")["nodes"][0]["metrics"]
            gpus = (m or {}).get("gpus") or []
            out = {p["pid"]: p for g in gpus for p in g["processes"]}
            return out if len(out) == 3 else None

        def named() -> dict[int, dict[str, Any]] | None:
            # Samples come every second, the drivers' task events every half second: the task
            # is named once the head has heard it runs on that worker.
            found = users()
            return found if found is not None and found[task_pid]["kind"] == "task" else None

        found = wait_until(named, timeout=30)
        assert found is not None
        a, t, s = found[actor_pid], found[task_pid], found[stranger]
        assert (a["kind"], a["name"], a["memory_used"], a["utilization"]) == (
            "actor",
            "GpuHolder",
            3 << 30,
            40.0,
        )
        assert a["id"] == holder._aid and a["worker_id"]
        assert t["kind"] == "task" and t["name"].endswith("hold_gpu") and t["id"] == ref.task_id()
        assert t["job_id"] == a["job_id"] and t["job_id"]
        assert (s["kind"], s["worker_id"], s["name"]) == (None, None, None)

        # Once the task ends its worker exits (a GPU function's max_calls is 1, as in Ray): a
        # process still listed on the GPU is then nobody's (NVML lags behind process exits).
        release.write_text("")
        assert nb.get(ref, timeout=30) == task_pid

        def gone() -> bool:
            found = users()
            return found is not None and found[task_pid]["kind"] is None

        wait_until(gone, timeout=30)
        assert not psutil.pid_exists(task_pid) or psutil.Process(task_pid).status() == "zombie"
        nb.kill(holder)
    finally:
        nb.shutdown()
