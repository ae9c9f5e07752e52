"""The view schema: the panel's generated TypeScript, the head's views, what drivers get.

The REST API's JSON is checked in test_jupyter_server.py and the panel in test_lab_panel.py; here
the schema itself, the Observer that builds the views from a real ``ClusterState``, and the
views a driver gets from a running cluster (``nb.nodes()``, ``nb.actors()``, ``nbcluster
status``).
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import msgspec
import pytest

import nbcluster as nb
from nbcluster.head.actors import ActorDirectory
from nbcluster.head.observe import Observer
from nbcluster.head.state import ClusterState
from nbcluster.protocol.codec import decode, encode
from nbcluster.protocol.messages import ALIVE, DEAD, PENDING, RESTARTING
from nbcluster.status import actor_views, cluster_view, status_report, task_views
from nbcluster.views import (
    ActorState,
    ClusterView,
    MetricsEvent,
    ServerMessage,
    SnapshotEvent,
    TaskEvent,
    TasksBody,
    TotalsView,
    schema,
)
from nbcluster.views import __main__ as views_main
from nbcluster.views.__main__ import main
from nbcluster.views.typescript import TS_FILE, render, ts_name
from tests.conftest import wait_until


def test_typescript_is_up_to_date() -> None:
    """labextension/src/views.gen.ts is what the schema writes (else: python -m nbcluster.views)."""
    assert main(["--check"]) == 0, "run: python -m nbcluster.views"
    text = render()
    assert TS_FILE.read_text() == text
    assert "export interface INode {" in text and "export type ServerMessage =" in text
    out = subprocess.run(
        [sys.executable, "-m", "nbcluster.views", "--ts"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == text


def test_a_stale_typescript_file_is_reported_and_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "views.gen.ts"
    stale.write_text(
        render().replace("export interface INode {", "export interface INode {\n  x: 1;")
    )
    monkeypatch.setattr(views_main, "TS_FILE", stale)
    assert views_main.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert views_main.main([]) == 0 and stale.read_text() == render()
    assert views_main.main(["--check"]) == 0


def test_every_view_reaches_the_typescript() -> None:
    """Each Struct of the schema is written (an unlisted one would be a view the panel lacks)."""
    text = render()
    structs = [
        v
        for v in vars(schema).values()
        if isinstance(v, type) and issubclass(v, msgspec.Struct) and v.__module__ == schema.__name__
    ]
    names = [ts_name(s) for s in structs if s not in (schema.View, schema.Event)]
    assert len(set(names)) == len(names)
    missing = [n for n in names if f"export interface {n} " not in text]
    assert missing == []


def test_actor_states_are_the_protocols() -> None:
    assert typing.get_args(ActorState) == tuple(
        s.lower() for s in (PENDING, ALIVE, RESTARTING, DEAD)
    )


def test_totals_keep_their_json_keys() -> None:
    t = TotalsView(nodes=1, cpu=2.0, cpu_used=1.0, gpu=0.0, gpu_used=0.0)
    assert msgspec.to_builtins(t) == {
        "nodes": 1,
        "CPU": 2.0,
        "CPU_used": 1.0,
        "GPU": 0.0,
        "GPU_used": 0.0,
    }


def test_counted_tasks_show_in_totals_and_are_forgotten_at_zero() -> None:
    """Tasks a driver counts instead of listing (beyond its first 10,000): the head keeps one
    record per function, shape and node, whatever their number."""
    st = ClusterState()
    obs = Observer(st, ActorDirectory(st))
    nid, _ = st.add_node(b"a", "n", "127.0.0.1", {"CPU": 2}, [])
    obs.job_started("job1", {})
    cpu = {"CPU": 1.0}
    obs.on_task_events(
        b"c",
        "job1",
        [
            ("n", "f", 1.0, cpu, "", 999_998, 0),
            ("n", "f", 1.0, cpu, nid, 0, 2),
            ("n", "g", 1.0, {"CPU": 64.0}, "", 5, 0),
        ],
    )
    assert len(obs.counts) == 3
    got = {(c.name, c.state, c.node_id): c.count for c in obs.task_count_views()}
    assert got == {
        ("f", "queued", None): 999_998,
        ("f", "running", nid): 2,
        ("g", "infeasible", None): 5,
    }
    (node,) = obs.node_views()
    assert node.tasks_running == 2
    body = TasksBody(tasks=obs.task_views(), counts=obs.task_count_views())
    assert msgspec.json.decode(msgspec.json.encode(body), type=TasksBody) == body
    report = status_report(obs.cluster(), obs.task_views(), obs.actor_views(), body.counts)
    assert "1000005 task(s) running or waiting" in report
    obs.on_task_events(b"c", "job1", [("n", "f", 2.0, cpu, nid, 0, 0)])
    assert len(obs.counts) == 2 and obs.node_views()[0].tasks_running == 0
    obs.job_gone("job1")
    assert not obs.counts and not obs.task_count_views()


def test_observer_views_survive_the_wire() -> None:
    """What the head builds, sends (msgpack to drivers, JSON to the panel) and gets back."""
    st = ClusterState()
    obs = Observer(st, ActorDirectory(st), address="127.0.0.1:1", version="x")
    info = {
        "gpus": [{"index": 0, "name": "G", "memory_total": 8}],
        "store_address": "tcp://127.0.0.1:2",
        "store_id": "abc",
        "object_store": {"capacity": 10, "used": 1, "spilled": 0, "objects": 1},
    }
    nid, _ = st.add_node(b"a", "n", "127.0.0.1", {"CPU": 2, "GPU": 1}, [0], info=info)
    obs.on_metrics(
        nid,
        {
            "time": 1.0,
            "cpu_percent": 5.0,
            "memory_used": 1,
            "memory_total": 2,
            "gpus": [
                {"index": 0, "name": "G", "utilization": 3, "memory_used": 1, "memory_total": 8}
            ],
        },
    )
    obs.job_started("job1", {"kernel_id": "k", "notebook": "/root/a.ipynb"})
    obs.notebook_root = "/root"
    obs.on_task_events(b"c", "job1", [("s", "t1", 1.0, "f", {"CPU": 1.0}), ("r", "t1", 2.0, nid)])
    cluster = obs.cluster()
    (node,) = cluster.nodes
    assert (
        node.store_id == "abc" and node.gpus[0].memory_total == 8 and node.gpus_free == {"0": 1.0}
    )
    assert node.metrics is not None and node.metrics.gpus[0].utilization == 3.0
    assert node.tasks_running == 1 and cluster.totals.cpu == 2.0
    (task,) = obs.task_views()
    assert task.owner.notebook == "a.ipynb" and task.state == "running"
    snap = SnapshotEvent(cluster=cluster, tasks=obs.task_views(), actors=obs.actor_views())
    # To a driver: msgpack of the builtins, converted back.
    header, _ = decode(encode({"k": 0, "result": msgspec.to_builtins(cluster)}))
    assert msgspec.convert(header["result"], ClusterView) == cluster
    # To the panel: JSON, a tagged union by "type".
    for msg in (snap, obs.metrics_message(), TaskEvent(task=task)):
        back = msgspec.json.decode(msgspec.json.encode(msg), type=ServerMessage)
        assert back == msg
    assert msgspec.json.decode(msgspec.json.encode(obs.metrics_message()))["type"] == "metrics"
    assert isinstance(obs.metrics_message(), MetricsEvent)
    # A malformed report from an agent is dropped with a warning, not a broken view.
    st.nodes[nid].info["object_store"] = {"capacity": "lots"}
    assert obs.cluster().nodes[0].object_store is None


@pytest.mark.timeout(120)
def test_drivers_get_the_same_views(cluster: nb.ClusterInfo) -> None:
    @nb.remote(num_gpus=1)
    class Held:
        def ping(self) -> int:
            return 1

    h = Held.options(name="held").remote()
    nb.get(h.ping.remote(), timeout=60)
    view = cluster_view()
    (node,) = view.nodes
    (raw,) = nb.nodes()
    # nb.nodes(): the node view as a dict, and Ray's keys.
    assert raw["NodeID"] == raw["node_id"] == node.node_id and raw["Alive"] is True
    assert raw["Resources"] == raw["resources_total"] == node.resources_total
    assert raw["NodeManagerAddress"] == node.address and raw["NodeName"] == node.name
    assert set(msgspec.structs.asdict(node)) <= set(raw)
    (actor,) = [a for a in nb.actors() if a["name"] == "held"]
    assert actor["state"] == "ALIVE" and actor["resources"] == {"GPU": 1.0}
    (av,) = [a for a in actor_views() if a.name == "held"]
    assert av.state == "alive" and av.actor_id == actor["actor_id"] and av.pid == actor["pid"]
    wait_until(lambda: cluster_view().nodes[0].actors == 1, timeout=10)
    report = status_report(cluster_view(), task_views(), actor_views())
    assert "1 actor(s)" in report and "held" in report and "GPU" in report
    nb.kill(h)
    wait_until(lambda: nb.actors()[0]["state"] == "DEAD", timeout=20)
    assert [a.state for a in actor_views()] == ["dead"]
