"""Widgets: the live dashboard and progress bars, in server kernels and as text outside Jupyter.

The server's node reports two (fake NVML) GPUs, so the dashboard's GPU bars show real metrics
pushed by the node agent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import nbcluster as nb
from nbcluster.testing import fake_nvml
from nbcluster.views import GpuMetricsView, MetricsView
from tests.conftest import wait_until
from tests.jupyter_helpers import JupyterServer, start_jupyter_server

WIDGET = "application/vnd.jupyter.widget-view+json"
FAKE_GPUS = [
    {"name": "Fake GPU", "utilization": 37, "memory_used": 2**30, "memory_total": 8 * 2**30},
    {"name": "Fake GPU", "utilization": 81, "memory_used": 6 * 2**30, "memory_total": 8 * 2**30},
]


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    tmp = tmp_path_factory.mktemp("widgets")
    srv = start_jupyter_server(
        tmp / "server",
        nbcluster={"num_cpus": 2, "num_gpus": 2},
        env=fake_nvml.environment(FAKE_GPUS, tmp / "gpus.json"),
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def k(gpu_server: JupyterServer) -> Any:
    kern = gpu_server.start_kernel("widgets.ipynb")
    kern.execute("import time\nimport nbcluster as nb\nnb.init()", timeout=120).raise_for_error()
    return kern


def _widget_outputs(r: Any) -> list[dict[str, Any]]:
    return [m for m in r.outputs if WIDGET in m.get("content", {}).get("data", {})]


def test_init_result_displays_the_live_dashboard(k: Any) -> None:
    r = k.execute("info = nb.init()\ninfo").raise_for_error()
    assert r.result is not None and WIDGET in r.result
    assert "nbcluster" in r.result["text/html"]  # the static fallback (e.g. on GitHub)


def test_dashboard_shows_nodes_gpus_tasks_and_updates_until_closed(k: Any) -> None:
    r = k.execute("d = nb.dashboard(interval=0.2)\nd").raise_for_error()
    assert r.result is not None and WIDGET in r.result
    k.execute(
        "@nb.remote(num_gpus=1)\nclass OnGpu:\n    def ping(self): return 1\n"
        "g = OnGpu.remote(); nb.get(g.ping.remote())\n"
        "@nb.remote\ndef busy():\n    time.sleep(30)\nbusy_ref = busy.remote()"
    ).raise_for_error()
    # Metrics arrive with the agent's pings; the view refreshes itself.
    probe = (
        "row = list(d._rows.values())[0]\n"
        "print(row.gpus and row.gpus[1][0].text.value, row.cpu.text.value, "
        "'GPU 1/2' in row.info.value, '1</b> actors' in row.info.value, "
        "'1</b> running tasks' in row.info.value or '2</b> running tasks' in row.info.value)"
    )

    def shown() -> bool:
        out = k.execute(probe).raise_for_error().stdout.split()
        return out[0] == "81%" and out[1].endswith("%") and out[2:] == ["True"] * 3

    wait_until(shown, timeout=30, interval=0.5)
    r = k.execute(
        "n0 = d.updates; time.sleep(1.0); print(d.updates - n0 >= 3, len(d._rows), d.running)"
    )
    assert r.raise_for_error().stdout.split() == ["True", "1", "True"]
    r = k.execute("d.close(); n1 = d.updates; time.sleep(0.6); print(d.running, d.updates == n1)")
    assert r.raise_for_error().stdout.split() == ["False", "True"]
    k.execute("nb.cancel(busy_ref); nb.kill(g)").raise_for_error()


def test_progress_widget_counts_done_and_failed(k: Any) -> None:
    r = k.execute(
        "@nb.remote(max_retries=0)\ndef maybe(i):\n    time.sleep(0.05)\n"
        "    if i == 3:\n        raise ValueError('no')\n    return i\n"
        "refs = [maybe.remote(i) for i in range(8)]\n"
        "bar = nb.progress(refs)\nbar.wait(60); bar.close()\n"
        "print(bar._bar.value, bar._bar.max, bar._bar.bar_style, bar.done, bar.failed)"
    ).raise_for_error()
    assert r.stdout.split() == ["8", "8", "danger", "7", "1"]
    assert _widget_outputs(r), r.outputs  # the bar was displayed under the cell
    r = k.execute(
        "vals = nb.get([maybe.remote(i) for i in range(3)], progress=True)\nprint(vals)"
    ).raise_for_error()
    assert r.stdout.strip() == "[0, 1, 2]" and _widget_outputs(r)


def test_progress_text_fallback_outside_a_notebook(
    cluster: nb.ClusterInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    @nb.remote(max_retries=0)
    def maybe(i: int) -> int:
        if i == 2:
            raise ValueError("no")
        return i

    assert nb.get([maybe.remote(i) for i in (0, 1, 3)], progress=True) == [0, 1, 3]
    err = capsys.readouterr().err
    assert "3/3 done" in err and "/s" in err and err.endswith("\n")
    bar = nb.progress([maybe.remote(i) for i in range(4)], label="maybe")
    assert bar.wait(60)
    bar.close()
    assert bar.summary().startswith("3/4 done, 1 failed")
    assert "maybe: 3/4 done, 1 failed" in capsys.readouterr().err
    with pytest.raises(TypeError):
        nb.progress(maybe.remote(0))  # type: ignore[arg-type]


def test_dashboard_outside_a_kernel_and_without_metrics(cluster: nb.ClusterInfo) -> None:
    from nbcluster.widgets.cluster_view import _NodeRow, resources, snapshot

    @nb.remote(num_gpus=1)
    class Held:
        def ping(self) -> int:
            return 1

    h = Held.remote()
    nb.get(h.ping.remote())
    snap = snapshot()
    (node,) = snap.nodes
    assert node.alive and node.actors == 1 and snap.actors_on(node.node_id) == ["Held"]
    assert resources(node)["GPU"] == (1.0, 2.0)
    d = nb.dashboard(interval=0.1)
    try:
        wait_until(lambda: d.updates >= 3, timeout=10)
        assert "GPU 1/2" in repr(d) and "1 actors" in repr(d)
    finally:
        d.close()
    assert not d.running
    nb.kill(h)
    # A node without metrics shows n/a; one with GPUs gets a utilisation and a memory bar each.
    row = _NodeRow()
    bare = msgspec.structs.replace(node, metrics=None)
    row.update(bare, [])
    assert row.cpu.text.value == "n/a" and len(row.bars.children) == 2
    gpus = [
        GpuMetricsView(
            index=i, name="G", utilization=50.0 + i, memory_used=2**30, memory_total=4 * 2**30
        )
        for i in range(2)
    ]
    metrics = MetricsView(
        time=1.0, cpu_percent=12.0, memory_used=2**30, memory_total=2**31, gpus=gpus
    )
    row.update(msgspec.structs.replace(node, metrics=metrics), ["a", "+3 more"])
    assert len(row.bars.children) == 6 and row.gpus[1][0].bar.value == 51.0
    assert row.mem.bar.value == 50.0 and row.gpus[0][1].text.value == "1.0 GiB/4.0 GiB"
    assert "+3 more" in row.info.value


def test_widget_modules_stay_out_of_plain_imports(tmp_path: Path) -> None:
    from tests.conftest import run_script

    out = run_script(
        "import sys, nbcluster\n"
        "print(any(m.startswith(('ipywidgets', 'IPython')) for m in sys.modules))"
    )
    assert out.stdout.strip() == "False", out.stderr


def test_status_magic_lists_gpus_with_their_metrics(k: Any) -> None:
    def shown() -> str | None:
        r = k.execute("%load_ext nbcluster\n%nbcluster status").raise_for_error()
        return r.stdout if "81%" in r.stdout else None

    out = str(wait_until(shown, timeout=30, interval=0.5))
    gpu_lines = [line for line in out.splitlines() if "Fake GPU" in line]
    assert len(gpu_lines) == 2 and "37%" in gpu_lines[0] and "6.0G/8.0G" in gpu_lines[1], out
