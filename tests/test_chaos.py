"""Chaos: SIGKILL workers, agents and the head under load, kill actors, cut a host's link; every
result must be exact, nothing may hang, nothing may leak.

The harness is :mod:`nbcluster.testing.chaos` (``benchmarks/chaos.py`` is its long run). Each
case prints its seed; replay a failure's schedule with ``NBCLUSTER_CHAOS_SEED=<seed>``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from nbcluster.testing.chaos import SEED_ENV, ChaosConfig, ChaosReport, run_chaos, seed_from_env
from nbcluster.testing.cluster import ProcessCluster
from tests.conftest import wait_until
from tests.test_netns import Net, net  # noqa: F401  (the fixture, reused)

SEED = seed_from_env()

# Realistic rates: a fault every few seconds, on 3 nodes of 2 CPUs (the driver's node included).
# item_timeout_s: the longest one result may take; a node taken for dead needs 5 s of silence to be
# noticed (nbcluster.head.heartbeat).
CASES: dict[str, dict[str, Any]] = {
    "worker": {"faults": ("worker",), "duration_s": 8.0, "interval_s": 1.5, "item_timeout_s": 20},
    "actor_kill": {
        "faults": ("actor_kill",),
        "duration_s": 5.0,
        "interval_s": 1.5,
        "item_timeout_s": 20,
    },
    "agent": {"faults": ("agent",), "duration_s": 10.0, "interval_s": 2.0, "item_timeout_s": 30},
    "head": {"faults": ("head",), "duration_s": 8.0, "interval_s": 2.5, "item_timeout_s": 30},
    # One node, as in local mode: no other node's activity wakes the scheduler up.
    "worker_burst": {
        "faults": ("worker_burst",),
        "duration_s": 5.0,
        "interval_s": 2.0,
        "item_timeout_s": 20,
        "nodes": 1,
    },
}


def _check(report: ChaosReport) -> None:
    print(report.format())
    assert report.faults, f"no fault was injected ({SEED_ENV}={report.seed})"
    assert sum(report.done.values()) >= 20, report.format()
    problems = report.violations()
    assert not problems, f"{SEED_ENV}={report.seed}\n{report.format()}"


@pytest.mark.parametrize("kind", list(CASES))
def test_chaos(kind: str, tmp_path: Path) -> None:
    print(f"chaos {kind}: seed {SEED} (replay: {SEED_ENV}={SEED})")
    config = ChaosConfig(seed=SEED, drain_s=45.0, **CASES[kind])
    _check(run_chaos(config, tmp_path))


def test_chaos_link_cut_and_heal(
    net: Net,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hosts in network namespaces; their links are cut (shorter and longer than the 5 s after
    which a node is taken for dead) and healed."""
    print(f"chaos link: seed {SEED} (replay: {SEED_ENV}={SEED})")
    # The driver's own socket (objects it owns) must be reachable from the hosts.
    monkeypatch.setenv("NBCLUSTER_BIND_HOST", net.head_ip)

    def layout(cluster: ProcessCluster) -> list[str]:
        for host, addr in net.hosts.items():
            flags = ("--num-cpus", "2", "--prestart", "1", "--bind-host", addr)
            cluster.join(host, *flags, prefix=tuple(net.netns(host)))
        return []

    config = ChaosConfig(
        seed=SEED,
        faults=("link",),
        duration_s=12.0,
        interval_s=2.0,
        link_cut_s=(2.0, 13.0),
        driver_reads_big=False,  # the driver's host has no node (no store) here
        item_timeout_s=40.0,
        drain_s=60.0,
    )
    try:
        report = run_chaos(config, tmp_path, layout=layout, link=net, host=net.head_ip)
    finally:
        for host in net.hosts:
            net.heal(host)
    _check(report)


def test_seed_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SEED_ENV, "1234")
    assert seed_from_env() == 1234
    monkeypatch.delenv(SEED_ENV)
    assert 1 <= seed_from_env() < 2**31  # a fresh one, printed by each case
    with pytest.raises(ValueError, match="unknown fault kind"):
        ChaosConfig(faults=("meteor",))


def test_driver_holding_a_locality_lease_rejoins_a_restarted_head(tmp_path: Path) -> None:
    """Found by the head chaos case (seed 1054245520), made deterministic: the head restarts
    while a task that reads a stored argument runs, then restarts once more."""
    import socket

    import nbcluster as nb
    from nbcluster.testing.chaos_workload import chaos_big, chaos_consume, chaos_small, digest
    from nbcluster.testing.chaos_workload import payload as expected

    nb.shutdown()
    cluster = ProcessCluster(tmp_path)
    runs = str(tmp_path / "runs")
    try:
        cluster.start_head()
        cluster.join(socket.gethostname(), "--num-cpus", "2", "--prestart", "1")
        nb.init(address=cluster.address, token_file=str(cluster.token_file))
        big = chaos_big.remote(runs, 1, 1, 2 << 20, 0.0)
        assert nb.wait([big], timeout=30)[0]
        slow = chaos_consume.remote(runs, 2, big, 3.0)  # leased under the class (CPU, @store)
        wait_until(lambda: "consume:2" in Path(runs).read_text(), 30)
        for _ in range(2):
            cluster.kill_head()
            cluster.start_head()
            time.sleep(1.0)  # the driver notices the restart on its next heartbeat
        assert nb.get(slow, timeout=15) == digest(expected(1, 1, 2 << 20))
        assert nb.get(chaos_small.remote(runs, 1, 3, 0.0), timeout=15) == digest(
            expected(1, 3, 4096)
        )
        again = chaos_consume.remote(runs, 4, big)
        assert nb.get(again, timeout=15) == digest(expected(1, 1, 2 << 20))
    except BaseException:
        print(cluster.log_tail(4000))
        raise
    finally:
        nb.shutdown()
        cluster.close()
        assert not cluster.leaks()
