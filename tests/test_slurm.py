"""``SlurmCluster`` against a real, local Slurm (``tests/slurm_local.py``: munged, slurmctld and
slurmd started by the test session; skipped with the reason where that cannot be done)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import nbcluster as nb
from nbcluster.deploy import JobState, PoolError, SlurmCluster
from tests.conftest import wait_until
from tests.slurm_local import LocalSlurm

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def driver(local_slurm: LocalSlurm) -> Iterator[nb.ClusterInfo]:
    """This process as a driver of a local cluster with one 1-CPU node (the pools add more)."""
    nb.shutdown()
    info = nb.init(num_cpus=1)
    yield info
    nb.shutdown()


def _pool(tmp_path: Path, **kw: object) -> SlurmCluster:
    kw.setdefault("head_timeout", 10)
    return SlurmCluster(poll_interval=0.3, workdir=tmp_path / "pool", **kw)  # type: ignore[arg-type]


@nb.remote
def where() -> tuple[str, str]:
    return os.environ.get("SLURM_JOB_ID", ""), nb.get_runtime_context().get_node_id()


def test_scale_up_run_tasks_scale_down_close(
    driver: nb.ClusterInfo, local_slurm: LocalSlurm, tmp_path: Path
) -> None:
    pool = _pool(tmp_path)
    script = pool.job_script()
    assert "#SBATCH --cpus-per-task=1" in script and "exec " in script
    pool.scale(2)
    joined = pool.wait_for_nodes(2, timeout=60)
    ids = {j.job_id for j in joined}
    assert ids <= set(local_slurm.jobs())
    by_node = {j.node_id: j.job_id for j in joined}
    # Tasks on each node report the Slurm job they run in.
    refs = [
        where.options(
            scheduling_strategy=nb.NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote()
        for node in by_node
    ]
    for job_id, node_id in nb.get(refs, timeout=60):
        assert by_node[node_id] == job_id
    # The secret is in no script, argument or environment of the jobs.
    secret = pool.secret()
    assert secret not in script
    assert secret not in (tmp_path / "pool" / "job.sh").read_text()
    agents = [
        p
        for p in psutil.process_iter(["cmdline", "environ"])
        if "nbcluster.agent" in " ".join(p.info["cmdline"] or [])
        and pool.pool_id in " ".join(p.info["cmdline"] or [])
    ]
    assert len(agents) == 2
    for p in agents:
        assert secret not in " ".join(p.info["cmdline"])
        assert secret not in "".join(f"{k}={v}" for k, v in (p.info["environ"] or {}).items())
    assert (tmp_path / "pool" / "token").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "pool").stat().st_mode & 0o777 == 0o700
    ps = subprocess.run(["ps", "axww", "-o", "args"], capture_output=True, text=True).stdout
    assert secret not in ps
    # Scale down: one job leaves squeue, its node leaves the cluster.
    pool.scale(1)
    wait_until(lambda: len(set(local_slurm.jobs()) & ids) == 1, timeout=30)
    gone = [j for j in pool.refresh() if j.state == JobState.GONE]
    assert len(gone) == 1 and gone[0].reason == "scaled down"
    wait_until(
        lambda: not any(n["alive"] for n in nb.nodes() if n["node_id"] == gone[0].node_id), 30
    )
    assert "running" in repr(pool) and gone[0].job_id in pool._repr_html_()
    pool.close()
    assert not set(local_slurm.jobs()) & ids
    assert all(j.state == JobState.GONE for j in pool.status())


def test_bad_partition_is_a_clear_error(driver: nb.ClusterInfo, tmp_path: Path) -> None:
    pool = _pool(tmp_path, partition="no-such-partition")
    with pytest.raises(PoolError) as e:
        pool.scale(1)
    msg = str(e.value)
    assert "no-such-partition" in msg.lower() or "invalid partition" in msg.lower(), msg
    assert pool.job_name in msg and "sbatch refused job 1 of 1" in msg
    pool.close()


def test_a_missing_sbatch_is_a_clear_error(driver: nb.ClusterInfo, tmp_path: Path) -> None:
    pool = _pool(tmp_path, sbatch=str(tmp_path / "no-such-sbatch"))
    with pytest.raises(PoolError) as e:
        pool.scale(1)
    msg = str(e.value)
    assert "no-such-sbatch" in msg and "not found" in msg and "sbatch=" in msg, msg
    assert all(j.state == JobState.GONE for j in pool.status()), pool.status()  # none left waiting
    pool.close()


def test_adapt_grows_from_zero_for_pending_work_and_shrinks_when_idle(
    driver: nb.ClusterInfo, local_slurm: LocalSlurm, tmp_path: Path
) -> None:
    pool = _pool(tmp_path, cpus=2)
    pool.adapt(minimum=0, maximum=2, idle_timeout=2)
    assert pool.status() == []  # no demand, no jobs

    @nb.remote(num_cpus=2)  # more than the driver's node has: only a pool node fits it
    def big() -> str:
        return os.environ.get("SLURM_JOB_ID", "")

    job = nb.get(big.remote(), timeout=90)
    assert job in {j.job_id for j in pool.status()}
    assert len(pool.status()) == 1  # one job for one task: no resubmitting while it waited
    wait_until(lambda: pool.status()[0].state == JobState.GONE, timeout=40, interval=0.3)
    assert pool.status()[0].reason.startswith("idle for")
    wait_until(lambda: job not in local_slurm.jobs(), timeout=30)
    pool.close()


def test_walltime_end_drains_the_node_and_loses_no_task(
    driver: nb.ClusterInfo, local_slurm: LocalSlurm, tmp_path: Path
) -> None:
    # 1 minute of walltime, the drain signal 50 s before its end: soon after the job starts.
    pool = _pool(tmp_path, walltime="1:00", signal_grace=50)
    assert "#SBATCH --signal=B:TERM@50" in pool.job_script()
    pool.scale(1)
    (job,) = pool.wait_for_nodes(1, timeout=60)

    @nb.remote(max_retries=0)
    def long_on_slurm() -> str:
        import time

        if os.environ.get("SLURM_JOB_ID"):
            time.sleep(300)  # ended by the drain: the task runs again on another node
        return nb.get_runtime_context().get_node_id()

    ref = long_on_slurm.options(
        scheduling_strategy=nb.NodeAffinitySchedulingStrategy(job.node_id, soft=True)
    ).remote()
    # Drained without counting a retry (max_retries=0): it finished on the driver's node.
    assert nb.get(ref, timeout=150) == driver.node_id
    wait_until(lambda: pool.refresh()[0].state == JobState.GONE, timeout=30)
    log = (tmp_path / "pool" / f"slurm-{job.job_id}.out").read_text()
    assert job.job_id not in local_slurm.jobs() or "COMPLETING" in log
    pool.close()


def test_killing_the_driver_ends_its_jobs_within_the_head_timeout(
    local_slurm: LocalSlurm, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        import nbcluster as nb
        from nbcluster.deploy import SlurmCluster
        nb.init(num_cpus=1)
        pool = SlurmCluster(head_timeout=4, poll_interval=0.3, workdir={str(tmp_path / "p")!r})
        pool.scale(1)
        (job,) = pool.wait_for_nodes(1, timeout=60)
        print(job.job_id, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip()
        assert job_id in local_slurm.jobs()
        # The driver and the local head it started, at once: no JOB_ENDED reaches the agent,
        # which must notice on its own that its head is gone.
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        proc.wait(10)
        t0 = time.monotonic()
        wait_until(lambda: job_id not in local_slurm.jobs(), timeout=30, interval=0.2)
        assert time.monotonic() - t0 < 4 + 10 + 5  # timeout + squeue's MinJobAge + slack
        log = (tmp_path / "p" / f"slurm-{job_id}.out").read_text()
        assert "no word from the head" in log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_server_pools_rest_and_kernel_magics(local_slurm: LocalSlurm, tmp_path: Path) -> None:
    """``c.NbclusterApp.pools``, the ``pools`` REST routes, and ``%nbcluster scale|pools`` in a
    kernel of that server, whose job ends when the kernel does."""
    from tests.jupyter_helpers import start_jupyter_server

    srv = start_jupyter_server(
        tmp_path / "srv",
        nbcluster={
            "num_cpus": 1,
            "num_gpus": 0,
            "pools": [{"kind": "slurm", "name": "cpu", "cpus": 1, "scale": 1}],
        },
        env={"NBCLUSTER_HOME": str(tmp_path / "home")},
    )
    try:

        def jobs(state: str) -> list[dict[str, object]]:
            (pool,) = srv.get("nbcluster/api/pools")["pools"]
            return [j for j in pool["jobs"] if j["state"] == state]

        wait_until(lambda: len(jobs("running")) == 1, timeout=60, interval=0.3)
        assert srv.post("nbcluster/api/pools/cpu/scale", {"n": 2})["ok"]
        wait_until(lambda: len(jobs("running")) == 2, timeout=60, interval=0.3)
        status, body = srv.request("POST", "nbcluster/api/pools/cpu/scale", {"n": -1})
        assert status == 400 and "n must be" in body["error"]
        status, body = srv.request("POST", "nbcluster/api/pools/nope/scale", {"n": 1})
        assert status == 404

        k = srv.start_kernel("pools.ipynb")
        r = k.execute("%load_ext nbcluster\n%nbcluster scale slurm 1 --cpus 1", timeout=60)
        r.raise_for_error()
        assert "slurm: scaling to 1 node(s)" in r.stdout
        r = k.execute(
            "pools = get_ipython().find_magic('nbcluster').__self__._pools\n"
            "pools.find('slurm').wait_for_nodes(1, timeout=60)\n"
            "%nbcluster pools",
            timeout=90,
        ).raise_for_error()
        assert "slurm (slurm): 1 running" in r.stdout, r.stdout
        kernel_job = r.stdout.split("\n")[1].split()[0]
        assert kernel_job in local_slurm.jobs()
        k.shutdown()  # its job ends with it (the head tells the agent its owner's job ended)
        wait_until(lambda: kernel_job not in local_slurm.jobs(), timeout=30, interval=0.3)

        # Adaptive with nothing to do: both idle nodes are released, down to the minimum.
        body = {"minimum": 0, "maximum": 2, "idle_timeout": 1}
        assert srv.post("nbcluster/api/pools/cpu/adapt", body)["pool"]["adaptive"]
        wait_until(lambda: not local_slurm.jobs(), timeout=30, interval=0.3)
        assert not jobs("running")
        assert srv.post("nbcluster/api/pools/cpu/scale", {"n": 0})["ok"]
    finally:
        srv.stop()
    assert not local_slurm.jobs()


def test_nbcluster_up_detached_jobs_end_when_their_head_is_gone(
    local_slurm: LocalSlurm, tmp_path: Path
) -> None:
    from tests.jupyter_helpers import free_port

    up_opts = ["--cpus", "1", "--head-timeout", "3"]
    port = free_port()
    env = {**os.environ, "NBCLUSTER_HOME": str(tmp_path / "home")}
    env.pop("NBCLUSTER_ADDRESS", None)
    token = tmp_path / "token"
    head = subprocess.Popen(
        [sys.executable, "-m", "nbcluster", "head", f"--port={port}", f"--token-file={token}"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert head.stdout is not None
        assert "head starting" in head.stdout.readline() + head.stdout.readline()
        args = ["--address", f"127.0.0.1:{port}", "--token-file", str(token)]
        r = subprocess.run(
            [sys.executable, "-m", "nbcluster", "up", "slurm", "--nodes", "1", *up_opts, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.splitlines()[-1].split()[0]
        assert "running" in r.stdout and job_id in local_slurm.jobs()  # detached: still there
        bad = subprocess.run(
            [sys.executable, "-m", "nbcluster", "up", "nope", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "unknown pool kind 'nope'" in bad.stderr
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(30)
    # The head stopped its nodes, or the agent gave up on it: the job ends either way.
    wait_until(lambda: job_id not in local_slurm.jobs(), timeout=30, interval=0.3)


def test_each_job_offers_only_the_gpus_slurm_gave_it(
    driver: nb.ClusterInfo,
    local_slurm: LocalSlurm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbcluster.testing import fake_nvml

    # The jobs inherit this environment (sbatch's default): NVML shows both of the node's GPUs.
    gpus = [{"name": f"GPU{i}", "memory_total": 1000} for i in range(2)]
    for k, v in fake_nvml.environment(gpus, tmp_path / "gpus.json").items():
        monkeypatch.setenv(k, v)
    pool = _pool(tmp_path, gpus=1)
    assert "#SBATCH --gres=gpu:1" in pool.job_script()
    pool.scale(2)
    joined = pool.wait_for_nodes(2, timeout=60)

    @nb.remote(num_gpus=1)
    def gpu_task() -> tuple[str, list[int], str]:
        return os.environ["SLURM_JOB_GPUS"], nb.get_gpu_ids(), os.environ["CUDA_VISIBLE_DEVICES"]

    seen = set()
    for j in joined:
        assert j.node_id is not None
        node = next(n for n in nb.nodes() if n["node_id"] == j.node_id)
        assert node["resources_total"]["GPU"] == 1
        strategy = nb.NodeAffinitySchedulingStrategy(j.node_id, soft=False)
        ref = gpu_task.options(scheduling_strategy=strategy).remote()
        given, ids, visible = nb.get(ref, timeout=60)
        assert ids == [int(given)] and visible == given  # the job's own GPU, nothing else
        assert [g["index"] for g in node["gpus"]] == [int(given)]
        seen.add(given)
    assert seen == {"0", "1"}
    pool.close()


def test_a_loopback_head_refuses_jobs_on_other_machines(
    driver: nb.ClusterInfo, local_slurm: LocalSlurm, tmp_path: Path
) -> None:
    pool = _pool(tmp_path, partition="remote")  # its one node is another machine
    with pytest.raises(nb.exceptions.ConfigurationError) as e:
        pool.scale(1)
    for fix in ("c.NbclusterApp.ip", "nbcluster head --host", "127.0.0.1"):
        assert fix in str(e.value)
    assert pool.status() == [] and not local_slurm.jobs()
    pool.close()


def test_a_job_that_fails_says_why_with_its_log(
    driver: nb.ClusterInfo, local_slurm: LocalSlurm, tmp_path: Path
) -> None:
    pool = _pool(tmp_path, python="/no/such/python")
    (job,) = pool.scale(1)
    with pytest.raises(PoolError) as e:
        pool.wait_for_nodes(1, timeout=60)
    msg = str(e.value)
    assert job.job_id in msg and "failed" in msg and "/no/such/python" in msg, msg
    (gone,) = pool.status()
    assert gone.state == JobState.GONE and "No such file" in gone.log_tail
    assert "/no/such/python" in pool._repr_html_()
    pool.close()
