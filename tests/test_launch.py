"""The one launcher of heads and node agents (``nbcluster.launch``), with real processes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from nbcluster.exceptions import NbclusterError
from nbcluster.launch import (
    EXIT_ADDRESS_IN_USE,
    HEAD_READY,
    START_TIMEOUT_S,
    AgentOptions,
    ChildProcess,
    free_port,
    start_agent,
)
from nbcluster.protocol.security import new_token, write_token_file
from nbcluster.store.segment import SHM_DIR
from tests.conftest import all_gone


def test_agent_options_build_the_command_line(tmp_path: Path) -> None:
    opts = AgentOptions(
        head_address="10.0.0.1:7711",
        token_file=tmp_path / "token",
        node_name="box",
        num_cpus=2,
        resources={"TPU": 1},
        spill_dir=tmp_path / "spill",
        spill_limit=5,
    )
    args = opts.args()
    assert args[:4] == ["--address", "10.0.0.1:7711", "--token-file", str(tmp_path / "token")]
    assert args[args.index("--parent-pid") + 1] == str(os.getpid())
    assert args[args.index("--node-name") + 1] == "box"
    assert args[args.index("--resources") + 1] == '{"TPU": 1}'
    assert args[args.index("--spill-dir") + 1] == str(tmp_path / "spill")
    assert "--num-gpus" not in args and "--cwd" not in args
    assert "--parent-pid" not in AgentOptions("h:1", "t", watch_parent=False).args()
    # Default node name: this host's.
    default = AgentOptions("h:1", "t").args()
    assert default[default.index("--node-name") + 1] == socket.gethostname()


def test_an_agent_that_cannot_start_is_a_clear_error_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    write_token_file(tmp_path / "token", new_token())
    agent = start_agent(
        AgentOptions("127.0.0.1:1", tmp_path / "token", num_cpus=-1), log=log
    )  # a negative CPU count: a usage error, said in one line, before anything starts
    with pytest.raises(NbclusterError, match=r"exited during start-up \(code 2\)") as err:
        agent.wait_ready(time.monotonic() + START_TIMEOUT_S)
    assert "nbcluster-worker" in str(err.value)  # the end of its log comes with the error
    agent.stop()
    assert agent.proc.returncode == 2 and agent.node_id == ""

    # No secret: one line, not a traceback.
    log = tmp_path / "agent-2.log"
    agent = start_agent(AgentOptions("127.0.0.1:1", tmp_path / "missing"), log=log)
    with pytest.raises(NbclusterError, match=r"code 2\):\nnbcluster-worker: token file"):
        agent.wait_ready(time.monotonic() + START_TIMEOUT_S)
    agent.stop()
    assert "Traceback" not in log.read_text()


def test_head_and_agent_start_report_their_ids_and_stop_with_their_workers(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    write_token_file(token_file, new_token())
    port = free_port()
    head = ChildProcess(
        "head",
        "nbcluster.head",
        ["--port", str(port), "--token-file", str(token_file), "--parent-pid", str(os.getpid())],
        marker=HEAD_READY,
        log=tmp_path / "head.log",
    )
    agent = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert head.wait_ready(deadline).endswith(f":{port}")
        agent = start_agent(
            AgentOptions(f"127.0.0.1:{port}", token_file, num_cpus=1, spill_dir=tmp_path / "sp"),
            log=tmp_path / "agent.log",
        )
        agent.wait_ready(deadline)
        assert len(agent.node_id) > 0 and agent.store_address.startswith("tcp://")
        assert agent.store_id and agent.head_address == f"127.0.0.1:{port}"
        assert any(f.startswith(f"nbc-{agent.store_id}") for f in os.listdir(SHM_DIR))
        workers = [p.pid for p in psutil.Process(agent.pid).children(recursive=True)]
        assert workers  # prestarted
    finally:
        if agent is not None:
            agent.stop()
        head.stop()
    assert all_gone([head.pid, agent.pid, *workers])
    assert not any(f.startswith(f"nbc-{agent.store_id}") for f in os.listdir(SHM_DIR))
    assert (tmp_path / "agent.log").exists() and agent.proc.stdout is not None
    assert agent.proc.stdout.closed


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` now (``SigCgt`` in its status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signum - 1)))


def test_a_sigterm_right_after_the_ready_line_still_stops_the_workers(tmp_path: Path) -> None:
    """The ready line is printed after the SIGTERM handler is in place.

    Before, a SIGTERM that came between the two ended the agent by default and left its workers
    (in their own sessions) running: CI saw a worker outlive ``stop()``.
    """
    import signal

    token_file = tmp_path / "token"
    write_token_file(token_file, new_token())
    port = free_port()
    head = ChildProcess(
        "head",
        "nbcluster.head",
        ["--port", str(port), "--token-file", str(token_file), "--parent-pid", str(os.getpid())],
        marker=HEAD_READY,
        log=tmp_path / "head.log",
    )
    workers: list[int] = []
    agent = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        head.wait_ready(deadline)
        assert _catches(head.pid, signal.SIGTERM)
        agent = start_agent(
            AgentOptions(f"127.0.0.1:{port}", token_file, num_cpus=2, spill_dir=tmp_path / "sp"),
            log=tmp_path / "agent.log",
        )
        agent.wait_ready(deadline)
        assert _catches(agent.pid, signal.SIGTERM)
        workers = [p.pid for p in psutil.Process(agent.pid).children(recursive=True)]
        agent.terminate()  # at once, as a user's Ctrl-C in the launching notebook would
        agent.proc.wait(START_TIMEOUT_S)
        assert agent.proc.returncode == 0  # it ran its shutdown, not the default action
        assert workers and all_gone(workers)
    finally:
        if agent is not None:
            agent.stop()
        head.stop()
    assert all_gone([head.pid, *workers])


def test_free_port_stays_out_of_the_ephemeral_range() -> None:
    # Ports from that range are where outgoing connections and port-0 servers land: one picked
    # there could be taken before our server binds it (CI: a head's "Address already in use").
    low, high = (int(w) for w in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 40  # random, not one port for everyone
    assert all(not low <= p <= high for p in ports)
    for p in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_head_whose_port_is_taken_says_so_in_its_exit_status(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    write_token_file(token_file, new_token())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        head = ChildProcess(
            "head",
            "nbcluster.head",
            ["--port", str(port), "--token-file", str(token_file)],
            marker=HEAD_READY,
            log=tmp_path / "head.log",
        )
        with pytest.raises(NbclusterError, match=f"(?s)code {EXIT_ADDRESS_IN_USE}.*already in use"):
            head.wait_ready(time.monotonic() + START_TIMEOUT_S)
        head.stop()
    assert "Traceback" not in (tmp_path / "head.log").read_text()


def test_a_local_cluster_whose_head_port_is_taken_starts_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nbcluster as nb
    from nbcluster.client import launcher

    nb.shutdown()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = [taken.getsockname()[1]]  # the first pick: held by someone else

        def pick(host: str = "127.0.0.1") -> int:  # the launcher's port choice, made to clash
            picks.append(free_port(host))
            return picks[-2]

        monkeypatch.setattr(launcher, "free_port", pick)
        cluster = launcher.LocalCluster(num_cpus=1)
        try:
            cluster.start()
            assert cluster.address == f"127.0.0.1:{picks[1]}"
            assert cluster.token_file.exists()  # the first try's clean-up kept the session
            nb.init(address=cluster.address, token_file=cluster.token_file)

            @nb.remote
            def one() -> int:
                return 1

            assert nb.get(one.remote(), timeout=60) == 1
        finally:
            nb.shutdown()
            cluster.stop()
    assert len(picks) == 3  # the taken port, then the one the head bound (and the next pick)
    assert not cluster.session_dir.exists()
