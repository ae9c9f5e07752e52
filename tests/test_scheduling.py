"""Scheduling across nodes: SPREAD, node affinity, locality, fractional GPUs, GPU detection.

The process tests run a standalone head and three node agents on this machine (one of them with
a logical GPU) and a driver that connects to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.agent import resources
from nbcluster.exceptions import ActorDiedError, TaskUnschedulableError
from nbcluster.scheduling import NodeAffinitySchedulingStrategy, strategy_spec
from nbcluster.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy as RayNodeAffinity,
)
from tests.conftest import stop_processes, wait_until

TIMEOUT = 90  # seconds: the machine is shared and small
_HEAD: dict[str, str] = {}  # the module cluster's head address and token file


# --------------------------------------------------------------------------- options (no cluster)
def test_strategy_options_are_validated() -> None:
    assert RayNodeAffinity is NodeAffinitySchedulingStrategy is nb.NodeAffinitySchedulingStrategy
    assert nb.util.scheduling_strategies.NodeAffinitySchedulingStrategy is RayNodeAffinity
    assert strategy_spec(None) is None and strategy_spec("DEFAULT") is None
    assert strategy_spec("SPREAD") == {"t": "spread"}
    spec = strategy_spec(NodeAffinitySchedulingStrategy("node-1", soft=True))
    assert spec == {"t": "node", "node": "node-1", "soft": True, "spill": False}

    @nb.remote
    def f() -> None: ...

    with pytest.raises(ValueError, match="unknown scheduling_strategy 'PACK'"):
        f.options(scheduling_strategy="PACK")
    with pytest.raises(ValueError, match="placement groups"):
        f.options(scheduling_strategy=object())
    with pytest.raises(ValueError, match="node id"):
        NodeAffinitySchedulingStrategy("")
    with pytest.raises(ValueError, match="whole number"):
        f.options(num_gpus=1.5)

    @nb.remote
    class A: ...

    with pytest.raises(ValueError, match="whole number"):
        A.options(num_gpus=2.5)
    with pytest.raises(ValueError, match="unknown scheduling_strategy"):
        A.options(scheduling_strategy="ANYWHERE")


# --------------------------------------------------------------------------- GPU detection
def _fake_nvml(gpus: list[tuple[str, int]]) -> ModuleType:
    """A stand-in for pynvml that reports ``gpus`` as (name, memory bytes)."""
    mod = ModuleType("fake_pynvml_for_tests")
    mod.nvmlInit = lambda: None  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: gpus[h][0].encode()  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(  # type: ignore[attr-defined]
        total=gpus[h][1], used=0, free=gpus[h][1]
    )
    return mod


def test_gpus_detected_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nvml([("NVIDIA H100 80GB HBM3", 80 << 30), ("NVIDIA A10", 24 << 30)])
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setenv(resources.NVML_MODULE_ENV, fake.__name__)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = resources.detect_gpus()
    assert gpus == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 << 30},
        {"index": 1, "name": "NVIDIA A10", "memory_total": 24 << 30},
    ]
    assert resources.node_resources(2, None, None, gpus)["GPU"] == 2
    # An agent started inside an allocation offers only the GPUs it was given.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g["index"] for g in resources.detect_gpus()] == [1]


def test_no_nvidia_driver_means_no_gpus_and_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except Exception:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    monkeypatch.delenv(resources.NVML_MODULE_ENV, raising=False)
    assert resources.detect_gpus() == []
    assert "GPU" not in resources.node_resources(1, None, None, [])
    # A module that is not there at all: the same.
    monkeypatch.setenv(resources.NVML_MODULE_ENV, "no_such_nvml_module_here")
    assert resources.detect_gpus() == []


def test_node_resources_reject_bad_amounts() -> None:
    with pytest.raises(ValueError, match="whole GPUs"):
        resources.node_resources(1, 1.5, None, [])
    with pytest.raises(ValueError, match="non-negative"):
        resources.node_resources(-1, 0, None, [])
    with pytest.raises(ValueError, match="resources\\['x'\\]"):
        resources.node_resources(1, 0, {"x": "many"}, [])  # type: ignore[dict-item]


# --------------------------------------------------------------------------- a 3-node cluster
def _drain(proc: subprocess.Popen[str]) -> None:
    """Read a child's remaining output so that it never blocks on a full pipe."""
    assert proc.stdout is not None
    stream = proc.stdout
    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()


def _start(
    cmd: list[str], ready: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **(env or {})}
        )
    assert proc.stdout is not None
    line = ""
    deadline = time.monotonic() + TIMEOUT
    while not line.startswith(ready):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"{cmd[3]} exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{cmd[3]} not ready within {TIMEOUT} s")
    _drain(proc)
    return proc


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A head and agents ``box-a``, ``box-b`` (2 CPUs each) and ``gpu-box`` (2 CPUs and one GPU,
    found through a fake NVML); yields node name -> node id, with a driver connected."""
    import socket

    nb.shutdown()
    tmp = tmp_path_factory.mktemp("sched")
    token = tmp / "token"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    _HEAD.update(address=address, token=str(token))
    py = [sys.executable, "-m", "nbcluster"]
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(
            _start(
                [*py, "head", "--port", str(port), "--token-file", str(token)],
                "NBCLUSTER_HEAD_READY",
                tmp / "head.log",
            )
        )
        fake_gpus = tmp / "gpus.json"
        fake_gpus.write_text(json.dumps([{"name": "NVIDIA Fake H100", "memory_total": 80 << 30}]))
        nvml = {
            resources.NVML_MODULE_ENV: "nbcluster.testing.fake_nvml",
            "NBCLUSTER_FAKE_NVML": str(fake_gpus),
        }
        for name in ("box-a", "box-b", "gpu-box"):
            procs.append(
                _start(
                    [
                        *py,
                        "worker",
                        "--address",
                        address,
                        "--token-file",
                        str(token),
                        "--node-name",
                        name,
                        "--num-cpus",
                        "2",
                        "--prestart",
                        "1",
                    ],
                    "NBCLUSTER_AGENT_READY",
                    tmp / f"{name}.log",
                    env=nvml if name == "gpu-box" else {resources.NVML_MODULE_ENV: "none_here"},
                )
            )
        nb.init(address=address, token_file=token)
        yield {n["name"]: n["node_id"] for n in nb.nodes()}
    finally:
        nb.shutdown()
        stop_processes(procs, timeout=20)


@nb.remote(num_cpus=1)
def where(hold_s: float = 0.0) -> str:
    time.sleep(hold_s)
    return nb.get_runtime_context().get_node_id()


@nb.remote(num_cpus=0)
class Where:
    def node(self) -> str:
        return nb.get_runtime_context().get_node_id()


def test_spread_places_tasks_and_actors_on_different_nodes(three_nodes: dict[str, str]) -> None:
    # Warm up box-a: it then has idle workers of this job, which DEFAULT would pick first.
    on_a = NodeAffinitySchedulingStrategy(three_nodes["box-a"])
    nb.get([where.options(num_cpus=0.5, scheduling_strategy=on_a).remote(0.5) for _ in range(3)])
    wait_until(lambda: nb.available_resources().get("CPU") == 6.0, timeout=TIMEOUT)
    spread = where.options(num_cpus=0.5, scheduling_strategy="SPREAD")
    # Each task holds its worker a moment, so all three are placed while the others run.
    refs = [spread.remote(1.0) for _ in range(3)]
    assert sorted(nb.get(refs, timeout=TIMEOUT)) == sorted(three_nodes.values())
    actors = [Where.options(scheduling_strategy="SPREAD").remote() for _ in range(3)]
    placed = nb.get([a.node.remote() for a in actors], timeout=TIMEOUT)
    assert sorted(placed) == sorted(three_nodes.values())
    for a in actors:
        nb.kill(a)


def test_hard_affinity_runs_on_that_node(three_nodes: dict[str, str]) -> None:
    for node_id in three_nodes.values():
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        refs = [where.options(scheduling_strategy=strategy).remote() for _ in range(3)]
        assert nb.get(refs, timeout=TIMEOUT) == [node_id] * 3
        actor = Where.options(scheduling_strategy=strategy).remote()
        assert nb.get(actor.node.remote(), timeout=TIMEOUT) == node_id
        nb.kill(actor)


def test_affinity_to_a_bogus_node(three_nodes: dict[str, str]) -> None:
    hard = NodeAffinitySchedulingStrategy("node-does-not-exist", soft=False)
    ref = where.options(scheduling_strategy=hard).remote()
    with pytest.raises(TaskUnschedulableError, match=r"node-does-not-exist.*not part of"):
        nb.get(ref, timeout=TIMEOUT)
    # Too small counts as impossible too: no node of this cluster has 3 CPUs.
    big = NodeAffinitySchedulingStrategy(three_nodes["box-a"])
    with pytest.raises(TaskUnschedulableError, match="less than"):
        nb.get(where.options(num_cpus=3, scheduling_strategy=big).remote(), timeout=TIMEOUT)
    actor = Where.options(scheduling_strategy=hard).remote()
    with pytest.raises(ActorDiedError, match="node-does-not-exist"):
        nb.get(actor.node.remote(), timeout=TIMEOUT)
    # Soft affinity falls back to any node.
    soft = NodeAffinitySchedulingStrategy("node-does-not-exist", soft=True)
    got = nb.get(where.options(scheduling_strategy=soft).remote(), timeout=TIMEOUT)
    assert got in three_nodes.values()


def test_consumer_runs_where_its_large_argument_lives(three_nodes: dict[str, str]) -> None:
    np = pytest.importorskip("numpy")

    @nb.remote(num_cpus=0.5)
    def produce() -> Any:
        return np.ones(2_000_000)  # 16 MB: lives in the producing node's store

    @nb.remote(num_cpus=0.5)
    def consume(arr: Any) -> tuple[str, float]:
        return nb.get_runtime_context().get_node_id(), float(arr.sum())

    for name in ("box-b", "gpu-box", "box-a"):
        # Idle leases of earlier tasks are returned within a second: then X has room for both.
        wait_until(lambda: nb.available_resources().get("CPU") == 6.0, timeout=TIMEOUT)
        node_id = three_nodes[name]
        on_x = NodeAffinitySchedulingStrategy(node_id)
        big = produce.options(scheduling_strategy=on_x).remote()
        nb.wait([big], timeout=TIMEOUT)
        got = nb.get([consume.remote(big) for _ in range(2)], timeout=TIMEOUT)
        assert got == [(node_id, 2_000_000.0)] * 2, name


def test_half_gpus_share_one_gpu_at_the_same_time(
    three_nodes: dict[str, str], tmp_path: Path
) -> None:
    @nb.remote(num_gpus=0.5, num_cpus=0)
    def half(folder: str, me: str) -> tuple[str, str, bool]:
        # Both halves must be running at once: each waits (bounded) to see the other.
        Path(folder, me).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return (
            nb.get_runtime_context().get_node_id(),
            os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            len(os.listdir(folder)) == 2,
        )

    both = tmp_path / "both"
    both.mkdir()
    got = nb.get([half.remote(str(both), m) for m in ("a", "b")], timeout=TIMEOUT)
    assert got == [(three_nodes["gpu-box"], "0", True)] * 2


def test_half_and_three_quarters_do_not_share_a_gpu(
    three_nodes: dict[str, str], tmp_path: Path
) -> None:
    @nb.remote(num_gpus=0.5, num_cpus=0)
    def hold(release: str) -> str:
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

    @nb.remote(num_gpus=0.75, num_cpus=0)
    def bigger(started: str) -> str:
        Path(started).touch()
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

    release, started = tmp_path / "release", tmp_path / "started"
    first = hold.remote(str(release))
    wait_until(lambda: nb.available_resources().get("GPU", 1.0) <= 0.5, timeout=TIMEOUT)
    second = bigger.remote(str(started))
    # While the half runs, 0.75 more does not fit the one GPU: the second task must not start.
    # (A bounded window: there is no event for "did not happen".)
    assert nb.wait([second], timeout=2.0)[0] == [] and not started.exists()
    release.touch()
    assert nb.get([first, second], timeout=TIMEOUT) == ["0", "0"]
    assert started.exists()


def test_gpu_node_reports_its_gpus(three_nodes: dict[str, str]) -> None:
    by_name = {n["name"]: n for n in nb.nodes()}
    gpu_node = by_name["gpu-box"]
    assert gpu_node["resources_total"]["GPU"] == 1
    assert gpu_node["gpus"] == [{"index": 0, "name": "NVIDIA Fake H100", "memory_total": 80 << 30}]
    assert "GPU" not in by_name["box-a"]["resources_total"] and not by_name["box-a"]["gpus"]
    wait_until(lambda: nb.available_resources().get("GPU") == 1.0, timeout=TIMEOUT)
    assert nb.cluster_resources()["CPU"] == 6


def test_hard_affinity_fails_and_soft_moves_when_the_node_leaves(
    three_nodes: dict[str, str], tmp_path: Path
) -> None:
    agent = _start(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "worker",
            "--address",
            _HEAD["address"],
            "--token-file",
            _HEAD["token"],
            "--node-name",
            "box-d",
            "--num-cpus",
            "2",
            "--prestart",
            "2",
        ],
        "NBCLUSTER_AGENT_READY",
        tmp_path / "box-d.log",
    )
    try:
        box_d = next(n["node_id"] for n in nb.nodes() if n["name"] == "box-d" and n["alive"])

        @nb.remote(num_cpus=1, max_retries=1)
        def long(mark: str) -> str:
            Path(mark).touch()
            time.sleep(120)
            return nb.get_runtime_context().get_node_id()

        @nb.remote(num_cpus=1, max_retries=1)
        def short(mark: str) -> str:
            if nb.get_runtime_context().get_node_id() == box_d:
                Path(mark).touch()
                time.sleep(120)
            return nb.get_runtime_context().get_node_id()

        hard = long.options(scheduling_strategy=NodeAffinitySchedulingStrategy(box_d))
        soft = short.options(scheduling_strategy=NodeAffinitySchedulingStrategy(box_d, soft=True))
        h_ref, s_ref = hard.remote(str(tmp_path / "h")), soft.remote(str(tmp_path / "s"))
        wait_until(lambda: (tmp_path / "h").exists() and (tmp_path / "s").exists(), TIMEOUT)
        agent.terminate()
        agent.wait(30)
        with pytest.raises(TaskUnschedulableError, match="dead"):
            nb.get(h_ref, timeout=TIMEOUT)
        assert nb.get(s_ref, timeout=TIMEOUT) in three_nodes.values()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        if agent.stdout is not None:
            agent.stdout.close()


def test_locality_hint_counts_stored_arguments_only() -> None:
    import msgpack

    from nbcluster.scheduling import preferred_store, stored_bytes
    from nbcluster.store.client import MARKER

    def marker(store: str, size: int) -> list[bytes]:
        return [MARKER + msgpack.packb({"oid": "x", "store": store, "size": size})]

    inline = [b"\x80\x05small pickle", b"buffer"]
    sizes = stored_bytes([marker("s1", 300), inline, marker("s2", 500), marker("s1", 400)])
    assert sizes == {"s1": 700, "s2": 500}
    assert preferred_store(sizes) == "s1"
    assert preferred_store({"b": 5, "a": 5}) == "a"  # ties: stable
    assert preferred_store(stored_bytes([inline])) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-gpus", "1.5"], "whole GPUs"),
        (["--num-cpus", "-2"], "non-negative"),
        (["--resources", "[1, 2]"], "must be a mapping"),
        (["--resources", '{"TPU": -1}'], "non-negative"),
    ],
)
def test_worker_rejects_bad_resource_flags(flags: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nbcluster", "worker", "--address", "127.0.0.1:1", *flags],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "NBCLUSTER_TOKEN": "not-used-for-this"},
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
