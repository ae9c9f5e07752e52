"""Process lifecycle: what init() starts, shutdown() and driver death stop; standalone head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import nbcluster as nb
from nbcluster.launch import free_port
from tests.conftest import (
    ROOT,
    all_gone,
    descendants,
    ready_line,
    run_script,
    stop_processes,
    wait_until,
)

LIST_PIDS = """
import json, psutil
print("PIDS", json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
"""


def _pids_from(output: str) -> list[int]:
    for line in output.splitlines():
        if line.startswith("PIDS "):
            return list(json.loads(line[5:]))
    raise AssertionError(f"no PIDS line in:\n{output}")


def test_init_starts_head_agent_and_workers_and_shutdown_stops_all() -> None:
    nb.shutdown()
    info = nb.init(num_cpus=2)
    try:
        assert info.local

        @nb.remote
        def pid() -> int:
            return os.getpid()

        worker_pid = nb.get(pid.remote(), timeout=30)
        procs = descendants()
        cmdlines = [" ".join(p.cmdline()) for p in procs]
        assert any("nbcluster.head" in c for c in cmdlines)
        assert any("nbcluster.agent" in c for c in cmdlines)
        assert worker_pid in [p.pid for p in procs]
        assert worker_pid != os.getpid()
        session = Path(info.session_dir or "")
        assert session.is_dir()
    finally:
        pids = [p.pid for p in descendants()]
        nb.shutdown()
    wait_until(lambda: all_gone(pids), timeout=15)
    assert not session.exists()
    assert not nb.is_initialized()


def test_main_module_functions_and_uncaught_exception_cleanup() -> None:
    code = (
        textwrap.dedent(
            """
        import nbcluster as nb
        nb.init(num_cpus=2)

        @nb.remote
        def f(x):
            return x * x

        print("RESULT", nb.get([f.remote(i) for i in range(4)]), flush=True)

        @nb.remote  # redefined in the same script: the new body runs
        def f(x):
            return -x

        print("RESULT2", nb.get(f.remote(3)), flush=True)

        class Point:  # a class defined in __main__ travels by value
            def __init__(self, x, y):
                self.x, self.y = x, y

        @nb.remote
        def norm1(p):
            return abs(p.x) + abs(p.y)

        print("RESULT3", nb.get(norm1.remote(Point(3, -4))), flush=True)
        """
        )
        + LIST_PIDS
        + "\nraise RuntimeError('driver crashed')\n"
    )
    proc = run_script(code, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "RESULT [0, 1, 4, 9]" in proc.stdout
    assert "RESULT2 -3" in proc.stdout
    assert "RESULT3 7" in proc.stdout
    assert "driver crashed" in proc.stderr
    pids = _pids_from(proc.stdout)
    assert len(pids) >= 3  # head, agent, worker(s)
    wait_until(lambda: all_gone(pids), timeout=15)


def test_killed_driver_takes_its_cluster_down() -> None:
    code = (
        "import nbcluster as nb, time\ninfo = nb.init(num_cpus=1)\n"
        "print('SESSION', info.session_dir)\n" + LIST_PIDS + "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        session = Path(proc.stdout.readline().split(" ", 1)[1].strip())
        assert (session / "token").exists()
        pids = _pids_from(proc.stdout.readline())
        assert pids
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: all_gone(pids), timeout=15)
        assert not session.exists()  # the secret does not outlive the cluster
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def standalone(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A head started with ``nbcluster head`` and an agent with ``nbcluster-worker``."""
    nb.shutdown()
    token_file = tmp_path / "token"
    port = free_port()
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "head",
            "--port",
            str(port),
            "--token-file",
            str(token_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs = [head]
    try:
        assert head.stdout is not None
        banner = []
        for line in head.stdout:
            banner.append(line)
            if line.startswith("NBCLUSTER_HEAD_READY"):
                break
        text = "".join(banner)
        assert f"nbcluster-worker --address 127.0.0.1:{port}" in text
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert token_file.read_text() not in text  # the secret is never printed
        worker_cmd = [shutil.which("nbcluster-worker") or sys.executable]
        if not worker_cmd[0].endswith("nbcluster-worker"):
            worker_cmd += ["-m", "nbcluster", "worker"]
        agent = subprocess.Popen(
            [
                *worker_cmd,
                "--address",
                f"127.0.0.1:{port}",
                "--token-file",
                str(token_file),
                "--num-cpus",
                "2",
                "--node-name",
                "box-a",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(agent)
        assert agent.stdout is not None
        ready_line(agent.stdout)
        yield f"127.0.0.1:{port}", token_file, procs
    finally:
        nb.shutdown()
        stop_processes(procs)


def _join(address: str, token_file: Path, name: str, *flags: str) -> subprocess.Popen[str]:
    """Start ``nbcluster worker`` (a node agent) joining ``address``; returns once it is ready."""
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "worker",
            "--address",
            address,
            "--token-file",
            str(token_file),
            "--node-name",
            name,
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert agent.stdout is not None
    ready_line(agent.stdout)
    return agent


def test_standalone_head_worker_and_driver(standalone) -> None:  # type: ignore[no-untyped-def]
    address, token_file, procs = standalone
    info = nb.init(address=address, token_file=token_file)
    assert not info.local
    nodes = nb.nodes()
    assert [n["name"] for n in nodes] == ["box-a"]
    assert nb.cluster_resources()["CPU"] == 2

    @nb.remote
    def f(x: int) -> int:
        return x + 1

    assert nb.get([f.remote(i) for i in range(10)], timeout=30) == list(range(1, 11))
    # A second driver (the status command) sees the same cluster.
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "status",
            "--address",
            address,
            "--token-file",
            str(token_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "box-a" in status.stdout and "alive" in status.stdout
    nb.shutdown()  # disconnecting a driver leaves the cluster running
    assert all(p.poll() is None for p in procs)
    # The secret never appears on any command line.
    secret = token_file.read_text()
    for p in psutil.process_iter(["cmdline"]):
        assert secret not in " ".join(p.info["cmdline"] or [])


def test_pending_task_runs_when_a_capable_node_joins(standalone, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    address, token_file, procs = standalone
    nb.init(address=address, token_file=token_file)

    @nb.remote(num_gpus=1)
    def on_gpu() -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

    caplog.set_level(logging.WARNING, logger="nbcluster")
    ref = on_gpu.remote()
    wait_until(lambda: "missing GPU: 1" in caplog.text, timeout=10)
    assert nb.wait([ref], timeout=0.5)[0] == []
    gpu_box = _join(address, token_file, "gpu-box", "--num-cpus", "1", "--num-gpus", "1")
    procs.append(gpu_box)
    assert nb.get(ref, timeout=60) == "0"
    assert sorted(n["name"] for n in nb.nodes()) == ["box-a", "gpu-box"]


def test_agent_sigterm_stops_its_workers(standalone) -> None:  # type: ignore[no-untyped-def]
    address, token_file, procs = standalone
    nb.init(address=address, token_file=token_file)

    @nb.remote
    def pid() -> int:
        return os.getpid()

    wpid = nb.get(pid.remote(), timeout=30)
    agent = procs[1]
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(15) == 0
    wait_until(lambda: all_gone([wpid]), timeout=15)


def test_objects_move_between_nodes(standalone) -> None:  # type: ignore[no-untyped-def]
    np = pytest.importorskip("numpy")
    address, token_file, procs = standalone
    for name, res in (("box-b", '{"b": 1}'), ("box-c", '{"c": 2}')):
        procs.append(_join(address, token_file, name, "--num-cpus", "2", "--resources", res))
    nb.init(address=address, token_file=token_file)

    @nb.remote(resources={"b": 1})
    def produce() -> tuple[str, object]:
        return nb.get_runtime_context().get_node_id(), np.arange(2_000_000, dtype=np.float64)

    @nb.remote(resources={"c": 1})
    def consume(pair: tuple[str, object]) -> tuple[str, str, float]:
        where, arr = pair
        return where, nb.get_runtime_context().get_node_id(), float(arr.sum())  # type: ignore[attr-defined]

    ref = produce.remote()
    results = nb.get([consume.remote(ref), consume.remote(ref)], timeout=60)
    expected = float(np.arange(2_000_000, dtype=np.float64).sum())
    for made_on, read_on, total in results:
        assert made_on != read_on and total == expected  # crossed nodes, intact
    # The driver reads it too (from its own node's copy).
    assert nb.get(ref, timeout=60)[1][-1] == 1_999_999
