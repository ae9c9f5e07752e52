"""SSHCluster against real OpenSSH servers in network namespaces (see tests/sshhosts.py).

The head and this driver sit on the bridge (SUBNET.1); hosts h1 and h2 each run an ``sshd``;
``h3`` is an ssh alias for an address where nothing answers. Agents are started by the real
``ssh`` client with the test's ssh_config (key, known_hosts, strict host key checking).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.deploy import JobState, PoolError
from nbcluster.deploy.registry import Pools
from nbcluster.deploy.ssh import SSHCluster
from nbcluster.exceptions import ConfigurationError
from nbcluster.scheduling import NodeAffinitySchedulingStrategy
from tests.conftest import wait_until
from tests.multinode import Procs
from tests.sshhosts import SSHHosts, namespaces_unavailable, ssh_hosts, sshd_unavailable

# The first test may install openssh-server with apt (fresh CI machine): more than the default.
pytestmark = pytest.mark.timeout(400)

#: The tree under test, for the hosts' Python (the namespaces share this filesystem).
TREE = str(Path(nb.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHHosts]:
    why = namespaces_unavailable() or sshd_unavailable()
    if why:
        pytest.skip(why)
    with ssh_hosts(tmp_path_factory.mktemp("ssh"), ["h1", "h2"], unreachable=["h3"]) as h:
        yield h


@pytest.fixture
def head(hosts: SSHHosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Procs]:
    nb.shutdown()
    # The driver's own socket (objects it owns) must be reachable from the hosts too.
    monkeypatch.setenv("NBCLUSTER_BIND_HOST", hosts.net.head_ip)
    procs = Procs(tmp_path, host=hosts.net.head_ip)
    try:
        procs.start_head()
        nb.init(address=procs.address, token_file=str(procs.token_file))
        yield procs
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()
        for h in hosts.net.hosts:  # nothing a test started may outlive it
            wait_until(lambda h=h: not hosts.session_pids(h), timeout=15)


def make_pool(hosts: SSHHosts, tmp_path: Path, names: list[str], **kw: Any) -> SSHCluster:
    options: dict[str, Any] = {
        "python": sys.executable,
        "ssh_config": hosts.config,
        "setup": [f"export PYTHONPATH={TREE}"],
        "cpus": 1,
        "workdir": tmp_path / "pool",
        "poll_interval": 0.2,
    }
    options.update(kw)
    return SSHCluster(names, **options)


@nb.remote
def where() -> tuple[str, int, str]:
    """The node, the network namespace (inode) and the SSH connection this task runs in."""
    return (
        nb.get_runtime_context().get_node_id(),
        os.stat("/proc/self/ns/net").st_ino,
        os.environ.get("SSH_CONNECTION", ""),
    )


def netns_inode(hosts: SSHHosts, host: str) -> int:
    return os.stat(f"/run/netns/{hosts.net.ns(host)}").st_ino


def gone(pool: SSHCluster, job_id: str) -> bool:
    return any(j.job_id == job_id and j.state == JobState.GONE for j in pool.refresh())


def test_two_hosts_join_run_tasks_scale_down_and_close(
    hosts: SSHHosts, head: Procs, tmp_path: Path
) -> None:
    pool = make_pool(hosts, tmp_path, ["h1", "h2"])
    try:
        pool.scale(2)
        jobs = {j.host: j for j in pool.wait_for_nodes(2, timeout=60)}
        assert set(jobs) == {"h1", "h2"}
        for host, job in jobs.items():
            assert job.node_id
            strategy = NodeAffinitySchedulingStrategy(job.node_id, soft=False)
            node, inode, conn = nb.get(
                where.options(scheduling_strategy=strategy).remote(), timeout=60
            )
            assert node == job.node_id
            assert inode == netns_inode(hosts, host)  # it ran in that host's namespace
            assert conn.split()[2] == hosts.net.hosts[host]  # through its SSH session
        # The secret is nowhere in the process list of the hosts (the ssh clients included).
        ps = hosts.ssh("h1", "ps -eww -o args")
        assert ps.returncode == 0 and "nbcluster.agent" in ps.stdout
        assert current.require()._token not in ps.stdout
        assert "--token-stdin" in ps.stdout

        # Scale down: one session closes, its agent drains and exits, nothing left there.
        pool.scale(1)
        stopped = next(j for j in pool.status() if j.stop_requested)
        kept = next(j for j in pool.status() if not j.stop_requested)
        wait_until(lambda: gone(pool, stopped.job_id), timeout=30)
        wait_until(lambda: not hosts.session_pids(stopped.host), timeout=15)
        assert hosts.session_pids(kept.host)  # the other host still runs its agent
        assert {n["node_id"] for n in nb.nodes() if n["alive"]} == {kept.node_id}
        assert nb.get(where.remote(), timeout=60)[0] == kept.node_id
    finally:
        pool.close(timeout=30)
    assert all(j.state == JobState.GONE for j in pool.status())
    for host in ("h1", "h2"):
        wait_until(lambda host=host: not hosts.session_pids(host), timeout=15)
    assert not any(n["alive"] for n in nb.nodes())


def test_unreachable_host_fails_alone_and_names_itself(
    hosts: SSHHosts, head: Procs, tmp_path: Path
) -> None:
    pool = make_pool(hosts, tmp_path, ["h3", "h1"], connect_timeout=5)
    try:
        pool.scale(2)
        joined = pool.wait_for_nodes(1, timeout=60)
        assert [j.host for j in joined] == ["h1"]
        failed = next(j for j in pool.status() if j.host == "h3")
        wait_until(lambda: gone(pool, failed.job_id), timeout=30)
        failed = next(j for j in pool.status() if j.host == "h3")
        assert failed.reason.startswith("host h3: ssh could not start the session")
        assert "No route to host" in failed.reason or "timed out" in failed.reason
        assert "h3" in pool.summary()
        assert nb.get(where.remote(), timeout=60)[0] == joined[0].node_id
    finally:
        pool.close(timeout=30)


@pytest.mark.parametrize("case", ["no-python", "no-nbcluster", "other-version"])
def test_a_host_that_cannot_run_the_agent_says_why(
    hosts: SSHHosts, head: Procs, tmp_path: Path, case: str
) -> None:
    python, setup = sys.executable, [f"export PYTHONPATH={TREE}"]
    if case == "no-python":
        python = "/nonexistent/bin/python3"
        expect = "host h2: no Python /nonexistent/bin/python3 on this host"
    elif case == "no-nbcluster":
        if not os.path.exists("/usr/bin/python3"):
            pytest.skip("no system Python at /usr/bin/python3")
        python, setup = "/usr/bin/python3", []
        expect = "host h2: nbcluster is not importable by /usr/bin/python3"
    else:
        other = tmp_path / "other" / "nbcluster"
        other.mkdir(parents=True)
        (other / "__init__.py").write_text('__version__ = "0.0.1-other"\n')
        setup = [f"export PYTHONPATH={other.parent}"]
        expect = f"host h2: nbcluster 0.0.1-other is installed for {python}, but this cluster runs"
    pool = make_pool(hosts, tmp_path, ["h2"], python=python, setup=setup)
    try:
        (job,) = pool.scale(1)
        wait_until(lambda: gone(pool, job.job_id), timeout=30)
        (job,) = pool.status()
        assert job.reason.startswith(expect), job.reason
        assert job.node_id is None
        with pytest.raises(PoolError, match="h2"):
            pool.wait_for_nodes(1, timeout=5)
    finally:
        pool.close(timeout=30)


def test_agent_ends_with_its_ssh_session(hosts: SSHHosts, head: Procs, tmp_path: Path) -> None:
    """Killing the ssh client (as a crash of this process would) ends the remote agent."""
    pool = make_pool(hosts, tmp_path, ["h1"])
    try:
        (job,) = pool.scale(1)
        (joined,) = pool.wait_for_nodes(1, timeout=60)
        proc = pool._sessions[job.job_id]._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        wait_until(lambda: not hosts.session_pids("h1"), timeout=20)
        wait_until(
            lambda: not any(n["alive"] for n in nb.nodes() if n["node_id"] == joined.node_id),
            timeout=15,
        )
        wait_until(lambda: gone(pool, job.job_id), timeout=15)
    finally:
        pool.close(timeout=30)


def test_a_loopback_head_is_refused_for_other_hosts_and_bad_hosts_lists(
    tmp_path: Path,
) -> None:
    nb.shutdown()
    nb.init(num_cpus=1)  # a local cluster: its head listens on 127.0.0.1
    try:
        pool = SSHCluster(["gpu1"], workdir=tmp_path / "pool")
        with pytest.raises(ConfigurationError, match=r"127\.0\.0\.1.*loopback.*NbclusterApp\.ip"):
            pool.scale(1)
        assert pool.status() == []  # nothing was started
        pool.close()
        # Hosts that are this machine may use a loopback head.
        local = SSHCluster(["localhost", "me@127.0.0.1"], workdir=tmp_path / "pool2")
        assert not local._leaves_this_host()
        local.close()
        for bad in ([], ["gpu1", "gpu1"], ["-oProxyCommand=x"], ["two words"]):
            with pytest.raises(ValueError):
                SSHCluster(bad)
    finally:
        nb.shutdown()


def test_a_pool_from_the_servers_settings(hosts: SSHHosts, head: Procs, tmp_path: Path) -> None:
    """``c.NbclusterApp.pools = [{"kind": "ssh", ...}]`` and ``%nbcluster scale ssh 0``."""
    pools = Pools()
    pool = pools.from_config(
        {
            "kind": "ssh",
            "name": "boxes",
            "hosts": ["h2"],
            "python": sys.executable,
            "ssh_config": str(hosts.config),
            "setup": [f"export PYTHONPATH={TREE}"],
            "cpus": 1,
            "workdir": str(tmp_path / "pool"),
            "scale": 1,
        }
    )
    assert isinstance(pool, SSHCluster) and pools.find("boxes") is pool
    (job,) = pool.wait_for_nodes(1, timeout=60)
    assert job.host == "h2" and "boxes (ssh): 1 running" in pools.summary()
    pools.scale("ssh", 0, {"name": "boxes"})
    assert pools.find("boxes") is None
    wait_until(lambda: not hosts.session_pids("h2"), timeout=30)


def test_adapt_grows_on_a_pending_task_and_releases_idle_hosts(
    hosts: SSHHosts, head: Procs, tmp_path: Path
) -> None:
    pool = make_pool(hosts, tmp_path, ["h1", "h2"])
    try:
        pool.adapt(minimum=0, maximum=2, idle_timeout=2)
        assert pool.status() == []  # no demand, no hosts
        # The head has no node at all: the task waits, and the pool grows for it.
        node, inode, _ = nb.get(where.remote(), timeout=90)
        # The pool learns the job's node from the head on its next look.
        (job,) = wait_until(lambda: [j for j in pool.refresh() if j.node_id == node], timeout=15)
        assert inode == netns_inode(hosts, job.host)
        assert len([j for j in pool.status() if j.state != JobState.GONE]) == 1
        # Idle for 2 s: drained and released.
        wait_until(lambda: gone(pool, job.job_id), timeout=30)
        assert pool.status()[0].reason == "idle for 2 s"
        wait_until(lambda: not hosts.session_pids(job.host), timeout=15)
    finally:
        pool.close(timeout=30)


def test_an_agent_cut_off_from_its_head_exits_after_head_timeout(
    hosts: SSHHosts, head: Procs, tmp_path: Path
) -> None:
    pool = make_pool(hosts, tmp_path, ["h1"], head_timeout=3)
    try:
        (job,) = pool.scale(1)
        pool.wait_for_nodes(1, timeout=60)

        def agent_running() -> bool:
            return any(
                "nbcluster.agent" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
                for pid in hosts.session_pids("h1")
                if Path(f"/proc/{pid}/cmdline").exists()
            )

        assert agent_running()
        hosts.net.cut("h1")
        try:
            wait_until(lambda: not agent_running(), timeout=20)  # 3 s without its head
        finally:
            hosts.net.heal("h1")
        wait_until(lambda: gone(pool, job.job_id), timeout=60)
        (ended,) = pool.status()
        assert "no word from the head" in ended.reason, ended.reason
    finally:
        pool.close(timeout=30)
