"""The Prometheus export of a standalone head (``nbcluster head --metrics-port``) and the Grafana
dashboard in docs/grafana (the Jupyter server's ``GET /nbcluster/metrics`` is tested in
test_jupyter_server.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import nbcluster as nb
from tests.conftest import ROOT, wait_until
from tests.multinode import Procs

DASHBOARD = ROOT / "docs" / "grafana" / "nbcluster.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[Samples, str]:
    """Every sample of the exposition at ``url`` by (name, labels), and its content type."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text, ctype = r.read().decode(), r.headers["Content-Type"]
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, ctype


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name`` whose labels include ``labels`` (the sum when several match)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    return sum(found) if found else None


def metrics_url(procs: Procs) -> str:
    def ready() -> str | None:
        for line in (procs.tmp / "head.log").read_text().splitlines():
            if line.startswith("NBCLUSTER_METRICS_READY"):
                return line.split()[1]
        return None

    return str(wait_until(ready, 10))


@nb.remote
def square(x: int) -> int:
    return x * x


@nb.remote
def boom() -> None:
    raise ValueError("boom")


@nb.remote(max_restarts=1, max_task_retries=-1, num_cpus=0)
class Keeper:
    def pid(self) -> int:
        return os.getpid()


def test_standalone_head_metrics(procs: Procs) -> None:
    procs.start_head("--metrics-port", "0")
    url = metrics_url(procs)
    assert url.startswith("http://127.0.0.1:")  # loopback unless --metrics-host says otherwise
    procs.join("a", "--num-cpus", "1")
    procs.join("b", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    assert nb.get([square.remote(i) for i in range(5)], timeout=60) == [i * i for i in range(5)]
    try:
        nb.get(boom.remote(), timeout=60)
    except ValueError:
        pass
    ref = nb.put(np.ones(2_000_000, dtype=np.uint8))
    keeper = Keeper.remote()  # type: ignore[attr-defined]
    pid = nb.get(keeper.pid.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)  # its worker dies: the head restarts it once
    assert nb.get(keeper.pid.remote(), timeout=60) != pid

    def settled() -> Samples | None:
        s, _ = scrape(url)
        done = value(s, "nbcluster_tasks_ended_total", function="square", state="finished")
        # (and each node's first host sample: agents send one with a ping a second or two in)
        sampled = all(value(s, "nbcluster_node_memory_total_bytes", node=n) for n in "ab")
        return (
            s if done == 5 and value(s, "nbcluster_object_store_used_bytes") and sampled else None
        )

    samples = wait_until(settled, 20)
    assert isinstance(samples, dict)
    assert value(samples, "nbcluster_nodes", state="alive") == 2
    assert value(samples, "nbcluster_nodes", state="dead") == 0
    assert value(samples, "nbcluster_tasks_ended_total", function="boom", state="failed") == 1
    assert value(samples, "nbcluster_resources_total", resource="CPU") == 2
    assert (value(samples, "nbcluster_object_store_used_bytes") or 0) >= 2_000_000
    assert value(samples, "nbcluster_object_store_objects") == 1
    assert value(samples, "nbcluster_actor_restarts_total", class_name="Keeper") == 1
    assert value(samples, "nbcluster_actors", class_name="Keeper", state="alive") == 1
    waits = value(samples, "nbcluster_lease_wait_seconds_count") or 0
    assert waits >= 2  # a lease per node at least, and the actor's two
    assert value(samples, "nbcluster_lease_wait_seconds_bucket", le="+Inf") == waits
    for node in ("a", "b"):
        assert value(samples, "nbcluster_node_memory_total_bytes", node=node)
        assert value(samples, "nbcluster_node_workers", node=node) is not None
    del ref

    # Only GET of the metrics paths answers.
    with urllib.request.urlopen(url.replace("/metrics", "/nbcluster/metrics"), timeout=10) as r:
        assert r.status == 200
    for bad in (url.replace("/metrics", "/other"), url + "x"):
        try:
            urllib.request.urlopen(bad, timeout=10)
            raise AssertionError(f"{bad} answered")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("POST answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 405
    # Garbage instead of a request: the connection is closed, the server goes on.
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert scrape(url)[1].startswith("text/plain; version=0.0.4")


def test_metrics_port_taken_is_a_clear_error(procs: Procs) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        log = procs.tmp / "head.log"
        procs.head = procs._popen(
            [
                "head",
                "--port",
                str(procs.port),
                "--token-file",
                str(procs.token_file),
                "--metrics-port",
                str(port),
            ],
            log,
            [],
        )
        assert procs.head.wait(30) == 2
    assert "no metrics endpoint" in log.read_text()


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert exprs
    return {m for e in exprs for m in re.findall(r"\bnbcluster_[a-z_]+", e)}


def test_grafana_dashboard_uses_existing_metrics(procs: Procs) -> None:
    """Every metric the dashboard charts is in a scrape (so its panels are not empty)."""
    procs.start_head("--metrics-port", "0")
    url = metrics_url(procs)
    procs.join("a", "--num-cpus", "1")

    def joined() -> Samples | None:
        s = scrape(url)[0]
        alive = value(s, "nbcluster_nodes", state="alive") == 1
        # A node's host metrics come with its pings, from about a second after it joined.
        return s if alive and value(s, "nbcluster_node_memory_total_bytes", node="a") else None

    samples = wait_until(joined, 20)
    assert isinstance(samples, dict)
    names = {n for n, _ in samples}
    wanted = dashboard_metric_names()
    # GPU series exist only on nodes with GPUs: the names are checked in the Jupyter test
    # (a faked GPU); here, every other one.
    missing = {n for n in wanted - names if "_gpu_" not in n}
    assert not missing, f"the dashboard charts metrics no scrape has: {sorted(missing)}"
    assert len(wanted) >= 15
    assert Path(DASHBOARD).read_text().endswith("\n")
