"""The server extension, through a real ``jupyter server`` and real kernels it starts."""

from __future__ import annotations

import asyncio
import glob
import http.cookiejar
import json
import os
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from nbcluster.jupyter.handlers import (
    ROUTES,
    CancelCellHandler,
    CancelTaskHandler,
    KillActorHandler,
    PoolAdaptHandler,
    PoolScaleHandler,
)
from nbcluster.testing import fake_nvml
from tests.conftest import ROOT, wait_until
from tests.jupyter_helpers import JupyterServer, Kernel, free_port, start_jupyter_server
from tests.test_export import Samples, dashboard_metric_names, value

WRITES = (
    CancelTaskHandler,
    CancelCellHandler,
    KillActorHandler,
    PoolScaleHandler,
    PoolAdaptHandler,
)
FAKE_GPUS = [{"name": "NVIDIA H100", "utilization": 37, "memory_used": 1000, "memory_total": 80000}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """A server whose local node has 2 CPUs, 1 custom resource and one (faked) GPU to sample."""
    tmp = tmp_path_factory.mktemp("jserver")
    srv = start_jupyter_server(
        tmp,
        nbcluster={"num_cpus": 2, "num_gpus": 0, "resources": {"custom": 1}},
        env=fake_nvml.environment(FAKE_GPUS, tmp / "gpus.json"),
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kernel(server: JupyterServer) -> Kernel:
    k = server.start_kernel("work/analysis.ipynb")
    k.execute(
        "import nbcluster as nb, time\n"
        "info = nb.init()\n"
        "@nb.remote\n"
        "def add(x):\n"
        "    return x + 1\n"
        "@nb.remote\n"
        "def slow():\n"
        "    time.sleep(120)\n"
        "@nb.remote(num_cpus=0)\n"
        "class Counter:\n"
        "    def __init__(self): self.n = 0\n"
        "    def inc(self):\n"
        "        self.n += 1\n"
        "        return self.n\n"
    ).raise_for_error()
    return k


# ----------------------------------------------------------------------------- REST
def test_cluster_shows_head_and_local_node_with_metrics(server: JupyterServer) -> None:
    def with_metrics() -> dict[str, Any] | None:
        body = server.get("nbcluster/api/cluster")
        return body if body["nodes"] and body["nodes"][0]["metrics"] else None

    body = wait_until(with_metrics, timeout=30)
    assert isinstance(body, dict)
    head = body["head"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", head["address"]) and head["version"]
    (node,) = body["nodes"]
    assert node["alive"] and node["state"] == "alive"
    assert node["resources_total"]["CPU"] == 2 and node["resources_total"]["custom"] == 1
    assert node["object_store"]["capacity"] > 0
    m = node["metrics"]
    assert m["memory_total"] == psutil.virtual_memory().total and 0 <= m["cpu_percent"] <= 100
    assert m["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA H100",
            "utilization": 37.0,
            "memory_used": 1000,
            "memory_total": 80000,
            "processes": [],
        }
    ]
    assert body["totals"]["nodes"] == 1 and body["totals"]["CPU"] == 2

    hist = server.get(f"nbcluster/api/metrics?node_id={node['node_id']}")
    assert hist["node_id"] == node["node_id"] and hist["history"]
    assert hist["history"][-1]["time"] >= hist["history"][0]["time"]
    assert node["node_id"] in server.get("nbcluster/api/metrics")["nodes"]
    status, err = server.request("GET", "nbcluster/api/metrics?node_id=node-nope")
    assert status == 404 and "node-nope" in err["error"]


def test_kernels_find_the_head_without_configuration(server: JupyterServer) -> None:
    (conn,) = server.runtime_dir.glob("nbcluster-server-*.json")
    assert stat.S_IMODE(conn.stat().st_mode) == 0o600
    info = json.loads(conn.read_text())
    assert info["pid"] == server.proc.pid and info["base_url"] == "/"
    assert info["address"] == server.get("nbcluster/api/cluster")["head"]["address"]
    assert stat.S_IMODE(Path(info["token_file"]).stat().st_mode) == 0o600
    k = server.start_kernel("env.ipynb")
    try:
        r = k.execute("import os; print(os.environ['NBCLUSTER_ADDRESS'])").raise_for_error()
        assert r.stdout.strip() == info["address"]
    finally:
        k.shutdown()


def test_kernel_tasks_show_their_owner(server: JupyterServer, kernel: Kernel) -> None:
    r = kernel.execute("print(nb.get([add.remote(i) for i in range(3)]))").raise_for_error()
    assert r.stdout.strip() == "[1, 2, 3]"

    def add_tasks() -> list[dict[str, Any]]:
        tasks = server.get("nbcluster/api/tasks")["tasks"]
        return [t for t in tasks if t["name"] == "add" and t["state"] == "finished"]

    tasks = wait_until(lambda: len(add_tasks()) == 3 and add_tasks(), timeout=20)
    assert isinstance(tasks, list)
    node_id = server.get("nbcluster/api/cluster")["nodes"][0]["node_id"]
    for t in tasks:
        assert t["owner"]["kernel_id"] == kernel.kernel_id
        assert t["owner"]["notebook"] == "work/analysis.ipynb"
        assert t["node_id"] == node_id and t["resources"] == {"CPU": 1.0}
        assert t["submitted_at"] <= t["started_at"] <= t["ended_at"]


def test_prometheus_metrics_and_memory(server: JupyterServer, kernel: Kernel) -> None:
    """``GET nbcluster/metrics`` (Prometheus text, every metric of the Grafana dashboard) and
    ``GET nbcluster/api/memory`` (the kernel's stored object, owned by its notebook)."""
    r = kernel.execute(
        "import numpy as np\n"
        "print(nb.get([add.remote(i) for i in range(4)]))\n"
        "held = nb.put(np.ones(2_000_000, dtype=np.uint8))\n"
        "print(held.hex())"
    ).raise_for_error()
    held = r.stdout.split()[-1]

    def scraped() -> Samples | None:
        status, text = server.request("GET", "nbcluster/metrics")
        assert status == 200 and isinstance(text, str)
        s: Samples = {}
        for family in text_string_to_metric_families(text):
            for x in family.samples:
                s[(x.name, frozenset(x.labels.items()))] = x.value
        done = value(s, "nbcluster_tasks_ended_total", function="add", state="finished")
        stored = value(s, "nbcluster_object_store_used_bytes") or 0
        return s if (done or 0) >= 4 and stored >= 2_000_000 else None

    samples = wait_until(scraped, timeout=20)
    assert isinstance(samples, dict)
    assert value(samples, "nbcluster_nodes", state="alive") == 1
    assert value(samples, "nbcluster_resources_total", resource="custom") == 1
    assert value(samples, "nbcluster_node_gpu_utilization_percent", gpu="0") == 37
    assert value(samples, "nbcluster_node_gpu_memory_total_bytes", gpu="0") == 80000
    missing = dashboard_metric_names() - {n for n, _ in samples}
    assert not missing, f"the Grafana dashboard charts metrics no scrape has: {sorted(missing)}"
    assert server.request("GET", "nbcluster/metrics", auth=False)[0] in (401, 403)

    body = server.get("nbcluster/api/memory")
    obj = next(o for o in body["objects"] if o["object_id"] == held)
    assert obj["size"] >= 2_000_000 and obj["state"] == "in_memory"
    assert obj["owner"]["notebook"] == "work/analysis.ipynb"
    assert obj["owner"]["kernel_id"] == kernel.kernel_id
    assert obj["node_id"] == body["nodes"][0]["node_id"] and body["nodes"][0]["objects"] >= 1
    assert len(server.get("nbcluster/api/memory?limit=1")["objects"]) == 1
    for bad in ("0", "x", "10001"):
        status, err = server.request("GET", f"nbcluster/api/memory?limit={bad}")
        assert status == 400 and "limit" in err["error"], bad
    kernel.execute("del held").raise_for_error()


def test_timeline_shows_kernel_tasks_with_notebook_and_cell(
    server: JupyterServer, kernel: Kernel
) -> None:
    before = server.get("nbcluster/api/timeline")["next"]
    code = "print(nb.get([add.remote(i) for i in range(4)]))"
    kernel.execute(code, metadata={"cellId": "cell-42"}).raise_for_error()

    def spans() -> list[dict[str, Any]]:
        body = server.get(f"nbcluster/api/timeline?since={before}")
        return [s for s in body["spans"] if s["name"] == "add"]

    got = wait_until(lambda: len(spans()) == 4 and spans(), timeout=20)
    assert isinstance(got, list)
    node_id = server.get("nbcluster/api/cluster")["nodes"][0]["node_id"]
    for s in got:
        assert s["notebook"] == "work/analysis.ipynb" and s["cell"] == "cell-42"
        assert s["state"] == "finished" and s["node_id"] == node_id and s["pid"] > 0
        assert s["submitted_at"] <= s["sent_at"] <= s["ended_at"]
        assert s["started_at"] is not None and s["run"] >= 0 and s["seq"] > before
    # Incremental: nothing new after the last one; bad arguments are refused.
    last = server.get("nbcluster/api/timeline")["next"]
    assert server.get(f"nbcluster/api/timeline?since={last}")["spans"] == []
    assert server.get("nbcluster/api/timeline?limit=2")["spans"][-1]["seq"] == last
    for bad in ("since=x", "since=-1", "limit=0", "limit=100000"):
        status, err = server.request("GET", f"nbcluster/api/timeline?{bad}")
        assert status == 400 and "since" in err["error"]


def test_infeasible_task_names_the_missing_resource(server: JupyterServer, kernel: Kernel) -> None:
    kernel.execute("big = add.options(num_gpus=1).remote(1)").raise_for_error()

    def infeasible() -> list[dict[str, Any]]:
        tasks = server.get("nbcluster/api/tasks")["tasks"]
        return [t for t in tasks if t["state"] == "infeasible"]

    (t,) = wait_until(infeasible, timeout=20)  # type: ignore[misc]
    assert t["missing"] == "GPU" and t["resources"]["GPU"] == 1
    assert t["owner"]["kernel_id"] == kernel.kernel_id
    assert server.post(f"nbcluster/api/tasks/{t['task_id']}/cancel") == {"ok": True}
    r = kernel.execute(
        "try:\n    nb.get(big, timeout=30)\nexcept Exception as e:\n    print(type(e).__name__)"
    ).raise_for_error()
    assert "Cancelled" in r.stdout


def test_cancel_running_task(server: JupyterServer, kernel: Kernel) -> None:
    kernel.execute("ref = slow.remote()").raise_for_error()

    def running() -> list[dict[str, Any]]:
        tasks = server.get("nbcluster/api/tasks")["tasks"]
        return [t for t in tasks if t["name"] == "slow" and t["state"] == "running"]

    (t,) = wait_until(running, timeout=30)  # type: ignore[misc]
    assert server.get("nbcluster/api/cluster")["nodes"][0]["tasks_running"] >= 1
    assert server.post(f"nbcluster/api/tasks/{t['task_id']}/cancel") == {"ok": True}
    r = kernel.execute(
        "try:\n    nb.get(ref, timeout=60)\nexcept Exception as e:\n    print(type(e).__name__)"
    ).raise_for_error()
    assert "Cancelled" in r.stdout

    def cancelled() -> bool:
        tasks = server.get("nbcluster/api/tasks")["tasks"]
        return any(x["task_id"] == t["task_id"] and x["state"] == "cancelled" for x in tasks)

    wait_until(cancelled, timeout=20)
    status, body = server.request("POST", "nbcluster/api/tasks/no-such-task/cancel")
    assert status == 404 and "no-such-task" in body["error"]


def test_a_cells_tasks_are_cancelled_together(server: JupyterServer, kernel: Kernel) -> None:
    """Tasks carry the notebook cell that submitted them; one request cancels all of them."""
    kernel.execute(
        "cell_refs = [slow.remote() for _ in range(2)]", metadata={"cellId": "cell-7"}
    ).raise_for_error()
    kernel.execute("other = slow.remote()", metadata={"cellId": "cell-8"}).raise_for_error()

    def of_cell(cell: str) -> list[dict[str, Any]]:
        tasks = server.get("nbcluster/api/tasks")["tasks"]
        return [t for t in tasks if t["cell_id"] == cell and t["state"] != "cancelled"]

    tasks = wait_until(lambda: len(of_cell("cell-7")) == 2 and of_cell("cell-7"), timeout=30)
    assert isinstance(tasks, list)
    counts = {t["cell_count"] for t in tasks}
    assert len(counts) == 1 and isinstance(counts.pop(), int)  # the cell's In [n]
    job = tasks[0]["owner"]["job_id"]
    assert server.post(f"nbcluster/api/jobs/{job}/cells/cell-7/cancel") == {"cancelled": 2}
    r = kernel.execute(
        "for ref in cell_refs:\n"
        "    try:\n"
        "        nb.get(ref, timeout=60)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__)\n"
    ).raise_for_error()
    assert r.stdout.split() == ["TaskCancelledError", "TaskCancelledError"]
    assert [t["state"] for t in of_cell("cell-8")] in (["queued"], ["running"])  # untouched
    assert server.post(f"nbcluster/api/jobs/{job}/cells/cell-8/cancel") == {"cancelled": 1}
    wait_until(lambda: of_cell("cell-7") == [], timeout=20)  # task events come in batches
    status, body = server.request("POST", f"nbcluster/api/jobs/{job}/cells/cell-7/cancel")
    assert status == 404 and "cell-7" in body["error"]


def test_actor_owner_and_kill(server: JupyterServer, kernel: Kernel) -> None:
    r = kernel.execute(
        "c = Counter.options(name='counter').remote()\nprint(nb.get(c.inc.remote()))"
    )
    assert r.raise_for_error().stdout.strip() == "1"
    actors = server.get("nbcluster/api/actors")["actors"]
    (a,) = [a for a in actors if a["name"] == "counter"]
    assert a["class_name"] == "Counter" and a["state"] == "alive" and a["pid"] > 0
    assert a["owner"]["kernel_id"] == kernel.kernel_id
    assert a["owner"]["notebook"] == "work/analysis.ipynb"
    assert a["node_id"] == server.get("nbcluster/api/cluster")["nodes"][0]["node_id"]
    assert server.get("nbcluster/api/cluster")["nodes"][0]["actors"] >= 1
    assert server.post(f"nbcluster/api/actors/{a['actor_id']}/kill") == {"ok": True}

    def dead() -> bool:
        actors = server.get("nbcluster/api/actors")["actors"]
        return any(x["actor_id"] == a["actor_id"] and x["state"] == "dead" for x in actors)

    wait_until(dead, timeout=30)
    wait_until(lambda: not psutil.pid_exists(a["pid"]), timeout=30)
    r = kernel.execute(
        "try:\n    nb.get(c.inc.remote(), timeout=30)\nexcept Exception as e:\n"
        "    print(type(e).__name__)"
    ).raise_for_error()
    assert "Actor" in r.stdout  # ActorDiedError
    status, body = server.request("POST", f"nbcluster/api/actors/{a['actor_id']}/kill")
    assert status == 404 and "error" in body


def test_kernel_shutdown_releases_its_tasks_and_actors(server: JupyterServer) -> None:
    k = server.start_kernel("work/short-lived.ipynb")
    k.execute(
        "import nbcluster as nb, time\n"
        "nb.init()\n"
        "@nb.remote\n"
        "def nap():\n"
        "    time.sleep(120)\n"
        "@nb.remote(num_cpus=0)\n"
        "class Holder:\n"
        "    def ping(self): return 1\n"
        "h = Holder.options(name='holder').remote()\n"
        "nb.get(h.ping.remote())\n"
        "ref = nap.remote()\n"
    ).raise_for_error()

    def mine(kind: str) -> list[dict[str, Any]]:
        items = server.get(f"nbcluster/api/{kind}")[kind]
        return [x for x in items if x["owner"]["kernel_id"] == k.kernel_id]

    wait_until(lambda: any(t["state"] == "running" for t in mine("tasks")), timeout=30)
    assert any(a["state"] == "alive" for a in mine("actors"))
    k.shutdown()
    wait_until(lambda: all(t["state"] == "cancelled" for t in mine("tasks")), timeout=30)
    wait_until(lambda: all(a["state"] == "dead" for a in mine("actors")), timeout=30)
    node = server.get("nbcluster/api/cluster")["nodes"][0]
    wait_until(
        lambda: (
            server.get("nbcluster/api/cluster")["nodes"][0]["resources_available"]["CPU"]
            == node["resources_total"]["CPU"]
        ),
        timeout=30,
    )


# ----------------------------------------------------------------------------- websocket
class Stream:
    """The events websocket, read with timeouts."""

    def __init__(self, conn: WebSocketClientConnection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop

    def next(self, timeout: float = 20.0) -> dict[str, Any]:
        async def read() -> Any:
            return await self.conn.read_message()

        raw = self.loop.run_until_complete(asyncio.wait_for(read(), timeout))
        assert raw is not None, "the events websocket closed"
        msg: dict[str, Any] = json.loads(raw)
        return msg

    def until(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        loop_deadline = self.loop.time() + timeout
        while True:
            left = loop_deadline - self.loop.time()
            assert left > 0, "no matching websocket message in time"
            msg = self.next(left)
            if pred(msg):
                return msg


@pytest.fixture
def events(server: JupyterServer) -> Iterator[Stream]:
    loop = asyncio.new_event_loop()
    req = HTTPRequest(
        server.ws_url("nbcluster/api/events"),
        headers={"Authorization": f"token {server.token}"},
    )

    async def connect() -> WebSocketClientConnection:
        return await websocket_connect(req)

    conn = loop.run_until_complete(asyncio.wait_for(connect(), 20))
    try:
        yield Stream(conn, loop)
    finally:

        async def close() -> None:
            conn.close()
            await asyncio.sleep(0.1)

        loop.run_until_complete(close())
        loop.close()


def test_websocket_snapshot_metrics_and_changes(
    server: JupyterServer, kernel: Kernel, events: Stream
) -> None:
    snap = events.next()
    assert snap["type"] == "snapshot"
    assert snap["cluster"]["nodes"][0]["node_id"] and "tasks" in snap and "actors" in snap
    m1 = events.until(lambda m: m["type"] == "metrics")
    m2 = events.until(lambda m: m["type"] == "metrics")
    assert 0.5 < m2["time"] - m1["time"] < 5  # about once a second
    n = m2["nodes"][0]
    assert n["metrics"]["gpus"][0]["utilization"] == 37.0 and n["alive"]
    assert set(n) >= {"node_id", "resources_available", "object_store", "tasks_running", "actors"}
    assert m2["totals"]["nodes"] == 1
    kernel.execute("nb.get(add.remote(41))").raise_for_error()
    ev = events.until(lambda m: m["type"] == "task" and m["task"]["state"] == "finished")
    assert ev["task"]["name"] == "add" and ev["task"]["owner"]["kernel_id"] == kernel.kernel_id
    kernel.execute("w = Counter.remote(); nb.get(w.inc.remote())").raise_for_error()
    ev = events.until(lambda m: m["type"] == "actor" and m["actor"]["state"] == "alive")
    assert ev["actor"]["class_name"] == "Counter"

    # A node joining, then leaving.
    address = server.get("nbcluster/api/cluster")["head"]["address"]
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbcluster.agent",
            "--address",
            address,
            "--token-file",
            str(server.runtime_dir / "nbcluster-token"),
            "--num-cpus",
            "1",
            "--prestart",
            "0",
            "--node-name",
            "extra-node",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ev = events.until(lambda m: m["type"] == "node" and m["node"]["name"] == "extra-node")
        assert ev["node"]["alive"] and ev["node"]["resources_total"]["CPU"] == 1
        agent.terminate()
        ev = events.until(
            lambda m: (
                m["type"] == "node" and m["node"]["name"] == "extra-node" and not m["node"]["alive"]
            )
        )
        assert ev["node"]["state"] == "dead"
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(30)


# ----------------------------------------------------------------------------- auth + stop
def _concrete(pattern: str) -> str:
    return re.sub(r"\([^)]*\)", "some-id", pattern).lstrip("/")


def test_every_route_requires_auth_and_stop_leaves_nothing(tmp_path: Path) -> None:
    srv = start_jupyter_server(
        tmp_path / "strict",
        nbcluster={"num_cpus": 1, "num_gpus": 0},
        server={"allow_unauthenticated_access": False},
    )
    stopped = False
    try:
        assert len(ROUTES) == 15
        for pattern, _handler in ROUTES:
            path = _concrete(pattern)
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
                for headers in ({}, {"Authorization": "token wrong-token"}):
                    status, _ = srv.request(method, path, auth=False, headers=headers)
                    assert status in (401, 403), (method, path, headers, status)
            # jupyter-server answers CORS preflights without credentials (browsers send none):
            # allowed, and it reveals nothing.
            status, body = srv.request("OPTIONS", path, auth=False)
            assert status in (200, 204, 403) and (status == 403 or not body), (path, status)
        # The websocket too.
        for headers in ({}, {"Authorization": "token wrong-token"}):
            req = HTTPRequest(srv.ws_url("nbcluster/api/events"), headers=headers)

            async def connect(req: HTTPRequest = req) -> WebSocketClientConnection:
                return await websocket_connect(req)

            with pytest.raises(HTTPClientError) as exc:
                asyncio.run(asyncio.wait_for(connect(), 20))
            assert exc.value.code in (401, 403)
        # Token auth works; cookie auth works for GET but a POST needs the XSRF token.
        assert srv.request("GET", "nbcluster/api/cluster")[0] == 200
        opener, xsrf = _cookie_login(srv)
        with opener.open(srv.url + "nbcluster/api/tasks", timeout=20) as r:
            assert r.status == 200 and "tasks" in json.loads(r.read())
        cancel = srv.url + "nbcluster/api/tasks/some-id/cancel"
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(urllib.request.Request(cancel, b"", method="POST"), timeout=20)
        assert err.value.code == 403
        req = urllib.request.Request(cancel, b"", {"X-XSRFToken": xsrf}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(req, timeout=20)
        assert err.value.code == 404  # authenticated and XSRF-checked: the task is unknown

        # Stopping the server stops the head, the agent and its workers; nothing is left.
        k = srv.start_kernel("x.ipynb")
        r = k.execute(
            "import nbcluster as nb, numpy as np\n"
            "nb.init()\n"
            "big = nb.put(np.ones(1 << 20))\n"  # 8 MiB: a shared-memory segment
            "print(nb.nodes()[0]['store_id'])"
        ).raise_for_error()
        store_id = r.stdout.strip()
        assert glob.glob(f"/dev/shm/nbc-{store_id}-*"), "the value should be in the store"
        pids = srv.stop()
        stopped = True
        assert srv.proc.returncode == 0, srv.log()[-3000:]
        assert len(pids) >= 3  # the agent, its worker(s) and the kernel at least
        wait_until(lambda: not [p for p in pids if psutil.pid_exists(p)], timeout=20)
        assert not list(srv.runtime_dir.glob("nbcluster-server-*.json"))
        assert not glob.glob(f"/dev/shm/nbc-{store_id}-*")
    finally:
        if not stopped:
            srv.stop()


def _ws_first_message(srv: JupyterServer) -> dict[str, Any]:
    """Open the events websocket with the server's token; return its first message."""
    req = HTTPRequest(
        srv.ws_url("nbcluster/api/events"), headers={"Authorization": f"token {srv.token}"}
    )

    async def first() -> dict[str, Any]:
        conn = await websocket_connect(req)
        try:
            raw = await conn.read_message()
            assert isinstance(raw, str)
            msg: dict[str, Any] = json.loads(raw)
            return msg
        finally:
            conn.close()

    return asyncio.run(asyncio.wait_for(first(), 20))


def test_every_route_asks_the_authorizer(tmp_path: Path) -> None:
    """Authentication is not enough: the server's Authorizer decides, per route and action."""
    policy = tmp_path / "authz"
    policy.write_text("allow")  # the helper waits for GET /cluster to answer
    srv = start_jupyter_server(
        tmp_path / "authz-server",
        nbcluster={"num_cpus": 1, "num_gpus": 0},
        server={"authorizer_class": "tests.jupyter_authorizers.SwitchableAuthorizer"},
        env={
            "NBC_TEST_AUTHZ": str(policy),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    reads = [_concrete(p) for p, h in ROUTES if h not in WRITES]
    reads.remove("nbcluster/api/events")
    writes = [_concrete(p) for p, h in ROUTES if h in WRITES]
    try:
        policy.write_text("deny")
        for path in reads:
            assert srv.request("GET", path)[0] == 403, path
        for path in writes:
            assert srv.request("POST", path)[0] == 403, path
        with pytest.raises(HTTPClientError) as exc:
            _ws_first_message(srv)
        assert exc.value.code == 403

        policy.write_text("read")  # a read-only collaborator
        for path in reads:
            # Allowed through (the logs route without a target answers 400: a bad request).
            assert srv.request("GET", path)[0] == (400 if path.endswith("/logs") else 200), path
        assert _ws_first_message(srv)["type"] == "snapshot"
        for path in writes:
            assert srv.request("POST", path)[0] == 403, path

        policy.write_text("allow")
        for path in writes:  # authorized: the ids are unknown
            assert srv.request("POST", path)[0] == 404, path
        asked = set(policy.with_suffix(".log").read_text().splitlines())
        assert {"read nbcluster", "execute nbcluster"} <= asked
    finally:
        srv.stop()


def test_head_only_on_all_interfaces(tmp_path: Path) -> None:
    srv = start_jupyter_server(
        tmp_path / "headonly", nbcluster={"ip": "0.0.0.0", "local_node": False}, wait_node=False
    )
    try:
        body = srv.get("nbcluster/api/cluster")
        assert body["nodes"] == [] and body["totals"]["nodes"] == 0
        assert body["head"]["address"].startswith("0.0.0.0:")
        port = body["head"]["address"].rsplit(":", 1)[1]
        (conn,) = srv.runtime_dir.glob("nbcluster-server-*.json")
        assert json.loads(conn.read_text())["address"] == f"127.0.0.1:{port}"
        k = srv.start_kernel("h.ipynb")
        r = k.execute("import nbcluster as nb\nnb.init()\nprint(nb.nodes())").raise_for_error()
        assert r.stdout.strip() == "[]"
        assert not [p for p in srv.descendants() if "nbcluster.agent" in " ".join(p.cmdline())]
    finally:
        srv.stop()


def test_server_restart_keeps_remote_nodes_and_detached_actors(tmp_path: Path) -> None:
    port = free_port()
    tmp = tmp_path / "restart"
    srv = start_jupyter_server(tmp, nbcluster={"num_cpus": 1, "num_gpus": 0, "port": port})
    agent_log = open(tmp / "agent.log", "ab")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbcluster.agent",
            "--address",
            f"127.0.0.1:{port}",
            "--token-file",
            str(srv.runtime_dir / "nbcluster-token"),
            "--num-cpus",
            "1",
            "--resources",
            '{"remote": 1}',
            "--node-name",
            "remote-1",
        ],
        stdout=agent_log,
        stderr=agent_log,
        start_new_session=True,
    )
    srv2: JupyterServer | None = None
    try:

        def remote_node(s: JupyterServer) -> dict[str, Any] | None:
            nodes = s.get("nbcluster/api/cluster")["nodes"]
            return next((n for n in nodes if n["name"] == "remote-1" and n["alive"]), None)

        node = wait_until(lambda: remote_node(srv), timeout=60)
        assert isinstance(node, dict)
        k = srv.start_kernel("svc.ipynb")
        k.execute(
            "import nbcluster as nb\n"
            "nb.init(namespace='svc')\n"
            "@nb.remote(num_cpus=0, resources={'remote': 1})\n"
            "class Service:\n"
            "    def pid(self):\n"
            "        import os; return os.getpid()\n"
            "s = Service.options(name='service', lifetime='detached').remote()\n"
            "print(nb.get(s.pid.remote()))"
        ).raise_for_error()
        (actor,) = [a for a in srv.get("nbcluster/api/actors")["actors"] if a["name"] == "service"]
        assert actor["node_id"] == node["node_id"] and actor["detached"]

        srv.stop()
        assert srv.proc.returncode == 0
        assert agent.poll() is None, "the remote agent must survive the server's stop"
        assert psutil.pid_exists(actor["pid"])

        srv2 = start_jupyter_server(
            tmp, nbcluster={"num_cpus": 1, "num_gpus": 0, "port": port}, wait_node=False
        )
        again = wait_until(lambda: remote_node(srv2), timeout=60)
        assert isinstance(again, dict) and again["node_id"] == node["node_id"]

        def service_alive() -> dict[str, Any] | None:
            actors = srv2.get("nbcluster/api/actors")["actors"]
            return next(
                (a for a in actors if a["name"] == "service" and a["state"] == "alive"), None
            )

        found = wait_until(service_alive, timeout=60)
        assert isinstance(found, dict) and found["pid"] == actor["pid"]
        k2 = srv2.start_kernel("svc2.ipynb")
        r = k2.execute(
            "import nbcluster as nb\n"
            "nb.init(namespace='svc')\n"
            "print(nb.get(nb.get_actor('service').pid.remote()))"
        ).raise_for_error()
        assert r.stdout.strip() == str(actor["pid"])
    finally:
        if srv2 is not None:
            srv2.stop()
        srv.stop()
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
        agent_log.close()


def _cookie_login(srv: JupyterServer) -> tuple[urllib.request.OpenerDirector, str]:
    """Log in through the login form, like a browser; returns the opener and the XSRF token."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(srv.url + "login", timeout=20) as r:
        r.read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    form = urllib.parse.urlencode({"password": srv.token, "_xsrf": xsrf}).encode()
    with opener.open(srv.url + "login", form, timeout=20) as r:
        r.read()
    assert any(c.name.startswith("username-") for c in jar), [c.name for c in jar]
    return opener, xsrf
