"""The engine-independent parts of pools: the agent's head timeout, labels and owner job (real
head and agents), and the pure helpers adapt and the job script rely on. ``test_slurm.py`` runs
the pools against a real Slurm."""

from __future__ import annotations

import pytest

import nbcluster as nb
from nbcluster.agent.__main__ import parse_labels, route_address
from nbcluster.deploy.registry import option_parser, parse_words
from nbcluster.deploy.slurm import slurm_memory, slurm_time
from nbcluster.deploy.util import is_loopback, nodes_needed, parse_duration, shell_command
from tests.conftest import wait_until
from tests.multinode import Procs


def test_an_agent_exits_when_its_head_is_gone_for_the_head_timeout(procs: Procs) -> None:
    procs.start_head()
    node = procs.join("n1", "--head-timeout", "2", "--label", "nbcluster.job=7")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    try:
        (view,) = [n for n in nb.nodes() if n["node_id"] == node]
        assert view["labels"] == {"nbcluster.job": "7"}
    finally:
        nb.shutdown()
    procs.kill_head()
    agent = procs.agents["n1"]
    assert agent.wait(15) == 3  # 2 s without a word, then out (status 3)
    log = (procs.tmp / "agent-n1.log").read_text()
    assert "no word from the head" in log and "--head-timeout 2" in log


def test_an_agent_with_exit_with_job_leaves_when_that_driver_does(procs: Procs) -> None:
    procs.start_head()
    nb.init(address=procs.address, token_file=str(procs.token_file))
    try:
        job = nb.get_runtime_context().get_job_id()
        procs.join("mine", "--exit-with-job", job)
        procs.join("other")
        assert len([n for n in nb.nodes() if n["alive"]]) == 2
    finally:
        nb.shutdown()  # the head tells every agent the job ended
    assert procs.agents["mine"].wait(15) == 3
    assert procs.agents["other"].poll() is None
    nb.init(address=procs.address, token_file=str(procs.token_file))
    try:  # it drained: the head dropped it at once
        wait_until(lambda: [n["name"] for n in nb.nodes() if n["alive"]] == ["other"], 10)
    finally:
        nb.shutdown()


def test_bad_agent_flags_are_usage_errors(procs: Procs) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_labels(["novalue"])
    assert parse_labels(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    assert route_address("127.0.0.1:1") == "127.0.0.1"
    with pytest.raises(ValueError, match="cannot resolve"):
        route_address("no-such-host.invalid:1")


def test_nodes_needed_grows_gpu_pools_for_gpu_work_and_cpu_pools_for_cpu_work() -> None:
    cpu_work = [{"shape": {"CPU": 1.0}, "count": 10}]
    gpu_work = [{"shape": {"CPU": 1.0, "GPU": 1.0}, "count": 3}]
    cpu_pool, gpu_pool = {"CPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}
    assert nodes_needed(cpu_work, cpu_pool) == 3  # 10 CPUs over 4-CPU nodes
    assert nodes_needed(cpu_work, gpu_pool) == 0  # no GPU node for CPU work
    assert nodes_needed(gpu_work, gpu_pool) == 2
    assert nodes_needed(gpu_work, cpu_pool) == 0
    assert nodes_needed([{"shape": {"CPU": 16.0}, "count": 1}], cpu_pool) == 0  # never fits
    assert nodes_needed([{"shape": {"TPU": 1.0}, "count": 1}], cpu_pool) == 0
    assert nodes_needed([], gpu_pool) == 0


def test_durations_memory_and_walltime() -> None:
    assert parse_duration("5min") == 300 and parse_duration("2h") == 7200
    assert parse_duration("1:30:00") == 5400 and parse_duration(90) == 90.0
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")
    assert slurm_memory("32GB") == "32G" and slurm_memory("500MiB") == "500M"
    assert slurm_memory(4096) == "4096M"
    with pytest.raises(ValueError, match="memory"):
        slurm_memory("lots")
    assert slurm_time("2:00:00") == "2:00:00" and slurm_time("90min") == "1:30:00"
    assert slurm_time("1-00:00") == "1-00:00"


def test_shell_command_keeps_job_variables_expandable() -> None:
    line = shell_command(["python", "--label", "nbcluster.job=$SLURM_JOB_ID", "a b", "x;rm"])
    assert line == "python --label \"nbcluster.job=$SLURM_JOB_ID\" 'a b' 'x;rm'"


def test_loopback_and_magic_words() -> None:
    assert is_loopback("127.0.0.1:7711") and is_loopback("localhost:1")
    assert not is_loopback("10.1.2.3:7711")
    p = option_parser("%nbcluster scale")
    p.add_argument("kind")
    p.add_argument("n", type=int)
    ns, opts = parse_words(["slurm", "4", "--gpus", "1", "--walltime", "2:00:00"], p)
    assert (ns.kind, ns.n) == ("slurm", 4)
    assert opts == {"gpus": 1, "walltime": "2:00:00"}
    with pytest.raises(ValueError, match="--bogus"):
        parse_words(["slurm", "4", "--bogus"], p)
